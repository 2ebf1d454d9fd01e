"""A real two-process `moe-adapt` run on localhost agrees with a single-process run.

Two `python -m moe_adapt.main` processes (JAX_PROCESS_ID 0 and 1, coordinator on
127.0.0.1, `--distributed=on`) with 2 CPU devices each share one workdir and train MUKA's
tiny preset (two teachers, their confidence scores, the `muki` student, evaluation) on the
4-device global mesh. The same command runs side by side in a single process with 4 CPU
devices in another workdir. Checked:
- both processes exit 0 within the time limit (on a timeout every process is killed and
  the test fails with their stderr);
- results.json is process 0's results (its own wall time), and process 1 computed the same;
- the results agree with the single-process run: accuracies are k / N of a finite test set,
  so any tolerance below 1 / N means "the same predictions"; the other floats (confidence
  means, logged losses, teacher scores, the trained student) differ by float rounding only,
  since the 4-device program is the same and only the cross-process all-reduce (gloo) sums
  in another order;
- the workdir holds each file once: the same config.json, the same files under
  checkpoints/ (no duplicate or left-over temporary folders), one metrics line per
  (stage, step), no temporary files.
"""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from moe_adapt.methods import muka
from moe_adapt.train import checkpoint as ckpt_lib
from tests.methods import configs_util
from tests.subprocess_util import xla_flags

pytestmark = pytest.mark.slow  # Three CLI runs shared by every test.

REPO = pathlib.Path(__file__).resolve().parents[1]
# --print_json: the results as the last stdout line, read from each process.
FLAGS = ["--config=configs/muka.py:fmnist,tiny", "--config.variants=('muki',)", "--print_json"]
# Seconds for the three processes together. They need about 75 s of CPU time in all (mostly
# XLA compilation), so ~40 s of wall time on 2 idle cores; the limit only bounds a hang (e.g.
# a process that never reaches the coordinator) on a loaded machine.
TIMEOUT_S = 600
# Variables that announce a multi-process launch (moe_adapt.train.mesh.multi_process_env).
_LAUNCH_VARS = (
  "JAX_COORDINATOR_ADDRESS",
  "COORDINATOR_ADDRESS",
  "JAX_NUM_PROCESSES",
  "JAX_PROCESS_ID",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "OMPI_COMM_WORLD_SIZE",
  "TPU_WORKER_HOSTNAMES",
)
RTOL, ATOL = 1e-5, 1e-7


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Proc:
  """One CLI process writing its output to files (no pipe can fill up and block it)."""

  name: str
  popen: subprocess.Popen
  out: pathlib.Path
  err: pathlib.Path

  @property
  def stderr_tail(self) -> str:
    return f"--- {self.name} stderr ---\n{self.err.read_text()[-3000:]}"

  def results(self) -> dict:
    """The results JSON the CLI prints as its last stdout line."""
    return json.loads(self.out.read_text().strip().splitlines()[-1])


