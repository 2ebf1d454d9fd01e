r"""Sweeps: a config's declared ablations × seeds × target domains, one run each.

Every run is one `moe-adapt` command in its own folder `<sweep_dir>/<hash>`, the
hash being that of the run's spec (config file, config argument, overrides). The
same command therefore finds the same folders again: finished runs (holding
results.json) are skipped and interrupted ones are launched again, which resumes
them from their last checkpoint (the workdir is the unit of resumption).

  python -m launch.sweep launch --config=configs/meta_dmoe.py:digits_rot \
      --sweep_dir=runs/mdmoe_ablations --seeds=0,1,2 --workers=2
  python -m launch.sweep list --sweep_dir=runs/mdmoe_ablations
  python -m launch.sweep work --sweep_dir=runs/mdmoe_ablations   # one more worker

A run folder holds `spec.json` (written before anything is launched), `log.txt`
(stdout and stderr of every attempt, appended) and what the CLI writes
(config.json, metrics.jsonl, checkpoints/, results.json). While an attempt runs,
its process holds an exclusive `flock` on log.txt; that is how `list` tells a
running run from an interrupted one, and how several `work` processes sharing one
sweep folder (SLURM array tasks from `launch.slurm`, one per Cloud TPU slice) claim
each run exactly once: a worker starts a run only while holding its lock and only
if results.json is still absent. Across machines this needs a file system whose
flock is cluster-wide (NFSv4, Lustre mounted with `flock`, GPFS, Filestore).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import fcntl
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, NamedTuple, TextIO

SPEC_FILE = "spec.json"
LOG_FILE = "log.txt"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"  # Written by the CLI when a run starts.
SEED_KEY = "seed"
TARGETS_KEY = "data.target_domains"
STATES = ("done", "running", "failed", "incomplete", "not started")
LAUNCHERS = ("local", "print")
# How the local launcher starts the CLI: the same interpreter as the sweep.
LOCAL_PROGRAM = (sys.executable, "-m", "moe_adapt.main")
PRINT_PROGRAM = ("moe-adapt",)

_HASH_CHARS = 12
_LOG_PREFIX = "[launch.sweep]"
_EXIT_LINE = re.compile(re.escape(_LOG_PREFIX) + r" exit code (-?\d+)")
_SCALARS = (bool, int, float, str)


class Run(NamedTuple):
  """One run of a sweep: `spec` lives in `path/spec.json`, `name` is its hash."""

  name: str
  path: pathlib.Path
  spec: dict


# ----------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------


def parse_config_flag(value: str) -> tuple[str, str | None]:
  """`'configs/x.py:arg'` -> `('configs/x.py', 'arg')`; no colon -> `(file, None)`."""
  if not isinstance(value, str) or not value:
    raise ValueError(f"--config={value!r} is invalid; accepted: FILE or FILE:ARG")
  file, sep, arg = value.partition(":")
  return os.path.normpath(file), (arg if sep else None)


def load_config_module(config_file: str) -> ModuleType:
  """Imports a config file by path (as ml_collections' config_flags does)."""
  path = pathlib.Path(config_file)
  if not path.is_file():
    raise ValueError(f"--config file {config_file!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_sweep_config_{uuid.uuid4().hex}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config file {config_file!r} defines no get_config(arg)")
  return module


def declared_sweep(module: ModuleType, config_arg: str | None) -> list[dict]:
  """The override dicts of the config file's `get_sweep(arg)`, checked.

  Raises:
    ValueError: the file has no `get_sweep`, or it returns something other than
      a non-empty list of dicts with dotted string keys and scalar/tuple values.
  """
  if not hasattr(module, "get_sweep"):
    raise ValueError(
      "the config file declares no get_sweep(arg); pass --no_sweep to run the base config only"
    )
  sweep = module.get_sweep(config_arg)
  if not isinstance(sweep, list | tuple) or not sweep:
    raise ValueError(f"get_sweep must return a non-empty list of dicts; got {sweep!r}")
  for i, entry in enumerate(sweep):
    if not isinstance(entry, Mapping) or not all(isinstance(k, str) and k for k in entry):
      raise ValueError(f"get_sweep entry {i} must be a dict with dotted string keys; got {entry!r}")
    if SEED_KEY in entry:
      raise ValueError(f"get_sweep entry {i} sets {SEED_KEY!r}; seeds come from --seeds")
    for key, value in entry.items():
      _check_value(key, value)
  return [dict(entry) for entry in sweep]


def _check_value(key: str, value: Any) -> None:
  """Accepts what `--config.<key>=<value>` can express: scalars and (nested) tuples."""
  if isinstance(value, list | tuple):
    for item in value:
      _check_value(key, item)
  elif not isinstance(value, _SCALARS):
    raise ValueError(
      f"override {key}={value!r} has type {type(value).__name__}; accepted: bool, int, float, "
      "str, or a tuple/list of those"
    )


def parse_seeds(text: str) -> list[int]:
  """`'0,1,2'` -> `[0, 1, 2]`."""
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    seeds = []
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={text!r} is invalid; accepted: distinct integers >= 0, e.g. 0,1,2")
  return seeds


def parse_targets(text: str) -> list[tuple[str, ...]]:
  """`'rot0;rot15,rot75'` -> `[('rot0',), ('rot15', 'rot75')]`: one entry per run."""
  entries = [tuple(d.strip() for d in e.split(",") if d.strip()) for e in text.split(";")]
  if not entries or any(not e for e in entries):
    raise ValueError(
      f"--targets={text!r} is invalid; accepted: ';'-separated runs, each a ','-separated "
      "list of domains, e.g. 'rot0;rot75' or 'rot0,rot15;rot75'"
    )
  return entries


def _lookup(config: Any, key: str) -> Any:
  """The value at dotted `key` of a ConfigDict (ValueError naming the key if absent)."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      where = ".".join(parts[:i]) or "the config"
      fields = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a group)"
      raise ValueError(
        f"override {key!r} names no field of the config; fields of {where}: {fields}"
      )
    node = node[part]
  return node


def parse_set(items: Sequence[str], config: Any) -> dict[str, Any]:
  """`['meta.steps=40', 'aggregator.kind=mean']` -> typed overrides.

  A value is parsed as a Python literal (`40`, `1e-3`, `True`, `('a', 'b')`)
  unless the field holds a string, as the CLI's `--config.<key>=<value>` does.
  """
  out = {}
  for item in items:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {item!r} is invalid; accepted: KEY=VALUE, e.g. meta.steps=40")
    if key in (SEED_KEY, TARGETS_KEY):
      raise ValueError(f"--set {key}=... is not accepted; use --seeds / --targets")
    current = _lookup(config, key)
    if isinstance(current, str):
      value = raw
    elif isinstance(current, bool) and raw.lower() in ("true", "false"):
      value = raw.lower() == "true"
    else:
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        value = raw
    _check_value(key, value)
    out[key] = value
  return out


def _json_value(value: Any) -> Any:
  """Tuples -> lists (what the spec stores after its JSON round trip)."""
  return json.loads(json.dumps(value))


def expand(
  config_file: str,
  config_arg: str | None,
  sweep: Sequence[Mapping[str, Any]],
  *,
  seeds: Sequence[int],
  targets: Sequence[Sequence[str]] | None = None,
  fixed: Mapping[str, Any] | None = None,
) -> list[dict]:
  """Run specs for every sweep entry × target entry × seed (in that nesting order).

  Args:
    config_file: path of the config file, as passed to `--config`.
    config_arg: the text after the colon (None when there is none).
    sweep: override dicts (dotted keys), e.g. `[{}]` or `get_sweep(arg)`.
    seeds: one run per seed (override `seed`).
    targets: one run per entry (override `data.target_domains`); None = the
      config's own targets.
    fixed: overrides applied to every run (`--set`); must not repeat a key that
      a sweep entry sets.

  Returns:
    Specs `{"config_file", "config_arg", "overrides"}` in launch order, duplicates
    removed; values are JSON-compatible (tuples are lists).
  """
  fixed = dict(fixed or {})
  specs, seen = [], set()
  for i, entry in enumerate(sweep):
    clash = sorted(set(entry) & set(fixed))
    if clash:
      raise ValueError(f"--set {', '.join(clash)} clashes with get_sweep entry {i} ({entry})")
    if targets is not None and TARGETS_KEY in entry:
      raise ValueError(f"--targets clashes with get_sweep entry {i}, which sets {TARGETS_KEY}")
    for target in targets if targets is not None else [None]:
      for seed in seeds:
        overrides = {**fixed, **entry, SEED_KEY: seed}
        if target is not None:
          overrides[TARGETS_KEY] = tuple(target)
        spec = {
          "config_file": config_file,
          "config_arg": config_arg,
          "overrides": _json_value(overrides),
        }
        name = spec_hash(spec)
        if name not in seen:
          seen.add(name)
          specs.append(spec)
  return specs


def spec_hash(spec: Mapping[str, Any]) -> str:
  """First 12 hex digits of the sha256 of the spec's canonical JSON."""
  blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
  return hashlib.sha256(blob).hexdigest()[:_HASH_CHARS]


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> None:
  """Sets dotted `overrides` on a ConfigDict in place (lists become tuples)."""
  for key, value in overrides.items():
    parent, _, field = key.rpartition(".")
    _lookup(config, key)
    node = _lookup(config, parent) if parent else config
    value = _to_tuples(value)
    try:
      node[field] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"override {key}={value!r} does not fit the config: {e}") from e


