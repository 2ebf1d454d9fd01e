"""SIGKILL at every stage of every method, then the same command again: the same results.

For each method, on its tiny CLI config (fewer variants or domains, so that every kind of
stage appears once), two `moe-adapt` subprocesses on 1 CPU device:
- `ref`: one uninterrupted run;
- `chain`: the same command started again and again in another workdir, each start killed
  with a real SIGKILL at the next point of the method's kill list (tests/kill_at.py installs
  the fault by wrapping library functions under their public names), until a start ends.

Kill points (see tests/kill_at.py): `save:<stage>:<step>` right after a stage's first
checkpoint is committed (the restart resumes inside the stage); `write:<stage>:<step>`
inside orbax's commit of a checkpoint (all files written into the temporary folder, not yet
renamed: the restart must drop it and resume from the previous checkpoint); `call:` /
`return:` inside the post-training phase (evaluation, cached evaluations, cached teacher
scores). Every stage checkpoints every 2 steps and has 3 or 4 steps.

Checked: each killed start died by SIGKILL where intended and wrote no results.json; each
restart left finished stages alone and resumed the killed stage from its newest committed
checkpoint; the final results.json is bitwise the reference's (times aside), as are every
logged metric and every stage's final checkpoint, which restores; no temporary file is left.

Coverage by this file and the other kill tests (tests/test_main.py: SIGKILL in Meta-DMoE's
meta stage after a checkpoint; tests/methods/test_finetune.py: SIGKILL in the `lora` stage
before its first checkpoint; tests/train/test_loop.py: SIGKILL of a bare training loop):

| method | stages killed here (mid-stage / during a checkpoint write) | post-training phase |
|---|---|---|
| meta_dmoe | experts, aggregator, student / meta | evaluation |
| co_tuning | source, co_tuning_reverse / l2_sp | calibration + relationship |
| muka | teacher_0, muki / teacher_1 | cached teacher scores |
| finetune | pretrain / lora | evaluation |
| adamix | pretrain, adamix / adapter | mixture evaluation (cache) |
| adapter_soup | pretrain, adapter_rot0, zero_shot_head_rot75 / adapter_rot75 | cached evaluations |

Speed: the reference compiles with XLA's cheap CPU settings and fills a persistent
compilation cache that every start of the chain reads back; two methods run at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_adapt.train import checkpoint as ckpt_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 600
WORKERS = 2
# Fields that measure time: they differ between any two runs.
TIMING_FIELDS = ("wall_time_s", "step_time_s")
# Evaluation caches in the workdir (adamix, adapter_soup).
JSON_CACHES = ("adamix_eval.json", "mixture_evals.json")
# One block, no dropout: the adapter methods' training steps compile several times faster.
VIT = ("--config.model.options.depth=1", "--config.model.dropout=0.0")


@dataclasses.dataclass(frozen=True)
class Case:
  """A method's CLI flags and its kill points, in the order the pipeline reaches them."""

  flags: tuple[str, ...]
  kills: tuple[str, ...]


CASES = {
  "meta_dmoe": Case(
    ("--config=configs/meta_dmoe.py:digits_rot,tiny",),
    (
      "save:experts:2",
      "save:aggregator:2",
      "save:student:2",
      "write:meta:4",
      # The second call is evaluation's (the first gives the meta stages their features).
      "return:moe_adapt.methods.meta_dmoe:expert_features:2",
    ),
  ),
  "co_tuning": Case(
    (
      "--config=configs/co_tuning.py:fmnist,tiny",
      "--config.variants=('fine_tune','l2_sp','co_tuning_reverse')",  # the baseline is run
      "--config.selection.lr_grid=(0.03,)",  # one candidate: stages named by variant
    ),
    (
      "save:source:2",
      "call:moe_adapt.methods.co_tuning:compute_relationship:1",
      "write:l2_sp:4",
      "save:co_tuning_reverse:2",
    ),
  ),
  "muka": Case(
    ("--config=configs/muka.py:fmnist,tiny", "--config.variants=('muki','teachers')"),
    (
      "save:teacher_0:2",
      "write:teacher_1:3",
      "return:moe_adapt.methods.muka:teacher_scores:1",
      "save:muki:2",
    ),
  ),
  "finetune": Case(
    ("--config=configs/finetune.py:digits,tiny", *VIT, "--config.variants=('lora',)"),
    (
      "save:pretrain:2",
      "write:lora:4",
      "call:moe_adapt.methods.adapter_harness:evaluate_outcomes:1",
    ),
  ),
  "adamix": Case(
    ("--config=configs/adamix.py:digits,tiny", *VIT, "--config.variants=('adamix','adapter')"),
    (
      "save:pretrain:2",
      "save:adamix:2",
      # Inside `adamix.evaluate_mixture` (two random routings of each kind, merged, fixed),
      # before the variant's entry of the evaluation cache is written.
      "call:moe_adapt.methods.adapter_harness:evaluate_outcomes:3",
      "write:adapter:4",
    ),
  ),
  "adapter_soup": Case(
    (
      "--config=configs/adapter_soup.py:digits,tiny",
      *VIT,
      "--config.data.domains=('rot0','rot75')",
      "--config.selection.top_k=1",
      "--config.pruning.sparsities=(0.5,)",
    ),
    (
      "save:pretrain:2",
      "save:adapter_rot0:2",
      "write:adapter_rot75:4",
      "save:zero_shot_head_rot75:2",
      # The 8th of 17 cached evaluations: 2 novel-domain ones and the zero-shot head's
      # are cached before it, the in-domain study is under way.
      "call:moe_adapt.methods.soup_core:evaluate_outcomes:8",
    ),
  ),
}
# Longest first, so that two workers finish at about the same time.
ORDER = ("meta_dmoe", "adapter_soup", "adamix", "co_tuning", "muka", "finetune")


