"""Tests of moe_adapt.methods.finetune (the fine-tuning harness and the `finetune` method).

- Harness units, in process on a 1-block ViT: `split_trainable` / `join`, parameter counts
  against hand counts, the AdamW schedule (read off the updates), `Examples`, the fixed
  evaluation subset of `load_task`, and `train` changing exactly the trainable leaves.
- End to end through the CLI (`configs/finetune.py:digits,tiny`, one block, no dropout,
  more steps so that the models learn something): results.json, the trainable tree of
  each variant, a rerun that does no work, a run killed with SIGKILL and resumed (its
  stages trained before the kill double as a second run with the same seed).
- Data parallel: the `lora` variant run in a child process on 8 fake devices from the CLI
  run's pre-trained backbone matches the 1-device CLI run.
- Bad input: unknown variant, protocol, model kind, target domains; a backbone that does
  not fit the benchmark's modality. A bad target domain fails before the workdir is
  written, so the corrected command can reuse it.

Speed: the reference CLI run starts in the background when the module starts (fixture
`background`) while the in-process tests run (the 8-device test starts once its
`pretrain` stage is saved); the killed/resumed run follows it, watched by a thread. The
CLI runs share one persistent compilation cache (also used by tests/methods/
test_adamix.py, whose `pretrain` stage compiles the same programs).
"""

import dataclasses
import json
import math
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_adapt import main as main_lib
from moe_adapt.data import examples as examples_lib
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.methods import finetune
from moe_adapt.models import adapted
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import finetuning
from tests.methods import configs_util
from tests.subprocess_util import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 600
TRAIN_STEPS, PRETRAIN_STEPS = 100, 300
VARIANTS = ("head", "lora", "full")
# Overrides of the tiny preset for the CLI runs (the same in test_adamix.py): one block, no
# dropout (its random bits make each training step compile ~10x slower on CPU), and enough
# steps at a higher learning rate that accuracies differ from chance.
SMALL = {
  "model.options.depth": 1,
  "model.dropout": 0.0,
  "pretrain.steps": PRETRAIN_STEPS,
  "pretrain.lr": 0.003,
  "train.steps": TRAIN_STEPS,
  "train.lr": 0.003,
  "checkpoint_every": 50,
  "log_every": 10,
}
FLAGS = [
  "--config=configs/finetune.py:digits,tiny",
  *(f"--config.{k}={v}" for k, v in SMALL.items()),
  f"--config.variants={VARIANTS!r}",
  "--print_json",  # the results as the last stdout line
]