def _to_tuples(value: Any) -> Any:
  if isinstance(value, list | tuple):
    return tuple(_to_tuples(v) for v in value)
  return value


def check_specs(specs: Sequence[Mapping[str, Any]]) -> None:
  """Builds every run's config and lets its method validate it, before anything runs.

  Raises:
    ValueError: naming the run's overrides and what is wrong with them.
  """
  from moe_adapt import methods, recipes  # noqa: F401  Deferred: imports JAX; registers recipes.

  modules = {}
  for spec in specs:
    source = (spec["config_file"], spec["config_arg"])
    if source not in modules:
      modules[source] = load_config_module(spec["config_file"])
    config = modules[source].get_config(spec["config_arg"])
    try:
      apply_overrides(config, spec["overrides"])
      methods.get_method(config.method).validate_config(config)
    except ValueError as e:
      raise ValueError(f"run {describe(spec)}: {e}") from e


def describe(spec: Mapping[str, Any]) -> str:
  """`'seed=0 meta.steps=40'`: the overrides, sorted, in CLI value syntax."""
  return " ".join(f"{k}={format_value(v)}" for k, v in sorted(spec["overrides"].items()))


def format_value(value: Any) -> str:
  """A value as ml_collections parses it from `--config.<key>=<value>`.

  Strings stay raw, booleans are `True`/`False`, numbers use `repr`, and
  sequences become tuple literals with double-quoted strings (`("rot0",)`),
  which read better inside shell quotes.
  """
  if isinstance(value, str):
    return value
  return _literal(value)


