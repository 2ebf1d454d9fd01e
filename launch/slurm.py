r"""Sweeps on SLURM: one job array whose tasks are `launch.sweep work` workers.

  python -m launch.slurm --config=configs/meta_dmoe.py:digits_rot \
      --sweep_dir=/shared/runs/mdmoe_ablations --seeds=0,1,2 \
      --tasks=8 --max_parallel=4 --gpus_per_task=1 --cpus_per_task=8 \
      --partition=gpu --time=04:00:00 --venv=/shared/venvs/moe_adapt
  python -m launch.sweep list --sweep_dir=/shared/runs/mdmoe_ablations

On the submitting host this expands and checks the runs exactly as
`launch.sweep launch` does and creates their folders (so that no two array tasks
race to write a spec.json), then writes the job script to
`<sweep_dir>/slurm/array-<time>.sh` and submits it with `sbatch --parsable`. Each
array task runs `python -m launch.sweep work --sweep_dir=<sweep_dir>` starting at
run number `$SLURM_ARRAY_TASK_ID`: it claims runs through the sweep's per-run lock
and skips those with results.json, so tasks never run the same run twice and a
resubmitted array (after a time limit, a preemption or `scancel`) only runs what is
unfinished, resuming interrupted runs from their checkpoints. The sweep folder must
be on storage every node sees, with cluster-wide flock (NFSv4, Lustre mounted with
`flock`, GPFS). Task logs go to `<sweep_dir>/slurm/<job>_<task>.out`; each run's own
log is its log.txt.

`exec` makes the worker the task's main process, so the SIGTERM that SLURM sends at
the time limit or on `scancel` reaches it: it stops its runs and marks them
interrupted, and the next submission resumes them. Options that are not given are
left to the cluster's defaults. `--dry_run` prints the script and the sbatch command
without writing or submitting the script (the run folders are still created).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

from launch import sweep

SCRIPT_DIR = "slurm"  # Inside the sweep folder: job scripts and task logs.
_TIME = re.compile(r"^(\d+-)?\d+(:\d\d){0,2}$")


def job_script(
  sweep_dir: str | os.PathLike,
  *,
  tasks: int,
  max_parallel: int | None = None,
  workers: int = 1,
  job_name: str = "moe-adapt-sweep",
  chdir: str | os.PathLike,
  python: str = sys.executable,
  venv: str | None = None,
  program: Sequence[str] | None = None,
  gpus_per_task: int | None = None,
  cpus_per_task: int | None = None,
  mem: str | None = None,
  partition: str | None = None,
  account: str | None = None,
  time: str | None = None,
) -> str:
  """The sbatch script of a `tasks`-task array of sweep workers over `sweep_dir`.

  Args:
    sweep_dir: the sweep folder (made absolute: the job starts in `chdir`).
    tasks: array size; task i starts at run i.
    max_parallel: at most this many tasks at once (`--array=0-N%M`).
    workers: runs at a time inside one task (`work --workers`).
    chdir: the job's working directory (the repository: config paths are relative to it).
    python: interpreter of the worker; with `venv`, the venv's `python` after activation.
    venv: virtualenv to activate first.
    program: argv prefix of the CLI the worker runs (default: the worker's interpreter
      with `-m moe_adapt.main`).
    gpus_per_task, cpus_per_task, mem, partition, account, time: sbatch options.
  """
  sweep_dir = os.path.abspath(sweep_dir)
  array = f"0-{tasks - 1}" + (f"%{max_parallel}" if max_parallel else "")
  lines = [
    "#!/bin/bash",
    f"#SBATCH --job-name={job_name}",
    f"#SBATCH --array={array}",
    "#SBATCH --ntasks=1",
    f"#SBATCH --chdir={os.path.abspath(chdir)}",
    f"#SBATCH --output={os.path.join(sweep_dir, SCRIPT_DIR, '%A_%a.out')}",
    "#SBATCH --open-mode=append",
  ]
  optional = {
    "gpus-per-task": gpus_per_task,
    "cpus-per-task": cpus_per_task,
    "mem": mem,
    "partition": partition,
    "account": account,
    "time": time,
  }
  lines += [f"#SBATCH --{key}={value}" for key, value in optional.items() if value is not None]
  lines.append("set -euo pipefail")
  if venv is not None:
    lines.append(f"source {shlex.quote(os.path.join(venv, 'bin', 'activate'))}")
    python = "python"
  argv = [python, "-m", "launch.sweep", "work", f"--sweep_dir={sweep_dir}"]
  argv.append(f"--workers={workers}")
  if program is not None:
    argv.append(f"--program={shlex.join(program)}")
  lines.append("exec " + shlex.join(argv))
  return "\n".join(lines) + "\n"


def submit(script: str, sweep_dir: str | os.PathLike, *, sbatch: str = "sbatch") -> str:
  """Writes `script` into `<sweep_dir>/slurm/` and submits it; returns the job id."""
  folder = pathlib.Path(sweep_dir) / SCRIPT_DIR
  folder.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
  path = folder / f"array-{stamp}.sh"
  path.write_text(script, encoding="utf-8")
  try:
    proc = subprocess.run(
      [sbatch, "--parsable", str(path)], capture_output=True, text=True, check=False
    )
  except FileNotFoundError:
    raise ValueError(f"{sbatch!r} is not on PATH: is this a SLURM submission host?") from None
  if proc.returncode != 0:
    raise ValueError(f"sbatch failed with exit code {proc.returncode}: {proc.stderr.strip()}")
  # --parsable prints '<job id>' or '<job id>;<cluster>'.
  return proc.stdout.strip().split(";")[0]


def _positive(value: int | None, field: str) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise ValueError(f"--{field}={value!r} is invalid; accepted: an integer >= 1")


def _main(args: argparse.Namespace) -> int:
  for field in ("tasks", "max_parallel", "workers", "gpus_per_task", "cpus_per_task"):
    _positive(getattr(args, field), field)
  if args.time is not None and not _TIME.match(args.time):
    raise ValueError(
      f"--time={args.time!r} is invalid; accepted: SLURM's [D-]HH:MM:SS, e.g. 04:00:00"
    )
  program = sweep.parse_program(args.program) if args.program is not None else None
  runs = sweep.runs_from_args(args)
  unfinished = [run for run in runs if sweep.run_state(run.path) != "done"]
  if not unfinished:
    print(f"{len(runs)} runs: all done; nothing submitted")
    return 0
  tasks = min(args.tasks or len(unfinished), len(unfinished))
  script = job_script(
    args.sweep_dir,
    tasks=tasks,
    max_parallel=args.max_parallel,
    workers=args.workers,
    job_name=args.job_name,
    chdir=os.getcwd(),
    venv=args.venv,
    program=program,
    gpus_per_task=args.gpus_per_task,
    cpus_per_task=args.cpus_per_task,
    mem=args.mem,
    partition=args.partition,
    account=args.account,
    time=args.time,
  )
  if args.dry_run:
    print(f"sbatch --parsable <<'EOF'\n{script}EOF")
    return 0
  job = submit(script, args.sweep_dir, sbatch=args.sbatch)
  print(
    f"submitted array job {job}: {tasks} task(s) for {len(unfinished)} unfinished of "
    f"{len(runs)} runs; follow with: python -m launch.sweep list --sweep_dir={args.sweep_dir}"
  )
  return 0


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m launch.slurm", description=__doc__.split("\n\n")[0]
  )
  sweep.add_sweep_arguments(parser)
  parser.add_argument(
    "--tasks", type=int, default=None, help="array tasks (default and cap: unfinished runs)"
  )
  parser.add_argument("--max_parallel", type=int, default=None, help="tasks at once (%%M)")
  parser.add_argument("--workers", type=int, default=1, help="runs at a time per task")
  parser.add_argument("--gpus_per_task", type=int, default=None)
  parser.add_argument("--cpus_per_task", type=int, default=None)
  parser.add_argument("--mem", default=None, help="memory per node, e.g. 64G")
  parser.add_argument("--partition", default=None)
  parser.add_argument("--account", default=None)
  parser.add_argument("--time", default=None, help="time limit per task, e.g. 04:00:00")
  parser.add_argument("--job_name", default="moe-adapt-sweep")
  parser.add_argument("--venv", default=None, help="virtualenv the tasks activate")
  parser.add_argument("--sbatch", default="sbatch", help="the sbatch command (default sbatch)")
  parser.add_argument("--dry_run", action="store_true", help="print the script, submit nothing")
  sweep.add_program_argument(parser)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _main(args)
  except ValueError as e:
    print(f"launch.slurm: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
