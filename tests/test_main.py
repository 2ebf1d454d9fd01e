"""Tests of the `moe-adapt` CLI (moe_adapt/main.py) with the Meta-DMoE tiny preset.

Three CLI runs are shared by the tests (module fixture `runs`):
- `ref`: an uninterrupted run (40 meta-steps, a checkpoint every 5 steps);
- `resumed`: the same command, SIGKILLed once the meta stage has logged step >= 10, then
  run again in the same workdir, which resumes;
- `diverged`: a run whose expert learning rate makes the loss non-finite.
With the same device count on CPU a resumed run is bitwise the uninterrupted one, so
results and logged losses are compared exactly. Each subprocess sees 1 CPU device.

Workdir semantics (rerun does no work, another config is refused, --overwrite moves the
old contents aside) and bad-input messages are checked on the CLI where the exit code and
the one-line message matter, and through `main.run` in-process where that is cheaper.
"""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from moe_adapt import main as main_lib
from moe_adapt import methods, recipes  # noqa: F401  (registers the recipes)
from moe_adapt.methods import meta_dmoe
from moe_adapt.train import checkpoint as ckpt_lib
from moe_adapt.train import workdir as workdir_lib
from tests.subprocess_util import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_ARG = "digits_rot,tiny"
META_STEPS, CHECKPOINT_EVERY, KILL_AT_STEP = 40, 5, 10
OVERRIDES = {"meta.steps": META_STEPS, "checkpoint_every": CHECKPOINT_EVERY}
RUN_FLAGS = [f"--config=configs/meta_dmoe.py:{CONFIG_ARG}"] + [
  f"--config.{k}={v}" for k, v in OVERRIDES.items()
]
DIVERGE_FLAGS = [
  f"--config=configs/meta_dmoe.py:{CONFIG_ARG}",
  "--config.experts.lr=1e30",  # Adam's first update is ~lr·sign(g): the next loss is NaN.
  "--config.checkpoint_every=1",
]
STAGES = {
  "shared_backbone": 4,
  "experts": 4,
  "aggregator": 4,
  "student": 4,
  "meta": META_STEPS,
  "erm_continued": META_STEPS,
}
VARIANTS = (
  "erm",
  "erm_continued",
  "expert_average",
  "aggregator_head",
  "aggregator_pretrained",
  "meta_unadapted",
  "meta_dmoe",
  "meta_dmoe_target_zeros",
  "meta_dmoe_target_source_mean",
  "meta_dmoe_target_shuffled",
)
RUN_TIMEOUT_S = 900