def _literal(value: Any) -> str:
  if isinstance(value, list | tuple):
    items = [_literal(v) for v in value]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  if isinstance(value, str):
    return json.dumps(value)  # JSON string escapes are valid in Python literals.
  return repr(value)


def command(
  spec: Mapping[str, Any], workdir: str | os.PathLike, *, program: Sequence[str] = LOCAL_PROGRAM
) -> list[str]:
  """The argv that runs `spec` in `workdir`: `program --config=... --config.k=v --workdir=...`."""
  config = spec["config_file"]
  if spec["config_arg"] is not None:
    config += f":{spec['config_arg']}"
  overrides = [f"--config.{k}={format_value(v)}" for k, v in sorted(spec["overrides"].items())]
  return [*program, f"--config={config}", *overrides, f"--workdir={os.fspath(workdir)}"]


# ----------------------------------------------------------------------------
# Run folders and their state
# ----------------------------------------------------------------------------


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.write_text(json.dumps(obj, sort_keys=True, indent=2) + "\n", encoding="utf-8")
  os.replace(tmp, path)


def prepare_runs(specs: Sequence[Mapping[str, Any]], sweep_dir: str | os.PathLike) -> list[Run]:
  """Creates `<sweep_dir>/<hash>/spec.json` for every spec (kept when already there).

  Raises:
    ValueError: a folder holds a different spec.json (edited by hand?).
  """
  root = pathlib.Path(sweep_dir)
  runs = []
  for spec in specs:
    name = spec_hash(spec)
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    spec_path = path / SPEC_FILE
    if spec_path.exists():
      stored = json.loads(spec_path.read_text(encoding="utf-8"))
      if stored != spec:
        raise ValueError(f"{spec_path} holds another spec than its name says; move it away")
    else:
      _write_json_atomic(spec_path, dict(spec))
    runs.append(Run(name, path, dict(spec)))
  return runs


