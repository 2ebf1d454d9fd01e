"""Tests of launch/tpu_pod.sh and launch/slurm.sh.

The dry runs are checked line by line. Then the scripts run for real with fake
`gcloud`, `tar` and `sbatch` first on PATH that record their arguments (and
sbatch its standard input): what runs must be exactly what the dry run printed.
Finally the command each worker / node would execute is itself run in a sandbox
with fake `uv`, `moe-adapt` and `srun`, to check that the moe-adapt arguments
survive the nested shell quoting.
"""

import os
import pathlib
import shlex
import stat
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU = REPO / "launch" / "tpu_pod.sh"
SLURM = REPO / "launch" / "slurm.sh"
# Arguments that need quoting: a tuple literal with double quotes, a space, a single quote.
TRICKY = [
  "--config=configs/meta_dmoe.py:fmnist_shift",
  "--workdir=/shared/runs/x",
  '--config.data.target_domains=("rot0",)',
  "--config.data.options.data_dir=/data/it's here",
]

# A fake command: records its argv (NUL-separated, one call per line) and stdin.
FAKE = """#!/usr/bin/env bash
{{ printf '%s\\0' "$(basename "$0")" "$@"; echo; }} >> {log}
{stdin}
exit {code}
"""


def _fake(bin_dir: pathlib.Path, name: str, log: pathlib.Path, *, code="0", stdin="") -> None:
  path = bin_dir / name
  path.write_text(FAKE.format(log=shlex.quote(str(log)), code=code, stdin=stdin))
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _calls(log: pathlib.Path) -> list[list[str]]:
  if not log.exists():
    return []
  return [line.split("\0")[:-1] for line in log.read_text().splitlines()]


def _run(script, *args, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60
  )


