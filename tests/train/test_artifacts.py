"""train.artifacts: values and arrays computed once per workdir, local or gs://."""

import json

import numpy as np
import pytest

from moe_adapt.train import artifacts
from tests import fake_gcs


@pytest.fixture
def gcs(monkeypatch):
  yield from fake_gcs.install(monkeypatch)


def fail():
  raise AssertionError("computed a second time")


def test_json_cache_computes_each_key_once_and_a_resumed_run_reads_it(tmp_path):
  cache = artifacts.JsonCache(tmp_path, "evals.json")
  assert cache.get("rot0|a+b", lambda: 0.5) == 0.5
  assert cache.get("rot0|a+b", fail) == 0.5 and cache.computed == 1
  assert cache.get("rot0|all", lambda: {"accuracy": np.float32(0.25)}) == {"accuracy": 0.25}
  again = artifacts.JsonCache(tmp_path, "evals.json")
  assert again.get("rot0|a+b", fail) == 0.5 and again.computed == 0
  stored = json.loads((tmp_path / "evals.json").read_text())
  assert stored == {"rot0|a+b": 0.5, "rot0|all": {"accuracy": 0.25}}


def test_json_cache_rewrites_a_remote_object_at_most_every_flush_interval(gcs, tmp_path):
  cache = artifacts.JsonCache("gs://bucket/run", "evals.json", remote_flush_s=3600)
  cache.get("a", lambda: 1)
  cache.get("b", lambda: 2)
  assert gcs.writes == []  # within the interval: kept in memory
  cache.flush()
  cache.flush()  # nothing new: no rewrite
  assert gcs.writes == ["/bucket/run/evals.json"]
  assert artifacts.JsonCache("gs://bucket/run", "evals.json").values == {"a": 1, "b": 2}
  every = artifacts.JsonCache("gs://bucket/run", "evals.json", remote_flush_s=0)
  every.get("c", lambda: 3)
  assert len(gcs.writes) == 2
  with pytest.raises(ValueError, match=r"remote_flush_s=-1 is invalid; accepted: a number >= 0"):
    artifacts.JsonCache(tmp_path, "evals.json", remote_flush_s=-1)


def test_cached_arrays_round_trip_and_refuse_other_shapes(tmp_path):
  made = {"mc": np.arange(6, dtype=np.float32).reshape(3, 2), "ids": np.arange(3)}
  shapes = {"mc": (3, 2), "ids": (3,)}
  first = artifacts.cached_arrays(tmp_path, "s.npz", lambda: made, expected_shapes=shapes)
  again = artifacts.cached_arrays(tmp_path, "s.npz", fail, expected_shapes=shapes)
  for name in made:
    np.testing.assert_array_equal(first[name], made[name])
    np.testing.assert_array_equal(again[name], made[name])
  with pytest.raises(ValueError, match=r"s\.npz holds arrays .* but this run needs"):
    artifacts.cached_arrays(tmp_path, "s.npz", fail, expected_shapes={"mc": (4, 2)})


def test_cached_arrays_on_gs(gcs):
  made = {"x": np.ones((2, 2), np.float32)}
  artifacts.cached_arrays("gs://bucket/run", "s.npz", lambda: made, expected_shapes={"x": (2, 2)})
  got = artifacts.cached_arrays("gs://bucket/run", "s.npz", fail, expected_shapes={"x": (2, 2)})
  np.testing.assert_array_equal(got["x"], made["x"])