CONFIGS = configs_util.config_module("finetune")


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The `digits,tiny` config with dotted-key overrides, e.g. `**{"data.protocol": "x"}`."""
  return configs_util.with_overrides(CONFIGS.get_config("digits,tiny"), **overrides)


# ----------------------------------------------------------------------------- CLI runs


def _env(devices: int, cache: pathlib.Path) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  # Runs of the same programs read them back instead of compiling them again.
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  return env


@dataclasses.dataclass
class Run:
  """A CLI process writing its output to files (no pipe can fill up and block it)."""

  workdir: pathlib.Path
  args: list
  logs: pathlib.Path
  cache: pathlib.Path
  devices: int = 1
  proc: subprocess.Popen | None = None
  returncode: int | None = None
  deadline: float = 0.0

  def launch(self, tag: str) -> "Run":
    self.out, self.err = self.logs / f"{tag}.out", self.logs / f"{tag}.err"
    command = [sys.executable, "-m", "moe_adapt.main", *self.args, f"--workdir={self.workdir}"]
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.proc = subprocess.Popen(
        command, cwd=REPO, env=_env(self.devices, self.cache), stdout=out, stderr=err
      )
    self.returncode, self.deadline = None, time.monotonic() + RUN_TIMEOUT_S
    return self

  def poll(self) -> bool:
    if self.returncode is None and self.proc.poll() is not None:
      self.returncode = self.proc.returncode
    return self.returncode is not None

  def wait(self) -> "Run":
    while not self.poll():
      if time.monotonic() > self.deadline:
        self.stop()
        pytest.fail(f"{self.args} did not finish within {RUN_TIMEOUT_S} s")
      time.sleep(0.2)
    return self

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()

  @property
  def stdout(self) -> str:
    return self.out.read_text()

  @property
  def stderr(self) -> str:
    return self.err.read_text()


def _cache_dir(tmp_path_factory) -> pathlib.Path:
  # Per pytest session, shared with test_adamix.py (same pre-training programs).
  return tmp_path_factory.getbasetemp() / "adapter_methods_jax_cache"


def _metric_lines(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  lines = []
  for line in path.read_text().splitlines():
    try:
      lines.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut by the kill
      continue
  return lines


def _tree_listing(path) -> dict:
  """Relative path -> (size, mtime_ns) of every file under `path`."""
  path = pathlib.Path(path)
  return {
    str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
    for p in sorted(path.rglob("*"))
    if p.is_file()
  }


def _kill_and_resume(run: Run, info: dict) -> None:
  """Launches `run`, SIGKILLs it once stage `lora` has logged a step, launches it again.

  By then the `pretrain` and `head` stages have saved their final checkpoints. Runs in a
  thread: failures are recorded in `info['error']`; `info['abort']` stops it.
  """
  try:
    run.launch("killed")
    while not any(r["stage"] == "lora" for r in _metric_lines(run.workdir)):
      if info.get("abort"):
        return
      if run.poll():
        info["error"] = f"the run to kill ended (exit {run.returncode}):\n{run.stderr}"
        return
      if time.monotonic() > run.deadline:
        info["error"] = "the run to kill did not reach the lora stage in time"
        return
      time.sleep(0.02)
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait()
    info["killed_returncode"] = run.proc.returncode
    info["results_at_kill"] = (run.workdir / "results.json").exists()
    info["stages_at_kill"] = {r["stage"] for r in _metric_lines(run.workdir)}
    info["lines_at_kill"] = len(_metric_lines(run.workdir))
    if info.get("abort"):
      return
    run.launch("resumed")
    while not run.poll() and time.monotonic() < run.deadline and not info.get("abort"):
      time.sleep(0.2)
  except Exception as e:  # reported by the fixture that joins the thread
    info["error"] = repr(e)


def _module_runs_slow_tests(request) -> bool:
  """Whether a selected test of this module is marked slow (they need the CLI runs)."""
  return any(
    getattr(item, "module", None) is request.module and item.get_closest_marker("slow")
    for item in request.session.items
  )


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
  """Starts the reference CLI run as the module starts (if a slow test is selected);
  `ref` starts the others."""
  base = tmp_path_factory.mktemp("finetune_cli")
  cache = _cache_dir(tmp_path_factory)
  runs = {
    "base": base,
    "ref": Run(base / "ref", FLAGS, base, cache),
    "resumed": Run(base / "resumed", FLAGS, base, cache),
    "info": {},
  }
  if _module_runs_slow_tests(request):
    runs["ref"].launch("ref")
  yield runs
  runs["info"]["abort"] = True
  if "thread" in runs:
    runs["thread"].join(timeout=60)
  for run in (runs["ref"], runs["resumed"]):
    run.stop()


@pytest.fixture(scope="module")
def ref(background) -> Run:
  """The finished reference run; starts the killed/resumed run (it reads back what `ref`
  compiled)."""
  run = background["ref"]
  if run.proc is None:
    run.launch("ref")
  run.wait()
  assert run.returncode == 0, run.stderr[-5000:]
  info = background["info"]
  thread = threading.Thread(target=_kill_and_resume, args=(background["resumed"], info))
  thread.start()
  background["thread"] = thread
  return run


@pytest.fixture(scope="module")
def second_runs(background, ref) -> dict:
  """{'resumed': Run, ...facts at the kill}, finished."""
  background["thread"].join(timeout=RUN_TIMEOUT_S)
  info = background["info"]
  assert "error" not in info, info["error"]
  resumed = background["resumed"]
  assert resumed.poll(), "the resumed run did not finish in time"
  return {"resumed": resumed, **info}


def _results(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "results.json").read_text())


def _comparable(results: dict) -> dict:
  """Results without the measured times."""
  return {k: v for k, v in results.items() if k not in ("wall_time_s", "step_time_s")}


def _final_state(workdir, stage: str, step: int) -> dict:
  """The saved state {'params', 'opt_state'} of a stage's final checkpoint, as NumPy."""
  path = pathlib.Path(workdir) / "checkpoints" / stage / str(step) / "state"
  return jax.device_get(ocp.StandardCheckpointer().restore(path))