def _config_module():
  spec = importlib.util.spec_from_file_location(
    "_meta_dmoe_config", REPO / "configs" / "meta_dmoe.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CONFIGS = _config_module()


def make_config(arg: str = CONFIG_ARG, **overrides):
  """The config the CLI builds from `arg` and `--config.<key>=<value>` overrides."""
  config = CONFIGS.get_config(arg)
  for name, value in overrides.items():
    *groups, field = name.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[field] = value
  return config


def _env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(1)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _command(args, workdir) -> list[str]:
  return [sys.executable, "-m", "moe_adapt.main", *args, f"--workdir={workdir}"]


def cli(args, workdir, *, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs the CLI to completion and captures its output."""
  return subprocess.run(
    _command(args, workdir),
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@dataclasses.dataclass
class Run:
  """A CLI process writing its output to files (no pipe can fill up and block it)."""

  workdir: pathlib.Path
  args: list
  logs: pathlib.Path
  compilation_cache: pathlib.Path | None = None
  proc: subprocess.Popen | None = None
  start: float = 0.0
  wall: float | None = None
  returncode: int | None = None

  def launch(self, tag: str) -> None:
    self.out, self.err = self.logs / f"{tag}.out", self.logs / f"{tag}.err"
    env = _env()
    if self.compilation_cache is not None:
      # Runs of one command compile the same programs: later ones read them back.
      env["JAX_COMPILATION_CACHE_DIR"] = str(self.compilation_cache)
      env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
      env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.proc = subprocess.Popen(
        _command(self.args, self.workdir), cwd=REPO, env=env, stdout=out, stderr=err
      )
    self.start, self.wall, self.returncode = time.monotonic(), None, None

  def poll(self) -> bool:
    """Whether the process has ended (recording its exit code and wall time)."""
    if self.returncode is None and self.proc.poll() is not None:
      self.returncode, self.wall = self.proc.returncode, time.monotonic() - self.start
    return self.returncode is not None

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


def _metric_lines(workdir) -> list[dict]:
  """Every parsable line of metrics.jsonl, in file order (a line cut by a kill is skipped)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  lines = []
  for line in path.read_text().splitlines():
    try:
      lines.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return lines


def _meta_steps(workdir) -> list[int]:
  return [r["step"] for r in _metric_lines(workdir) if r["stage"] == "meta"]


def _last_per_step(lines) -> dict:
  """(stage, step) -> the metrics of the last line logged for it, without the time."""
  return {(r["stage"], r["step"]): {k: v for k, v in r.items() if k != "time"} for r in lines}


def _wait(runs, deadline: float) -> None:
  while not all(run.poll() for run in runs):
    if time.monotonic() > deadline:
      pytest.fail(f"CLI runs did not finish within {RUN_TIMEOUT_S} s")
    time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The three shared CLI runs (see the module docstring), all finished.

  `ref` and `diverged` run side by side; then `resumed` is started, killed and
  restarted, reading the programs `ref` compiled from a persistent compilation cache.
  """
  base = tmp_path_factory.mktemp("cli_runs")
  cache = base / "compilation_cache"
  ref = Run(base / "ref", RUN_FLAGS, base, cache)
  resumed = Run(base / "resumed", RUN_FLAGS, base, cache)
  diverged = Run(base / "diverged", DIVERGE_FLAGS, base)
  deadline = time.monotonic() + RUN_TIMEOUT_S
  info = {}
  try:
    ref.launch("ref")
    diverged.launch("diverged")
    _wait([ref], deadline)
    resumed.launch("killed")
    # Kill once the meta stage is past a checkpoint (step 10 is saved before the
    # line of step 10 is logged).
    while not (_meta_steps(resumed.workdir) and max(_meta_steps(resumed.workdir)) >= KILL_AT_STEP):
      if resumed.poll():
        pytest.fail(
          f"the run to interrupt ended (exit {resumed.returncode}) before meta step "
          f"{KILL_AT_STEP}:\n{resumed.stderr[-3000:]}"
        )
      if time.monotonic() > deadline:
        pytest.fail("the run to interrupt did not reach the meta stage in time")
      time.sleep(0.02)
    resumed.proc.send_signal(signal.SIGKILL)
    resumed.proc.wait()
    info["killed_returncode"] = resumed.proc.returncode
    info["results_at_kill"] = (resumed.workdir / "results.json").exists()
    info["lines_at_kill"] = len(_metric_lines(resumed.workdir))
    info["meta_step_at_kill"] = max(_meta_steps(resumed.workdir))
    resumed.launch("resumed")
    _wait([resumed, diverged], deadline)
  finally:
    for run in (ref, resumed, diverged):
      run.stop()
  return {"ref": ref, "resumed": resumed, "diverged": diverged, **info}


@pytest.fixture(scope="module")
def ref(runs) -> Run:
  run = runs["ref"]
  assert run.returncode == 0, run.stderr[-5000:]
  return run


def _results(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "results.json").read_text())


def _tree_listing(path) -> dict:
  """Relative path -> (size, mtime_ns) of every file under `path`."""
  path = pathlib.Path(path)
  return {
    str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
    for p in sorted(path.rglob("*"))
    if p.is_file()
  }


def _read_state(step_dir) -> dict:
  """The saved state pytree of one checkpoint step as NumPy arrays (no template needed)."""
  return jax.device_get(ocp.StandardCheckpointer().restore(pathlib.Path(step_dir) / "state"))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_run_writes_config_metrics_checkpoints_results(ref):
  wd = ref.workdir
  expected_config = json.loads(json.dumps(make_config(**OVERRIDES).to_dict()))
  assert json.loads((wd / "config.json").read_text()) == expected_config

  # metrics.jsonl: every step of every stage logged (log_every=1), losses finite.
  lines = _metric_lines(wd)
  for stage, num_steps in STAGES.items():
    steps = [r["step"] for r in lines if r["stage"] == stage]
    assert steps == list(range(num_steps)), stage
  assert all(math.isfinite(r["loss"]) for r in lines)
  assert [r["stage"] for r in lines] == sorted(
    (r["stage"] for r in lines), key=list(STAGES).index
  ), "stages out of order"

  # A finished checkpoint of every stage at its last step.
  for stage, num_steps in STAGES.items():
    with ckpt_lib.Checkpointer(wd / "checkpoints" / stage) as checkpointer:
      assert checkpointer.all_steps()[-1] == num_steps, stage
      assert checkpointer.is_finished(), stage

  results = _results(wd)
  assert {"method", "benchmark", "seed", "target_domains", "metrics", "wall_time_s"} <= set(results)
  assert results["method"] == "meta_dmoe"
  assert results["benchmark"] == "digits_rot"
  assert results["seed"] == 0
  assert results["target_domains"] == ["rot75"]
  assert 0 < results["wall_time_s"] <= ref.wall
  assert set(results["metrics"]) == set(VARIANTS)
  # Accuracies are counts over the whole rot75 domain (no padded example counted).
  splits = meta_dmoe.make_setup(make_config()).splits["rot75"]
  n_test = len(meta_dmoe.whole_domain(splits)[1])
  for variant, per_domain in results["metrics"].items():
    assert set(per_domain) == {"rot75", "mean"}, variant
    acc = per_domain["rot75"]["accuracy"]
    assert 0.0 <= acc <= 1.0, variant
    assert acc * n_test == pytest.approx(round(acc * n_test), abs=1e-6), variant
    assert per_domain["mean"]["accuracy"] == pytest.approx(acc), variant

  # stdout: the results table (the method's row marked, the file named), no raw JSON.
  out = ref.stdout
  assert out.startswith("Results: meta_dmoe on digits_rot, seed 0, target domain rot75"), out
  assert re.search(r"^\* meta_dmoe +[0-9.]+ +[0-9.]+ ", out, flags=re.M), out
  assert f"Saved: {wd}/results.json" in out
  assert "Smoke test" in out and "smoke test" in ref.stderr
  assert not any(line.startswith("{") for line in out.splitlines())
  # A line per stage as it starts, before its progress bar.
  for stage in STAGES:
    assert f"stage '{stage}': {STAGES[stage]} steps, starting" in ref.stderr, stage


@pytest.mark.slow
def test_rerun_of_finished_run_prints_results_and_does_no_work(ref):
  before = _tree_listing(ref.workdir)
  start = time.monotonic()
  proc = cli([*RUN_FLAGS, "--print_json"], ref.workdir)
  elapsed = time.monotonic() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The same table as the first run (rows in the same order), then the JSON line.
  *table, last = proc.stdout.strip().splitlines()
  assert json.loads(last) == _results(ref.workdir)
  assert "\n".join(table) + "\n" == ref.stdout
  assert _tree_listing(ref.workdir) == before  # metrics.jsonl, checkpoints, results untouched
  assert not re.search(r"(experts|aggregator|student|meta):", proc.stderr), "a stage ran"
  assert elapsed < 0.5 * ref.wall, (elapsed, ref.wall)


@pytest.mark.slow
def test_rerun_with_other_config_is_refused_and_changes_nothing(ref):
  before = _tree_listing(ref.workdir)
  proc = cli([*RUN_FLAGS, "--config.seed=1"], ref.workdir)
  assert proc.returncode == 2
  # Progress lines ("loading data") may come first; the error is the one error line.
  (error,) = [line for line in proc.stderr.splitlines() if line.startswith("moe-adapt: error: ")]
  assert error.startswith("moe-adapt: error: workdir=")
  assert "seed: stored=0 new=1" in proc.stderr
  assert "--overwrite" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert _tree_listing(ref.workdir) == before
  assert not list(ref.workdir.glob("previous-*"))


@pytest.mark.slow
def test_overwrite_moves_old_contents_aside(ref, tmp_path, monkeypatch):
  wd = tmp_path / "wd"
  shutil.copytree(ref.workdir, wd)
  old = {name: (wd / name).read_bytes() for name in ("config.json", "results.json")}
  calls = []

  def fake_run(config, workdir, setup=None):
    calls.append((config.seed, workdir))
    return {"method": "meta_dmoe", "seed": config.seed, "metrics": {}}

  monkeypatch.setattr(meta_dmoe, "run", fake_run)
  config = make_config(**OVERRIDES, seed=1)
  with pytest.raises(workdir_lib.ConfigMismatchError, match="seed: stored=0 new=1"):
    main_lib.run(config, str(wd))
  assert not calls

  results = main_lib.run(config, str(wd), overwrite=True)
  assert calls == [(1, str(wd))]
  (previous,) = wd.glob("previous-*")
  for name, content in old.items():
    assert (previous / name).read_bytes() == content
  assert (previous / "metrics.jsonl").exists() and (previous / "checkpoints" / "meta").is_dir()
  assert not (wd / "checkpoints").exists() and not (wd / "metrics.jsonl").exists()
  assert json.loads((wd / "config.json").read_text())["seed"] == 1
  assert _results(wd) == results and results["seed"] == 1 and "wall_time_s" in results

  # A second overwrite keeps the first previous-* folder where it is.
  main_lib.run(make_config(**OVERRIDES, seed=2), str(wd), overwrite=True)
  assert len(list(wd.glob("previous-*"))) == 2
  assert (previous / "results.json").read_bytes() == old["results.json"]


@pytest.mark.slow
def test_main_run_of_finished_workdir_returns_stored_results(ref, tmp_path, monkeypatch):
  wd = tmp_path / "wd"
  shutil.copytree(ref.workdir, wd)

  def must_not_run(config, workdir, setup=None):
    raise AssertionError("the method ran again")

  monkeypatch.setattr(meta_dmoe, "run", must_not_run)
  assert main_lib.run(make_config(**OVERRIDES), str(wd)) == _results(ref.workdir)


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_results(runs, ref):
  resumed = runs["resumed"]
  assert runs["killed_returncode"] == -signal.SIGKILL
  assert not runs["results_at_kill"]
  assert runs["meta_step_at_kill"] < META_STEPS - 1, "the run was killed too late to resume"
  assert resumed.returncode == 0, resumed.stderr[-5000:]

  # Finished stages are restored, not run again; meta resumes from a checkpoint.
  for stage in ("shared_backbone", "experts", "aggregator", "student"):
    assert f"{stage}:" not in resumed.stderr, f"stage {stage} ran again"
  after_kill = _metric_lines(resumed.workdir)[runs["lines_at_kill"] :]
  assert {r["stage"] for r in after_kill} == {"meta", "erm_continued"}
  first = after_kill[0]["step"]
  assert first >= KILL_AT_STEP and first % CHECKPOINT_EVERY == 0, first
  assert first <= runs["meta_step_at_kill"] + 1

  # Bitwise the uninterrupted run: results, every logged metric, the final meta state.
  expected, got = _results(ref.workdir), _results(resumed.workdir)
  expected.pop("wall_time_s")
  got.pop("wall_time_s")
  assert got == expected
  assert _last_per_step(_metric_lines(resumed.workdir)) == _last_per_step(
    _metric_lines(ref.workdir)
  )
  final = f"checkpoints/meta/{META_STEPS}"
  ref_state, resumed_state = _read_state(ref.workdir / final), _read_state(resumed.workdir / final)
  assert jax.tree.structure(ref_state) == jax.tree.structure(resumed_state)
  for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(resumed_state)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- divergence


def _divergence_message(stderr: str) -> re.Match | None:
  return re.search(r"stage 'experts': non-finite loss at step (\d+)", stderr)


@pytest.mark.slow
def test_divergence_stops_with_stage_and_step_and_keeps_a_checkpoint(runs):
  run = runs["diverged"]
  assert run.returncode not in (0, None)
  match = _divergence_message(run.stderr)
  assert match, run.stderr[-3000:]
  bad_step = int(match.group(1))
  lines = [r for r in _metric_lines(run.workdir) if r["stage"] == "experts"]
  first_bad = min(r["step"] for r in lines if not math.isfinite(r["loss"]))
  assert bad_step == first_bad
  assert not (run.workdir / "results.json").exists()
  # The finished shared backbone and the diverged stage's last good checkpoint.
  assert sorted(p.name for p in (run.workdir / "checkpoints").iterdir()) == [
    "experts",
    "shared_backbone",
  ]

  # The newest checkpoint is at or before the first non-finite step, restores through
  # the stage's own state structure and holds finite parameters.
  config = make_config(**{"experts.lr": 1e30, "checkpoint_every": 1, "num_devices": 1})
  setup = meta_dmoe.make_setup(config)
  # Shapes and dtypes only (restored onto the first device): nothing to compile.
  template = jax.eval_shape(lambda: meta_dmoe.init_experts(setup, optax.adam(config.experts.lr)))
  with ckpt_lib.Checkpointer(run.workdir / "checkpoints" / "experts") as checkpointer:
    assert not checkpointer.is_finished()
    restored = checkpointer.restore(template)
  assert restored is not None
  step, state, meta = restored
  assert 0 < step <= bad_step and meta == {"step": step, "finished": False}
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow
def test_divergence_is_reported_in_one_line_without_traceback(runs):
  run = runs["diverged"]
  assert run.returncode == 3
  assert "Traceback" not in run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("moe-adapt: training diverged: stage 'experts'"), last
  assert _divergence_message(last), last


# ----------------------------------------------------------------------------- bad input


def test_cli_unknown_method_exits_2_with_one_line(tmp_path):
  wd = tmp_path / "wd"
  proc = cli([*RUN_FLAGS, "--config.method=nope"], wd)
  assert proc.returncode == 2
  accepted = ", ".join(methods.list_methods())
  assert proc.stderr == f"moe-adapt: error: method='nope' is unknown; accepted: {accepted}\n"
  assert not wd.exists()


def test_cli_unknown_target_domain_exits_2_with_one_line(tmp_path):
  proc = cli([*RUN_FLAGS, "--config.data.target_domains=('rot99',)"], tmp_path / "wd")
  assert proc.returncode == 2
  (line,) = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
  assert line.startswith("moe-adapt: error: target_domains has unknown domain(s) ['rot99']")
  assert "accepted: rot0, rot15" in line
  assert "Traceback" not in proc.stderr


def test_cli_malformed_override_names_the_field(tmp_path):
  proc = cli([*RUN_FLAGS, "--config.seed=abc"], tmp_path / "wd")
  assert proc.returncode != 0
  assert "--config.seed=abc" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "wd").exists()


def test_cli_unknown_benchmark_names_the_benchmark(tmp_path):
  proc = cli(["--config=configs/meta_dmoe.py:nope"], tmp_path / "wd")
  assert proc.returncode != 0
  assert "benchmark='nope' is unknown; accepted: digits_rot, fmnist_rot, fmnist_shift, tfds" in (
    proc.stderr
  )
  assert not (tmp_path / "wd").exists()


def test_cli_unknown_benchmark_has_no_traceback(tmp_path):
  proc = cli(["--config=configs/meta_dmoe.py:nope"], tmp_path / "wd")
  assert "Traceback" not in proc.stderr


def test_cli_data_dir_option_reaches_the_benchmark(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = cli(
    ["--config=configs/meta_dmoe.py:fmnist_rot,tiny", f"--config.data.options.data_dir={empty}"],
    tmp_path / "wd",
  )
  assert proc.returncode == 2
  assert f"moe-adapt: error: data_dir='{empty}' does not hold the Fashion-MNIST" in proc.stderr


def test_bad_config_fails_before_the_workdir_is_touched(tmp_path):
  wd = tmp_path / "wd"
  with pytest.raises(ValueError, match=r"method='nope' is unknown; accepted: .*meta_dmoe"):
    main_lib.run(make_config(method="nope"), str(wd))
  with pytest.raises(ValueError, match=r"meta\.distill='kl' is unknown"):
    main_lib.run(make_config(**{"meta.distill": "kl"}), str(wd))
  with pytest.raises(ValueError, match=r"experts\.lr=-1\.0 is invalid"):
    main_lib.run(make_config(**{"experts.lr": -1.0}), str(wd))
  assert not wd.exists()


def test_data_dependent_error_does_not_block_the_corrected_command(tmp_path, monkeypatch):
  wd = tmp_path / "wd"
  with pytest.raises(ValueError, match=r"target_domains has unknown domain\(s\) \['rot99'\]"):
    main_lib.run(make_config(**{"data.target_domains": ("rot99",)}), str(wd))
  monkeypatch.setattr(meta_dmoe, "run", lambda config, workdir, **kw: {"metrics": {}})
  main_lib.run(make_config(), str(wd))


# ----------------------------------------------------------------------------- help and list


def _bare_cli(args) -> subprocess.CompletedProcess:
  """`moe-adapt ARGS` without --workdir."""
  return subprocess.run(
    [sys.executable, "-m", "moe_adapt.main", *args],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_shows_the_projects_flags_and_examples_and_exits_0(flag):
  proc = _bare_cli([flag])
  assert proc.returncode == 0, proc.stderr
  for text in (
    "--config=FILE[:ARG]",
    "--workdir=DIR",
    "--[no]overwrite",
    "--distributed=",
    "--[no]print_json",
    "--config.FIELD=VALUE",
    "moe-adapt list",
    "Examples",
    "moe-adapt --config=configs/meta_dmoe.py:digits_rot --workdir=runs/meta_dmoe_digits",
  ):
    assert text in proc.stdout, text
  assert "helpfull" in proc.stdout and "Try --helpfull" not in proc.stdout
  assert proc.stdout == main_lib.help_text() + "\n"


def test_no_arguments_prints_the_help_and_exits_2():
  proc = _bare_cli([])
  assert proc.returncode == 2
  assert proc.stdout == main_lib.help_text() + "\n"
  assert "Traceback" not in proc.stderr


def test_list_names_every_method_config_preset_and_benchmark():
  from moe_adapt.data import registry

  proc = _bare_cli(["list"])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  for method in methods.list_methods():
    assert any(line.startswith(f"  {method} ") for line in lines), method
  for benchmark in registry.list_benchmarks():
    assert any(line.startswith(f"  {benchmark} ") for line in lines), benchmark
  config_lines = [line.split() for line in lines if line.startswith("  configs/")]
  configs = [p for p in (REPO / "configs").rglob("*.py") if not p.name.startswith("_")]
  assert len(config_lines) == len(configs)
  (meta,) = [line for line in lines if line.startswith("  configs/meta_dmoe.py ")]
  assert "digits_rot, fmnist_rot, fmnist_shift, tfds, text  -> meta_dmoe" in meta
  assert "tiny" in meta


def test_smoke_test_is_recognised_from_the_config_argument():
  assert main_lib._is_smoke_test(["--config=configs/meta_dmoe.py:digits_rot,tiny"])
  assert main_lib._is_smoke_test(["--config", "configs/muka.py:fmnist,hetero,tiny"])
  assert not main_lib._is_smoke_test(["--config=configs/meta_dmoe.py:digits_rot"])
  assert not main_lib._is_smoke_test(["--config=configs/tiny.py:digits_rot"])


def test_missing_backend_info_lines_are_dropped():
  import logging

  keep = main_lib._NoMissingBackendInfo()

  def record(level, message):
    return logging.LogRecord("jax._src.xla_bridge", level, "x.py", 1, message, (), None)

  assert not keep.filter(record(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL"))
  assert keep.filter(record(logging.WARNING, "Unable to initialize backend 'cuda': broken"))
  assert keep.filter(record(logging.INFO, "Platform 'cpu' is experimental"))
