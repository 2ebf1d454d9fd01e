"""In-process tests of moe_adapt.methods.meta_dmoe (the end-to-end CLI runs are in test_main.py).

- config validation and the data-dependent checks of `make_setup`: one ValueError naming the
  offending field for every bad input;
- the super-domain partition (hypothesis);
- the expert step and the second-order meta-step give the same losses and parameters on a
  1-device and an 8-device data-parallel mesh (tests/conftest.py fakes 8 CPU devices);
- the seed reaches the data, the partition, the initialisation and the sampled batches.

The step builders take the optimiser as an argument; the equality tests pass plain SGD so
that parameters after a step differ exactly by lr × (gradient difference) (Adam would turn
a float-rounding-level gradient into a full-size update wherever a gradient is ~0).
"""

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_adapt import models
from moe_adapt.methods import meta_dmoe
from moe_adapt.models import backbone_io
from moe_adapt.train import mesh as mesh_lib
from tests.methods import configs_util

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 2  # steps of each builder compared across meshes
RTOL, ATOL = 1e-4, 1e-6


CONFIGS = configs_util.config_module("meta_dmoe")


def tiny_config(arg: str = "digits_rot,tiny", **overrides) -> ml_collections.ConfigDict:
  """The config of `arg` with dotted-key overrides, e.g. `**{"meta.distill": "x"}`."""
  return configs_util.with_overrides(CONFIGS.get_config(arg), **overrides)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "arg", ["digits_rot", "digits_rot,tiny", "fmnist_rot", "fmnist_rot,tiny", "fmnist_shift"]
)
def test_presets_are_valid(arg):
  meta_dmoe.validate_config(CONFIGS.get_config(arg))


def test_aggregator_lr_zero_is_accepted():
  # A frozen aggregator during meta-training is a legitimate ablation.
  meta_dmoe.validate_config(tiny_config(**{"meta.aggregator_lr": 0.0}))


@pytest.mark.parametrize(
  "name, value, match",
  [
    ("meta.distill", "nope", r"meta\.distill='nope' is unknown; accepted: features, logits, both"),
    ("aggregator.kind", "sum", r"aggregator\.kind='sum' is unknown; accepted: transformer, mean"),
    ("experts.stack_map", "pmap", r"experts\.stack_map='pmap' is unknown; accepted: auto, "),
    ("experts.lr", -1e-3, r"experts\.lr=-0\.001 is invalid; accepted: a number > 0"),
    ("student.lr", 0.0, r"student\.lr=0\.0 is invalid"),
    ("meta.inner_lr", -1.0, r"meta\.inner_lr=-1\.0 is invalid"),
    ("meta.student_lr", -1.0, r"meta\.student_lr=-1\.0 is invalid"),
    (
      "meta.aggregator_lr",
      -1e-5,
      r"meta\.aggregator_lr=-1e-05 is invalid; accepted: a number >= 0",
    ),
    ("aggregator.lr", -2.0, r"aggregator\.lr=-2\.0 is invalid"),
    ("seed", -1, r"seed=-1 is invalid; accepted: an integer >= 0"),
    ("experts.num_experts", 0, r"experts\.num_experts=0 is invalid; accepted: an integer >= 1"),
    ("experts.steps", 0, r"experts\.steps=0 is invalid"),
    ("meta.support_size", 0, r"meta\.support_size=0 is invalid"),
    ("meta.inner_steps", -1, r"meta\.inner_steps=-1 is invalid"),
    ("adapt.repeats", 0, r"adapt\.repeats=0 is invalid"),
    ("checkpoint_every", 0, r"checkpoint_every=0 is invalid"),
    ("num_devices", -1, r"num_devices=-1 is invalid"),
  ],
)
def test_validate_config_names_the_bad_field(name, value, match):
  with pytest.raises(ValueError, match=match):
    meta_dmoe.validate_config(tiny_config(**{name: value}))