def _env(cache: pathlib.Path, kill_at: str | None) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
  )
  env["JAX_PLATFORMS"] = "cpu"
  # Every start reads back what the reference compiled.
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  env.pop("MOE_ADAPT_KILL_AT", None)
  if kill_at:
    env["MOE_ADAPT_KILL_AT"] = kill_at
  return env


# ----------------------------------------------------------------------------- workdir facts


def _metric_lines(workdir: pathlib.Path) -> list[dict]:
  """Every parsable line of metrics.jsonl in file order (a line cut by a kill is skipped)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  lines = []
  for line in path.read_text().splitlines():
    try:
      lines.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return lines


def _committed(workdir: pathlib.Path) -> dict[str, dict[int, bool]]:
  """stage -> {committed step: finished}, read from the files (no orbax manager is opened:
  it would clean up the temporary folders the next start must deal with)."""
  out = {}
  root = workdir / "checkpoints"
  for stage_dir in sorted(root.iterdir()) if root.is_dir() else ():
    steps = {}
    for step_dir in stage_dir.iterdir():
      if step_dir.name.isdigit():
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
        steps[int(step_dir.name)] = bool(meta["finished"])
    out[stage_dir.name] = steps
  return out


def _temporary(workdir: pathlib.Path) -> dict[str, list[str]]:
  """Paths under `workdir` left by an unfinished write (orbax's or an atomic JSON/npz) ->
  the names in it (folders) or []."""
  return {
    str(p.relative_to(workdir)): sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    for p in sorted(workdir.rglob("*"))
    if "tmp" in p.name
  }


@dataclasses.dataclass
class Start:
  """One start of a chain and what it left in the workdir."""

  kill_at: str | None
  returncode: int
  stderr: str
  lines_before: int  # parsable metric lines when the start began
  results_written: bool
  committed: dict[str, dict[int, bool]]
  temporary: dict[str, list[str]]  # see _temporary
  files: dict[str, int]  # top-level file -> mtime_ns
  caches: dict[str, dict]  # JSON caches of evaluations -> their contents


# Processes running now, so that the fixture's teardown can end them (e.g. after `-x`).
_LIVE: set[subprocess.Popen] = set()
_ABORT = threading.Event()


def _run(case: Case, workdir: pathlib.Path, cache: pathlib.Path, kill_at: str | None, log) -> Start:
  lines_before = len(_metric_lines(workdir))
  command = [sys.executable, "-m", "tests.kill_at", *case.flags, f"--workdir={workdir}"]
  with open(log, "w+") as err:
    proc = subprocess.Popen(
      command, cwd=REPO, env=_env(cache, kill_at), stdout=subprocess.DEVNULL, stderr=err
    )
    _LIVE.add(proc)
    try:
      returncode = proc.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      returncode = None
    finally:
      _LIVE.discard(proc)
    err.seek(0)
    stderr = err.read()
  return Start(
    kill_at=kill_at,
    returncode=returncode,
    stderr=stderr,
    lines_before=lines_before,
    results_written=(workdir / "results.json").exists(),
    committed=_committed(workdir),
    temporary=_temporary(workdir),
    files={p.name: p.stat().st_mtime_ns for p in workdir.glob("*") if p.is_file()},
    caches={
      p.name: json.loads(p.read_text()) for p in map(workdir.joinpath, JSON_CACHES) if p.exists()
    },
  )


def _run_method(name: str, base: pathlib.Path) -> dict:
  """The reference run, then the chain of killed starts (see the module docstring)."""
  case = CASES[name]
  cache = base / "compilation_cache"
  ref = _run(case, base / f"{name}_ref", cache, None, base / f"{name}_ref.log")
  chain = []
  if ref.returncode == 0:
    for i, kill_at in enumerate((*case.kills, None)):
      if _ABORT.is_set():
        break
      log = base / f"{name}_chain.{i}.log"
      chain.append(_run(case, base / f"{name}_chain", cache, kill_at, log))
      if chain[-1].returncode != -signal.SIGKILL:
        break
  return {
    "ref": ref,
    "chain": chain,
    "ref_dir": base / f"{name}_ref",
    "chain_dir": base / f"{name}_chain",
  }


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
  """method -> a function waiting for its runs; the selected methods run as the module starts,
  `WORKERS` at a time."""
  base = tmp_path_factory.mktemp("kill_resume")
  selected = {
    item.callspec.params["method"]
    for item in request.session.items
    if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
  }
  todo: queue.Queue = queue.Queue()
  for name in ORDER:
    if name in selected:
      todo.put(name)
  done = {name: threading.Event() for name in CASES}
  out: dict[str, dict] = {}

  def worker():
    while True:
      try:
        name = todo.get_nowait()
      except queue.Empty:
        return
      try:
        out[name] = _run_method(name, base)
      except Exception as e:  # reported by the test of that method
        out[name] = {"error": repr(e)}
      finally:
        done[name].set()

  threads = [threading.Thread(target=worker, daemon=True) for _ in range(WORKERS)]
  for thread in threads:
    thread.start()

  def get(name: str) -> dict:
    assert done[name].wait(timeout=4 * START_TIMEOUT_S * (len(CASES[name].kills) + 2))
    assert "error" not in out[name], out[name]["error"]
    ref = out[name]["ref"]
    assert ref.returncode == 0, ref.stderr[-5000:]
    return out[name]

  yield get
  _ABORT.set()
  for proc in list(_LIVE):
    proc.kill()
  for thread in threads:
    thread.join(timeout=60)


METHODS = pytest.mark.parametrize("method", list(CASES))


def _stage_and_step(point: str) -> tuple[str, int]:
  _, stage, step = point.split(":")
  return stage, int(step)


# ----------------------------------------------------------------------------- the tests


@pytest.mark.slow
@METHODS
def test_each_start_is_killed_at_its_point_and_writes_no_results(runs, method):
  r = runs(method)
  chain, kills = r["chain"], CASES[method].kills
  for start in chain[:-1]:
    assert start.returncode == -signal.SIGKILL, (start.kill_at, start.stderr[-3000:])
  assert [s.kill_at for s in chain] == [*kills, None], (
    f"the chain ended early: start {len(chain)} ({chain[-1].kill_at}) exited with "
    f"{chain[-1].returncode}:\n{chain[-1].stderr[-3000:]}"
  )
  for start in chain[:-1]:
    assert not start.results_written, start.kill_at
    kind = start.kill_at.split(":")[0]
    if kind == "save":
      stage, step = _stage_and_step(start.kill_at)
      assert max(start.committed[stage]) == step, (start.kill_at, start.committed)
      assert not start.committed[stage][step], "killed after the stage had finished"
    elif kind == "write":
      # Every file of the step is written, in a temporary folder orbax never renamed.
      stage, step = _stage_and_step(start.kill_at)
      assert step not in start.committed.get(stage, {}), start.committed
      (tmp,) = [t for t in start.temporary if t.startswith(f"checkpoints/{stage}/{step}.")]
      assert {"state", "meta"} <= set(start.temporary[tmp]), start.temporary


@pytest.mark.slow
@METHODS
def test_each_restart_keeps_finished_stages_and_resumes_the_killed_one(runs, method):
  r = runs(method)
  chain = r["chain"]
  lines = _metric_lines(r["chain_dir"])
  for killed, restart in itertools.pairwise(chain):
    logged = lines[restart.lines_before :]  # this start's lines, then later starts'
    finished = {s for s, steps in killed.committed.items() if steps and steps[max(steps)]}
    retrained = finished & {line["stage"] for line in logged}
    assert not retrained, f"after {killed.kill_at}: finished stages trained again: {retrained}"
    if killed.kill_at.split(":")[0] in ("save", "write"):
      stage, _ = _stage_and_step(killed.kill_at)
      newest = max(killed.committed.get(stage, {0: False}))
      first = next(line["step"] for line in logged if line["stage"] == stage)
      assert first == newest, f"after {killed.kill_at}: resumed at step {first}, not {newest}"


def _comparable(results: dict) -> dict:
  return {k: v for k, v in results.items() if k not in TIMING_FIELDS}


def _last_per_step(lines: list[dict]) -> dict:
  return {(r["stage"], r["step"]): {k: v for k, v in r.items() if k != "time"} for r in lines}


@pytest.mark.slow
@METHODS
def test_chained_run_ends_with_the_uninterrupted_results_bitwise(runs, method):
  r = runs(method)
  last = r["chain"][-1]
  assert last.returncode == 0, (last.kill_at, last.stderr[-5000:])
  ref_dir, chain_dir = r["ref_dir"], r["chain_dir"]
  expected = json.loads((ref_dir / "results.json").read_text())
  got = json.loads((chain_dir / "results.json").read_text())
  assert _comparable(got) == _comparable(expected)
  assert _last_per_step(_metric_lines(chain_dir)) == _last_per_step(_metric_lines(ref_dir))


@pytest.mark.slow
@METHODS
def test_final_checkpoints_restore_and_equal_the_reference(runs, method):
  r = runs(method)
  ref_dir, chain_dir = r["ref_dir"], r["chain_dir"]
  assert r["chain"][-1].returncode == 0
  stages = sorted(p.name for p in (ref_dir / "checkpoints").iterdir())
  assert sorted(p.name for p in (chain_dir / "checkpoints").iterdir()) == stages
  for stage in stages:
    with ckpt_lib.Checkpointer(ref_dir / "checkpoints" / stage) as ckpt:
      final = ckpt.all_steps()[-1]
    with ckpt_lib.Checkpointer(chain_dir / "checkpoints" / stage) as ckpt:
      assert ckpt.all_steps()[-1] == final and ckpt.is_finished(), stage
    states = [
      jax.device_get(
        ocp.StandardCheckpointer().restore(d / "checkpoints" / stage / f"{final}" / "state")
      )
      for d in (ref_dir, chain_dir)
    ]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1]), stage
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=stage)


@pytest.mark.slow
@METHODS
def test_no_temporary_or_damaged_folders_are_left(runs, method):
  r = runs(method)
  chain_dir = r["chain_dir"]
  assert r["chain"][-1].returncode == 0
  assert _temporary(chain_dir) == {}
  assert not list(chain_dir.rglob(f"{ckpt_lib.DAMAGED_PREFIX}*"))


def _start_after(chain: list[Start], point_prefix: str) -> int:
  """Index of the first start after the one killed at the point starting with `point_prefix`."""
  return next(i for i, s in enumerate(chain) if (s.kill_at or "").startswith(point_prefix)) + 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["muka"])
def test_muka_restart_reads_the_cached_teacher_scores(runs, method):
  chain = runs(method)["chain"]
  i = _start_after(chain, "return:moe_adapt.methods.muka:teacher_scores")
  name = "confidences.npz"
  assert name in chain[i - 1].files, "the killed start did not write the scores"
  # Never written again: later starts read it.
  assert {s.files[name] for s in chain[i:]} == {chain[i - 1].files[name]}
  assert "teacher scores: read" in chain[i].stderr


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adamix"])
def test_adamix_restart_reuses_the_evaluation_cache(runs, method):
  chain = runs(method)["chain"]
  at_kill = chain[_start_after(chain, "write:adapter") - 1].caches["adamix_eval.json"]
  assert set(at_kill) == {"adamix"}
  final = chain[-1].caches["adamix_eval.json"]
  assert set(final) == {"adamix", "adapter"}
  # The entry holds a measured step time: equal only if it was read back, not recomputed.
  assert final["adamix"] == at_kill["adamix"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adapter_soup"])
def test_adapter_soup_restart_evaluates_only_what_is_not_cached(runs, method):
  chain = runs(method)["chain"]
  at_kill = chain[-2].caches["mixture_evals.json"]
  final = chain[-1].caches["mixture_evals.json"]
  assert 0 < len(at_kill) < len(final)
  assert {k: final[k] for k in at_kill} == at_kill
  assert f"adapter_soup: {len(final) - len(at_kill)} evaluations in this run" in chain[-1].stderr
