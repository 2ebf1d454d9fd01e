"""Tests for moe_adapt.data.registry: lookup, validation, the split protocol, caching."""

import functools

import numpy as np
import pytest

from moe_adapt import data
from moe_adapt.data import registry
from moe_adapt.data.registry import Benchmark, DomainSplits, Split


def _toy_benchmark(**overrides) -> Benchmark:
  def load(seed):
    rng = np.random.default_rng(seed)
    split = lambda n: Split(rng.random((n, 2, 2, 1), dtype=np.float32), np.zeros(n, np.int32))
    return {d: DomainSplits(split(3), split(2), split(2)) for d in ("a", "b", "c")}

  fields = dict(
    name="toy",
    domains=("a", "b", "c"),
    num_classes=2,
    class_names=("no", "yes"),
    input_shape=(2, 2, 1),
    default_targets=("c",),
    loader=load,
  )
  fields.update(overrides)
  return Benchmark(**fields)


@pytest.fixture(name="toy_registered")
def fixture_toy_registered():
  data.register_benchmark("toy", lambda *, flag=False: _toy_benchmark())
  yield
  registry._REGISTRY.pop("toy")


def test_list_benchmarks_holds_the_builtins():
  assert {"digits_rot", "fmnist_rot", "fmnist_shift", "tfds"} <= set(data.list_benchmarks())


def test_unknown_benchmark_names_the_accepted_ones():
  with pytest.raises(ValueError, match=r"benchmark='nope' is unknown; accepted: .*digits_rot"):
    data.get_benchmark("nope")


def test_unknown_option_names_the_accepted_ones():
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]; accepted: image_size"):
    data.get_benchmark("digits_rot", colour=True)


def test_register_and_get(toy_registered):
  del toy_registered
  assert "toy" in data.list_benchmarks()
  bench = data.get_benchmark("toy", flag=True)
  assert bench.default_sources == ("a", "b")
  loaded = bench.load(seed=3)
  assert list(loaded) == ["a", "b", "c"]
  np.testing.assert_array_equal(loaded["b"].val.x, bench.load(seed=3)["b"].val.x)


def test_register_rejects_bad_names():
  with pytest.raises(ValueError, match="name"):
    data.register_benchmark("bad name", _toy_benchmark)
  with pytest.raises(ValueError, match="factory"):
    data.register_benchmark("fine", 3)


def test_load_validates_seed_and_loader_output():
  bench = _toy_benchmark()
  for seed in (-1, 1.5, True, "0"):
    with pytest.raises(ValueError, match="seed"):
      bench.load(seed=seed)
  wrong = _toy_benchmark(input_shape=(3, 3, 1))
  with pytest.raises(ValueError, match=r"a\.train\.x must be float32 \[N, 3, 3, 1\]"):
    wrong.load(seed=0)
  missing = _toy_benchmark(domains=("a", "b", "c", "d"))
  with pytest.raises(ValueError, match="loaded domains"):
    missing.load(seed=0)


@pytest.mark.parametrize(
  "sources, targets, match",
  [
    (["a"], ["z"], r"target_domains has unknown domain\(s\) \['z'\].*accepted: a, b, c"),
    (["q"], ["c"], r"source_domains has unknown domain\(s\) \['q'\]"),
    (["a", "c"], ["c"], r"target_domains \['c'\] are also in source_domains"),
    ([], ["c"], "source_domains is empty; accepted: a, b, c"),
    (["a"], [], "target_domains is empty"),
    ("a", ["c"], "source_domains must be a list"),
    (["a", "a"], ["c"], "source_domains lists a domain twice"),
  ],
)
def test_check_domains_errors(sources, targets, match):
  with pytest.raises(ValueError, match=match):
    _toy_benchmark().check_domains(sources, targets)


def test_check_domains_accepts_a_valid_choice():
  _toy_benchmark().check_domains(["a", "b"], ["c"])