STAGE_STEPS = {"pretrain": PRETRAIN_STEPS, **{v: TRAIN_STEPS for v in VARIANTS}}


def _assert_same_params(a: dict, b: dict, **tolerance) -> None:
  """Bitwise equal trees, or allclose with `tolerance`."""
  a, b = _paths(a), _paths(b)
  assert set(a) == set(b)
  for path in a:
    if tolerance:
      np.testing.assert_allclose(a[path], b[path], err_msg=str(path), **tolerance)
    else:
      np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


# ----------------------------------------------------------------------------- units


@pytest.fixture(scope="module")
def setup() -> ft.Setup:
  """A 1-block ViT without dropout on digits_rot, one device."""
  return ft.make_setup(
    tiny_config(**{"model.options.depth": 1, "model.dropout": 0.0, "num_devices": 1})
  )


def _dummy_inputs(setup: ft.Setup) -> tuple[jax.Array, ...]:
  """One example of zeros per model input, [1, ...] each."""
  first = setup.task.train[setup.task.domains[0]]
  return tuple(jnp.zeros((1, *a.shape[1:]), a.dtype) for a in first.inputs)


def _shapes(setup: ft.Setup, adapter: adapters_lib.AdapterConfig) -> dict:
  """Parameter shapes of the classifier with `adapter` (nothing is computed)."""
  model = ft.build_model(setup, adapter)
  dummy = _dummy_inputs(setup)
  return jax.eval_shape(lambda k: model.init(k, *dummy)["params"], jax.random.key(0))