def test_unknown_benchmark_in_the_config_argument():
  with pytest.raises(
    ValueError, match=r"benchmark='nope' is unknown; accepted: digits_rot, fmnist"
  ):
    CONFIGS.get_config("nope")
  with pytest.raises(ValueError, match=r"flags \['huge'\] are unknown; accepted: tiny"):
    CONFIGS.get_config("digits_rot,huge")


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"data.benchmark": "nope"}, r"benchmark='nope' is unknown; accepted: .*digits_rot"),
    ({"data.target_domains": ("rot99",)}, r"target_domains has unknown domain\(s\) \['rot99'\]"),
    (
      {"data.source_domains": ("rot0", "rot75"), "data.target_domains": ("rot75",)},
      r"target_domains \['rot75'\] are also in source_domains",
    ),
    ({"experts.num_experts": 6}, r"experts\.num_experts=6 exceeds .* accepted: 1\.\.5"),
    (
      {"data.source_domains": ("rot0", "rot15"), "experts.num_experts": 3},
      r"experts\.num_experts=3 exceeds the number of source domains \(2: rot0, rot15\)",
    ),
    ({"adapt.support_size": 5000}, r"adapt\.support_size=5000 exceeds target domain 'rot75'"),
    (
      {"meta.support_size": 200, "meta.query_size": 100},
      r"meta\.support_size \+ meta\.query_size = 300 exceeds the smallest source domain",
    ),
    ({"num_devices": 9}, r"num_devices=9 exceeds the 8 available"),
  ],
)
def test_make_setup_names_the_bad_field(overrides, match):
  config = tiny_config(**overrides)
  meta_dmoe.validate_config(config)  # Data-dependent: only make_setup can tell.
  with pytest.raises(ValueError, match=match):
    meta_dmoe.make_setup(config)


def test_missing_fashion_mnist_files_name_data_dir(tmp_path):
  config = tiny_config("fmnist_rot,tiny")
  config.data.options.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=rf"data_dir='{tmp_path}' does not hold the Fashion-MNIST"):
    meta_dmoe.make_setup(config)


# ----------------------------------------------------------------------------- partition


