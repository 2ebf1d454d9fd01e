"""Tests for moe_adapt.train.metrics."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.train import metrics as metrics_lib


def test_write_appends_json_lines(tmp_path):
  with metrics_lib.MetricWriter(tmp_path) as writer:
    writer.write("experts", 0, {"loss": jnp.float32(1.5), "acc": np.float64(0.25), "n": 3})
    writer.write("experts", np.int64(1), {"loss": jnp.array(float("nan"))})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  first, second = (json.loads(line) for line in lines)
  assert {k: v for k, v in first.items() if k != "time"} == {
    "stage": "experts",
    "step": 0,
    "loss": 1.5,
    "acc": 0.25,
    "n": 3,
  }
  assert isinstance(first["time"], float) and first["time"] > 1e9
  assert second["step"] == 1 and math.isnan(second["loss"])


def test_flushes_every_write(tmp_path):
  writer = metrics_lib.MetricWriter(tmp_path)
  writer.write("s", 0, {"loss": 1.0})
  # Visible to a reader before close (a kill after the write loses nothing).
  assert [r["loss"] for r in metrics_lib.read_metrics(tmp_path)] == [1.0]
  writer.close()


def test_read_metrics_keeps_last_line_per_stage_and_step(tmp_path):
  with metrics_lib.MetricWriter(tmp_path) as w:
    for step in range(4):
      w.write("a", step, {"loss": float(step)})
  # A resumed run repeats steps 2, 3 with other values, then continues.
  with metrics_lib.MetricWriter(tmp_path) as w:
    for step in range(2, 6):
      w.write("a", step, {"loss": 10.0 + step})
    w.write("b", 2, {"loss": -1.0})
  records = metrics_lib.read_metrics(tmp_path)
  assert [(r["stage"], r["step"], r["loss"]) for r in records] == [
    ("a", 0, 0.0),
    ("a", 1, 1.0),
    ("a", 2, 12.0),
    ("a", 3, 13.0),
    ("a", 4, 14.0),
    ("a", 5, 15.0),
    ("b", 2, -1.0),
  ]


def test_partial_last_line_from_a_kill_is_isolated(tmp_path):
  with metrics_lib.MetricWriter(tmp_path) as w:
    w.write("a", 0, {"loss": 1.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"stage": "a", "st')  # A write cut short.
  with metrics_lib.MetricWriter(tmp_path) as w:
    w.write("a", 1, {"loss": 2.0})
  with pytest.warns(RuntimeWarning, match="skipped 1 unparsable"):
    records = metrics_lib.read_metrics(tmp_path)
  assert [(r["step"], r["loss"]) for r in records] == [(0, 1.0), (1, 2.0)]


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with metrics_lib.MetricWriter(tmp_path) as w:
    w.write("a", 0, {"loss": 1.0})
  assert not (tmp_path / "metrics.jsonl").exists()
  assert metrics_lib.read_metrics(tmp_path) == []


def test_bad_metrics_are_rejected(tmp_path):
  with metrics_lib.MetricWriter(tmp_path) as w:
    with pytest.raises(ValueError, match=r"metric 'v' must be a real scalar; got shape \(2,\)"):
      w.write("a", 0, {"v": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"metric names \['time'\] are reserved"):
      w.write("a", 0, {"time": 1.0})
    with pytest.raises(ValueError, match=r"step=-1 is invalid"):
      w.write("a", -1, {"loss": 1.0})
    with pytest.raises(ValueError, match=r"stage='' is invalid"):
      w.write("", 0, {"loss": 1.0})
  assert metrics_lib.read_metrics(tmp_path) == []