def _paths(tree) -> dict[tuple, object]:
  """Path (dict keys, sequence indices, attribute names) -> leaf."""

  def entry(p):
    return getattr(p, "key", getattr(p, "idx", getattr(p, "name", None)))

  return {
    tuple(entry(p) for p in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _expected_trainable(path: tuple[str, ...], mode: str) -> bool:
  if mode == "all":
    return True
  if path[0] == "head":
    return True
  return mode == "adapters" and any(k.startswith(("adapter", "lora")) for k in path)


@pytest.mark.parametrize(
  ("kind", "mode"),
  [("pfeiffer", "adapters"), ("lora", "adapters"), ("houlsby", "head"), ("lora", "all")],
)
def test_split_trainable_is_disjoint_complete_and_join_inverts_it(setup, kind, mode):
  params = _shapes(setup, ft.adapter_config(setup.config, kind))
  frozen, trainable = adapted.split_trainable(params, mode)
  everything, f, t = _paths(params), _paths(frozen), _paths(trainable)
  assert not set(f) & set(t)
  assert set(f) | set(t) == set(everything)
  assert set(t) == {p for p in everything if _expected_trainable(p, mode)}
  assert all(everything[p] is leaf for p, leaf in {**f, **t}.items())
  joined = adapted.join(frozen, trainable)
  assert jax.tree.structure(joined) == jax.tree.structure(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(params)))


def test_param_counts_match_hand_counts(setup):
  # Two blocks, width d, FFN width m, bottleneck r, LoRA rank k on query and value.
  options = {**setup.backbone_config, "depth": 2}
  two = dataclasses.replace(setup, backbone_config=options)
  d, m, blocks, classes = options["hidden_size"], options["mlp_dim"], 2, 10
  p, channels, tokens = options["patch_size"], 1, (16 // options["patch_size"]) ** 2 + 1
  r, k = setup.config.adapter.bottleneck, setup.config.adapter.lora_rank
  block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)  # 2 LayerNorms, attention, FFN
  backbone = (p * p * channels * d + d) + d + tokens * d + blocks * block + 2 * d
  head = d * classes + classes
  bottleneck = d * r + r + r * d + d
  lora = 2 * (d * k + k * d)
  expected = {  # variant: (total, trainable without head, inference)
    "full": (backbone + head, backbone, backbone + head),
    "head": (backbone + head, 0, backbone + head),
    "pfeiffer": (backbone + head + blocks * bottleneck, blocks * bottleneck, None),
    "houlsby": (backbone + head + 2 * blocks * bottleneck, 2 * blocks * bottleneck, None),
    "lora": (backbone + head + blocks * lora, blocks * lora, backbone + head),
  }
  for variant, (total, trainable, inference) in expected.items():
    kind, mode = finetune.VARIANTS[variant]
    adapter = ft.adapter_config(two.config, kind)
    params = _shapes(two, adapter)
    deployed = params
    if kind == "lora":
      deployed = jax.eval_shape(lambda q, a=adapter: adapters_lib.merge_lora(q, a), params)
    counts = adapted.param_counts(params, train_mode=mode, inference_params=deployed)
    assert counts == {
      "total": total,
      "trainable": trainable,
      "head": head,
      "inference": total if inference is None else inference,
    }, variant


def _learning_rates(steps: int, lr: float, warmup_fraction: float) -> np.ndarray:
  """The rate of each of steps + 1 updates, read off AdamW: with zero gradients and
  weight decay 1 on a parameter 1, the update is exactly -rate."""
  tx = finetuning.make_optimizer(steps, lr, warmup_fraction=warmup_fraction, weight_decay=1.0)
  params = {"w": jnp.ones(())}
  update = jax.jit(tx.update)
  state, rates = tx.init(params), []
  for _ in range(steps + 1):
    updates, state = update({"w": jnp.zeros(())}, state, params)
    rates.append(-float(updates["w"]))
  return np.asarray(rates)


def test_make_optimizer_warms_up_then_decays_linearly_to_zero():
  steps, lr = 20, 0.1
  warmup = 5  # round(0.25 * 20)
  t = np.arange(steps + 1)
  expected = np.where(t < warmup, lr * t / warmup, lr * (1 - (t - warmup) / (steps - warmup)))
  np.testing.assert_allclose(_learning_rates(steps, lr, 0.25), expected, rtol=1e-6, atol=1e-8)
  # Without warm-up the first step already uses the full rate.
  no_warmup = _learning_rates(4, lr, 0.0)
  np.testing.assert_allclose(no_warmup, [0.1, 0.075, 0.05, 0.025, 0.0], rtol=1e-6, atol=1e-8)


def test_examples_concat_and_take():
  a = ft.Examples(
    (np.arange(6).reshape(3, 2), np.ones((3, 2), np.int32)), np.array([0, 1, 2], np.int32)
  )
  b = ft.Examples((np.arange(6, 10).reshape(2, 2), np.zeros((2, 2), np.int32)), np.array([3, 4]))
  both = examples_lib.concat_examples([a, b])
  assert len(both) == 5
  np.testing.assert_array_equal(both.inputs[0], np.arange(10).reshape(5, 2))
  np.testing.assert_array_equal(both.inputs[1][:, 0], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(both.labels, [0, 1, 2, 3, 4])
  picked = both.take(np.array([4, 0]))
  assert len(picked) == 2
  np.testing.assert_array_equal(picked.inputs[0], [[8, 9], [0, 1]])
  np.testing.assert_array_equal(picked.labels, [4, 0])
  with pytest.raises(ValueError, match="at least one part"):
    examples_lib.concat_examples([])


def test_load_task_max_examples_is_a_fixed_subset_of_the_test_split(setup):
  full = setup.task
  seed0 = ft.load_task(tiny_config(**{"eval.max_examples": 20}))
  seed1 = ft.load_task(tiny_config(**{"eval.max_examples": 20, "seed": 1}))
  assert full.domains == seed0.domains
  for d in full.domains:
    whole, sub = full.test[d], seed0.test[d]
    assert len(sub) == 20 < len(whole)
    # The same examples for every run seed.
    np.testing.assert_array_equal(sub.inputs[0], seed1.test[d].inputs[0])
    np.testing.assert_array_equal(sub.labels, seed1.test[d].labels)
    # Each one an example of the full split, in the split's order.
    flat = whole.inputs[0].reshape(len(whole), -1)
    rows = [int(np.flatnonzero((flat == x.ravel()).all(axis=1))[0]) for x in sub.inputs[0]]
    assert rows == sorted(set(rows))
    np.testing.assert_array_equal(sub.labels, whole.labels[rows])
    # Training and validation data are untouched.
    np.testing.assert_array_equal(seed0.train[d].inputs[0], full.train[d].inputs[0])
    np.testing.assert_array_equal(seed0.val[d].labels, full.val[d].labels)


@pytest.fixture(scope="module")
def pfeiffer(setup):
  """(model, params) of the 1-block ViT with Pfeiffer adapters.

  The params are random normal draws of the right shapes (nothing to compile): every leaf
  non-zero, so every trainable one gets a gradient or a weight-decay update.
  """
  adapter = ft.adapter_config(setup.config, "pfeiffer")
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), _shapes(setup, adapter)
  )
  return ft.build_model(setup, adapter), params