@settings(max_examples=50, deadline=None)
@given(data=st.data(), num_sources=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_partition_is_a_balanced_deterministic_partition(data, num_sources, seed):
  num_experts = data.draw(st.integers(1, num_sources))
  sources = tuple(f"d{i}" for i in range(num_sources))
  groups = meta_dmoe.partition_domains(sources, num_experts, seed)
  assert len(groups) == num_experts
  assert sorted(d for g in groups for d in g) == sorted(sources)  # each domain exactly once
  sizes = [len(g) for g in groups]
  assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
  for g in groups:  # within a group, the source order is kept
    assert list(g) == sorted(g, key=sources.index)
  assert meta_dmoe.partition_domains(sources, num_experts, seed) == groups


# ----------------------------------------------------------------------------- setups and steps


@pytest.fixture(scope="module")
def setups():
  """make_setup of the tiny digits config: seed 0 on 1 and 8 devices, seed 1 on 1 device."""
  out = {}
  for seed, num_devices in ((0, 1), (0, 8), (1, 1)):
    out[seed, num_devices] = meta_dmoe.make_setup(tiny_config(seed=seed, num_devices=num_devices))
  return out


def _on_mesh(tree, setup):
  """A device copy of a host pytree, replicated over the setup's mesh (donation-safe)."""
  return jax.device_put(tree, mesh_lib.replicated(setup.mesh))


def _expert_run(setup, tx, initial):
  """Losses of STEPS expert steps from the host state `initial`, and the final host state."""
  step_fn = meta_dmoe.make_expert_step(setup, tx)
  state, losses = _on_mesh(initial, setup), []
  for i in range(STEPS):
    state, metrics = step_fn(state, jnp.asarray(i, jnp.int32))
    losses.append(np.asarray(metrics["loss"]))
  return np.stack(losses), jax.device_get(state)


@pytest.fixture(scope="module")
def expert_runs(setups):
  tx = optax.sgd(0.1)
  initial = jax.device_get(meta_dmoe.init_experts(setups[0, 1], tx))
  runs = {nd: _expert_run(setups[0, nd], tx, initial) for nd in (1, 8)}
  return initial, runs


def _meta_initial_state(setup, tx_s, tx_a):
  """Host meta state: the student and aggregator at their initialisation."""
  sample = jnp.zeros((1, *setup.benchmark.input_shape), jnp.float32)
  variables = setup.model.init(jax.random.fold_in(setup.key("init"), 1), sample, train=False)
  tokens = jnp.zeros((1, setup.num_experts, setup.config.model.options.feature_dim), jnp.float32)
  agg = setup.agg_model.init(setup.key("init"), tokens)["params"]
  return jax.device_get(
    {
      "student": variables["params"],
      "aggregator": agg,
      "batch_stats": variables["batch_stats"],
      "opt_student": tx_s.init(variables["params"]),
      "opt_aggregator": tx_a.init(agg),
    }
  )


@pytest.fixture(scope="module")
def meta_runs(setups):
  tx_s, tx_a = optax.sgd(0.1), optax.sgd(0.1)
  s1 = setups[0, 1]
  initial = _meta_initial_state(s1, tx_s, tx_a)
  # Frozen expert features [E, N_src, D]: any fixed values exercise the step.
  feats = (
    np.random.default_rng(0)
    .normal(size=(s1.num_experts, s1.x.shape[0], s1.config.model.options.feature_dim))
    .astype(np.float32)
  )
  runs = {}
  for nd in (1, 8):
    setup = setups[0, nd]
    step_fn = meta_dmoe.make_meta_step(setup, tx_s, tx_a, _on_mesh(feats, setup))
    state, metrics = _on_mesh(initial, setup), []
    for i in range(STEPS):
      state, m = step_fn(state, jnp.asarray(i, jnp.int32))
      metrics.append(jax.device_get(m))
    runs[nd] = metrics, jax.device_get(state)
  return initial, runs


def _assert_trees_close(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


def test_setups_place_the_same_data_on_either_mesh(setups):
  one, eight = setups[0, 1], setups[0, 8]
  assert one.mesh.size == 1 and eight.mesh.size == 8
  assert eight.x.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(one.x), np.asarray(eight.x))
  np.testing.assert_array_equal(np.asarray(one.y), np.asarray(eight.y))
  np.testing.assert_array_equal(np.asarray(one.expert_pools), np.asarray(eight.expert_pools))
  assert one.super_domains == eight.super_domains


def test_setup_shapes_and_pools(setups):
  setup = setups[0, 1]
  assert setup.sources == ("rot0", "rot15", "rot30", "rot45", "rot60")
  assert setup.targets == ("rot75",)
  n = sum(len(setup.splits[d].train.y) for d in setup.sources)
  assert setup.x.shape == (n, 16, 16, 1) and setup.y.shape == (n,)
  pools, sizes = np.asarray(setup.expert_pools), np.asarray(setup.pool_sizes)
  assert pools.shape == (2, sizes.max())
  # Each expert's pool holds exactly the training examples of its super-domain's domains.
  offsets = np.cumsum([0] + [len(setup.splits[d].train.y) for d in setup.sources])
  for k, group in enumerate(setup.super_domains):
    expected = np.concatenate(
      [np.arange(offsets[i], offsets[i + 1]) for i, d in enumerate(setup.sources) if d in group]
    )
    np.testing.assert_array_equal(np.sort(pools[k, : sizes[k]]), expected)
    for d in group:
      assert int(setup.expert_of_domain[setup.sources.index(d)]) == k


def test_expert_step_is_the_same_on_1_and_8_devices(expert_runs):
  initial, runs = expert_runs
  (losses1, state1), (losses8, state8) = runs[1], runs[8]
  assert np.all(np.isfinite(losses1))
  np.testing.assert_allclose(losses8, losses1, rtol=RTOL)
  _assert_trees_close(state8, state1)
  # The steps did update every expert (a no-op step would pass the comparison trivially).
  w0 = jax.tree.leaves(initial["params"])
  w1 = jax.tree.leaves(state1["params"])
  assert all(a.shape[0] == 2 for a in w1)  # stacked: [E, ...]
  moved = [np.abs(b - a).reshape(2, -1).max(axis=1) for a, b in zip(w0, w1)]
  assert np.all(np.max(moved, axis=0) > 0), "some expert was not updated"


@pytest.mark.parametrize("stack_map", ["map", "vmap"])
def test_expert_step_is_the_same_for_every_stack_map(expert_runs, stack_map):
  # 'auto' (the other runs) is the unrolled scan on CPU; every choice computes the same.
  initial, runs = expert_runs
  setup = meta_dmoe.make_setup(tiny_config(num_devices=1, **{"experts.stack_map": stack_map}))
  losses, state = _expert_run(setup, optax.sgd(0.1), initial)
  np.testing.assert_allclose(losses, runs[1][0], rtol=RTOL)
  _assert_trees_close(state, runs[1][1])


def test_meta_step_is_the_same_on_1_and_8_devices(meta_runs):
  initial, runs = meta_runs
  (metrics1, state1), (metrics8, state8) = runs[1], runs[8]
  for m1, m8 in zip(metrics1, metrics8):
    assert np.isfinite(m1["loss"])
    # The outer CE reaches the aggregator only through the inner distillation step
    # (second order): a zero norm would mean that path is cut.
    assert m1["grad_norm_aggregator"] > 0
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=RTOL)
    np.testing.assert_allclose(m8["grad_norm_aggregator"], m1["grad_norm_aggregator"], rtol=1e-3)
  _assert_trees_close(state8, state1)
  # BatchNorm statistics are frozen in meta-training.
  _assert_trees_close(state1["batch_stats"], initial["batch_stats"])
  changed = jax.tree.map(lambda a, b: np.any(a != b), initial["aggregator"], state1["aggregator"])
  assert any(jax.tree.leaves(changed)), "the aggregator was not updated"


