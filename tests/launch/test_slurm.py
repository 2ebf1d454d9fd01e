"""Tests of launch/slurm.py (SLURM job arrays of sweep workers) and `launch.sweep work`.

The main test submits a tiny sweep of fake runs (a few lines of Python that sleep and
write results.json) through a fake `sbatch` that starts every array task as a local
process with `SLURM_ARRAY_TASK_ID` set. Half-way, one task gets SIGTERM (as from
`scancel` or a time limit) and the others SIGKILL (a node lost); the resubmitted array
then finishes the sweep, and every run has written its results exactly once.
"""

import json
import os
import pathlib
import re
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from launch import slurm, sweep

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILE = "configs/meta_dmoe.py"
TIMEOUT_S = 60

FAKE_CLI = """\
import json, os, pathlib, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
workdir = pathlib.Path(args["workdir"])
print("fake run", workdir.name, os.environ["SLURM_ARRAY_TASK_ID"], flush=True)
time.sleep(float(args["config.sleep"]))
(workdir / "results.json").write_text(json.dumps({"seed": int(args["config.seed"])}))
with open(os.environ["FAKE_COMPLETIONS"], "a") as f:
  f.write(workdir.name + "\\n")
"""

# A fake sbatch: reads the #SBATCH lines of the script it is given, starts one local
# process per array task (in its own session, as a node would) and prints a job id.
FAKE_SBATCH = """\
#!{python}
import os, pathlib, re, subprocess, sys
calls = pathlib.Path({calls!r})
with open(calls, "a") as f:
  f.write(" ".join(sys.argv[1:]) + "\\n")
job = str(1000 + len(calls.read_text().splitlines()))
script = sys.argv[-1]
opts = dict(re.findall(r"^#SBATCH --([\\w-]+)=(.*)$", open(script).read(), re.M))
lo, hi = map(int, re.match(r"(\\d+)-(\\d+)", opts["array"]).groups())
pids = []
for task in range(lo, hi + 1):
  out = opts["output"].replace("%A", job).replace("%a", str(task))
  env = dict(os.environ, SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(task))
  proc = subprocess.Popen(
    ["bash", script], cwd=opts["chdir"], env=env, stdout=open(out, "a"),
    stderr=subprocess.STDOUT, start_new_session=True,
  )
  pids.append(str(proc.pid))
pathlib.Path({pids!r}).write_text(" ".join(pids))
print(job + ";cluster")
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
  """(bin dir with sbatch, sbatch calls log, file of the last array's task pids)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls, pids = tmp_path / "sbatch_calls.txt", tmp_path / "task_pids.txt"
  sbatch = bin_dir / "sbatch"
  sbatch.write_text(FAKE_SBATCH.format(python=sys.executable, calls=str(calls), pids=str(pids)))
  sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_COMPLETIONS", str(tmp_path / "completions.txt"))
  return bin_dir, calls, pids


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # The fake sbatch has exited: its tasks are orphans that init reaps; a zombie
  # left in the meantime counts as ended.
  stat_file = pathlib.Path(f"/proc/{pid}/stat")
  return not (stat_file.exists() and stat_file.read_text().split(")")[-1].split()[0] == "Z")


def _wait(condition, what: str) -> None:
  deadline = time.monotonic() + TIMEOUT_S
  while not condition():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def test_killed_array_resubmitted_runs_every_run_exactly_once(tmp_path, fake_slurm):
  _, calls, pid_file = fake_slurm
  cli = tmp_path / "fake_cli.py"
  cli.write_text(FAKE_CLI)
  sweep_dir = tmp_path / "sweep"
  specs = sweep.expand("fake.py", None, [{"sleep": 1.5}], seeds=range(6))
  runs = sweep.prepare_runs(specs, sweep_dir)
  script = slurm.job_script(
    sweep_dir, tasks=3, chdir=REPO, program=[sys.executable, str(cli)], time="00:10:00"
  )
  assert "#SBATCH --array=0-2" in script and "#SBATCH --time=00:10:00" in script
  assert slurm.submit(script, sweep_dir) == "1001"
  assert calls.read_text().split()[0] == "--parsable"
  states = lambda: [sweep.run_state(run.path) for run in runs]
  # Half-way: some runs done, some running (which ones depends on the tasks' timing).
  _wait(lambda: "done" in states() and "running" in states(), "runs done and running")
  pids = [int(p) for p in pid_file.read_text().split()]
  os.kill(pids[0], signal.SIGTERM)  # scancel / time limit: the worker stops its run.
  for pid in pids[1:]:
    os.killpg(pid, signal.SIGKILL)  # A node lost: the task and its run die at once.
  _wait(lambda: not any(_alive(p) for p in pids), "the killed tasks to end")
  _wait(lambda: "running" not in states(), "the killed runs to release their locks")
  after = states()
  killed = {r.name for r, state in zip(runs, after, strict=True) if state == "incomplete"}
  assert killed and "done" in after and set(after) <= {"done", "incomplete", "not started"}
  finished_first = set((tmp_path / "completions.txt").read_text().split())
  assert finished_first == {r.name for r, state in zip(runs, after, strict=True) if state == "done"}
  log0 = (sweep_dir / "slurm" / "1001_0.out").read_text()
  assert "start" in log0 and "runs done" not in log0

  # Resubmitted: the finished runs are skipped, the killed ones run again.
  assert slurm.submit(script, sweep_dir) == "1002"
  pids = [int(p) for p in pid_file.read_text().split()]
  _wait(lambda: not any(_alive(p) for p in pids), "the resubmitted array to finish")
  assert states() == ["done"] * 6
  completions = (tmp_path / "completions.txt").read_text().split()
  assert sorted(completions) == sorted(run.name for run in runs)  # Each exactly once.
  for run in runs:
    headers = (run.path / sweep.LOG_FILE).read_text().count("attempt started")
    assert headers == (2 if run.name in killed else 1), run.name
  # Each task's summary counts what was done when it ended; the last one saw everything.
  outs = [(sweep_dir / "slurm" / f"1002_{task}.out").read_text().rstrip() for task in range(3)]
  assert all(re.search(r"\n[1-6]/6 runs done$", out) for out in outs), outs
  assert any(out.endswith("\n6/6 runs done") for out in outs), outs
  # A third submission would find nothing to do: every task skips every run.
  assert slurm.submit(script, sweep_dir) == "1003"
  pids = [int(p) for p in pid_file.read_text().split()]
  _wait(lambda: not any(_alive(p) for p in pids), "the third array to finish")
  assert sorted((tmp_path / "completions.txt").read_text().split()) == sorted(completions)
  out = (sweep_dir / "slurm" / "1003_1.out").read_text()
  assert out.startswith("6 runs: 6 done, 0 to launch")


def test_work_claims_each_run_once_and_rotates(tmp_path, monkeypatch, fake_slurm):
  cli = tmp_path / "fake_cli.py"
  cli.write_text(FAKE_CLI)
  specs = sweep.expand("fake.py", None, [{"sleep": 0.0}], seeds=range(3))
  runs = sweep.read_runs(sweep.prepare_runs(specs, tmp_path / "s")[0].path.parent)
  assert [r.name for r in sweep.rotate(runs, 4)] == [r.name for r in (*runs[1:], runs[0])]
  monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
  program = f"--program={shlex.join([sys.executable, str(cli)])}"
  argv = ["work", f"--sweep_dir={tmp_path / 's'}", program]
  proc = subprocess.run(
    [sys.executable, "-m", "launch.sweep", *argv], cwd=REPO, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr
  assert f"[1/3] start {runs[2].name}" in proc.stdout
  assert proc.stdout.rstrip().endswith("3/3 runs done")
  # A run whose results appeared after the state check is not started again.
  for run in runs:
    (run.path / "results.json").unlink()
  (runs[0].path / "results.json").write_text("{}")
  attempt = sweep._start(1, runs[0], [sys.executable, str(cli)], None)
  assert attempt is None


def test_bad_input(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  base = [f"--config={CONFIG_FILE}:digits_rot,tiny", f"--sweep_dir={tmp_path / 's'}"]
  cases = [
    (["--tasks=0"], "--tasks=0 is invalid; accepted: an integer >= 1"),
    (["--gpus_per_task=-1"], "--gpus_per_task=-1 is invalid"),
    (["--time=4h"], "--time='4h' is invalid; accepted: SLURM's [D-]HH:MM:SS"),
    (["--program="], "--program='' is invalid; accepted: a command line"),
    (["--set", "meta.stepz=1"], "override 'meta.stepz' names no field of the config"),
  ]
  for extra, message in cases:
    assert slurm.main([*base, *extra, "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"launch.slurm: error: {message}"), err
  assert sweep.main(["work", f"--sweep_dir={tmp_path}"]) == 2
  assert "holds no runs; create them first" in capsys.readouterr().err
  monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "x")
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "spec.json").write_text(json.dumps({"config_arg": None, "overrides": {}}))
  assert sweep.main(["work", f"--sweep_dir={tmp_path}"]) == 2
  assert "SLURM_ARRAY_TASK_ID='x' is not an integer" in capsys.readouterr().err


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path, capsys, monkeypatch, fake_slurm):
  _, calls, _ = fake_slurm
  monkeypatch.chdir(REPO)
  sweep_dir = tmp_path / "s"
  argv = [
    f"--config={CONFIG_FILE}:digits_rot,tiny", f"--sweep_dir={sweep_dir}", "--seeds=0,1",
    "--no_sweep", "--tasks=5", "--max_parallel=1", "--gpus_per_task=1", "--partition=gpu",
    "--venv=/opt/venv", "--dry_run",
  ]  # fmt: skip
  assert slurm.main(argv) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines == [
    "sbatch --parsable <<'EOF'",
    "#!/bin/bash",
    "#SBATCH --job-name=moe-adapt-sweep",
    "#SBATCH --array=0-1%1",  # Two runs: two tasks, not five.
    "#SBATCH --ntasks=1",
    f"#SBATCH --chdir={REPO}",
    f"#SBATCH --output={sweep_dir}/slurm/%A_%a.out",
    "#SBATCH --open-mode=append",
    "#SBATCH --gpus-per-task=1",
    "#SBATCH --partition=gpu",
    "set -euo pipefail",
    "source /opt/venv/bin/activate",
    f"exec python -m launch.sweep work --sweep_dir={sweep_dir} --workers=1",
    "EOF",
  ]
  assert not calls.exists() and not (sweep_dir / "slurm").exists()
  assert len(sweep.read_runs(sweep_dir)) == 2
  for run in sweep.read_runs(sweep_dir):
    (run.path / "results.json").write_text("{}")
  assert slurm.main(argv[:-1]) == 0
  assert capsys.readouterr().out == "2 runs: all done; nothing submitted\n"
  assert not calls.exists()