# 'all' is checked on the CLI run's `full` stage (a third compile here costs too much).
@pytest.mark.parametrize("mode", ["adapters", "head"])
def test_train_changes_exactly_the_trainable_leaves(setup, pfeiffer, mode, tmp_path):
  model, params = pfeiffer
  before = jax.tree.map(np.asarray, params)
  trained = ft.train(
    setup,
    str(tmp_path),
    None,
    stage=f"units_{mode}",
    model=model,
    params=params,
    train_mode=mode,
    examples=setup.task.train["rot0"],
    steps=2,
    lr=1e-2,
    batch_size=8,
  )
  assert trained.step_time_s > 0
  after = _paths(jax.tree.map(np.asarray, trained.params))
  initial = _paths(before)
  assert set(after) == set(initial)
  for path, value in initial.items():
    if _expected_trainable(path, mode):
      assert not np.array_equal(after[path], value), f"{path} did not change"
    else:
      np.testing.assert_array_equal(after[path], value, err_msg=str(path))
  # The caller's params are neither donated nor changed.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    (
      {"variants": ("head", "adamix")},
      "variants has unknown 'adamix'; accepted: full, head, houlsby, pfeiffer, lora",
    ),
    ({"variants": ()}, "variants=() is invalid"),
    ({"data.protocol": "loo"}, "data.protocol='loo' is unknown; accepted: lodo, pooled"),
    ({"model.kind": "resnet"}, "model.kind='resnet' is unknown; accepted: minilm, bert, vit"),
    ({"train.warmup_fraction": 1.5}, "train.warmup_fraction=1.5 is invalid"),
  ],
)
def test_bad_config_raises_one_value_error_naming_the_field(overrides, message, tmp_path):
  wd = tmp_path / "wd"
  with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
    main_lib.run(tiny_config(**overrides), str(wd))
  assert not wd.exists()


def test_vit_on_a_text_benchmark_is_refused(monkeypatch):
  config = tiny_config()
  config.data.benchmark = "vader_sentiment"
  inputs = (np.zeros((4, 8), np.int32), np.ones((4, 8), np.int32))
  examples = ft.Examples(inputs, np.zeros(4, np.int32))
  task = ft.Task(
    benchmark="vader_sentiment",
    modality="text",
    domains=("tweets", "movies"),
    class_names=("negative", "positive"),
    default_targets=("movies",),
    train={"tweets": examples, "movies": examples},
    val={"tweets": examples, "movies": examples},
    test={"tweets": examples, "movies": examples},
  )
  monkeypatch.setattr(ft, "load_task", lambda config: task)
  with pytest.raises(
    ValueError,
    match=r"^model\.kind='vit' does not fit benchmark 'vader_sentiment' \(text\); "
    r"accepted: minilm, bert$",
  ):
    ft.make_setup(config)


