"""Tests of moe_adapt.recipes.adapter_experts (issue #11 recipes 1 and 2).

- config validation: the presets are valid; one ValueError naming each bad field;
- the tiny preset through the CLI, end to end (one subprocess on 1 CPU device, shared by
  the module): every variant of both recipes on the held-out domain, parameter counts;
- the stacked-adapter map (`expert_outputs`) equals a Python loop over the experts;
- the weight-space soups use no target label: permuting the held-out domain's labels
  leaves every selection unchanged;
- `greedy_members` against a NumPy reference of similarity + FSD.
The refactor of meta_dmoe (`train_from_features`, `evaluate_with`) is covered by the
unchanged tests/methods/test_meta_dmoe.py and tests/test_main.py.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.methods import adapter_harness as ft
from moe_adapt.methods import adapter_soup as soup_lib
from moe_adapt.recipes import adapter_experts as ae
from tests.methods import configs_util

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = configs_util.config_module("recipes/adapter_experts")
ARG = "digits_rot,tiny"
VARIANTS = (
  "erm",
  "expert_average",
  "aggregator_head",
  "aggregator_pretrained",
  "meta_unadapted",
  "meta_dmoe",
  "soup_uniform",
  "soup_ties_50",
  "soup_task_arithmetic",
  "soup_ties",
  "soup_ties_member",
  "soup_dare",
  "soup_dare_ties",
  "soup_breadcrumbs",
  "soup_greedy_1",
  "soup_greedy_2",
  "best_single_oracle",
  "expert_0",
  "expert_1",
)


def tiny_config(**overrides):
  # One device: the CLI subprocess and the in-process checks share the workdir's stages.
  return configs_util.with_overrides(CONFIGS.get_config(ARG), num_devices=1, **overrides)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("arg", ["digits_rot", "fmnist_shift", "fmnist_rot", ARG])
def test_presets_are_valid(arg):
  config = CONFIGS.get_config(arg)
  ae.validate_config(config)
  assert config.method == "adapter_experts"
  assert config.vit.options.hidden_size == config.model.options.feature_dim


def test_presets_keep_meta_dmoe_fields():
  # Same data, domains, student, aggregator and meta-training as the full-network preset.
  ours, theirs = (
    CONFIGS.get_config("fmnist_shift"),
    configs_util.config_module("meta_dmoe").get_config("fmnist_shift"),
  )
  for group in ("data", "model", "aggregator", "student", "meta", "adapt"):
    assert ours[group].to_dict() == theirs[group].to_dict(), group
  assert ours.experts.num_experts == theirs.experts.num_experts


@pytest.mark.parametrize(
  "name, value, match",
  [
    ("adapter.kind", "adamix", r"adapter\.kind='adamix' is unknown; accepted: pfeiffer"),
    ("adapter.bottleneck", 0, r"adapter: bottleneck=0"),
    ("vit.options.num_heads", 3, r"vit\.options=.* is invalid: ViT: hidden_size=16"),
    ("vit.dropout", 1.5, r"vit\.dropout=1\.5 is invalid"),
    ("pretrain.steps", 0, r"pretrain\.steps=0 is invalid; accepted: an integer >= 1"),
    ("train.weight_decay", -1.0, r"train\.weight_decay=-1\.0 is invalid"),
    ("soup.ties_densities", (0.0,), r"soup\.ties_densities=\(0\.0,\) is invalid"),
    ("soup.ties_densities", (0.5, 0.5), r"soup\.ties_densities=.* distinct"),
    ("soup.greedy_sizes", (3,), r"soup\.greedy_sizes=\(3,\) is invalid; .*\[1, experts"),
    ("soup.num_samples", 0, r"soup\.num_samples=0 is invalid"),
    ("timing_steps", 0, r"timing_steps=0 is invalid"),
    ("meta.distill", "nope", r"meta\.distill='nope' is unknown"),  # meta_dmoe's checks
  ],
)
def test_bad_fields_are_named(name, value, match):
  with pytest.raises(ValueError, match=match):
    ae.validate_config(tiny_config(**{name: value}))


def test_vit_width_must_match_the_student():
  config = tiny_config(**{"vit.options.hidden_size": 32, "vit.options.mlp_dim": 64})
  ae.validate_config(config)  # a valid ViT on its own
  with pytest.raises(ValueError, match=r"vit\.options\.hidden_size=32 must equal .*\(16"):
    ae.make_setup(config)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The tiny preset through the CLI: (workdir, results)."""
  workdir = tmp_path_factory.mktemp("adapter_experts") / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [
    sys.executable,
    "-m",
    "moe_adapt.main",
    f"--config=configs/recipes/adapter_experts.py:{ARG}",
    "--config.num_devices=1",
    f"--workdir={workdir}",
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def restored(cli_run):
  """(setup, experts) restored in-process from the CLI run's finished stages."""
  workdir, _ = cli_run
  setup = ae.make_setup(tiny_config())
  return setup, ae.train_experts(setup, str(workdir), None, time_steps=False)


@pytest.mark.slow
def test_cli_run_reports_both_recipes(cli_run):
  workdir, results = cli_run
  assert results["method"] == "adapter_experts"
  assert results["target_domains"] == ["rot75"]
  assert set(VARIANTS) <= set(results["metrics"])
  for variant, per_domain in results["metrics"].items():
    for domain in ("rot75", "mean"):
      assert 0.0 <= per_domain[domain]["accuracy"] <= 1.0, variant
  metrics = results["metrics"]
  singles = [metrics[f"expert_{k}"]["rot75"]["accuracy"] for k in range(2)]
  assert metrics["best_single_oracle"]["rot75"]["accuracy"] == max(singles)
  # One checkpoint folder per stage of both recipes.
  stages = {p.name for p in (workdir / "checkpoints").iterdir()}
  assert {"backbone", "adapter_0", "adapter_1", "aggregator", "student", "meta"} <= stages
  assert results["meta_step_ms"]["median"] > 0
  draws = results["selections"]["rot75"]
  assert len(draws) == 1 and sorted(draws[0]["order"]) == [0, 1]
  # The merge family's λ / density, chosen on the source validation images, from the grids.
  grids = soup_lib.merge_candidates(tiny_config())
  assert set(results["selection"]) == {f"soup_{m}" for m in grids}
  for method, grid in grids.items():
    chosen = dict(results["selection"][f"soup_{method}"])
    assert 0.0 <= chosen.pop("source_val_accuracy") <= 1.0 and chosen in grid


@pytest.mark.slow
def test_param_counts_come_from_the_trees(cli_run, restored):
  _, results = cli_run
  setup, experts = restored
  p = results["params"]
  a = p["adapter_experts"]
  n = setup.num_experts
  assert a["total"] == a["backbone"] + n * (a["adapters_per_expert"] + a["head_per_expert"])
  leaves = jax.tree.leaves((experts.base, experts.stacked))
  assert a["total"] == sum(x.size for x in leaves)
  # The full-network expert is meta_dmoe's CNN classifier.
  sample = jnp.zeros((1, *setup.meta.benchmark.input_shape))
  cnn = setup.meta.model.init(jax.random.key(0), sample)["params"]
  assert p["full_network_experts"]["total"] == n * sum(x.size for x in jax.tree.leaves(cnn))


@pytest.mark.slow
def test_stacked_map_equals_a_loop_over_experts(restored):
  setup, experts = restored
  x = setup.harness.task.test["rot75"].inputs[0][:37]  # not a multiple of the batch
  feats, logits = ae.expert_outputs(experts, x, batch_size=16)
  assert feats.shape == (setup.num_experts, 37, 16)
  assert logits.shape == (setup.num_experts, 37, 10)
  ex = ft.Examples((x,), np.zeros(len(x), np.int32))
  for k in range(setup.num_experts):
    params = experts.params(jax.tree.map(lambda a, k=k: a[k], experts.stacked))
    want_f = ft.embed(setup.harness, experts.model, params, ex)
    want_l = ft.predict_logits(experts.model, params, ex, batch_size=16)
    np.testing.assert_allclose(feats[k], want_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[k], want_l, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_soup_selection_uses_no_target_labels(cli_run, restored):
  _, results = cli_run
  setup, experts = restored
  metrics, selections, outcomes, _ = ae.weight_space(setup, experts)
  for got, want in zip(selections["rot75"], results["selections"]["rot75"], strict=True):
    assert got["order"] == want["order"]
    np.testing.assert_allclose(got["similarity"], want["similarity"], rtol=1e-5)
  for variant in ("soup_uniform", "soup_greedy_2", "expert_0"):
    assert metrics[variant]["rot75"] == results["metrics"][variant]["rot75"]
  # Per-example outcomes: written for every single-model variant, averaged ones have none.
  assert outcomes == {v: results["per_example"][v] for v in outcomes}
  assert "soup_greedy_2" not in outcomes
  for variant in ("soup_uniform", "expert_0", "best_single_oracle"):
    entry = outcomes[variant]["rot75"]
    assert np.mean(entry["correct"]) == metrics[variant]["rot75"]["accuracy"]
    np.testing.assert_array_equal(entry["correct"], np.equal(entry["pred"], entry["label"]))

  # Permute the held-out domain's labels in every split: accuracies may move, the chosen
  # members may not.
  rng = np.random.default_rng(0)
  splits = dict(setup.meta.splits)
  target = splits["rot75"]
  splits["rot75"] = target._replace(
    **{
      s: getattr(target, s)._replace(y=rng.permutation(getattr(target, s).y))
      for s in target._fields
    }
  )
  permuted = dataclasses.replace(setup, meta=dataclasses.replace(setup.meta, splits=splits))
  metrics_p, selections_p, _, _ = ae.weight_space(permuted, experts)
  assert selections_p == selections
  assert metrics_p["soup_uniform"]["rot75"] != metrics["soup_uniform"]["rot75"]


# ----------------------------------------------------------------------------- greedy


def _np_fsd(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean(((a > 0) & (b < 0)) | ((a < 0) & (b > 0))))


def test_greedy_members_matches_a_numpy_reference():
  rng = np.random.default_rng(3)
  n, dim = 5, 8
  weights = rng.normal(size=(n, 40)).astype(np.float32)
  adapters = {"a": jnp.asarray(weights[:, :30]), "b": jnp.asarray(weights[:, 30:])}
  candidates = [rng.normal(size=(6, dim)) + 2.0 * (i == 3) for i in range(n)]
  target = rng.normal(size=(4, dim)) + 2.0

  def unit_mean(e):
    return np.mean(e / np.linalg.norm(e, axis=1, keepdims=True), axis=0)

  scores = [float(unit_mean(c) @ unit_mean(target)) for c in candidates]
  want = [int(np.argmax(scores))]
  while len(want) < 4:
    soup = weights[want].mean(0)
    rest = [j for j in range(n) if j not in want]
    want.append(min(rest, key=lambda j: (_np_fsd(soup, weights[j]), j)))
  got, got_scores = ae.greedy_members(target, candidates, adapters, max_size=4)
  assert got == want and want[0] == 3
  np.testing.assert_allclose(got_scores, scores, rtol=1e-6)
  with pytest.raises(ValueError, match=r"max_size=6 is invalid; accepted: an integer in \[1, 5\]"):
    ae.greedy_members(target, candidates, adapters, max_size=6)