def read_runs(sweep_dir: str | os.PathLike) -> list[Run]:
  """Every folder of `sweep_dir` holding a spec.json, sorted by overrides.

  Raises:
    ValueError: `sweep_dir` is not a directory.
  """
  root = pathlib.Path(sweep_dir)
  if not root.is_dir():
    raise ValueError(f"--sweep_dir={os.fspath(sweep_dir)!r} is not a directory")
  runs = []
  for spec_path in root.glob(f"*/{SPEC_FILE}"):
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    runs.append(Run(spec_path.parent.name, spec_path.parent, spec))
  # Runs that differ in one override only end up next to each other.
  return sorted(runs, key=lambda run: (describe(run.spec), run.name))


def _try_lock(f) -> bool:
  """Takes an exclusive, non-blocking flock on open file `f`; False if someone holds it."""
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  return True


def _last_line(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4096))
    lines = f.read().decode("utf-8", errors="replace").splitlines()
  return lines[-1] if lines else ""


def run_state(path: str | os.PathLike) -> str:
  """One of STATES for the run folder `path`.

  done: results.json exists. running: a process holds the lock on log.txt.
  failed: the last attempt ended with a non-zero exit code. incomplete: an
  attempt started (log.txt or config.json exists) and was interrupted.
  not started: only spec.json.
  """
  path = pathlib.Path(path)
  if (path / RESULTS_FILE).is_file():
    return "done"
  log = path / LOG_FILE
  if log.exists():
    with open(log, "a") as f:
      if not _try_lock(f):
        return "running"
    match = _EXIT_LINE.match(_last_line(log))
    return "failed" if match and int(match.group(1)) != 0 else "incomplete"
  return "incomplete" if (path / CONFIG_FILE).exists() else "not started"


# ----------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------


def _stamp() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class _Attempt(NamedTuple):
  index: int
  run: Run
  proc: subprocess.Popen
  log: TextIO
  start: float


def _start(index: int, run: Run, program: Sequence[str], env) -> _Attempt | None:
  """Starts one attempt, or returns None if another process is running or finished this run."""
  log = open(run.path / LOG_FILE, "a", encoding="utf-8")  # Closed in _finish.
  if not _try_lock(log):
    log.close()
    return None
  # Checked again under the lock: another worker (an array task on another node) may
  # have finished the run between our state check and the lock; a run is done once.
  if (run.path / RESULTS_FILE).is_file():
    log.close()
    return None
  argv = command(run.spec, run.path, program=program)
  log.write(f"{_LOG_PREFIX} {_stamp()} attempt started: {shlex.join(argv)}\n")
  log.flush()
  # The child inherits the log's open file description, and with it the lock:
  # the run counts as running for exactly as long as some process holds it.
  proc = subprocess.Popen(
    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
  )
  return _Attempt(index, run, proc, log, time.monotonic())


def _finish(attempt: _Attempt, returncode: int, *, interrupted: bool = False) -> float:
  wall = time.monotonic() - attempt.start
  # An interrupted attempt is not a failure: its footer does not match _EXIT_LINE.
  what = "interrupted, exit code" if interrupted else "exit code"
  attempt.log.write(f"\n{_LOG_PREFIX} {what} {returncode} after {wall:.1f} s\n")
  attempt.log.close()
  return wall


