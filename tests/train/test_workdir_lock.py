"""Tests of the workdir lock (train/workdir_lock.py): in-process, between real processes,
on a fake object store, and end to end with two `moe-adapt` commands on one workdir."""

import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from moe_adapt.train import workdir as wd
from moe_adapt.train import workdir_lock
from tests import fake_gcs

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def _dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _holder(path: pathlib.Path) -> dict:
  return json.loads((path / workdir_lock.LOCK_FILE).read_text())


def test_second_lock_is_refused_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  with workdir_lock.lock(workdir):
    holder = _holder(workdir)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    message = rf"workdir='.*run' is in use by pid {os.getpid()} on host .* \(started .*UTC\)"
    with pytest.raises(workdir_lock.WorkdirLockedError, match=message):
      with workdir_lock.lock(workdir):
        pytest.fail("entered a held lock")
  # Released: emptied (not deleted) and free again.
  assert (workdir / workdir_lock.LOCK_FILE).read_text() == ""
  with workdir_lock.lock(workdir):
    pass


def test_stale_lock_is_taken_over_with_a_message(tmp_path, caplog):
  stale = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}
  tmp_path.joinpath(workdir_lock.LOCK_FILE).write_text(json.dumps(stale))
  with caplog.at_level(logging.WARNING), workdir_lock.lock(tmp_path):
    assert _holder(tmp_path)["pid"] == os.getpid()
  assert f"taking over the stale lock of pid {stale['pid']}" in caplog.text


def test_overwrite_keeps_the_lock_in_place(tmp_path):
  with workdir_lock.lock(tmp_path):
    wd.prepare_workdir(tmp_path, {"a": 1})
    wd.prepare_workdir(tmp_path, {"a": 2}, overwrite=True)
    assert _holder(tmp_path)["pid"] == os.getpid()
    (previous,) = tmp_path.glob(f"{wd.PREVIOUS_PREFIX}*")
    assert sorted(p.name for p in previous.iterdir()) == [wd.CONFIG_FILE]


def test_remote_lock(monkeypatch):
  gcs = next(fake_gcs.install(monkeypatch))
  workdir = "gs://bucket/run"
  with workdir_lock.lock(workdir):
    holder = json.loads(fake_gcs.objects(gcs, "/bucket/run/")["LOCK.json"])
    assert holder["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"in use by pid {os.getpid()}"):
      with workdir_lock.lock(workdir):
        pass
  assert fake_gcs.objects(gcs, "/bucket/run/") == {}  # deleted on release
  # A dead process of this host: taken over. One of another host: refused.
  lock_object = wd.as_path(workdir) / workdir_lock.LOCK_FILE
  lock_object.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
  with workdir_lock.lock(workdir):
    assert json.loads(lock_object.read_text())["pid"] == os.getpid()
  lock_object.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 1 on host elsewhere"):
    with workdir_lock.lock(workdir):
      pass


_HOLD = """
import pathlib, sys, time
from moe_adapt.train import workdir_lock
with workdir_lock.lock(sys.argv[1]):
  pathlib.Path(sys.argv[2]).write_text("locked")
  while not pathlib.Path(sys.argv[3]).exists():
    time.sleep(0.05)
"""


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _wait_for(path: pathlib.Path, proc: subprocess.Popen) -> None:
  deadline = time.monotonic() + TIMEOUT_S
  while not path.exists():
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, f"{path} did not appear"
    time.sleep(0.05)


def test_two_processes(tmp_path):
  workdir, locked, done = tmp_path / "run", tmp_path / "locked", tmp_path / "done"
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(workdir), str(locked), str(done)],
    env=_env(),
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    _wait_for(locked, holder)
    second = subprocess.run(
      [sys.executable, "-c", _HOLD, str(workdir), str(tmp_path / "x"), str(done)],
      env=_env(),
      capture_output=True,
      text=True,
      timeout=TIMEOUT_S,
    )
    assert second.returncode != 0
    assert f"is in use by pid {holder.pid} on host {socket.gethostname()}" in second.stderr
    assert not (tmp_path / "x").exists()
    # The holder dies without releasing: the next process takes over, with a message.
    holder.send_signal(signal.SIGKILL)
    holder.wait(TIMEOUT_S)
    done.write_text("")
    third = subprocess.run(
      [sys.executable, "-c", _HOLD, str(workdir), str(tmp_path / "y"), str(done)],
      env=_env(),
      capture_output=True,
      text=True,
      timeout=TIMEOUT_S,
    )
    assert third.returncode == 0, third.stderr
    assert f"taking over the stale lock of pid {holder.pid}" in third.stderr
  finally:
    if holder.poll() is None:
      holder.kill()
      holder.wait()


# ----------------------------------------------------------------------------- end to end

FLAGS = ["--config=configs/muka.py:fmnist,tiny", "--config.variants=('muki',)"]


@pytest.mark.slow
def test_second_command_on_a_busy_workdir_refuses_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "moe_adapt.main", *FLAGS, f"--workdir={workdir}"]
  env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    lock_file = workdir / workdir_lock.LOCK_FILE
    deadline = time.monotonic() + 600
    while not (lock_file.exists() and lock_file.read_text()):
      assert first.poll() is None, first.communicate()
      assert time.monotonic() < deadline
      time.sleep(0.1)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    _, err = first.communicate(timeout=900)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  assert second.returncode == 2, second.stderr
  assert (
    second.stderr.strip()
    .splitlines()[-1]
    .startswith(f"moe-adapt: error: workdir='{workdir}' is in use by pid {first.pid} on host ")
  )
  assert first.returncode == 0, err[-3000:]
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert lines and len(lines) == len(set(lines))  # every line once
  steps = [(json.loads(x)["stage"], json.loads(x)["step"]) for x in lines]
  assert len(steps) == len(set(steps))
  assert lock_file.read_text() == ""