# ----------------------------------------------------------------------------- seeds


def test_seed_changes_data_partition_init_and_batches(setups, expert_runs):
  s0, s1 = setups[0, 1], setups[1, 1]
  assert s0.super_domains != s1.super_domains
  assert not np.array_equal(np.asarray(s0.x), np.asarray(s1.x))
  tx = optax.sgd(0.1)
  init0 = jax.device_get(meta_dmoe.init_experts(s0, tx))
  init1 = jax.device_get(meta_dmoe.init_experts(s1, tx))
  _, runs = expert_runs
  # Same seed: the same initialisation as the one the 1-device run started from.
  _assert_trees_close(init0, expert_runs[0])
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(init0["params"]), jax.tree.leaves(init1["params"]))
  )
  # Same initial state, other seed: other batches, hence another first loss.
  losses_seed1, _ = _expert_run(s1, tx, init0)
  assert losses_seed1[0] != runs[1][0][0]


# ----------------------------------------------------------------------------- premises


@pytest.mark.parametrize(
  "name", ["model.shared_init", "meta.mask_in_domain_expert", "meta.first_order", "meta.remat"]
)
@pytest.mark.parametrize("value", ["yes", 1, 0])
def test_non_boolean_switches_are_rejected_naming_the_field(name, value):
  # The mask was read by truthiness: 'no' (a non-empty string) switched masking on.
  # A config built in Python without type safety (the CLI's overrides keep a field's type).
  config = ml_collections.ConfigDict(tiny_config().to_dict(), type_safe=False)
  config = configs_util.with_overrides(config, **{name: value})
  match = re.escape(f"{name}={value!r} is invalid; accepted: True or False")
  with pytest.raises(ValueError, match=match):
    meta_dmoe.validate_config(config)