def launch_runs(
  runs: Sequence[Run],
  *,
  workers: int = 1,
  program: Sequence[str] = LOCAL_PROGRAM,
  env: Mapping[str, str] | None = None,
  poll_s: float = 0.5,
  out: TextIO | None = None,
) -> dict[str, int | None]:
  """Runs every unfinished run with at most `workers` processes at a time.

  Finished runs are skipped; unfinished ones are started again (the CLI resumes
  them); runs another process is running are left alone. If this function is
  interrupted (KeyboardInterrupt, SystemExit), it terminates its processes.

  Args:
    runs: from `prepare_runs`, in launch order.
    workers: the number of runs at a time (>= 1).
    program: argv prefix of the CLI.
    env: environment of the processes (None = inherit).
    poll_s: seconds between checks on the running processes.
    out: where progress lines go (default stdout).

  Returns:
    run name -> exit code of this call's attempt (0 for runs already done, None
    for runs running elsewhere).
  """
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
    raise ValueError(f"workers={workers!r} is invalid; accepted: an integer >= 1")
  out = out or sys.stdout
  say = lambda text: print(text, file=out, flush=True)
  codes: dict[str, int | None] = {}
  pending = []
  for run in runs:
    if run_state(run.path) == "done":
      codes[run.name] = 0
    else:
      pending.append(run)
  say(
    f"{len(runs)} runs: {len(codes)} done, {len(pending)} to launch "
    f"with {min(workers, max(len(pending), 1))} worker(s)"
  )
  total, started, active = len(pending), 0, []
  try:
    while pending or active:
      while pending and len(active) < workers:
        run = pending.pop(0)
        started += 1
        attempt = _start(started, run, program, env)
        if attempt is None:
          if run_state(run.path) == "done":
            codes[run.name] = 0
            say(f"[{started}/{total}] skip  {run.name}  (done by another process)")
          else:
            codes[run.name] = None
            say(f"[{started}/{total}] skip  {run.name}  (running in another process)")
          continue
        say(f"[{started}/{total}] start {run.name}  {describe(run.spec)}")
        active.append(attempt)
      for attempt in list(active):
        returncode = attempt.proc.poll()
        if returncode is None:
          continue
        active.remove(attempt)
        wall = _finish(attempt, returncode)
        codes[attempt.run.name] = returncode
        tag = f"[{attempt.index}/{total}]"
        if returncode == 0:
          say(f"{tag} done  {attempt.run.name}  in {wall:.1f} s")
        else:
          log = attempt.run.path / LOG_FILE
          say(f"{tag} FAILED {attempt.run.name}  exit code {returncode}, see {log}")
      if active:
        time.sleep(poll_s)
  finally:
    for attempt in active:  # Interrupted: stop the children rather than orphan them.
      attempt.proc.terminate()
    for attempt in active:
      try:
        attempt.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        attempt.proc.kill()
        attempt.proc.wait()
      _finish(attempt, attempt.proc.returncode, interrupted=True)
  return codes


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def runs_from_args(args: argparse.Namespace) -> list[Run]:
  """Expands, checks and prepares the runs that `add_sweep_arguments` options describe."""
  config_file, config_arg = parse_config_flag(args.config)
  module = load_config_module(config_file)
  sweep = [{}] if args.no_sweep else declared_sweep(module, config_arg)
  seeds = parse_seeds(args.seeds)
  targets = parse_targets(args.targets) if args.targets is not None else None
  fixed = parse_set(args.set or [], module.get_config(config_arg))
  specs = expand(config_file, config_arg, sweep, seeds=seeds, targets=targets, fixed=fixed)
  check_specs(specs)
  return prepare_runs(specs, args.sweep_dir)


def parse_program(text: str | None) -> list[str]:
  """`--program` text -> argv prefix of the CLI (None: LOCAL_PROGRAM)."""
  if text is None:
    return list(LOCAL_PROGRAM)
  argv = shlex.split(text)
  if not argv:
    raise ValueError(
      f"--program={text!r} is invalid; accepted: a command line, e.g. 'python -m moe_adapt.main'"
    )
  return argv


def rotate(runs: Sequence[Run], offset: int) -> list[Run]:
  """`runs` started at position `offset` (mod len): workers that start at different runs
  claim different runs first instead of all queueing on the first lock."""
  if not runs:
    return []
  k = offset % len(runs)
  return [*runs[k:], *runs[:k]]


def _worker_offset(value: int | None) -> int:
  """--offset, else the SLURM array task id, else 0."""
  if value is not None:
    if value < 0:
      raise ValueError(f"--offset={value} is invalid; accepted: an integer >= 0")
    return value
  raw = os.environ.get("SLURM_ARRAY_TASK_ID", "0")
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"SLURM_ARRAY_TASK_ID={raw!r} is not an integer") from None