@pytest.fixture
def fake_env(tmp_path):
  """PATH with fake gcloud / tar / sbatch; `gcloud describe` fails (no slice yet)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  # Only `describe` fails, so that the script has to create the slice.
  _fake(bin_dir, "gcloud", log, code='$([[ "$4" == describe ]] && echo 1 || echo 0)')
  _fake(bin_dir, "tar", log)
  _fake(bin_dir, "sbatch", log, stdin=f"cat > {shlex.quote(str(tmp_path / 'sbatch.stdin'))}")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
  return env, log, bin_dir


# ----------------------------------------------------------------------------- TPU pod

TPU_ARGS = ["--name=mdmoe-v4", "--zone=us-central2-b", "--accelerator_type=v4-32"]


def _remote_command(ssh_words: list[str]) -> str:
  return ssh_words[ssh_words.index("--command") + 1]


def test_tpu_dry_run_prints_the_exact_commands(fake_env, tmp_path):
  env, log, _ = fake_env
  proc = _run(TPU, *TPU_ARGS, "--dry_run", "--", *TRICKY, env=env)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 4
  tarball = f"{tmp_path}/moe_adapt-mdmoe-v4.tar.gz"
  assert lines[0] == (
    "gcloud compute tpus tpu-vm describe mdmoe-v4 --zone=us-central2-b >/dev/null 2>&1 || "
    "gcloud compute tpus tpu-vm create mdmoe-v4 --zone=us-central2-b --accelerator-type=v4-32 "
    "--version=tpu-ubuntu2204-base"
  )
  assert lines[1] == (
    f"tar -czf {tarball} --exclude=./.git --exclude=./runs --exclude=./venv "
    f"'--exclude=*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache -C {REPO} ."
  )
  assert lines[2] == (
    f"gcloud compute tpus tpu-vm scp {tarball} mdmoe-v4:moe_adapt.tar.gz "
    "--zone=us-central2-b --worker=all"
  )
  ssh = shlex.split(lines[3])
  assert ssh[:8] == [
    "gcloud", "compute", "tpus", "tpu-vm", "ssh", "mdmoe-v4", "--zone=us-central2-b",
    "--worker=all",
  ]  # fmt: skip
  remote = _remote_command(ssh)
  assert "'jax[tpu]==0.10.2'" in remote
  assert "~/moe_adapt_venv/bin/moe-adapt --distributed=on --config=configs/meta_dmoe.py" in remote
  assert _calls(log) == []  # A dry run runs nothing.


def test_tpu_runs_what_the_dry_run_prints(fake_env):
  env, log, _ = fake_env
  dry = _run(TPU, *TPU_ARGS, "--spot", "--project=proj", "--dry_run", "--", *TRICKY, env=env)
  assert dry.returncode == 0, dry.stderr
  describe, create = dry.stdout.splitlines()[0].split(" >/dev/null 2>&1 || ")
  expected = [shlex.split(describe), shlex.split(create)]
  expected += [shlex.split(line) for line in dry.stdout.splitlines()[1:]]
  assert "--spot" in expected[1] and "--project=proj" in expected[-1]
  real = _run(TPU, *TPU_ARGS, "--spot", "--project=proj", "--", *TRICKY, env=env)
  assert real.returncode == 0, real.stderr
  assert _calls(log) == expected


def test_tpu_reuses_an_existing_slice_and_clones_a_repo(fake_env):
  env, log, bin_dir = fake_env
  _fake(bin_dir, "gcloud", log)  # describe succeeds: the slice exists.
  args = ["--name=s", "--zone=z", "--repo_url=https://example.org/moe_adapt.git", "--ref=v1"]
  dry = _run(TPU, *args, "--dry_run", "--", *TRICKY, env=env)
  assert dry.returncode == 0, dry.stderr
  lines = dry.stdout.splitlines()
  assert lines[0] == "gcloud compute tpus tpu-vm describe s --zone=z"
  assert len(lines) == 2  # No packing or copying: the workers clone.
  remote = _remote_command(shlex.split(lines[1]))
  assert "git clone --quiet https://example.org/moe_adapt.git ~/moe_adapt" in remote
  assert "fetch --quiet origin v1" in remote
  real = _run(TPU, *args, "--", *TRICKY, env=env)
  assert real.returncode == 0, real.stderr
  assert _calls(log) == [shlex.split(line) for line in lines]


def test_tpu_worker_command_passes_the_arguments_unchanged(fake_env, tmp_path):
  """Runs the --command string as a worker would, with fake uv and moe-adapt."""
  env, _, _ = fake_env
  dry = _run(TPU, *TPU_ARGS, "--dry_run", "--", *TRICKY, env=env)
  remote = _remote_command(shlex.split(dry.stdout.splitlines()[3]))
  home = tmp_path / "home"
  (home / ".local" / "bin").mkdir(parents=True)
  (home / "moe_adapt_venv" / "bin").mkdir(parents=True)
  worker_log = tmp_path / "worker.log"
  _fake(home / ".local" / "bin", "uv", worker_log)
  _fake(home / "moe_adapt_venv" / "bin", "python", worker_log)
  _fake(home / "moe_adapt_venv" / "bin", "moe-adapt", worker_log)
  src = tmp_path / "src"
  src.mkdir()
  (src / "setup.py").write_text("")
  subprocess.run(
    ["/bin/tar", "-czf", str(home / "moe_adapt.tar.gz"), "-C", str(src), "."], check=True
  )
  worker_env = dict(os.environ, HOME=str(home))
  proc = subprocess.run(
    ["bash", "-c", remote], cwd=home, env=worker_env, capture_output=True, text=True, timeout=60
  )
  assert proc.returncode == 0, proc.stderr
  calls = _calls(worker_log)
  assert calls[0] == [
    "uv", "pip", "install", "--quiet", "--python", f"{home}/moe_adapt_venv/bin/python", "-e",
    f"{home}/moe_adapt", "jax[tpu]==0.10.2",
  ]  # fmt: skip
  assert calls[1] == ["moe-adapt", "--distributed=on", *TRICKY]
  assert (home / "moe_adapt" / "setup.py").exists()


def test_tpu_bad_input():
  cases = [
    (["--zone=z", "--", "x"], "--name is required"),
    (["--name=n", "--", "x"], "--zone is required"),
    (["--name=n", "--zone=z"], "no moe-adapt arguments; pass them after --"),
    (["--name=n", "--zone=z", "--bogus", "--", "x"], "unknown option '--bogus'; accepted: --name="),
  ]
  for args, message in cases:
    proc = _run(TPU, *args, "--dry_run")
    assert proc.returncode == 2, args
    assert proc.stderr.startswith(f"tpu_pod.sh: error: {message}"), proc.stderr


def test_tpu_missing_slice_without_accelerator_type(fake_env):
  env, log, _ = fake_env
  proc = _run(TPU, "--name=s", "--zone=z", "--", "--config=c.py", env=env)
  assert proc.returncode == 2
  assert "slice 's' not found in z; pass --accelerator_type to create it" in proc.stderr
  assert [call[4] for call in _calls(log)] == ["describe"]


# ----------------------------------------------------------------------------- SLURM

SLURM_ARGS = ["--nodes=2", "--gpus_per_node=8", "--time=04:00:00", "--venv=/opt/venv"]


def test_slurm_dry_run_prints_the_exact_script():
  proc = _run(SLURM, *SLURM_ARGS, "--partition=gpu", "--dry_run", "--", *TRICKY)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
    "sbatch <<'EOF'",
    "#!/bin/bash",
    "#SBATCH --job-name=moe-adapt",
    "#SBATCH --nodes=2",
    "#SBATCH --ntasks-per-node=1",
    f"#SBATCH --chdir={REPO}",
    "#SBATCH --gpus-per-node=8",
    "#SBATCH --partition=gpu",
    "#SBATCH --time=04:00:00",
    "#SBATCH --output=slurm-%x-%j.out",
    "set -euo pipefail",
    "source /opt/venv/bin/activate",
    "srun moe-adapt --distributed=on --config=configs/meta_dmoe.py:fmnist_shift "
    "--workdir=/shared/runs/x '--config.data.target_domains=(\"rot0\",)' "
    "'--config.data.options.data_dir=/data/it'\\''s here'",
    "EOF",
  ]


def test_slurm_submits_what_the_dry_run_prints(fake_env, tmp_path):
  env, log, _ = fake_env
  dry = _run(SLURM, *SLURM_ARGS, "--dry_run", "--", *TRICKY, env=env)
  real = _run(SLURM, *SLURM_ARGS, "--", *TRICKY, env=env)
  assert real.returncode == 0, real.stderr
  assert _calls(log) == [["sbatch"]]
  script = "\n".join(dry.stdout.splitlines()[1:-1]) + "\n"
  assert (tmp_path / "sbatch.stdin").read_text() == script


def test_slurm_script_runs_srun_with_the_arguments_unchanged(tmp_path):
  dry = _run(SLURM, "--nodes=2", "--venv=" + str(tmp_path / "venv"), "--dry_run", "--", *TRICKY)
  script = "\n".join(dry.stdout.splitlines()[1:-1]) + "\n"
  (tmp_path / "venv" / "bin").mkdir(parents=True)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "srun.log"
  (tmp_path / "venv" / "bin" / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
  _fake(bin_dir, "srun", log)
  proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert _calls(log) == [["srun", "moe-adapt", "--distributed=on", *TRICKY]]


def test_slurm_bad_input():
  cases = [
    (["--", "x"], "--nodes is required"),
    (["--nodes=0", "--", "x"], "--nodes='0' is invalid; accepted: an integer >= 1"),
    (["--nodes=2", "--gpus_per_node=a", "--", "x"], "--gpus_per_node='a' is invalid"),
    (["--nodes=2"], "no moe-adapt arguments"),
    (["--nodes=2", "--bogus", "--", "x"], "unknown option '--bogus'; accepted: --nodes="),
  ]
  for args, message in cases:
    proc = _run(SLURM, *args, "--dry_run")
    assert proc.returncode == 2, args
    assert proc.stderr.startswith(f"slurm.sh: error: {message}"), proc.stderr
