"""Tests for moe_adapt.train.workdir."""

import json
import os
import pathlib

import numpy as np
import pytest

from moe_adapt.train import workdir as wd

CONFIG = {"method": "meta_dmoe", "seed": 0, "model": {"width": 4, "dims": (1, 2)}, "lr": 0.1}


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
  """Relative path -> bytes of every file under `root`."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_new_workdir_is_created_with_config(tmp_path):
  path = wd.prepare_workdir(tmp_path / "a" / "b", CONFIG)
  assert path == (tmp_path / "a" / "b").absolute()
  stored = json.loads((path / "config.json").read_text())
  assert stored == {
    "method": "meta_dmoe",
    "seed": 0,
    "model": {"width": 4, "dims": [1, 2]},
    "lr": 0.1,
  }
  assert sorted(p.name for p in path.iterdir()) == ["config.json"]


def test_same_config_resumes_without_writing(tmp_path):
  path = wd.prepare_workdir(str(tmp_path / "run"), CONFIG)
  (path / "metrics.jsonl").write_text("{}\n")
  before = _snapshot(path)
  # Tuples and lists compare equal after the JSON round trip; key order is irrelevant.
  same = {"lr": 0.1, "model": {"dims": [1, 2], "width": 4}, "seed": 0, "method": "meta_dmoe"}
  assert wd.prepare_workdir(path, same) == path
  assert _snapshot(path) == before


def test_different_config_is_refused_with_the_differing_keys(tmp_path):
  path = wd.prepare_workdir(tmp_path / "run", CONFIG)
  before = _snapshot(path)
  new = {"method": "meta_dmoe", "seed": 1, "model": {"width": 4, "dims": (1, 2), "depth": 3}}
  with pytest.raises(wd.ConfigMismatchError) as info:
    wd.prepare_workdir(path, new)
  message = str(info.value)
  assert "seed: stored=0 new=1" in message
  assert "model.depth: stored='<absent>' new=3" in message
  assert "lr: stored=0.1 new='<absent>'" in message
  assert "model.width" not in message  # Equal keys are not listed.
  assert "--overwrite" in message and "--workdir" in message
  assert isinstance(info.value, ValueError)
  assert _snapshot(path) == before


def test_overwrite_moves_everything_aside_and_loses_nothing(tmp_path):
  path = wd.prepare_workdir(tmp_path / "run", CONFIG)
  (path / "metrics.jsonl").write_text('{"stage": "a", "step": 0}\n')
  (path / "checkpoints" / "experts" / "5").mkdir(parents=True)
  (path / "checkpoints" / "experts" / "5" / "data").write_bytes(b"\x00\x01")
  (path / "results.json").write_text("{}")
  (path / "previous-older").mkdir()
  (path / "previous-older" / "x").write_text("old")
  before = _snapshot(path)

  new = dict(CONFIG, seed=5)
  assert wd.prepare_workdir(path, new, overwrite=True) == path
  moved = [
    p for p in path.iterdir() if p.name.startswith("previous-") and p.name != "previous-older"
  ]
  assert len(moved) == 1
  assert moved[0].name.endswith("Z")  # A UTC timestamp.
  # Every old file is still there, byte for byte, under previous-<time>/ (older
  # previous-* folders stay where they were).
  after = _snapshot(path)
  for name, data in before.items():
    key = name if name.startswith("previous-older") else f"{moved[0].name}/{name}"
    assert after[key] == data
  assert json.loads((path / "config.json").read_text())["seed"] == 5
  assert not (path / "results.json").exists()

  # A second overwrite within the same second gets its own folder.
  wd.prepare_workdir(path, CONFIG, overwrite=True)
  assert len([p for p in path.iterdir() if p.name.startswith("previous-")]) == 3
  assert json.loads((path / "config.json").read_text())["seed"] == 0


def test_overwrite_of_new_dir_creates_no_previous(tmp_path):
  path = wd.prepare_workdir(tmp_path / "run", CONFIG, overwrite=True)
  assert [p.name for p in path.iterdir()] == ["config.json"]


def test_run_outputs_without_config_are_refused(tmp_path):
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(wd.WorkdirError, match=r"holds run outputs \(checkpoints\)"):
    wd.prepare_workdir(tmp_path / "run", CONFIG)
  # Unrelated files (e.g. a launcher's log) are fine.
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "stdout.txt").write_text("log")
  wd.prepare_workdir(tmp_path / "other", CONFIG)
  assert (tmp_path / "other" / "stdout.txt").read_text() == "log"


def test_unusable_workdir_gives_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a dir")
  with pytest.raises(wd.WorkdirError, match=r"workdir='.*file/run' cannot be created"):
    wd.prepare_workdir(blocker / "run", CONFIG)
  with pytest.raises(wd.WorkdirError, match=r"workdir='.*file' cannot be created.*not a directory"):
    wd.prepare_workdir(blocker, CONFIG)
  assert blocker.read_text() == "not a dir"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_workdir_gives_a_clear_error(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    with pytest.raises(wd.WorkdirError, match=r"workdir='.*ro' is not writable"):
      wd.prepare_workdir(ro, CONFIG)
  finally:
    ro.chmod(0o700)


def test_corrupt_config_json_is_reported(tmp_path):
  (tmp_path / "config.json").write_text('{"seed": ')
  with pytest.raises(wd.WorkdirError, match=r"config.json is not valid JSON"):
    wd.prepare_workdir(tmp_path, CONFIG)


def test_bad_config_argument():
  with pytest.raises(ValueError, match="config must be a mapping"):
    wd.prepare_workdir("/tmp/unused", [1, 2])
  with pytest.raises(ValueError, match="config is not JSON-serialisable"):
    wd.prepare_workdir("/tmp/unused", {"f": object()})


def test_write_json_atomic(tmp_path):
  path = tmp_path / "r.json"
  wd.write_json_atomic(path, {"b": np.float32(0.5), "a": [np.int64(1), (2, 3)], "c": np.ones(2)})
  text = path.read_text()
  want = {"a": [1, [2, 3]], "b": 0.5, "c": [1.0, 1.0]}
  assert json.loads(text) == want
  # Indented objects, lists of scalars on one line (per-example lists stay short).
  assert text == '{\n  "a": [\n    1,\n    [2, 3]\n  ],\n  "b": 0.5,\n  "c": [1.0, 1.0]\n}\n'
  nested = {"z": {"y": [], "x": {}}, "n": float("nan"), "s": ["a", None, True]}
  wd.write_json_atomic(path, nested)
  assert path.read_text() == wd.dumps_json(nested)
  assert json.dumps(json.loads(path.read_text()), sort_keys=True) == json.dumps(
    nested, sort_keys=True
  )
  wd.write_json_atomic(path, {"x": 1})
  assert json.loads(path.read_text()) == {"x": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # No temporary left.


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "r.json"
  wd.write_json_atomic(path, {"v": 1})
  with pytest.raises(ValueError, match="not JSON-serialisable"):
    wd.write_json_atomic(path, {"v": object()})

  def crash(src, dst):
    raise OSError("simulated crash before the rename")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError, match="simulated"):
    wd.write_json_atomic(path, {"v": 2})
  assert json.loads(path.read_text()) == {"v": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_read_results(tmp_path):
  assert wd.read_results(tmp_path) is None
  wd.write_json_atomic(tmp_path / "results.json", {"method": "m", "metrics": {}})
  assert wd.read_results(tmp_path) == {"method": "m", "metrics": {}}


def test_flatten_dict():
  d = {"a": {"b": 1, "c": {"d": [2, 3]}}, "e": {}, "f": "x"}
  assert wd.flatten_dict(d) == {"a.b": 1, "a.c.d": [2, 3], "e": {}, "f": "x"}
  assert wd.flatten_dict({"a": 1}, prefix="cfg.") == {"cfg.a": 1}


def test_other_processes_leave_the_files_to_process_zero(tmp_path, monkeypatch):
  import jax
  from jax.experimental import multihost_utils

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  sent = []
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: sent.append(x) or 0)
  assert wd.prepare_workdir(tmp_path / "run", CONFIG) == tmp_path / "run"
  assert not (tmp_path / "run").exists() and len(sent) == 1
  # Process 0 failed: the others fail too, with a message pointing at it.
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: np.int32(1))
  with pytest.raises(wd.WorkdirError, match=r"could not be prepared by process 0"):
    wd.prepare_workdir(tmp_path / "run", CONFIG)


def test_finished_results_is_read_only(tmp_path):
  assert wd.finished_results(tmp_path / "absent", {"a": 1}) is None
  assert not (tmp_path / "absent").exists()
  wd.prepare_workdir(tmp_path, {"a": 1})
  assert wd.finished_results(tmp_path, {"a": 1}) is None  # not finished
  wd.write_json_atomic(tmp_path / wd.RESULTS_FILE, {"metrics": {}})
  before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
  assert wd.finished_results(tmp_path, {"a": 1}) == {"metrics": {}}
  with pytest.raises(wd.ConfigMismatchError, match="a: stored=1 new=2"):
    wd.finished_results(tmp_path, {"a": 2})
  assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