def _launch(args: argparse.Namespace) -> int:
  runs = runs_from_args(args)
  if args.launcher == "print":
    for run in runs:
      if run_state(run.path) != "done":
        print(shlex.join(command(run.spec, run.path, program=PRINT_PROGRAM)))
    return 0
  codes = launch_runs(runs, workers=args.workers)
  failed = sorted(name for name, code in codes.items() if code not in (0, None))
  done = sum(run_state(run.path) == "done" for run in runs)
  print(f"{done}/{len(runs)} runs done" + (f"; failed: {', '.join(failed)}" if failed else ""))
  return 0 if done == len(runs) else 1


def _work(args: argparse.Namespace) -> int:
  runs = read_runs(args.sweep_dir)
  if not runs:
    raise ValueError(
      f"--sweep_dir={args.sweep_dir!r} holds no runs; create them first with "
      "`launch --launcher=print` (or submit with launch.slurm)"
    )
  program = parse_program(args.program)
  codes = launch_runs(
    rotate(runs, _worker_offset(args.offset)), workers=args.workers, program=program
  )
  failed = sorted(name for name, code in codes.items() if code not in (0, None))
  done = sum(run_state(run.path) == "done" for run in runs)
  print(f"{done}/{len(runs)} runs done" + (f"; failed: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


def _list(args: argparse.Namespace) -> int:
  runs = read_runs(args.sweep_dir)
  counts = dict.fromkeys(STATES, 0)
  for run in runs:
    state = run_state(run.path)
    counts[state] += 1
    print(f"{state:<12} {run.name}  {describe(run.spec)}")
  summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
  print(f"{len(runs)} runs: {summary or 'none'}")
  return 0


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m launch.sweep", description=__doc__.split("\n\n")[0]
  )
  commands = parser.add_subparsers(dest="command", required=True)
  launch = commands.add_parser("launch", help="create the run folders and run what is unfinished")
  add_sweep_arguments(launch)
  launch.add_argument("--workers", type=int, default=1, help="runs at a time (default 1)")
  launch.add_argument(
    "--launcher",
    choices=LAUNCHERS,
    default="local",
    help="local: run here; print: print the commands of unfinished runs (default local)",
  )
  lister = commands.add_parser("list", help="print every run's state, hash and overrides")
  lister.add_argument("--sweep_dir", required=True)
  worker = commands.add_parser(
    "work",
    help="run the unfinished runs of an existing sweep folder; several workers (e.g. SLURM "
    "array tasks, TPU slices) may share one folder: each run is claimed by one of them",
  )
  worker.add_argument("--sweep_dir", required=True)
  worker.add_argument("--workers", type=int, default=1, help="runs at a time (default 1)")
  worker.add_argument(
    "--offset",
    type=int,
    default=None,
    help="start at this run (mod the number of runs); default $SLURM_ARRAY_TASK_ID or 0",
  )
  add_program_argument(worker)
  return parser


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
  """The options that say which runs a sweep holds (read by `runs_from_args`)."""
  parser.add_argument(
    "--config", required=True, help="FILE[:ARG], e.g. configs/meta_dmoe.py:digits_rot"
  )
  parser.add_argument("--sweep_dir", required=True, help="folder of the sweep's run folders")
  parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
  parser.add_argument(
    "--targets",
    default=None,
    help="one run per ';'-separated entry, each a ','-separated list of target domains "
    "(default: the config's targets)",
  )
  parser.add_argument(
    "--set",
    action="append",
    metavar="KEY=VALUE",
    help="an override for every run, e.g. --set meta.steps=40 (repeatable)",
  )
  parser.add_argument(
    "--no_sweep", action="store_true", help="only the base config, not get_sweep(arg)"
  )


def add_program_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--program",
    default=None,
    help="command line that runs the CLI, e.g. 'apptainer exec img.sif python -m "
    "moe_adapt.main' (default: this interpreter with -m moe_adapt.main)",
  )


def _terminate(signum, frame) -> None:
  del frame
  sys.exit(128 + signum)  # SystemExit unwinds launch_runs, which stops its children.


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  with contextlib.suppress(ValueError):  # Not in the main thread (e.g. some test runners).
    signal.signal(signal.SIGTERM, _terminate)
  try:
    return {"launch": _launch, "list": _list, "work": _work}[args.command](args)
  except ValueError as e:
    print(f"launch.sweep: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
