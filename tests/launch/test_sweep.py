"""Tests of launch/sweep.py.

Fast tests cover spec expansion, hashing, value formatting (round-tripped through
ml_collections' own flag parser), run states, and the worker pool driven with a
fake CLI (a few lines of Python that sleep and write results.json).

The slow test is a tiny real sweep: `configs/meta_dmoe.py:digits_rot,tiny`, two seeds,
launched with one worker; the sweep's process group is SIGKILLed once the first run
has results and the second is in its meta stage; `list` then shows one run done and
one incomplete; a relaunch with two workers skips the first and resumes the second;
`launch.collect` then reports exactly the numbers of the two results.json files.
"""

import csv
import io
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from launch import collect, sweep
from tests.subprocess_util import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILE = "configs/meta_dmoe.py"

FAKE_CLI = """\
import json, os, pathlib, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
workdir = pathlib.Path(args["workdir"])
alive = pathlib.Path(os.environ["FAKE_ALIVE_DIR"])
marker = alive / workdir.name
marker.write_text(str(os.getpid()))
seen = len(list(alive.iterdir()))
print("fake run", workdir.name, flush=True)
time.sleep(float(args["config.sleep"]))
seen = max(seen, len(list(alive.iterdir())))
(workdir / "concurrency").write_text(str(seen))
marker.unlink()
if args.get("config.fail") == "True":
  print("boom", file=sys.stderr)
  sys.exit(3)
(workdir / "results.json").write_text(json.dumps({"seed": int(args["config.seed"])}))
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """(program argv prefix, folder of markers of live fake runs), env set for the fakes."""
  cli = tmp_path / "fake_cli.py"
  cli.write_text(FAKE_CLI)
  alive = tmp_path / "alive"
  alive.mkdir()
  monkeypatch.setenv("FAKE_ALIVE_DIR", str(alive))
  return [sys.executable, str(cli)], alive


def _fake_runs(tmp_path, seeds, **overrides):
  specs = sweep.expand("fake.py", None, [overrides], seeds=seeds)
  return sweep.prepare_runs(specs, tmp_path / "sweep")


def _headers(run) -> int:
  return (run.path / sweep.LOG_FILE).read_text().count("attempt started")


# ----------------------------------------------------------------------------- specs


def test_expand_order_overrides_and_hashes():
  specs = sweep.expand(
    CONFIG_FILE,
    "digits_rot",
    [{}, {"aggregator.kind": "mean"}],
    seeds=[0, 1],
    targets=[("rot0",), ("rot15", "rot75")],
    fixed={"meta.steps": 40},
  )
  assert len(specs) == 8
  assert [s["overrides"] for s in specs[:3]] == [
    {"meta.steps": 40, "seed": 0, "data.target_domains": ["rot0"]},
    {"meta.steps": 40, "seed": 1, "data.target_domains": ["rot0"]},
    {"meta.steps": 40, "seed": 0, "data.target_domains": ["rot15", "rot75"]},
  ]
  assert specs[4]["overrides"]["aggregator.kind"] == "mean"
  assert all(s["config_file"] == CONFIG_FILE and s["config_arg"] == "digits_rot" for s in specs)
  names = [sweep.spec_hash(s) for s in specs]
  assert len(set(names)) == 8 and all(len(n) == 12 for n in names)
  # The hash depends on content only (key order does not matter).
  reordered = {**specs[0], "overrides": dict(reversed(list(specs[0]["overrides"].items())))}
  assert sweep.spec_hash(reordered) == names[0]


def test_expand_drops_duplicates_and_refuses_clashes():
  assert len(sweep.expand("c.py", None, [{}, {}], seeds=[0])) == 1
  with pytest.raises(ValueError, match=r"--set meta.steps clashes with get_sweep entry 1"):
    sweep.expand("c.py", None, [{}, {"meta.steps": 3}], seeds=[0], fixed={"meta.steps": 4})
  with pytest.raises(ValueError, match="--targets clashes with get_sweep entry 0"):
    sweep.expand("c.py", None, [{"data.target_domains": ("a",)}], seeds=[0], targets=[("b",)])


def test_parsers():
  assert sweep.parse_config_flag("configs/./x.py:a,b") == ("configs/x.py", "a,b")
  assert sweep.parse_config_flag("x.py") == ("x.py", None)
  assert sweep.parse_seeds("0, 2,5") == [0, 2, 5]
  assert sweep.parse_targets("rot0;rot15, rot75") == [("rot0",), ("rot15", "rot75")]
  for bad in ("", "a", "1,1", "-1"):
    with pytest.raises(ValueError, match=f"--seeds={bad!r} is invalid; accepted: distinct"):
      sweep.parse_seeds(bad)
  with pytest.raises(ValueError, match="--targets='rot0;' is invalid"):
    sweep.parse_targets("rot0;")


@pytest.fixture(scope="module")
def config_module():
  return sweep.load_config_module(str(REPO / CONFIG_FILE))


def test_parse_set_follows_the_field_types(config_module):
  config = config_module.get_config("digits_rot")
  parsed = sweep.parse_set(
    [
      "meta.steps=40",
      "meta.inner_lr=1e-2",
      "meta.first_order=true",
      "aggregator.kind=mean",
      "stage_cache=123",  # A string field keeps the text, as the CLI does.
      "data.source_domains=('rot0', 'rot15')",
    ],
    config,
  )
  assert parsed == {
    "meta.steps": 40,
    "meta.inner_lr": 0.01,
    "meta.first_order": True,
    "aggregator.kind": "mean",
    "stage_cache": "123",
    "data.source_domains": ("rot0", "rot15"),
  }
  with pytest.raises(ValueError, match=r"override 'meta\.stepz' names no field of the config; fie"):
    sweep.parse_set(["meta.stepz=1"], config)
  with pytest.raises(ValueError, match=r"--set 'meta\.steps' is invalid; accepted: KEY=VALUE"):
    sweep.parse_set(["meta.steps"], config)
  with pytest.raises(ValueError, match=r"--set seed=\.\.\. is not accepted; use --seeds"):
    sweep.parse_set(["seed=3"], config)


def _parse_with_ml_collections(argv: list[str]):
  """The config the CLI would build from `argv` (its --config and --config.* flags)."""
  argv = ["moe-adapt", *(a for a in argv if a.startswith("--config"))]
  values = flags.FlagValues()
  # The override flags are found in `sys_argv` (sys.argv by default).
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_command_round_trips_through_ml_collections(monkeypatch):
  monkeypatch.chdir(REPO)
  overrides = {
    "seed": 3,
    "meta.inner_lr": 1e-5,
    "meta.first_order": True,
    "meta.mask_in_domain_expert": False,
    "aggregator.kind": "max",
    "data.target_domains": ["rot0"],
    "data.source_domains": ["rot15", "rot30"],
  }
  spec = {"config_file": CONFIG_FILE, "config_arg": "digits_rot,tiny", "overrides": overrides}
  argv = sweep.command(spec, "runs/x", program=["moe-adapt"])
  assert argv[0] == "moe-adapt" and argv[-1] == "--workdir=runs/x"
  assert '--config.data.target_domains=("rot0",)' in argv
  config = _parse_with_ml_collections(argv)
  for key, value in overrides.items():
    group, _, field = key.rpartition(".")
    got = config[group][field] if group else config[field]
    expected = tuple(value) if isinstance(value, list) else value
    assert got == expected and type(got) is type(expected), key


def test_declared_sweep_and_its_errors(tmp_path, config_module):
  entries = sweep.declared_sweep(config_module, "digits_rot")
  assert entries[0] == {} and {"aggregator.kind": "mean"} in entries
  plain = tmp_path / "plain.py"
  plain.write_text("def get_config(arg=None):\n  return None\n")
  with pytest.raises(ValueError, match=r"declares no get_sweep\(arg\); pass --no_sweep"):
    sweep.declared_sweep(sweep.load_config_module(str(plain)), None)
  bad = tmp_path / "bad.py"
  bad.write_text(
    "def get_config(arg=None):\n  return None\ndef get_sweep(arg=None):\n  return [{'seed': 1}]\n"
  )
  with pytest.raises(ValueError, match="get_sweep entry 0 sets 'seed'; seeds come from --seeds"):
    sweep.declared_sweep(sweep.load_config_module(str(bad)), None)
  with pytest.raises(ValueError, match=r"--config file 'nope\.py' does not exist"):
    sweep.load_config_module("nope.py")


def test_check_specs_names_the_bad_run():
  spec = {"config_file": str(REPO / CONFIG_FILE), "config_arg": "digits_rot,tiny"}
  good = {**spec, "overrides": {"seed": 0, "meta.steps": 5}}
  sweep.check_specs([good])
  bad = {**spec, "overrides": {"seed": 1, "meta.steps": 0}}
  with pytest.raises(ValueError, match=r"run meta.steps=0 seed=1: meta.steps=0 is invalid"):
    sweep.check_specs([good, bad])
  wrong_type = {**spec, "overrides": {"seed": 0, "meta.steps": 4.5}}
  with pytest.raises(ValueError, match=r"override meta.steps=4.5 does not fit the config"):
    sweep.check_specs([wrong_type])


# ----------------------------------------------------------------------------- states and pool


def test_run_state(tmp_path):
  (run,) = _fake_runs(tmp_path, [0], sleep=0)
  assert sweep.run_state(run.path) == "not started"
  (run.path / "config.json").write_text("{}")
  assert sweep.run_state(run.path) == "incomplete"
  log = run.path / sweep.LOG_FILE
  log.write_text("[launch.sweep] 2026 attempt started: x\n")
  with open(log, "a") as f:  # Another open file description holding the lock = a live run.
    assert sweep._try_lock(f)
    assert sweep.run_state(run.path) == "running"
  assert sweep.run_state(run.path) == "incomplete"
  with open(log, "a") as f:
    f.write("\n[launch.sweep] interrupted, exit code -15 after 3.0 s\n")
  assert sweep.run_state(run.path) == "incomplete"
  with open(log, "a") as f:
    f.write("[launch.sweep] exit code 2 after 3.0 s\n")
  assert sweep.run_state(run.path) == "failed"
  (run.path / "results.json").write_text("{}")
  assert sweep.run_state(run.path) == "done"


def test_pool_runs_with_at_most_n_workers_and_skips_finished_runs(tmp_path, fake):
  program, _ = fake
  runs = _fake_runs(tmp_path, [0, 1, 2, 3], sleep=1.0)
  out = io.StringIO()
  codes = sweep.launch_runs(runs, workers=2, program=program, poll_s=0.05, out=out)
  assert codes == {run.name: 0 for run in runs}
  assert out.getvalue().startswith("4 runs: 0 done, 4 to launch with 2 worker(s)\n")
  assert max(int((run.path / "concurrency").read_text()) for run in runs) == 2
  for run in runs:
    assert sweep.run_state(run.path) == "done"
    log = (run.path / sweep.LOG_FILE).read_text()
    assert f"fake run {run.name}" in log
    assert log.rstrip().splitlines()[-1].startswith("[launch.sweep] exit code 0 after")
  out = io.StringIO()
  assert sweep.launch_runs(runs, workers=2, program=program, out=out) == codes
  assert out.getvalue() == "4 runs: 4 done, 0 to launch with 1 worker(s)\n"
  assert all(_headers(run) == 1 for run in runs)


def test_pool_reports_a_failed_run(tmp_path, fake):
  program, _ = fake
  (run,) = _fake_runs(tmp_path, [0], sleep=0, fail=True)
  out = io.StringIO()
  assert sweep.launch_runs([run], program=program, poll_s=0.05, out=out) == {run.name: 3}
  assert f"FAILED {run.name}  exit code 3, see {run.path / 'log.txt'}" in out.getvalue()
  assert sweep.run_state(run.path) == "failed"
  assert "boom" in (run.path / sweep.LOG_FILE).read_text()
  with pytest.raises(ValueError, match="workers=0 is invalid; accepted: an integer >= 1"):
    sweep.launch_runs([run], workers=0, program=program)


def test_sigterm_stops_the_runs(tmp_path, fake):
  program, alive = fake
  runs = _fake_runs(tmp_path, [0, 1, 2], sleep=120)
  driver = tmp_path / "driver.py"
  driver.write_text(
    textwrap.dedent(f"""\
      import pathlib, signal, sys
      sys.path.insert(0, {str(REPO)!r})
      from launch import sweep
      signal.signal(signal.SIGTERM, sweep._terminate)
      runs = sweep.read_runs({str(tmp_path / "sweep")!r})
      sweep.launch_runs(runs, workers=2, program={program!r}, poll_s=0.05)
    """)
  )
  proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while len(list(alive.iterdir())) < 2:
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.05)
  pids = [int(p.read_text()) for p in alive.iterdir()]
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 128 + signal.SIGTERM
  for pid in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
  states = sorted(sweep.run_state(run.path) for run in runs)
  assert states == ["incomplete", "incomplete", "not started"]


# ----------------------------------------------------------------------------- command line


def test_cli_print_launcher_and_list(tmp_path, monkeypatch, capsys, config_module):
  monkeypatch.chdir(REPO)
  sweep_dir = tmp_path / "s"
  args = ["launch", f"--config={CONFIG_FILE}:digits_rot,tiny", f"--sweep_dir={sweep_dir}"]
  assert sweep.main([*args, "--seeds=0,1", "--set", "meta.steps=7", "--launcher=print"]) == 0
  lines = capsys.readouterr().out.splitlines()
  entries = sweep.declared_sweep(config_module, "digits_rot,tiny")
  assert len(lines) == 2 * len(entries)
  for line, (entry, seed) in zip(lines, [(e, s) for e in entries for s in (0, 1)], strict=True):
    argv = shlex.split(line)
    assert argv[:2] == ["moe-adapt", f"--config={CONFIG_FILE}:digits_rot,tiny"]
    config = _parse_with_ml_collections(argv)
    assert config.seed == seed and config.meta.steps == 7
    for key, value in entry.items():
      group, field = key.split(".")
      assert config[group][field] == value
    name = pathlib.Path(argv[-1].removeprefix("--workdir=")).name
    spec = json.loads((sweep_dir / name / "spec.json").read_text())
    assert sweep.spec_hash(spec) == name
    assert sweep.command(spec, sweep_dir / name, program=["moe-adapt"]) == argv

  assert sweep.main(["list", f"--sweep_dir={sweep_dir}"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[-1] == f"{len(lines)} runs: {len(lines)} not started"
  assert out[0].startswith("not started  ") and "seed=0" in out[0]


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--set", "meta.stepz=3"], "override 'meta.stepz' names no field of the config"),
    (["--seeds=a"], "--seeds='a' is invalid"),
    (["--set", "meta.steps=0", "--no_sweep"], "run meta.steps=0 seed=0: meta.steps=0 is invalid"),
    (["--set", "aggregator.kind=max"], "--set aggregator.kind clashes with get_sweep entry 1"),
  ],
)
def test_cli_errors(tmp_path, monkeypatch, capsys, extra, message):
  monkeypatch.chdir(REPO)
  args = ["launch", f"--config={CONFIG_FILE}:digits_rot,tiny", f"--sweep_dir={tmp_path / 's'}"]
  assert sweep.main([*args, *extra, "--launcher=print"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"launch.sweep: error: {message}") and err.count("\n") == 1
  assert not (tmp_path / "s").exists()  # Nothing is written before every run checks out.


# ----------------------------------------------------------------------------- end to end

E2E_TIMEOUT_S = 420
# Seed 1 is killed past meta step 10: the steps after it leave time to see it running.
E2E_META_STEPS = 30


def _e2e_env(cache: pathlib.Path) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(1)
  env["JAX_PLATFORMS"] = "cpu"
  # The runs compile the same programs: later ones read them back.
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  return env


def _meta_steps(run_dir: pathlib.Path) -> list[int]:
  path = run_dir / "metrics.jsonl"
  steps = []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # A line being written.
      continue
    if record.get("stage") == "meta":
      steps.append(record["step"])
  return steps


def _list_states(sweep_dir, env) -> dict[str, str]:
  proc = subprocess.run(
    [sys.executable, "-m", "launch.sweep", "list", f"--sweep_dir={sweep_dir}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  states = {}
  for line in proc.stdout.splitlines()[:-1]:
    state, rest = line[:12].strip(), line[12:].split()
    states[rest[0]] = state
  return states


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
  sweep_dir, out_dir = tmp_path / "sweep", tmp_path / "tables"
  env = _e2e_env(tmp_path / "compilation_cache")
  launch = [
    sys.executable, "-m", "launch.sweep", "launch", f"--config={CONFIG_FILE}:digits_rot,tiny",
    f"--sweep_dir={sweep_dir}", "--seeds=0,1", "--no_sweep",
    "--set", f"meta.steps={E2E_META_STEPS}",
  ]  # fmt: skip
  deadline = time.monotonic() + E2E_TIMEOUT_S
  log = open(tmp_path / "first_launch.txt", "w")
  # Its own session, so that killing its process group spares pytest.
  first = subprocess.Popen(
    [*launch, "--workers=1"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    start_new_session=True,
  )  # fmt: skip
  try:
    # Wait for: seed 0 done, seed 1 in its meta stage past a checkpoint, not finished.
    while True:
      assert first.poll() is None, (tmp_path / "first_launch.txt").read_text()
      assert time.monotonic() < deadline, "the first launch took too long"
      runs = sweep.read_runs(sweep_dir) if sweep_dir.exists() else []
      done = [r for r in runs if (r.path / "results.json").exists()]
      busy = [r for r in runs if r not in done and max(_meta_steps(r.path), default=0) >= 10]
      if len(done) == 1 and busy:
        break
      time.sleep(0.05)
    assert sweep.run_state(busy[0].path) == "running"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
  finally:
    if first.poll() is None:
      os.killpg(first.pid, signal.SIGKILL)
      first.wait()
    log.close()
  assert done[0].spec["overrides"]["seed"] == 0
  assert not (busy[0].path / "results.json").exists()
  # SIGKILL is delivered asynchronously: the killed run may take a moment to exit.
  while sweep.run_state(busy[0].path) == "running":
    assert time.monotonic() < deadline, "the killed run kept its log locked"
    time.sleep(0.05)
  assert _list_states(sweep_dir, env) == {done[0].name: "done", busy[0].name: "incomplete"}

  second = subprocess.run(
    [*launch, "--workers=2"], cwd=REPO, env=env, capture_output=True, text=True,
    timeout=max(deadline - time.monotonic(), 1),
  )  # fmt: skip
  assert second.returncode == 0, second.stdout + second.stderr
  assert "2 runs: 1 done, 1 to launch with 1 worker(s)" in second.stdout
  assert "2/2 runs done" in second.stdout
  assert _list_states(sweep_dir, env) == {done[0].name: "done", busy[0].name: "done"}
  assert _headers(done[0]) == 1 and _headers(busy[0]) == 2
  # The second attempt resumed the meta stage rather than starting it over.
  steps = _meta_steps(busy[0].path)
  assert steps[-1] == E2E_META_STEPS - 1 and steps.count(0) == 1

  assert collect.main([f"--sweep_dir={sweep_dir}", f"--out={out_dir}"]) == 0
  results = [json.loads((r.path / "results.json").read_text()) for r in (done[0], busy[0])]
  assert sorted(r["seed"] for r in results) == [0, 1]
  rows = list(csv.DictReader(io.StringIO((out_dir / "results.csv").read_text())))
  variants = sorted(results[0]["metrics"])
  assert sorted({row["variant"] for row in rows}) == variants
  for row in rows:
    values = np.array([r["metrics"][row["variant"]][row["column"]]["accuracy"] for r in results])
    assert int(row["n"]) == 2
    assert float(row["mean"]) == pytest.approx(values.mean(), abs=1e-12)
    assert float(row["std"]) == pytest.approx(values.std(ddof=1), abs=1e-12)
  markdown = (out_dir / "results.md").read_text()
  meta = [r["metrics"]["meta_dmoe"]["rot75"]["accuracy"] for r in results]
  expected = f"{100 * np.mean(meta):.1f} ± {100 * np.std(meta, ddof=1):.1f}"
  assert f"| meta_dmoe | {expected} | {expected} | 2 |" in markdown
