"""Tests of moe_adapt.methods.adamix and configs/adamix.py (the mixture modules themselves
are tested in tests/models/test_adamix.py).

- The consistency-regularised training step (`train.finetuning.make_train_step` with
  `adamix.consistency_loss`, AdaMix's loss) against NumPy on the two routed passes' logits,
  and with weight 0.
- End to end through the CLI (`configs/adamix.py:digits,tiny`, variants adapter, adamix,
  adamix_lora; one block, no dropout, more steps as in test_finetune.py): merged, random
  and fixed-routing metrics, the routing spread and its plot, trainable and inference
  parameter counts; the logged consistency term, and its absence with weight 0; a run whose
  results.json is gone reuses the cached evaluations instead of evaluating again.
- Bad values of the AdaMix config fields, each one ValueError naming the field.

The main CLI run starts in the background when the module starts (fixture `background`)
while the in-process tests run; the two runs that follow it read its compiled programs
back from a persistent compilation cache (shared with tests/methods/test_finetune.py).
"""

import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_adapt import main as main_lib
from moe_adapt.methods import adamix
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.models import adapted
from moe_adapt.train import finetuning, workdir_lock
from tests.methods import configs_util
from tests.subprocess_util import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 600
TRAIN_STEPS = 100
VARIANTS = ("adapter", "adamix", "adamix_lora")
MIXTURES = ("adamix", "adamix_lora")
# The overrides of test_finetune.py: the `pretrain` stage compiles the same programs.
SMALL = {
  "model.options.depth": 1,
  "model.dropout": 0.0,
  "pretrain.steps": 300,
  "pretrain.lr": 0.003,
  "train.steps": TRAIN_STEPS,
  "train.lr": 0.003,
  "checkpoint_every": 50,
  "log_every": 10,
}
FLAGS = [
  "--config=configs/adamix.py:digits,tiny",
  *(f"--config.{k}={v}" for k, v in SMALL.items()),
  f"--config.variants={VARIANTS!r}",
]
FLAGS_W0 = [*FLAGS[:-1], "--config.variants=('adamix',)", "--config.adamix.consistency_weight=0"]
# The CLI with `adapter_harness.evaluate` replaced by a function that ends the process (exit 7).
NO_EVAL = """
import sys
from moe_adapt.methods import adapter_harness

def no_eval(*args, **kwargs):
  print("adapter_harness.evaluate was called", file=sys.stderr)
  sys.exit(7)

adapter_harness.evaluate = no_eval
from moe_adapt import main
sys.argv = ["moe-adapt", *sys.argv[1:]]
main.entry_point()
"""


CONFIGS = configs_util.config_module("adamix")


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The `digits,tiny` config with dotted-key overrides, e.g. `**{"adamix.share": "x"}`."""
  return configs_util.with_overrides(CONFIGS.get_config("digits,tiny"), **overrides)


# ----------------------------------------------------------------------------- CLI runs


def _popen(args, workdir, logs: pathlib.Path, tag: str, cache: pathlib.Path, *, script=None):
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(1)
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  head = ["-c", script] if script else ["-m", "moe_adapt.main"]
  with open(logs / f"{tag}.out", "w") as out, open(logs / f"{tag}.err", "w") as err:
    return subprocess.Popen(
      [sys.executable, *head, *args, f"--workdir={workdir}"],
      cwd=REPO,
      env=env,
      stdout=out,
      stderr=err,
    )


def _wait(proc: subprocess.Popen, logs: pathlib.Path, tag: str) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of a finished process."""
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while proc.poll() is None:
    if time.monotonic() > deadline:
      proc.kill()
      proc.wait()
      pytest.fail(f"{tag} did not finish within {RUN_TIMEOUT_S} s")
    time.sleep(0.2)
  return proc.returncode, (logs / f"{tag}.out").read_text(), (logs / f"{tag}.err").read_text()


def _module_runs_slow_tests(request) -> bool:
  """Whether a selected test of this module is marked slow (they need the CLI runs)."""
  return any(
    getattr(item, "module", None) is request.module and item.get_closest_marker("slow")
    for item in request.session.items
  )


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
  """Starts the main CLI run as the module starts (if a slow test is selected)."""
  base = tmp_path_factory.mktemp("adamix_cli")
  # Per pytest session, shared with test_finetune.py (same pre-training programs).
  cache = tmp_path_factory.getbasetemp() / "adapter_methods_jax_cache"
  runs = {"base": base, "cache": cache, "procs": []}
  if _module_runs_slow_tests(request):
    runs["main"] = _popen(FLAGS, base / "main", base, "main", cache)
    runs["procs"].append(runs["main"])
  yield runs
  for proc in runs["procs"]:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.fixture(scope="module")