def test_minilm_on_digits_is_refused_before_the_workdir_is_touched(tmp_path):
  wd = tmp_path / "wd"
  with pytest.raises(
    ValueError,
    match=r"^model\.kind='minilm' does not fit benchmark 'digits_rot' \(image\); accepted: vit$",
  ):
    main_lib.run(tiny_config(**{"model.kind": "minilm"}), str(wd))
  assert not wd.exists()


def test_unknown_or_all_target_domains_are_refused(setup):
  def domains(**overrides):
    config = tiny_config(**overrides)
    return ft.protocol_domains(dataclasses.replace(setup, config=config))

  assert domains() == (("rot0", "rot15", "rot30", "rot45", "rot60"), ("rot75",))
  assert domains(**{"data.protocol": "pooled", "data.domains": ("rot15",)}) == (
    ("rot15",),
    ("rot15",),
  )
  accepted = "accepted: rot0, rot15, rot30, rot45, rot60, rot75"
  with pytest.raises(
    ValueError, match=rf"^data\.target_domains=\('rot99',\) is invalid; {accepted}"
  ):
    domains(**{"data.target_domains": ("rot99",)})
  with pytest.raises(ValueError, match=r"data\.target_domains holds every domain"):
    domains(**{"data.target_domains": setup.task.domains})
  with pytest.raises(ValueError, match=rf"^data\.domains=\('rot7',\) is invalid; {accepted}"):
    domains(**{"data.protocol": "pooled", "data.domains": ("rot7",)})


def test_bad_target_domain_does_not_block_the_corrected_command(tmp_path, monkeypatch):
  wd = tmp_path / "wd"
  with pytest.raises(ValueError, match=r"data\.target_domains=\('rot99',\) is invalid"):
    main_lib.run(tiny_config(**{"data.target_domains": ("rot99",)}), str(wd))
  monkeypatch.setattr(finetune, "run", lambda config, workdir, **kw: {"metrics": {}})
  main_lib.run(tiny_config(), str(wd))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ref_pretrained(background) -> pathlib.Path:
  """`ref`'s workdir once its `pretrain` stage is finished (its `head` stage has begun)."""
  run = background["ref"]
  if run.proc is None:
    run.launch("ref")
  while not any(r["stage"] == "head" for r in _metric_lines(run.workdir)):
    if run.poll() or time.monotonic() > run.deadline:
      break  # `ref` reports the failure
    time.sleep(0.1)
  return run.workdir


# `finetune` (variant lora) in process on 8 fake devices (the flag must precede JAX's start,
# hence a child process) from the pre-trained backbone of `ref` (argv[1]); results and the
# final lora parameters to argv[2].
EIGHT_DEVICE_SCRIPT = """
import json, pathlib, pickle, sys
import jax, jax.numpy as jnp
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.methods import finetune
from tests.methods.test_finetune import (
  PRETRAIN_STEPS, SMALL, TRAIN_STEPS, _final_state, tiny_config,
)

config = tiny_config(**SMALL, variants=("lora",), num_devices=8)
setup = ft.make_setup(config)
assert setup.mesh.size == 8, setup.mesh
pretrained = _final_state(sys.argv[1], "pretrain", PRETRAIN_STEPS)["params"]
backbone = ft.backbone_of(setup, jax.tree.map(jnp.asarray, pretrained))
ft.pretrained_backbone = lambda setup, workdir, writer: backbone
results = finetune.run(config, sys.argv[2], setup=setup)
pathlib.Path(sys.argv[2], "results.json").write_text(json.dumps(results))
# The final lora parameters as NumPy: an 8-device checkpoint does not restore onto 1 device.
lora = _final_state(sys.argv[2], "lora", TRAIN_STEPS)["params"]
pathlib.Path(sys.argv[2], "lora_params.pkl").write_bytes(pickle.dumps(lora))
"""