@pytest.mark.parametrize(
  "name, value, match",
  [
    ("selection.inner_lr_factors", (), r"selection\.inner_lr_factors=\(\) is invalid"),
    ("selection.inner_lr_factors", (1.0, 0.0), r"accepted: a non-empty tuple of numbers > 0"),
    ("selection.meta_checkpoints", 9, r"selection\.meta_checkpoints=9 exceeds meta\.steps=4"),
    ("meta.lr_decay", 1.5, r"meta\.lr_decay=1\.5 is invalid; accepted: a number in \(0, 1\]"),
    ("meta.logits_weight", -1.0, r"meta\.logits_weight=-1\.0 is invalid"),
    ("meta.inner_lr_dim", 0, r"meta\.inner_lr_dim=0 is invalid"),
    ("backbone.steps", 0, r"backbone\.steps=0 is invalid"),
    ("backbone.checkpoint", None, r"backbone\.checkpoint=None is invalid; accepted: a path"),
  ],
)
def test_premise_fields_are_validated(name, value, match):
  with pytest.raises(ValueError, match=match):
    meta_dmoe.validate_config(tiny_config(**{name: value}))


def test_inner_lr_grows_with_the_feature_size():
  config = tiny_config(**{"meta.inner_lr": 3e-4, "meta.inner_lr_dim": 2048})
  assert meta_dmoe.inner_lr(config, 2048) == pytest.approx(3e-4)
  assert meta_dmoe.inner_lr(config, 128) == pytest.approx(3e-4 / 16)


def test_experts_and_student_start_from_the_one_backbone(setups):
  setup, tx = setups[0, 1], optax.adam(1e-3)
  backbone = jax.device_get(meta_dmoe.init_model(setup, jax.random.key(7)))
  experts = jax.device_get(meta_dmoe.init_experts(setup, tx, backbone))
  student = jax.device_get(meta_dmoe.init_student(setup, tx, backbone))
  for k in range(setup.num_experts):
    expert_k = {p: jax.tree.map(lambda a, k=k: a[k], experts[p]) for p in ("params", "batch_stats")}
    for part in ("params", "batch_stats"):
      for a, b in zip(jax.tree.leaves(expert_k[part]), jax.tree.leaves(backbone[part])):
        np.testing.assert_array_equal(a, b)
  for part in ("params", "batch_stats"):
    for a, b in zip(jax.tree.leaves(student[part]), jax.tree.leaves(backbone[part])):
      np.testing.assert_array_equal(a, b)
  # The ablation: independent initialisations, no two experts alike.
  independent = jax.device_get(meta_dmoe.init_experts(setup, tx))
  kernels = [a for a in jax.tree.leaves(independent["params"]) if a.ndim > 2]
  assert not np.array_equal(kernels[0][0], kernels[0][1])


def test_backbone_checkpoint_round_trip_and_shape_check(setups, tmp_path):
  setup = setups[0, 1]
  variables = jax.device_get(meta_dmoe.init_model(setup, jax.random.key(1)))
  path = str(tmp_path / "backbone.msgpack")
  backbone_io.save_backbone(path, variables)
  template = jax.device_get(meta_dmoe.init_model(setup, jax.random.key(2)))
  loaded = backbone_io.load_backbone(path, template)
  _assert_trees_close(loaded, variables)

  # A model of another width: the first parameter (in the model's order) whose shape
  # differs is named, with both shapes.
  other = models.Classifier(
    backbone=models.get_backbone("convnet", width=4, feature_dim=16), num_classes=10
  )
  sample = jnp.zeros((1, *setup.benchmark.input_shape))
  other_vars = dict(other.init(jax.random.key(0), sample, train=False))
  want = backbone_io._flat_shapes(other_vars)
  got = backbone_io._flat_shapes(variables)
  first = next(n for n in want if got.get(n) != want[n])
  with pytest.raises(
    ValueError,
    match=rf"parameter '{re.escape(first)}' has shape {re.escape(str(got[first]))}, "
    rf"the model expects {re.escape(str(want[first]))}",
  ):
    backbone_io.load_backbone(path, other_vars)
  with pytest.raises(ValueError, match=r"backbone\.checkpoint='.*nope' does not exist"):
    backbone_io.load_backbone(str(tmp_path / "nope"), template)