def main_run(background) -> pathlib.Path:
  """The finished main run's workdir; starts the weight-0 run and the cached rerun.

  The rerun works on a copy of the finished workdir without results.json, with
  `adapter_harness.evaluate` disabled.
  """
  base, cache = background["base"], background["cache"]
  code, _, err = _wait(background["main"], base, "main")
  assert code == 0, err[-5000:]
  workdir = base / "main"
  copy = base / "no_results"
  shutil.copytree(workdir, copy)
  (copy / "results.json").unlink()
  (copy / adamix.SPREAD_PLOT).unlink()
  background["copy_listing"] = _tree_listing(copy)
  background["w0"] = _popen(FLAGS_W0, base / "w0", base, "w0", cache)
  # --print_json: the rerun's results as its last stdout line.
  background["rerun"] = _popen([*FLAGS, "--print_json"], copy, base, "rerun", cache, script=NO_EVAL)
  background["procs"] += [background["w0"], background["rerun"]]
  return workdir


@pytest.fixture(scope="module")
def w0_run(background, main_run) -> pathlib.Path:
  code, _, err = _wait(background["w0"], background["base"], "w0")
  assert code == 0, err[-5000:]
  return background["base"] / "w0"


def _results(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "results.json").read_text())


def _metric_lines(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def _tree_listing(path) -> dict:
  """Relative path -> (size, mtime_ns) of every file under `path` but the workdir lock
  (which every start that runs writes and empties)."""
  path = pathlib.Path(path)
  return {
    str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
    for p in sorted(path.rglob("*"))
    if p.is_file() and p.name != workdir_lock.LOCK_FILE
  }


# ----------------------------------------------------------------------------- the step


def _dummy_inputs(setup: ft.Setup) -> tuple[jax.Array, ...]:
  """One example of zeros per model input, [1, ...] each."""
  first = setup.task.train[setup.task.domains[0]]
  return tuple(jnp.zeros((1, *a.shape[1:]), a.dtype) for a in first.inputs)


@pytest.fixture(scope="module")
def mixture():
  """(setup, model, params, examples) of a 1-block ViT with an AdaMix mixture, 1 device.

  4 experts with both projections routed: two passes route alike with probability 1/16
  only. Params are random normal draws (nothing to compile), so experts differ.
  """
  config = tiny_config(**{"model.options.depth": 1, "model.dropout": 0.0, "num_devices": 1})
  setup = ft.make_setup(config)
  adapter = ft.adapter_config(config, "adamix", num_experts=4, share="none")
  model = ft.build_model(setup, adapter)
  dummy = _dummy_inputs(setup)
  shapes = jax.eval_shape(lambda k: model.init(k, *dummy)["params"], jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
  return setup, model, params, setup.task.train["rot75"]


def _step(mixture, weight: float, step: int, key, log_consistency: bool = False):
  """One step of `make_train_step` with consistency weight `weight`: its metrics."""
  setup, model, params, examples = mixture
  tx = finetuning.make_optimizer(10, 1e-3, warmup_fraction=0.0, weight_decay=0.0)
  frozen, trainable = adapted.split_trainable(params, "adapters")
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates its state
  state = {"params": trainable, "opt_state": jax.jit(tx.init)(trainable)}
  loss = adamix.consistency_loss(weight, log=log_consistency)
  fn = finetuning.make_train_step(model, tx, batch_size=8, mesh=setup.mesh, loss=loss)
  _, metrics = fn(state, jnp.int32(step), key, frozen, *examples.inputs, examples.labels)
  return {k: float(v) for k, v in metrics.items()}


STEP, KEY_SEED = 3, 5


@pytest.fixture(scope="module")
def reference_passes(mixture) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(logits of pass 1, of pass 2, labels) of the batch step STEP draws, recomputed.

  The keys as `make_train_step` derives them: fold_in(key, step) split into the batch
  index key and (dropout, routing) keys of pass 1 and pass 2.
  """
  _, model, params, examples = mixture
  key, step = jax.random.key(KEY_SEED), STEP
  idx_key, d1, r1, d2, r2 = jax.random.split(jax.random.fold_in(key, step), 5)
  idx = np.asarray(jax.random.randint(idx_key, (8,), 0, len(examples)))
  x = examples.inputs[0][idx]

  @jax.jit
  def forward(dropout_key, routing_key):
    rngs = {"dropout": dropout_key, "routing": routing_key}
    return model.apply({"params": params}, x, train=True, rngs=rngs)

  logits1 = np.asarray(forward(d1, r1), np.float64)
  logits2 = np.asarray(forward(d2, r2), np.float64)
  return logits1, logits2, examples.labels[idx]


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_consistency_loss_is_ce_plus_weighted_symmetric_kl_of_two_routed_passes(
  mixture, reference_passes
):
  weight = 0.5
  got = _step(mixture, weight, STEP, jax.random.key(KEY_SEED))
  logits1, logits2, labels = reference_passes
  assert np.abs(logits1 - logits2).max() > 1e-3, "the two passes routed alike"
  log_p, log_q = _log_softmax(logits1), _log_softmax(logits2)
  ce = -np.mean(log_p[np.arange(len(labels)), labels])
  kl_pq = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  kl_qp = np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)
  reg = np.mean(0.5 * (kl_pq + kl_qp))
  assert reg > 1e-4
  assert got["ce"] == pytest.approx(ce, rel=1e-5)
  assert got["consistency"] == pytest.approx(reg, rel=1e-4, abs=1e-7)
  assert got["loss"] == pytest.approx(ce + weight * reg, rel=1e-5)


def _symmetric_kl(logits1: np.ndarray, logits2: np.ndarray) -> float:
  log_p, log_q = _log_softmax(logits1), _log_softmax(logits2)
  kl_pq = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  kl_qp = np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)
  return float(np.mean(0.5 * (kl_pq + kl_qp)))


def test_weight_zero_is_plain_cross_entropy_of_one_pass(mixture, reference_passes):
  got = _step(mixture, 0.0, STEP, jax.random.key(KEY_SEED))
  logits1, logits2, labels = reference_passes
  ce = -np.mean(_log_softmax(logits1)[np.arange(len(labels)), labels])
  assert set(got) == {"loss", "ce"}
  assert got["loss"] == got["ce"] == pytest.approx(ce, rel=1e-5)
  # Logged only (what the method does for mixtures): the same KL, not in the loss.
  logged = _step(mixture, 0.0, STEP, jax.random.key(KEY_SEED), log_consistency=True)
  assert logged["loss"] == logged["ce"] == pytest.approx(ce, rel=1e-5)
  assert logged["consistency"] == pytest.approx(_symmetric_kl(logits1, logits2), rel=1e-4, abs=1e-7)


def test_epoch_batches_cover_every_example_once_per_epoch():
  key, n, size = jax.random.key(0), 24, 8

  def batch(step):
    return finetuning.epoch_batch(key, jnp.int32(step), n, batch_size=size, epoch_steps=3)

  epochs = [np.concatenate([batch(e * 3 + s) for s in (0, 1, 2)]) for e in range(2)]
  for idx in epochs:
    assert sorted(idx.tolist()) == list(range(n))
  assert not np.array_equal(epochs[0], epochs[1])  # a fresh permutation per epoch
  # N not a multiple of the batch: the last batch wraps round to the epoch's start.
  wrap = [
    finetuning.epoch_batch(key, jnp.int32(s), 20, batch_size=8, epoch_steps=3) for s in (0, 1, 2)
  ]
  assert set(np.concatenate(wrap).tolist()) == set(range(20))
  np.testing.assert_array_equal(wrap[2][4:], wrap[0][:4])


def test_epoch_training_returns_the_best_dev_epoch(mixture, tmp_path):
  setup, model, params, examples = mixture
  dev = iter([0.2, 0.6, 0.4])
  seen = []

  def select(full_params):
    seen.append(jax.device_get(full_params))
    return next(dev)

  trained = ft.train(
    setup,
    str(tmp_path),
    None,
    stage="adamix",
    model=model,
    params=params,
    train_mode="adapters",
    examples=examples.take(np.arange(16)),
    steps=0,
    lr=1e-3,
    batch_size=8,
    time_steps=False,
    epochs=3,
    select=select,
  )
  assert trained.selection == {"epoch": 2, "dev_accuracy": [0.2, 0.6, 0.4]}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trained.params), seen[1])
  assert not np.array_equal(seen[1]["head"]["kernel"], seen[2]["head"]["kernel"]), (
    "epoch 3 trained on"
  )
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "adamix").iterdir()) == [
    "epoch_001",
    "epoch_002",
    "epoch_003",
  ]
  entry = ft.selection_entry(trained, 16, 8)
  assert entry == {"epoch": 2, "checkpoint_step": 4}


def test_variant_adapters():
  config = tiny_config(**{"adamix.num_experts": 3, "adamix.share": "down"})
  single = adamix.variant_adapter(config, "adapter")
  assert single.kind == "pfeiffer" and single.bottleneck == config.adapter.bottleneck
  mix = adamix.variant_adapter(config, "adamix")
  assert (mix.kind, mix.num_experts, mix.share) == ("adamix", 3, "down")
  assert adamix.variant_adapter(config, "adamix_no_sharing").share == "none"
  lora = adamix.variant_adapter(config, "adamix_lora")
  assert (lora.kind, lora.num_experts, lora.lora_rank) == ("adamix_lora", 3, 2)
  assert adamix.variant_adapter(config, "full").kind == "none"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    ({"adamix.num_experts": 0}, "adamix.num_experts=0 is invalid; accepted: an integer >= 1"),
    ({"adamix.share": "left"}, "adamix.share='left' is unknown; accepted: none, up, down"),
    ({"eval.routing_samples": 0}, "eval.routing_samples=0 is invalid; accepted: an integer >= 1"),
    (
      {"adamix.consistency_weight": -1.0},
      "adamix.consistency_weight=-1.0 is invalid; accepted: a number in [0, ∞)",
    ),
    ({"variants": ("adamix", "soup")}, "variants has unknown 'soup'; accepted: adapter, adamix"),
    (
      {"adapter.bottleneck": 17},
      "adapter.bottleneck=17 exceeds the hidden size 16; accepted: an int in [1, 16]",
    ),
    ({"adapter.position": "late"}, "adapter: position='late' is unknown; accepted: after_dropout"),
    ({"train.epochs": -1}, "train.epochs=-1 is invalid; accepted: an integer >= 0"),
    (
      {"eval.routing_variants": ("adapter",)},
      "eval.routing_variants has unknown 'adapter'; accepted: adamix, adamix_no_consistency",
    ),
  ],
)
def test_bad_adamix_fields_raise_one_value_error_naming_the_field(overrides, message, tmp_path):
  wd = tmp_path / "wd"
  with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
    main_lib.run(tiny_config(**overrides), str(wd))
  assert not wd.exists()


def test_bad_domain_does_not_block_the_corrected_command(tmp_path, monkeypatch):
  wd = tmp_path / "wd"
  with pytest.raises(ValueError, match=r"data\.domains=\('rot99',\) is invalid"):
    main_lib.run(tiny_config(**{"data.domains": ("rot99",)}), str(wd))
  monkeypatch.setattr(adamix, "run", lambda config, workdir, **kw: {"metrics": {}})
  main_lib.run(tiny_config(), str(wd))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_reports_merged_random_and_fixed_routing(main_run):
  results = _results(main_run)
  assert results["method"] == "adamix" and results["protocol"] == "pooled"
  assert results["source_domains"] == results["target_domains"] == ["rot75"]
  n_test = len(ft.load_task(tiny_config()).test["rot75"])
  # Random and fixed routing are evaluated for eval.routing_variants (default: adamix).
  assert tuple(tiny_config().eval.routing_variants) == ("adamix",)
  assert set(results["metrics"]) == {
    *VARIANTS,
    "adamix_random",
    "adamix_random_example",
    "adamix_fixed",
  }
  for name, per_domain in results["metrics"].items():
    assert set(per_domain) == {"rot75", "mean"}, name
    acc = per_domain["mean"]["accuracy"]
    assert acc == per_domain["rot75"]["accuracy"] and 0 <= acc <= 1, name
    if not name.endswith(("_random", "_random_example")):  # means over routing samples
      assert acc * n_test == pytest.approx(round(acc * n_test), abs=1e-6), name
  # The models learned something (10 classes).
  assert max(m["mean"]["accuracy"] for m in results["metrics"].values()) > 0.15

  # One single-routing accuracy per sample; `adamix_random` is their mean.
  samples = tiny_config().eval.routing_samples
  assert set(results["routing_spread"]) == {"adamix"}
  spread = results["routing_spread"]["adamix"]
  assert len(spread) == samples
  assert all(0 <= a <= 1 and a * n_test == pytest.approx(round(a * n_test)) for a in spread)
  assert results["metrics"]["adamix_random"]["mean"]["accuracy"] == pytest.approx(np.mean(spread))
  plot = main_run / adamix.SPREAD_PLOT
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  assert set(results["step_time_s"]) == set(VARIANTS)
  assert all(t > 0 for t in results["step_time_s"].values())
  # Per-example outcomes of every variant but the averaged random routing.
  configs_util.check_per_example(results, {*VARIANTS, "adamix_fixed"})


@pytest.mark.slow
def test_parameter_counts(main_run):
  counts = _results(main_run)["params"]
  config = tiny_config()
  d, r, k = 16, config.adapter.bottleneck, config.adapter.lora_rank
  m = config.adamix.num_experts  # up-projection (LoRA: B) shared
  assert counts["adapter"]["trainable"] == d * r + r + r * d + d
  assert counts["adamix"]["trainable"] == m * (d * r + r) + (r * d + d)
  assert counts["adamix_lora"]["trainable"] == 2 * (m * d * k + k * d)  # query and value
  # Merged AdaMix costs one adapter at inference; merged AdaMix-LoRA nothing extra.
  assert counts["adamix"]["inference"] == counts["adapter"]["inference"]
  assert counts["adamix"]["trainable"] > counts["adapter"]["trainable"]
  plain = counts["adapter"]["total"] - counts["adapter"]["trainable"]
  assert counts["adamix_lora"]["inference"] == plain
  for c in counts.values():
    assert c["total"] == plain + c["trainable"] and c["head"] == d * 10 + 10


@pytest.mark.slow
def test_consistency_term_is_logged_and_not_trained_on_with_weight_zero(main_run, w0_run):
  lines = _metric_lines(main_run)
  for stage in MIXTURES:
    logged = [r for r in lines if r["stage"] == stage]
    assert len(logged) == TRAIN_STEPS // 10, stage
    for r in logged:  # weight 1
      assert r["consistency"] >= 0 and math.isfinite(r["loss"])
      assert r["loss"] == pytest.approx(r["ce"] + r["consistency"], rel=1e-6)
    # 0 where both passes drew the same experts (M = 2, down routed: half the steps).
    assert any(r["consistency"] > 0 for r in logged), stage
  assert all("consistency" not in r for r in lines if r["stage"] == "adapter")

  w0 = [r for r in _metric_lines(w0_run) if r["stage"] == "adamix"]
  assert len(w0) == TRAIN_STEPS // 10
  # Mixtures log the KL between two routed passes at weight 0 too; the loss is the CE.
  assert all(r["consistency"] >= 0 and r["loss"] == r["ce"] for r in w0)
  assert any(r["consistency"] > 0 for r in w0)
  results = _results(main_run)
  assert results["consistency_kl"]["adamix"] == [
    r["consistency"] for r in lines if r["stage"] == "adamix"
  ]
  assert results["consistency_kl"]["adapter"] == []
  assert results["expert_spread"]["adapter"] is None
  assert results["expert_spread"]["adamix"] > 0
  # Same data, init and routing draws: only the regulariser differs.
  with_reg = {r["step"]: r["ce"] for r in lines if r["stage"] == "adamix"}
  assert w0[0]["ce"] != with_reg[w0[0]["step"]] or w0[-1]["ce"] != with_reg[w0[-1]["step"]]


@pytest.mark.slow
def test_rerun_without_results_reuses_the_cached_evaluations(background, main_run):
  base = background["base"]
  code, out, err = _wait(background["rerun"], base, "rerun")
  assert code == 0, err[-5000:]
  copy = base / "no_results"
  expected, got = _results(main_run), _results(copy)
  assert json.loads(out.strip().splitlines()[-1]) == got
  expected.pop("wall_time_s")
  got.pop("wall_time_s")
  assert got == expected
  assert (copy / adamix.SPREAD_PLOT).is_file()
  # Only results.json and the plot were written: no stage trained, the cache untouched.
  listing = _tree_listing(copy)
  assert set(listing) - set(background["copy_listing"]) == {"results.json", adamix.SPREAD_PLOT}
  assert {k: listing[k] for k in background["copy_listing"]} == background["copy_listing"]
