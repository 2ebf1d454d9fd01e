"""Tests of moe_adapt.methods.co_tuning and configs/co_tuning.py.

- End to end through the CLI (`python -m moe_adapt.main --config=configs/co_tuning.py:
  fmnist,tiny`): results.json with the four variants, the source head's ECE before and
  after calibration, the relationships (values and heat-map PNGs); a second run with
  another seed and sampling rate reuses the `source` stage from the stage cache.
- Bad inputs, each one ValueError naming the field: sampling rate outside (0, 1], a target
  class left without examples, an unknown relationship kind or variant, a missing source
  checkpoint (the `cub` preset), classes and domains the benchmark does not have.
- The pieces against NumPy: class selection and stratified subsampling, the optimiser's
  per-group learning rates, step decay and weight decay, the L2-SP penalty of the shared
  fine-tuning step, the relationship diagnostic and the checkpoint format.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from moe_adapt import data
from moe_adapt.methods import co_tuning, co_tuning_data, co_tuning_finetune
from moe_adapt.train import mesh as mesh_lib
from tests.methods import configs_util
from tests.subprocess_util import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
VARIANTS = ("fine_tune", "l2_sp", "co_tuning_direct", "co_tuning_reverse")
RUN_TIMEOUT_S = 600


CONFIGS = configs_util.config_module("co_tuning")


def tiny_config(arg: str = "fmnist,tiny", **overrides) -> ml_collections.ConfigDict:
  """The config of `arg` with dotted-key overrides, e.g. `**{"data.sampling_rate": 0.5}`."""
  return configs_util.with_overrides(CONFIGS.get_config(arg), **overrides)


# ----------------------------------------------------------------------------- the CLI


def _env(compilation_cache: pathlib.Path) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(1)
  env["JAX_PLATFORMS"] = "cpu"
  # The second run compiles the same programs: it reads them back.
  env["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  return env


def cli(args, workdir, tmp: pathlib.Path, *, timeout=RUN_TIMEOUT_S):
  return subprocess.run(
    [sys.executable, "-m", "moe_adapt.main", *args, f"--workdir={workdir}"],
    cwd=REPO,
    env=_env(tmp / "jax_cache"),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two tiny CLI runs sharing a stage cache: (seed 0, rate 1) then (seed 1, rate 0.5)."""
  tmp = tmp_path_factory.mktemp("co_tuning_cli")
  cache = tmp / "stage_cache"
  out = {}
  for name, seed, rate in (("first", 0, 1.0), ("second", 1, 0.5)):
    workdir = tmp / name
    proc = cli(
      [
        "--config=configs/co_tuning.py:fmnist,tiny",
        f"--config.seed={seed}",
        f"--config.data.sampling_rate={rate}",
        f"--config.stage_cache={cache}",
      ],
      workdir,
      tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out[name] = workdir
  return out


def _results(workdir) -> dict:
  return json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
def test_cli_run_reports_every_variant(runs):
  results = _results(runs["first"])
  assert results["method"] == "co_tuning"
  assert results["target_domains"] == ["rot45"] and results["source_domains"] == ["rot0"]
  assert results["target_classes"] == ["Dress", "Coat", "Shirt", "Ankle boot"]
  assert set(results["metrics"]) == set(VARIANTS)
  test_size = results["num_examples"]["target_test"]
  for variant in VARIANTS:
    per_domain = results["metrics"][variant]
    acc = per_domain["rot45"]["accuracy"]
    assert 0.0 <= acc <= 1.0 and per_domain["mean"]["accuracy"] == acc
    assert round(acc * test_size) == pytest.approx(acc * test_size, abs=1e-6)  # k / N
    assert 0.0 <= per_domain["rot45"]["ece"] <= 1.0
  configs_util.check_per_example(results, VARIANTS)
  # Tiny preset: a pool of 10 training + at most 4 validation images per target class, of
  # which round(0.2 · n_c) per class are held out for validation; all the rest at rate 1.
  pool = results["num_examples"]["target_train"] + results["num_examples"]["target_val"]
  assert 44 <= pool <= 56
  assert 8 <= results["num_examples"]["target_val"] <= 12


@pytest.mark.slow
def test_cli_run_logs_every_choice_made_on_validation(runs):
  results = _results(runs["first"])
  selection, tried = results["selection"], results["selection_candidates"]
  config = tiny_config()
  for variant in VARIANTS:
    grid = co_tuning.candidates(config, variant)
    assert [{k: c[k] for k in grid[0]} for c in tried[variant]] == grid
    best = max(c["val_accuracy"] for c in tried[variant])
    # The first candidate with the best validation accuracy, and what the metrics report.
    assert selection[variant] == next(c for c in tried[variant] if c["val_accuracy"] == best)
    assert results["metrics"][variant]["rot45"]["val_accuracy"] == pytest.approx(best)
  reverse = selection["relationship_reverse"]
  assert reverse["C"] in co_tuning.core.category_mapping.DEFAULT_L2_GRID
  assert reverse["temperature"] > 0 and 0 <= reverse["val_accuracy"] <= 1


@pytest.mark.slow
def test_cli_run_reports_source_calibration(runs):
  cal = _results(runs["first"])["source_calibration"]
  assert cal["fitted"] is True
  assert 0.05 <= cal["temperature"] <= 20.0
  for key in ("ece_before", "ece_after", "accuracy"):
    assert 0.0 <= cal[key] <= 1.0
  assert np.isfinite(cal["nll_before"]) and np.isfinite(cal["nll_after"])
  assert "rot0 val" in cal["fitted_on"] and "rot0 test" in cal["measured_on"]


@pytest.mark.slow
def test_cli_run_saves_relationships_and_heatmaps(runs):
  results = _results(runs["first"])
  for kind in ("direct", "reverse"):
    info = results["relationships"][kind]
    matrix = np.asarray(info["matrix"])
    assert matrix.shape == (4, 6)  # [C_t, C_s]
    assert np.all(matrix >= 0)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-4)
    png = runs["first"] / info["heatmap"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.0 <= info["source_head_accuracy_on_target_val"] <= 1.0
    assert 1 / 6 - 1e-6 <= info["mean_row_max"] <= 1.0
    assert 0.0 <= info["mean_row_entropy"] <= info["max_entropy"] == pytest.approx(np.log(6))


@pytest.mark.slow
def test_second_run_reuses_the_source_stage(runs):
  first, second = _results(runs["first"]), _results(runs["second"])
  stages = {json.loads(line)["stage"] for line in open(runs["second"] / "metrics.jsonl")}
  assert "source" not in stages  # not trained again ...
  config = tiny_config()
  grid = {
    co_tuning.candidate_stage(v, c) for v in VARIANTS for c in co_tuning.candidates(config, v)
  }
  assert grid <= stages  # every candidate of every variant trained
  assert (runs["second"] / "checkpoints" / "source").is_dir()  # ... but copied in
  # The same source model: the same calibration, although seed and rate differ.
  assert second["source_calibration"] == first["source_calibration"]
  # round(0.5 · n_c) of the 8–12 training images per class left after the hold-out.
  assert 16 <= second["num_examples"]["target_train"] <= 24


def test_cli_names_the_missing_source_checkpoint(tmp_path):
  proc = cli(["--config=configs/co_tuning.py:cub"], tmp_path / "cub", tmp_path, timeout=120)
  assert proc.returncode == 2
  assert "model.source_checkpoint is empty" in proc.stderr
  assert not (tmp_path / "cub").exists()  # nothing written for a bad command


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("arg", ["fmnist", "fmnist,tiny", "news", "news,tiny"])
def test_presets_are_valid(arg):
  co_tuning.validate_config(CONFIGS.get_config(arg))


def test_cub_preset_builds_and_needs_a_checkpoint(tmp_path):
  config = CONFIGS.get_config("cub")
  assert config.model.backbone == "resnet50" and config.data.benchmark == "tfds"
  assert config.data.options.tfds_name == "caltech_birds2011"
  with pytest.raises(ValueError, match=r"model\.source_checkpoint is empty"):
    co_tuning.validate_config(config)
  missing = tmp_path / "resnet50.npz"
  config.model.source_checkpoint = str(missing)
  # A file in the project's layout does not say its number of classes (a directory does).
  with pytest.raises(ValueError, match=r"model\.num_source_classes=0 is invalid"):
    co_tuning.validate_config(config)
  config.model.num_source_classes = 1000
  co_tuning.validate_config(config)  # a path is given; whether it exists is data-dependent
  with pytest.raises(ValueError, match=rf"model\.source_checkpoint='{missing}' does not exist"):
    co_tuning.make_setup(config)


def test_config_argument_errors():
  with pytest.raises(ValueError, match=r"preset='nope' is unknown; accepted: fmnist, news, cub"):
    CONFIGS.get_config("nope")
  with pytest.raises(ValueError, match=r"flags \['huge'\] are unknown; accepted: tiny"):
    CONFIGS.get_config("fmnist,huge")


def test_sweep_declares_the_sampling_rates():
  assert CONFIGS.get_sweep("fmnist") == [{"data.sampling_rate": r} for r in (0.15, 0.3, 0.5, 1.0)]
  for overrides in CONFIGS.get_sweep("fmnist"):
    co_tuning.validate_config(tiny_config(**overrides))


@pytest.mark.parametrize(
  "name, value, match",
  [
    ("data.sampling_rate", 0.0, r"data\.sampling_rate=0\.0 is invalid; accepted: .* \(0, 1\]"),
    ("data.sampling_rate", 1.5, r"data\.sampling_rate=1\.5 is invalid"),
    ("data.sampling_rate", -0.2, r"data\.sampling_rate=-0\.2 is invalid"),
    (
      "variants",
      ("fine_tune", "co_tuning_cosine"),
      r"relationship kind 'cosine' is unknown; accepted kinds: direct, reverse",
    ),
    ("variants", ("erm",), r"variants has unknown 'erm'; accepted: fine_tune, l2_sp"),
    ("variants", (), r"variants=\(\) is invalid"),
    ("variants", ("l2_sp", "l2_sp"), r"lists a variant twice"),
    (
      "variants",
      ("l2_sp", "co_tuning_direct"),
      r"variants=\('l2_sp', 'co_tuning_direct'\) compares 2 variants without 'fine_tune'",
    ),
    ("co_tuning.trade_off", -1.0, r"co_tuning\.trade_off=-1\.0 is invalid"),
    ("l2_sp.alpha", -0.01, r"l2_sp\.alpha=-0\.01 is invalid"),
    ("finetune.momentum", 1.0, r"finetune\.momentum=1\.0 is invalid; accepted: .*\[0, 1\)"),
    ("finetune.lr", 0.0, r"finetune\.lr=0\.0 is invalid"),
    ("finetune.lr_decay_at", 0.0, r"finetune\.lr_decay_at=0\.0 is invalid"),
    ("finetune.steps", 0, r"finetune\.steps=0 is invalid; accepted: an integer >= 1"),
    ("data.target_classes", (3, 3), r"data\.target_classes=\(3, 3\) lists a class twice"),
    ("data.source_classes", (0, -1), r"data\.source_classes=\(0, -1\) is invalid"),
    ("seed", -1, r"seed=-1 is invalid; accepted: an integer >= 0"),
    ("calibration.num_bins", 0, r"calibration\.num_bins=0 is invalid"),
    ("model.source_checkpoint", "model.pt", r"model\.source_checkpoint='model\.pt' is invalid"),
    ("data.val_fraction", 1.0, r"data\.val_fraction=1\.0 is invalid"),
    ("data.val_fraction", 0.0, r"data\.val_fraction=0\.0 is invalid"),
    ("selection.lr_grid", (0.01, 0.0), r"selection\.lr_grid=\(0\.01, 0\.0\) is invalid"),
    ("selection.trade_off_grid", (1.0, 1.0), r"selection\.trade_off_grid=.* lists a value twice"),
    ("selection.alpha_grid", (-0.1,), r"selection\.alpha_grid=\(-0\.1,\) is invalid"),
  ],
)
def test_validate_config_names_the_bad_field(name, value, match):
  with pytest.raises(ValueError, match=match):
    co_tuning.validate_config(tiny_config(**{name: value}))


def test_a_single_variant_needs_no_baseline():
  co_tuning.validate_config(tiny_config(variants=("co_tuning_direct",)))
  co_tuning.validate_config(tiny_config(variants=("co_tuning_reverse", "fine_tune")))


def test_calibration_without_source_data_needs_a_temperature(tmp_path):
  config = tiny_config(
    **{
      "data.source_domain": "",
      "model.source_checkpoint": str(tmp_path / "x.npz"),
      "model.num_source_classes": 6,
    }
  )
  with pytest.raises(ValueError, match=r"calibration\.temperature=0 \(fit on held-out"):
    co_tuning.validate_config(config)


@pytest.mark.parametrize(
  "overrides, match",
  [
    # 10 training images per class × 0.01 rounds to 0: the class would be empty.
    (
      {"data.sampling_rate": 0.01},
      r"data\.sampling_rate=0\.01 leaves target class 'Dress' with no training example",
    ),
    ({"data.target_classes": (3, 12)}, r"data\.target_classes has class\(es\) \[12\] beyond"),
    ({"data.target_domain": "rot99"}, r"data\.target_domain='rot99' is not a domain"),
    (
      {"data.target_domain": "rot0", "data.target_classes": (0, 3)},
      r"both 'rot0' and data\.source_classes and data\.target_classes share class\(es\) \[0\]",
    ),
  ],
)
def test_make_setup_names_the_bad_field(overrides, match):
  config = tiny_config(**overrides)
  co_tuning.validate_config(config)  # data-dependent: only make_setup can tell
  with pytest.raises(ValueError, match=match):
    co_tuning.make_setup(config)


# ----------------------------------------------------------------------------- data pieces


def _split(labels) -> data.Split:
  y = np.asarray(labels, np.int32)
  x = np.arange(len(y), dtype=np.float32).reshape(-1, 1, 1, 1)  # x identifies the example
  return data.Split(x, y)


def test_select_classes_relabels_in_the_given_order():
  split = _split([5, 1, 7, 1, 5, 2])
  out = co_tuning_data.select_classes(split, (5, 1), where="test")
  np.testing.assert_array_equal(out.y, [0, 1, 1, 0])
  np.testing.assert_array_equal(out.x.ravel(), [0, 1, 3, 4])


def test_select_classes_names_an_empty_class():
  with pytest.raises(ValueError, match=r"target domain 'd' \(train split\) has no example of"):
    co_tuning_data.select_classes(
      _split([0, 0, 1]), (0, 2), where="target domain 'd' (train split)"
    )


def test_cap_and_subsample_are_stratified_and_seeded():
  y = np.repeat(np.arange(3), [20, 30, 10])
  split = _split(np.random.default_rng(0).permutation(y))
  capped = co_tuning_data.cap_per_class(split, 3, 12)
  np.testing.assert_array_equal(np.bincount(capped.y), [12, 12, 10])
  for c in range(3):  # the first 12 of each class, in split order
    np.testing.assert_array_equal(capped.x[capped.y == c], split.x[split.y == c][:12])
  names = ("a", "b", "c")
  sub = co_tuning_data.subsample(
    capped, 0.5, np.random.default_rng(1), class_names=names, where="t", allow_empty=False
  )
  np.testing.assert_array_equal(np.bincount(sub.y), [6, 6, 5])  # round(0.5 · n_c)
  assert set(sub.x.ravel()) <= set(capped.x.ravel())
  again = co_tuning_data.subsample(
    capped, 0.5, np.random.default_rng(1), class_names=names, where="t", allow_empty=False
  )
  np.testing.assert_array_equal(again.x, sub.x)
  other = co_tuning_data.subsample(
    capped, 0.5, np.random.default_rng(2), class_names=names, where="t", allow_empty=False
  )
  assert not np.array_equal(other.x, sub.x)
  empty = co_tuning_data.subsample(
    capped, 0.01, np.random.default_rng(1), class_names=names, where="t", allow_empty=True
  )
  assert len(empty.y) == 0


# ----------------------------------------------------------------------------- optimiser


def test_optimizer_group_learning_rates_decay_and_weight_decay():
  config = tiny_config(**{"finetune.steps": 10, "finetune.lr_decay_at": 0.5})
  cfg = config.finetune
  tx = co_tuning.make_optimizer(config)
  params = {
    "backbone": {"w": jnp.full((3,), 2.0)},
    "source_head": {"w": jnp.full((2,), 2.0)},
    "target_head": {"w": jnp.full((2,), 2.0)},
  }
  grads = jax.tree.map(jnp.ones_like, params)
  state = co_tuning_finetune.set_weight_decay(tx.init(params), 0.0)
  momentum = cfg.momentum
  trace = 0.0
  for step in range(7):
    updates, state = tx.update(grads, state, params)
    # Nesterov SGD with g = 1: trace_t = g + μ·trace_{t−1}; update = −lr·(g + μ·trace_t).
    trace = 1.0 + momentum * trace
    lr = cfg.lr * (cfg.lr_decay if step >= 5 else 1.0)
    expected = -lr * (1.0 + momentum * trace)
    np.testing.assert_allclose(updates["backbone"]["w"], expected, rtol=1e-5)
    np.testing.assert_allclose(updates["source_head"]["w"], expected, rtol=1e-5)
    np.testing.assert_allclose(updates["target_head"]["w"], cfg.head_lr_mult * expected, rtol=1e-5)
  # Weight decay adds wd·w to the gradient (first step: −lr·(1 + μ)·(g + wd·w)).
  state = co_tuning_finetune.set_weight_decay(tx.init(params), 0.5)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(
    updates["backbone"]["w"], -cfg.lr * (1 + momentum) * (1.0 + 0.5 * 2.0), rtol=1e-5
  )


def test_variant_settings():
  config = tiny_config()
  ft = co_tuning_finetune.variant_settings(config, "fine_tune")
  assert ft["trade_off"] == ft["l2sp_alpha"] == ft["l2sp_beta"] == 0.0
  assert ft["weight_decay"] == 5e-4 and ft["relationship"] is None
  sp = co_tuning_finetune.variant_settings(config, "l2_sp")
  assert (sp["l2sp_alpha"], sp["l2sp_beta"], sp["weight_decay"]) == (0.01, 0.01, 0.0)
  ct = co_tuning_finetune.variant_settings(config, "co_tuning_reverse")
  assert ct["trade_off"] == 2.3 and ct["relationship"] == "reverse"
  assert ft["lr_scale"] == sp["lr_scale"] == ct["lr_scale"] == 1.0
  lr = config.finetune.lr
  ct = co_tuning_finetune.variant_settings(
    config, "co_tuning_direct", {"lr": 2 * lr, "trade_off": 0.5}
  )
  assert (ct["trade_off"], ct["lr_scale"]) == (0.5, pytest.approx(2.0))
  sp = co_tuning_finetune.variant_settings(config, "l2_sp", {"lr": lr, "alpha": 0.2})
  assert (sp["l2sp_alpha"], sp["l2sp_beta"], sp["lr_scale"]) == (0.2, 0.01, 1.0)


def test_candidates_share_the_learning_rate_grid():
  config = tiny_config(
    **{
      "selection.lr_grid": (0.01, 0.1),
      "selection.trade_off_grid": (1.0, 2.3),
      "selection.alpha_grid": (),
    }
  )
  assert co_tuning.candidates(config, "fine_tune") == [{"lr": 0.01}, {"lr": 0.1}]
  assert co_tuning.candidates(config, "l2_sp") == [
    {"lr": 0.01, "alpha": 0.01},  # () = the configured l2_sp.alpha
    {"lr": 0.1, "alpha": 0.01},
  ]
  grid = co_tuning.candidates(config, "co_tuning_reverse")
  assert [(c["lr"], c["trade_off"]) for c in grid] == [(0.01, 1.0), (0.01, 2.3), (0.1, 1.0),
                                                       (0.1, 2.3)]  # fmt: skip
  assert co_tuning.candidate_stage("l2_sp", {"lr": 0.01, "alpha": 0.1}) == "l2_sp_lr0.01_alpha0.1"
  empty = tiny_config(**{"selection.lr_grid": ()})
  assert co_tuning.candidates(empty, "fine_tune") == [{"lr": empty.finetune.lr}]


# ----------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def tiny_setup():
  return co_tuning.make_setup(tiny_config(num_devices=1))


def test_setup_tasks(tiny_setup):
  task = tiny_setup.task
  assert task.source_names == ("T-shirt/top", "Trouser", "Pullover", "Sandal", "Sneaker", "Bag")
  assert tiny_setup.num_source_classes == 6 and tiny_setup.num_target_classes == 4
  train, val = np.bincount(task.target_train.y), np.bincount(task.target_val.y)
  pool = train + val  # 10 training images per class + the capped validation ones
  assert np.all(pool >= 10)
  np.testing.assert_array_equal(val, [round(0.2 * n) for n in pool])
  for split in (task.source_train, task.source_val, task.source_test):
    assert set(np.unique(split.y)) <= set(range(6))
  assert tiny_setup.x_target.shape == (int(train.sum()), 28, 28, 1)


def test_validation_is_fixed_per_seed_whatever_the_rate():
  tasks = {
    (seed, rate): co_tuning_data.make_task(tiny_config(seed=seed, **{"data.sampling_rate": rate}))
    for seed in (0, 1)
    for rate in (1.0, 0.3)
  }
  for seed in (0, 1):
    full, low = tasks[seed, 1.0], tasks[seed, 0.3]
    np.testing.assert_array_equal(low.target_val.x, full.target_val.x)
    np.testing.assert_array_equal(low.target_val.y, full.target_val.y)
    assert len(low.target_train.y) < len(full.target_train.y)
    # Training images never come from the hold-out.
    held = {x.tobytes() for x in full.target_val.x}
    assert not held & {x.tobytes() for x in full.target_train.x}
  assert not np.array_equal(tasks[0, 1.0].target_val.x, tasks[1, 1.0].target_val.x)


def test_hold_out_is_stratified_and_names_an_empty_hold_out():
  split = _split(np.repeat(np.arange(3), [10, 5, 20]))
  rest, held = co_tuning_data.hold_out(split, 0.2, np.random.default_rng(0), num_classes=3)
  np.testing.assert_array_equal(np.bincount(held.y), [2, 1, 4])
  np.testing.assert_array_equal(np.sort(np.concatenate([rest.x, held.x]).ravel()), split.x.ravel())
  with pytest.raises(ValueError, match=r"data\.val_fraction=0\.01 holds out no target example"):
    co_tuning_data.hold_out(split, 0.01, np.random.default_rng(0), num_classes=3)


STEP_PARAMS = ("trade_off", "l2sp_alpha", "l2sp_beta", "lr_scale")


@pytest.fixture(scope="module")
def step_inputs(tiny_setup):
  """Host fine-tuning inputs: params whose backbone is moved away from the anchor."""
  variables = co_tuning.init_source(tiny_setup, optax.adam(1e-3))
  anchor = variables["params"]["backbone"]
  rng = np.random.default_rng(0)
  moved = jax.tree.map(lambda w: w + rng.normal(size=w.shape).astype(np.float32) * 0.1, anchor)
  feature_dim = tiny_setup.config.model.options.feature_dim
  head = co_tuning_finetune.init_target_head(tiny_setup, feature_dim)["head"]
  params = {"backbone": moved, "source_head": variables["params"]["head"], "target_head": head}
  return jax.device_get(
    {"params": params, "batch_stats": variables["batch_stats"], "anchor": anchor}
  )


def _finetune(setup, inputs, coefs, *, steps=1):
  coefs = (*coefs, 1.0)[: len(STEP_PARAMS)]  # lr_scale 1 unless given
  """Metrics of each step and the final host state, from `inputs` on `setup`'s mesh."""
  tx = co_tuning.make_optimizer(setup.config)
  step = co_tuning.make_finetune_step(setup, tx)
  rep = mesh_lib.replicated(setup.mesh)
  state = jax.device_put(
    {
      "params": inputs["params"],
      "batch_stats": inputs["batch_stats"],
      "opt_state": tx.init(inputs["params"]),
    },
    rep,
  )
  uniform = jax.device_put(np.full((4, 6), 1 / 6, np.float32), rep)
  anchor = jax.device_put(inputs["anchor"], rep)
  coefs = jax.device_put({k: np.float32(v) for k, v in zip(STEP_PARAMS, coefs)}, rep)
  history = []
  for i in range(steps):
    state, metrics = step(
      state, jnp.asarray(i, jnp.int32), setup.x_target, setup.y_target, uniform, anchor, coefs
    )
    history.append(jax.device_get(metrics))
  return history, jax.device_get(state)


def test_finetune_step_penalty_is_l2_sp(tiny_setup, step_inputs):
  moved, anchor = step_inputs["params"]["backbone"], step_inputs["anchor"]
  dist = sum(float(np.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(moved),
                                                           jax.tree.leaves(anchor)))  # fmt: skip
  head_sq = sum(float(np.sum(w**2)) for w in jax.tree.leaves(step_inputs["params"]["target_head"]))
  [plain], _ = _finetune(tiny_setup, step_inputs, (0.0, 0.0, 0.0))
  assert plain["penalty"] == 0.0 and plain["loss"] == pytest.approx(plain["target_ce"])
  [sp], _ = _finetune(tiny_setup, step_inputs, (0.0, 0.3, 2.0))
  assert sp["penalty"] == pytest.approx(0.5 * 0.3 * dist + 0.5 * 2.0 * head_sq, rel=1e-4)
  assert sp["loss"] == pytest.approx(sp["target_ce"] + sp["penalty"], rel=1e-5)
  assert sp["target_ce"] == pytest.approx(plain["target_ce"], rel=1e-6)  # same batch
  [co], _ = _finetune(tiny_setup, step_inputs, (2.3, 0.0, 0.0))
  # With a uniform relationship the extra term is λ·(logsumexp(z_s) − mean(z_s)) > 0.
  assert co["loss"] > co["target_ce"] == pytest.approx(plain["target_ce"], rel=1e-6)


def test_lr_scale_is_the_learning_rate_times_the_scale(step_inputs):
  """A learning-rate grid point = lr_scale × the configured lr for every parameter group."""
  base = co_tuning.make_setup(tiny_config(num_devices=1))
  times3 = co_tuning.make_setup(tiny_config(num_devices=1, **{"finetune.lr": 3 * 3e-2}))
  _, scaled = _finetune(base, step_inputs, (2.3, 0.0, 0.0, 3.0), steps=3)
  _, direct = _finetune(times3, step_inputs, (2.3, 0.0, 0.0, 1.0), steps=3)
  for a, b in zip(jax.tree.leaves(scaled["params"]), jax.tree.leaves(direct["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.eight_devices
def test_finetune_step_is_the_same_on_1_and_8_devices(tiny_setup, step_inputs):
  eight = co_tuning.make_setup(tiny_config(num_devices=8))
  assert eight.mesh.size == 8 and tiny_setup.mesh.size == 1
  coefs = (2.3, 0.01, 0.01)
  history1, state1 = _finetune(tiny_setup, step_inputs, coefs, steps=2)
  history8, state8 = _finetune(eight, step_inputs, coefs, steps=2)
  for m1, m8 in zip(history1, history8):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  moved = [np.any(a != b) for a, b in zip(jax.tree.leaves(step_inputs["params"]),
                                          jax.tree.leaves(state1["params"]))]  # fmt: skip
  assert all(moved), "some parameter was not updated"


# ----------------------------------------------------------------------------- the rest


def test_relationships_use_train_and_validation_as_the_official_code():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(5), size=40).astype(np.float32)
  labels = np.repeat(np.arange(2), 20)
  train, val = np.arange(0, 40, 2), np.arange(1, 40, 2)
  direct, chosen = co_tuning.compute_relationship(
    "direct", probs[train], labels[train], probs[val], labels[val], 2, max_iter=5
  )
  assert chosen == {}
  expected = np.stack([probs[labels == c].mean(0) for c in range(2)])  # train + val pooled
  np.testing.assert_allclose(direct, expected, rtol=1e-5)
  reverse, chosen = co_tuning.compute_relationship(
    "reverse", probs[train], labels[train], probs[val], labels[val], 2, max_iter=5
  )
  np.testing.assert_allclose(reverse.sum(1), 1.0, rtol=1e-5)
  assert set(chosen) == {"C", "temperature", "val_accuracy"}
  assert chosen["C"] in co_tuning.core.category_mapping.DEFAULT_L2_GRID
  plain = co_tuning.core.category_mapping.reverse_relationship(
    probs[train], labels[train], 2, val_source_probs=probs[val], val_labels=labels[val], max_iter=5
  )
  np.testing.assert_allclose(reverse, plain, rtol=1e-6)


def test_relationship_peakedness():
  one_hot = co_tuning.relationship_peakedness(np.eye(2, 4))
  assert one_hot["mean_row_max"] == 1.0 and one_hot["mean_row_entropy"] == pytest.approx(0.0)
  flat = co_tuning.relationship_peakedness(np.full((2, 4), 0.25))
  assert flat["mean_row_max"] == 0.25
  assert flat["mean_row_entropy"] == pytest.approx(flat["max_entropy"]) == pytest.approx(np.log(4))


def test_relationship_accuracy_of_an_exact_mapping():
  # Target class c is source class c: the source head alone predicts the target.
  relationship = np.eye(3, 4) * 0.9 + 0.025  # [C_t=3, C_s=4]
  relationship /= relationship.sum(1, keepdims=True)
  labels = np.array([0, 1, 2, 2, 1])
  probs = np.eye(4)[labels]
  prior = np.full(3, 1 / 3)
  assert co_tuning.relationship_accuracy(relationship, probs, labels, prior) == 1.0
  assert co_tuning.relationship_accuracy(relationship, probs, (labels + 1) % 3, prior) == 0.0


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_source_checkpoint_round_trip_and_mismatch(tmp_path, suffix, tiny_setup):
  variables = co_tuning.init_source(tiny_setup, optax.adam(1e-3))
  template = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  changed = jax.tree.map(lambda x: np.asarray(x) + 1.0, template)
  path = tmp_path / f"source{suffix}"
  co_tuning.save_source_checkpoint(path, changed)
  loaded = co_tuning.load_source_checkpoint(path, template)
  assert jax.tree.structure(loaded) == jax.tree.structure(template)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(changed)):
    np.testing.assert_array_equal(a, b)
  wrong = {"params": {**changed["params"], "head": {"kernel": np.zeros((3, 3), np.float32)}}}
  co_tuning.save_source_checkpoint(path, {**changed, **wrong})
  with pytest.raises(ValueError, match=r"model\.source_checkpoint='.*' does not match"):
    co_tuning.load_source_checkpoint(path, template)