def _inner_inputs(setup):
  student = jax.device_get(meta_dmoe.init_model(setup, jax.random.key(0)))
  d = setup.config.model.options.feature_dim
  tokens = jax.random.normal(jax.random.key(1), (8, setup.num_experts, d))
  agg = setup.agg_model.init(jax.random.key(2), tokens[:1])["params"]
  return student, agg, np.asarray(setup.x[:8]), tokens


@pytest.mark.parametrize("distill", ["features", "logits", "both"])
def test_the_inner_step_adapts_only_the_feature_extractor(setups, distill):
  setup = dataclasses.replace(
    setups[0, 1], config=tiny_config(**{"meta.distill": distill, "meta.inner_lr": 1.0})
  )
  student, agg, xs, tokens = _inner_inputs(setup)
  adapt = meta_dmoe.make_adapt_fn(setup)
  adapted = jax.device_get(adapt(student["params"], student["batch_stats"], agg, xs, tokens))
  _assert_trees_close(adapted["head"], student["params"]["head"])  # the head: no inner step
  moved = [
    np.abs(a - b).max()
    for a, b in zip(
      jax.tree.leaves(adapted["backbone"]), jax.tree.leaves(student["params"]["backbone"])
    )
  ]
  assert max(moved) > 0, "the feature extractor was not adapted"


def test_a_target_given_in_the_batch_replaces_the_aggregated_feature(setups):
  setup = setups[0, 1]
  student, agg, xs, tokens = _inner_inputs(setup)
  inner_loss, _ = meta_dmoe.make_losses(setup)
  mask = jnp.ones((setup.num_experts,), bool)
  batch = {"x": xs, "tokens": tokens, "mask": mask, "batch_stats": student["batch_stats"]}
  context = {"aggregator": agg, "head": student["params"]["head"]}
  target = setup.agg_model.apply(
    {"params": agg}, tokens, mask, method=models.AggregatorClassifier.aggregate
  )
  theta = student["params"]["backbone"]
  np.testing.assert_allclose(
    inner_loss(theta, {**batch, "target": target}, context),
    inner_loss(theta, batch, context),
    rtol=1e-6,
  )
  zeros = inner_loss(theta, {**batch, "target": jnp.zeros_like(target)}, context)
  assert not np.isclose(zeros, inner_loss(theta, batch, context))


@pytest.mark.slow
def test_run_reports_selection_and_paired_per_example_outcomes(tmp_path):
  # One device and two steps per stage: what is asserted is the results' shape, not the
  # learning (the 8-device equality of the steps is tested above).
  steps = ("backbone", "experts", "student", "meta")
  overrides = {f"{stage}.steps": 2 for stage in steps}
  overrides.update({"aggregator.pretrain_steps": 2, "selection.meta_checkpoints": 2})
  config = tiny_config(num_devices=1, **overrides)
  setup = meta_dmoe.make_setup(config)
  results = meta_dmoe.run(config, str(tmp_path), setup=setup)
  n = len(meta_dmoe.whole_domain(setup.splits["rot75"])[1])
  assert set(results["per_example"]) == set(results["metrics"])
  for variant, per_domain in results["per_example"].items():
    correct = per_domain["rot75"]["correct"]
    assert len(correct) == n and set(correct) <= {0, 1}, variant
    if "correct_draws" not in per_domain["rot75"]:
      assert np.mean(correct) == pytest.approx(results["metrics"][variant]["rot75"]["accuracy"])
  chosen = results["selection"]["meta_dmoe"]
  assert chosen["checkpoint_step"] in (1, 2)
  assert chosen["inner_lr_factor"] in config.selection.inner_lr_factors
  assert results["selection"]["erm_continued"]["checkpoint_step"] in (1, 2)
  assert (tmp_path / "backbone.msgpack").exists()