def _launch(name: str, workdir, logs: pathlib.Path, *, devices: int, extra: dict) -> Proc:
  env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
  env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", **extra)
  out, err = logs / f"{name}.out", logs / f"{name}.err"
  cmd = [sys.executable, "-m", "moe_adapt.main", *FLAGS, f"--workdir={workdir}"]
  if extra:
    cmd.append("--distributed=on")
  with open(out, "w") as fo, open(err, "w") as fe:
    popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fo, stderr=fe)
  return Proc(name, popen, out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{'pair': workdir of the 2-process run, 'single': of the 1-process run, 'procs': ...}."""
  base = tmp_path_factory.mktemp("two_process")
  pair, single = base / "pair", base / "single"
  coordinator = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
  procs, start = [], time.monotonic()
  try:
    for i in range(2):
      extra = {**coordinator, "JAX_PROCESS_ID": str(i)}
      procs.append(_launch(f"process{i}", pair, base, devices=2, extra=extra))
    procs.append(_launch("single", single, base, devices=4, extra={}))
    while any(p.popen.poll() is None for p in procs):
      if time.monotonic() - start > TIMEOUT_S:
        for p in procs:
          p.popen.kill()
        pytest.fail(
          f"not finished within {TIMEOUT_S} s:\n" + "\n".join(p.stderr_tail for p in procs)
        )
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.popen.poll() is None:
        p.popen.kill()
        p.popen.wait()
  failed = [p for p in procs if p.popen.returncode != 0]
  assert not failed, "\n".join(
    f"{p.name}: exit {p.popen.returncode}\n{p.stderr_tail}" for p in failed
  )
  print(f"two-process test: all three runs finished in {time.monotonic() - start:.1f} s")
  return {"pair": pair, "single": single, "procs": {p.name: p for p in procs}}


def _without_time(results: dict) -> dict:
  return {k: v for k, v in results.items() if k != "wall_time_s"}


def _assert_close(got, expected, where: str = "results") -> None:
  """Equal structure and strings; numbers within RTOL / ATOL."""
  if isinstance(expected, dict):
    assert isinstance(got, dict) and got.keys() == expected.keys(), where
    for k in expected:
      _assert_close(got[k], expected[k], f"{where}.{k}")
  elif isinstance(expected, list):
    assert isinstance(got, list) and len(got) == len(expected), where
    for i, (g, e) in enumerate(zip(got, expected)):
      _assert_close(g, e, f"{where}[{i}]")
  elif isinstance(expected, float):
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=where)
  else:
    assert got == expected, where


def _json(path: pathlib.Path):
  return json.loads(path.read_text())


def _entries(root: pathlib.Path, depth: int) -> list[str]:
  """Relative paths of the files and folders at most `depth` levels below `root`."""
  return sorted(
    str(p.relative_to(root)) for p in root.rglob("*") if len(p.relative_to(root).parts) <= depth
  )


def test_results_json_is_process_0s_and_both_processes_agree(runs):
  stored = _json(runs["pair"] / "results.json")
  p0, p1 = runs["procs"]["process0"].results(), runs["procs"]["process1"].results()
  # Each process measures its own wall time: the file holds process 0's.
  assert stored == p0
  assert _without_time(p1) == _without_time(p0)


def test_results_agree_with_the_single_process_run(runs):
  pair, single = _json(runs["pair"] / "results.json"), _json(runs["single"] / "results.json")
  assert set(pair["metrics"]) == {"muki"}
  # Every accuracy is a multiple of 1 / N_test, so RTOL / ATOL far below 1 / N: the same
  # predictions on every test example.
  assert 1 / pair["num_examples"]["test"] > 100 * (RTOL + ATOL)
  _assert_close(_without_time(pair), _without_time(single))


def test_teacher_scores_and_trained_student_agree(runs):
  with (
    np.load(runs["pair"] / muka.CONFIDENCE_FILE) as a,
    np.load(runs["single"] / muka.CONFIDENCE_FILE) as b,
  ):
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
      np.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=1e-6, err_msg=name)
  # The final student checkpoint (written by two processes on 2 + 2 devices) restores here,
  # on one device of another topology, and holds the single-process run's parameters. Adam
  # turns a rounding-level gradient into a full-size update where a gradient is ~0, hence
  # the looser tolerance than for the losses.
  config = configs_util.config_module("muka").get_config("fmnist,tiny")
  setup = muka.make_setup(config)
  tx = optax.adam(config.student.lr)
  template = jax.eval_shape(
    lambda key: muka.init_model(setup.student_model, key, setup.input_shape, tx),
    setup.key("student_init"),
  )
  states = []
  for run in ("pair", "single"):
    with ckpt_lib.Checkpointer(runs[run] / "checkpoints" / "muki") as ckpt:
      step, state, meta = ckpt.restore(template)
    assert step == config.student.steps and meta["finished"]
    states.append(jax.device_get(state["params"]))
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_workdir_holds_each_file_once(runs):
  pair, single = runs["pair"], runs["single"]
  assert _json(pair / "config.json") == _json(single / "config.json")
  # The same files and folders down to checkpoints/<stage>/<step>/<item> (below that orbax
  # writes per-process files): no temporary or duplicate files, each checkpoint saved once.
  assert _entries(pair, 4) == _entries(single, 4)
  assert not [f for f in _entries(pair, 99) if "tmp" in pathlib.Path(f).name]
  stages = {p.name for p in (pair / "checkpoints").iterdir()}
  assert stages == {"teacher_0", "teacher_1", "muki"}
  # One metrics line per (stage, step), written by process 0 only, with the same values.
  lines = [json.loads(line) for line in (pair / "metrics.jsonl").read_text().splitlines()]
  expected = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["stage"], r["step"]) for r in lines]
  assert len(set(keys)) == len(keys) == len(expected) > 0
  assert keys == [(r["stage"], r["step"]) for r in expected]
  for got, want in zip(lines, expected):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=RTOL, atol=ATOL)