@pytest.mark.parametrize(
  "val, test, match",
  [(0.0, 0.2, "val_fraction"), (0.1, 1.0, "test_fraction"), (0.5, 0.5, "< 1"), ("x", 0.1, "val")],
)
def test_check_fractions(val, test, match):
  with pytest.raises(ValueError, match=match):
    registry.check_fractions(val, test)


@pytest.mark.parametrize("value", [0, 9, -3, 2.5, True, "10"])
def test_check_max_per_domain(value):
  with pytest.raises(ValueError, match="max_per_domain must be None or an int >= 10"):
    registry.check_max_per_domain(value)


def test_plan_domains_is_a_disjoint_seeded_partition():
  domains = [f"d{i}" for i in range(6)]
  plan = functools.partial(
    registry.plan_domains, 1000, domains, val_fraction=0.1, test_fraction=0.2
  )
  first = plan(seed=0)
  everything = np.concatenate([np.concatenate(p) for p in first.values()])
  np.testing.assert_array_equal(np.sort(everything), np.arange(1000))  # Disjoint and complete.
  for p in first.values():
    assert (len(p.train), len(p.val), len(p.test)) in {(117, 17, 33), (116, 17, 33)}
  again = plan(seed=0)
  other = plan(seed=1)
  for d in domains:
    for a, b in zip(first[d], again[d]):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first["d0"].train, other["d0"].train)
  small = plan(seed=0, max_per_domain=50)
  for d in domains:
    chunk = np.concatenate(first[d])
    np.testing.assert_array_equal(np.concatenate(small[d]), chunk[:50])  # A prefix.


def test_plan_domains_rejects_too_small_domains():
  with pytest.raises(ValueError, match="domain 'd0' has 4 images, too few"):
    registry.plan_domains(8, ["d0", "d1"], seed=0, val_fraction=0.1, test_fraction=0.1)


class _CountingBuild:
  def __init__(self):
    self.calls = 0

  def __call__(self):
    self.calls += 1
    x = np.arange(2 * 4, dtype=np.uint8).reshape(2, 2, 2, 1) * 30
    y = np.array([1, 0], np.int32)
    return {f"{d}/{p}": (x, y) for d in ("a", "b") for p in DomainSplits._fields}


def test_cache_is_written_once_and_read_back(tmp_path, monkeypatch):
  monkeypatch.setenv(registry.CACHE_ENV_VAR, str(tmp_path))
  build = _CountingBuild()
  run = lambda seed: registry.cached_uint8_build("toy", {"k": 1}, seed, ("a", "b"), build)
  first = run(0)
  files = list(tmp_path.iterdir())
  assert len(files) == 1 and files[0].suffix == ".npz"
  second = run(0)
  assert build.calls == 1
  np.testing.assert_array_equal(first["b"].test.x, second["b"].test.x)
  assert first["a"].train.x.dtype == np.float32
  np.testing.assert_allclose(first["a"].train.x.ravel() * 255, np.arange(8) * 30, atol=1e-4)
  run(1)  # Another seed: another file.
  assert build.calls == 2 and len(list(tmp_path.iterdir())) == 2


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
  monkeypatch.setenv(registry.CACHE_ENV_VAR, str(tmp_path))
  build = _CountingBuild()
  registry.cached_uint8_build("toy", {}, 0, ("a", "b"), build)
  (path,) = tmp_path.iterdir()
  path.write_bytes(b"not a zip file")
  out = registry.cached_uint8_build("toy", {}, 0, ("a", "b"), build)
  assert build.calls == 2 and out["a"].train.x.shape == (2, 2, 2, 1)
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # No temporary files left.


def test_cache_can_be_disabled(tmp_path, monkeypatch):
  monkeypatch.setenv(registry.CACHE_ENV_VAR, str(tmp_path))
  build = _CountingBuild()
  for _ in range(2):
    registry.cached_uint8_build("toy", {}, 0, ("a", "b"), build, use_cache=False)
  assert build.calls == 2 and not list(tmp_path.iterdir())