@pytest.mark.slow
def test_eight_devices_match_one(ref_pretrained, request, tmp_path, tmp_path_factory):
  """`finetune` (variant lora) on 8 devices from `ref`'s pre-trained backbone, run while
  `ref` trains its variants on 1 device."""
  workdir = tmp_path / "eight_devices"
  env = _env(8, _cache_dir(tmp_path_factory))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  command = [sys.executable, "-c", EIGHT_DEVICE_SCRIPT, str(ref_pretrained), str(workdir)]
  done = subprocess.run(
    command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
  )
  assert done.returncode == 0, done.stderr[-5000:]
  got = _results(workdir)
  ref = request.getfixturevalue("ref")
  expected = _results(ref.workdir)
  assert got["metrics"]["lora"] == expected["metrics"]["lora"]
  assert got["params"]["lora"] == expected["params"]["lora"]
  _assert_same_params(
    pickle.loads((workdir / "lora_params.pkl").read_bytes()),
    _final_state(ref.workdir, "lora", TRAIN_STEPS)["params"],
    rtol=1e-4,
    atol=1e-6,
  )


@pytest.mark.slow
def test_cli_results_hold_metrics_params_and_step_times(ref):
  results = _results(ref.workdir)
  assert results["method"] == "finetune" and results["benchmark"] == "digits_rot"
  assert results["protocol"] == "lodo" and results["target_domains"] == ["rot75"]
  assert results["source_domains"] == ["rot0", "rot15", "rot30", "rot45", "rot60"]
  assert 0 < results["wall_time_s"]
  assert json.loads(ref.stdout.strip().splitlines()[-1]) == results

  n_test = len(ft.load_task(tiny_config()).test["rot75"])
  assert set(results["metrics"]) == set(VARIANTS)
  for variant, per_domain in results["metrics"].items():
    assert set(per_domain) == {"rot75", "mean"}, variant
    acc = per_domain["rot75"]["accuracy"]
    assert 0 <= acc <= 1 and acc * n_test == pytest.approx(round(acc * n_test), abs=1e-6)
    assert per_domain["mean"]["accuracy"] == acc
  # The models learned something (10 classes): the equality tests below are not vacuous.
  assert max(m["mean"]["accuracy"] for m in results["metrics"].values()) > 0.15
  configs_util.check_per_example(results, VARIANTS)

  counts = results["params"]
  assert set(counts) == set(VARIANTS)
  total, head = counts["full"]["total"], counts["full"]["head"]
  assert head == 16 * 10 + 10
  assert counts["full"]["trainable"] == total - head and counts["full"]["inference"] == total
  assert counts["head"] == {"total": total, "trainable": 0, "head": head, "inference": total}
  lora_state = _final_state(ref.workdir, "lora", TRAIN_STEPS)["params"]
  lora_leaves = sum(
    leaf.size for path, leaf in _paths(lora_state).items() if path[-1].startswith("lora")
  )
  assert lora_leaves == counts["lora"]["trainable"] > 0
  assert counts["lora"]["total"] == total + lora_leaves
  assert counts["lora"]["inference"] == counts["lora"]["total"] - lora_leaves == total

  assert set(results["step_time_s"]) == set(VARIANTS)
  assert all(t > 0 for t in results["step_time_s"].values())

  lines = _metric_lines(ref.workdir)
  for stage, steps in STAGE_STEPS.items():
    logged = [r["step"] for r in lines if r["stage"] == stage]
    assert logged == list(range(9, steps, 10)), stage
  assert all(math.isfinite(r["loss"]) for r in lines)


@pytest.mark.slow
def test_each_variant_trains_the_leaves_of_its_mode(ref):
  pretrained = _paths(_final_state(ref.workdir, "pretrain", PRETRAIN_STEPS)["params"])
  states = {v: _paths(_final_state(ref.workdir, v, TRAIN_STEPS)["params"]) for v in VARIANTS}
  # What each stage trains (its checkpointed state) is the trainable tree of its mode.
  assert set(states["head"]) == {("head", "bias"), ("head", "kernel")}
  assert {p for p in states["lora"] if p[0] != "head"} == {
    ("backbone", "block_0", "attention", t, ab)
    for t in ("query", "value")
    for ab in ("lora_a", "lora_b")
  }
  assert set(states["full"]) == set(pretrained)
  # Full fine-tuning moved every backbone leaf away from the pre-trained one.
  for path, value in states["full"].items():
    if path[0] == "backbone":
      assert not np.array_equal(value, pretrained[path]), path


@pytest.mark.slow
def test_rerun_of_finished_workdir_returns_the_results_and_does_no_work(ref, monkeypatch):
  before = _tree_listing(ref.workdir)

  def must_not_run(*args, **kwargs):
    raise AssertionError("finetune.run ran again")

  monkeypatch.setattr(finetune, "run", must_not_run)
  # The config the CLI flags build (else the workdir would refuse it as another config).
  config = tiny_config(**SMALL, variants=VARIANTS)
  assert main_lib.run(config, str(ref.workdir)) == _results(ref.workdir)
  assert _tree_listing(ref.workdir) == before
  # The CLI printed the same results as its last line.
  assert json.loads(ref.stdout.strip().splitlines()[-1]) == _results(ref.workdir)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_results(ref, second_runs):
  resumed = second_runs["resumed"]
  assert second_runs["killed_returncode"] == -signal.SIGKILL
  assert not second_runs["results_at_kill"], "killed too late: the run had finished"
  assert {"pretrain", "head", "lora"} <= second_runs["stages_at_kill"]
  assert resumed.returncode == 0, resumed.stderr[-5000:]

  # Finished stages are restored, not trained again; the rest resumes.
  after_kill = _metric_lines(resumed.workdir)[second_runs["lines_at_kill"] :]
  stages_after_kill = {r["stage"] for r in after_kill}
  assert "full" in stages_after_kill and stages_after_kill <= {"lora", "full"}
  assert _comparable(_results(resumed.workdir)) == _comparable(_results(ref.workdir))
  assert _last_per_step(_metric_lines(resumed.workdir)) == _last_per_step(
    _metric_lines(ref.workdir)
  )
  for stage in ("lora", "full"):
    _assert_same_params(
      _final_state(resumed.workdir, stage, TRAIN_STEPS),
      _final_state(ref.workdir, stage, TRAIN_STEPS),
    )


def _last_per_step(lines) -> dict:
  """(stage, step) -> the metrics of the last line logged for it, without the time."""
  return {(r["stage"], r["step"]): {k: v for k, v in r.items() if k != "time"} for r in lines}


@pytest.mark.slow
def test_two_runs_with_the_same_seed_are_identical(ref, second_runs):
  # `pretrain` and `head` were trained straight through by the killed process, from
  # scratch in another workdir: states (parameters and optimizer) bitwise equal.
  resumed = second_runs["resumed"]
  for stage, steps in (("pretrain", PRETRAIN_STEPS), ("head", TRAIN_STEPS)):
    _assert_same_params(
      _final_state(resumed.workdir, stage, steps), _final_state(ref.workdir, stage, steps)
    )
  expected, got = _results(ref.workdir), _results(resumed.workdir)
  assert got["metrics"] == expected["metrics"]
  # ... and training did move the adapters away from their initialisation (B = 0).
  lora = _paths(_final_state(ref.workdir, "lora", TRAIN_STEPS)["params"])
  assert all(np.any(v != 0) for p, v in lora.items() if p[-1] == "lora_b")


@pytest.mark.parametrize(
  ("overrides", "expected"),
  [
    # lodo: neither the benchmark's default target (rot75) nor the held-out rot0 is seen.
    ({"data.target_domains": ("rot0",)}, ("rot15", "rot30", "rot45", "rot60")),
    ({"data.target_domains": ("rot75",)}, ("rot0", "rot15", "rot30", "rot45", "rot60")),
    # pooled: the targets are the training domains; only the default targets stay out.
    (
      {"data.protocol": "pooled", "data.domains": ("rot0",)},
      ("rot0", "rot15", "rot30", "rot45", "rot60"),
    ),
    ({"pretrain.domains": ("rot0", "rot15")}, ("rot0", "rot15")),
  ],
)
def test_pretraining_never_sees_a_held_out_domain(overrides, expected):
  setup = ft.make_setup(tiny_config(**overrides))
  assert ft.pretrain_domains(setup) == expected
