"""Tests for the Fashion-MNIST benchmarks (fmnist_rot, fmnist_shift) and the IDX reader.

Benchmarks are built with max_per_domain=30 to stay fast; tests that need the real files
skip when Debian's dataset-fashion-mnist is not installed.
"""

import gzip
import struct

import numpy as np
import pytest

from moe_adapt import data
from moe_adapt.data import fashion, images, registry

SMALL = 30  # Images per domain: 21 train / 3 val / 6 test.

try:
  fashion.find_data_dir()
  HAVE_DATA = True
except fashion.MissingDataError:
  HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="apt-get install dataset-fashion-mnist")


def _write_idx(path, array, *, compress):
  codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
    f">{array.ndim}I", *array.shape
  )
  payload = header + array.tobytes()
  if compress:
    payload = gzip.compress(payload)
  path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
  x = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
  path = tmp_path / ("x.idx.gz" if compress else "x.idx")
  _write_idx(path, x, compress=compress)
  np.testing.assert_array_equal(data.read_idx(path), x)
  y = np.array([-1, 7, 1 << 20], ">i4")
  _write_idx(tmp_path / "y.idx", y, compress=False)
  out = data.read_idx(tmp_path / "y.idx")
  assert out.dtype.isnative and out.tolist() == [-1, 7, 1 << 20]


def test_read_idx_rejects_bad_files(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "bad")
  (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
  with pytest.raises(ValueError, match="implies 13"):
    data.read_idx(tmp_path / "short")


@pytest.mark.parametrize("name", ["fmnist_rot", "fmnist_shift"])
def test_missing_files_say_how_to_get_them(tmp_path, name):
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
  with pytest.raises(data.MissingDataError) as info:
    data.get_benchmark(name, data_dir=tmp_path)
  assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
  message = str(info.value)
  assert f"data_dir='{tmp_path}'" in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert "t10k-labels-idx1-ubyte[.gz]" in message
  assert "missing: train-images" not in message  # That one is present.


def test_bad_data_dir_type():
  with pytest.raises(ValueError, match="data_dir must be a path"):
    data.get_benchmark("fmnist_rot", data_dir=3)


@needs_data
@pytest.mark.parametrize("name", ["fmnist_rot", "fmnist_shift"])
@pytest.mark.parametrize("value", [0, 5, 2.5, True, "100"])
def test_bad_max_per_domain(name, value):
  with pytest.raises(ValueError, match="max_per_domain must be None or an int >= 10"):
    data.get_benchmark(name, max_per_domain=value)


@needs_data
def test_bad_cache_and_fraction_options():
  with pytest.raises(ValueError, match="cache must be True or False"):
    data.get_benchmark("fmnist_rot", cache="yes")
  with pytest.raises(ValueError, match="test_fraction"):
    data.get_benchmark("fmnist_shift", test_fraction=-0.1)
  with pytest.raises(ValueError, match="domain 'rot0' has 10 images, too few"):
    data.get_benchmark("fmnist_rot", max_per_domain=10, val_fraction=0.01).load(seed=0)


@needs_data
def test_finds_the_debian_files_through_dpkg(monkeypatch, tmp_path):
  debian = fashion._debian_dirs()
  if not debian:
    pytest.skip("dpkg does not list dataset-fashion-mnist")
  monkeypatch.setattr(fashion, "DEFAULT_DATA_DIR", str(tmp_path / "nowhere"))
  assert fashion.find_data_dir() == debian[0].resolve()


@pytest.fixture(name="cache_dir", scope="module")
def fixture_cache_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("cache")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(registry.CACHE_ENV_VAR, str(path))
    yield path


@pytest.fixture(name="source", scope="module")
def fixture_source():
  x, y = fashion.load_fashion_mnist(str(fashion.find_data_dir()))
  return registry.to_unit_float(x), y


def _plans(domains, seed=0):
  return registry.plan_domains(
    fashion.NUM_IMAGES,
    domains,
    seed=seed,
    val_fraction=0.1,
    test_fraction=0.2,
    max_per_domain=SMALL,
  )


def _check_splits(bench, loaded):
  assert tuple(loaded) == bench.domains
  for splits in loaded.values():
    assert [len(s.y) for s in splits] == [21, 3, 6]
    for split in splits:
      assert split.x.dtype == np.float32 and split.x.shape[1:] == (28, 28, 1)
      assert split.y.dtype == np.int32 and split.y.min() >= 0 and split.y.max() <= 9
      levels = split.x * 255
      np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # 8-bit levels.
      assert split.x.min() >= 0 and split.x.max() <= 1


@needs_data
def test_source_is_fashion_mnist(source):
  x, y = source
  assert x.shape == (70_000, 28, 28, 1) and y.shape == (70_000,)
  np.testing.assert_array_equal(np.bincount(y), np.full(10, 7000))


@needs_data
def test_fmnist_rot(cache_dir, source):
  bench = data.get_benchmark("fmnist_rot", max_per_domain=SMALL)
  assert bench.domains == fashion.ROT_DOMAINS and bench.default_targets == ("rot75",)
  assert bench.input_shape == (28, 28, 1) and bench.class_names[9] == "Ankle boot"
  loaded = bench.load(seed=0)
  _check_splits(bench, loaded)
  x, y = source
  plans = _plans(fashion.ROT_DOMAINS)
  used = np.concatenate([np.concatenate(p) for p in plans.values()])
  assert len(np.unique(used)) == len(used)  # Disjoint images across domains.
  for domain, angle in zip(fashion.ROT_DOMAINS, fashion.ROT_ANGLES):
    for split, idx in zip(loaded[domain], plans[domain]):
      expected = registry.to_unit_float(registry.to_uint8(images.rotate(x[idx], angle)))
      np.testing.assert_array_equal(split.x, expected)
      np.testing.assert_array_equal(split.y, y[idx])
  assert np.abs(loaded["rot0"].train.x - images.rotate(loaded["rot0"].train.x, 75)).mean() > 0.1

  again = bench.load(seed=0)
  np.testing.assert_array_equal(again["rot45"].val.x, loaded["rot45"].val.x)
  other = bench.load(seed=1)
  assert not np.array_equal(other["rot45"].val.x, loaded["rot45"].val.x)
  assert len(list(cache_dir.glob("fmnist_rot-*.npz"))) == 2  # One per seed.
  fresh = data.get_benchmark("fmnist_rot", max_per_domain=SMALL, cache=False).load(seed=1)
  for domain in bench.domains:
    for a, b in zip(fresh[domain], other[domain]):
      np.testing.assert_array_equal(a.x, b.x)  # The cache reads back bit-identical.
      np.testing.assert_array_equal(a.y, b.y)


@pytest.fixture(name="shift", scope="module")
def fixture_shift(cache_dir):
  del cache_dir
  bench = data.get_benchmark("fmnist_shift", max_per_domain=SMALL)
  return bench, bench.load(seed=0)


def test_fmnist_shift_domain_design():
  domains, targets = fashion.SHIFT_DOMAINS, fashion.SHIFT_TARGETS
  assert len(domains) == 22 and len(set(domains)) == 22 and set(targets) <= set(domains)
  sources = [d for d in domains if d not in targets]
  assert len(sources) == 17
  factors = lambda names: {f for d in names for f in d.split("+")}
  for domain in domains:
    geometry, appearance = domain.split("+")
    assert geometry in fashion.GEOMETRY and appearance in fashion.APPEARANCE
  seen = factors(sources)
  new_combinations = [t for t in targets if set(t.split("+")) <= seen]
  unseen = [t for t in targets if not set(t.split("+")) <= seen]
  assert new_combinations == ["rot30+blur", "shear+noise", "scale+contrast"]
  assert unseen == ["elastic+clean", "upright+invert"]
  assert factors(unseen) - seen == {"elastic", "invert"}


@needs_data
def test_fmnist_shift_metadata_and_splits(shift):
  bench, loaded = shift
  assert bench.domains == fashion.SHIFT_DOMAINS
  assert bench.default_targets == fashion.SHIFT_TARGETS
  bench.check_domains(bench.default_sources, bench.default_targets)
  _check_splits(bench, loaded)


@needs_data
def test_fmnist_shift_applies_each_domains_factors(shift, source):
  _, loaded = shift
  x, _ = source
  plans = _plans(fashion.SHIFT_DOMAINS)
  for domain in fashion.SHIFT_DOMAINS:
    got = np.concatenate([s.x for s in loaded[domain]])
    clean = x[np.concatenate(plans[domain])]
    if domain == "upright+clean":
      np.testing.assert_array_equal(got, clean)
    elif domain == "upright+invert":
      np.testing.assert_allclose(got, 1 - clean, atol=1e-6)
    else:
      assert np.abs(got - clean).mean() > 0.03, domain
  # Contrast lowers the spread, blur lowers the high frequencies, noise raises them.
  spread = lambda d: np.concatenate([s.x for s in loaded[d]]).std(axis=(1, 2, 3)).mean()
  assert spread("upright+contrast") < 0.5 * spread("upright+clean")
  roughness = lambda d: np.abs(np.diff(loaded[d].train.x, axis=2)).mean()
  assert roughness("upright+blur") < roughness("upright+clean") < roughness("upright+noise")


@needs_data
def test_fmnist_shift_domains_are_distributions(shift, source):
  """Per-image randomness: rot30 angles vary, occlusion patches move."""
  _, loaded = shift
  x, _ = source
  idx = _plans(fashion.SHIFT_DOMAINS)["rot30+clean"].train
  got = loaded["rot30+clean"].train.x
  angles = np.arange(20, 41)
  errors = np.stack([np.abs(got - images.rotate(x[idx], a)).mean(axis=(1, 2, 3)) for a in angles])
  best = angles[errors.argmin(0)]
  assert best.min() >= 25 and best.max() <= 35 and len(set(best.tolist())) >= 4
  occluded = loaded["upright+occlude"].train.x[..., 0]
  corners = {tuple(np.argwhere(img == np.float32(128 / 255))[0]) for img in occluded}
  assert len(corners) > 10


@needs_data
def test_fmnist_shift_is_deterministic(shift):
  bench, loaded = shift
  fresh = data.get_benchmark("fmnist_shift", max_per_domain=SMALL, cache=False)
  again = fresh.load(seed=0)
  for domain in bench.domains:
    np.testing.assert_array_equal(again[domain].test.x, loaded[domain].test.x)
  other = fresh.load(seed=3)
  assert not np.array_equal(other["shear+noise"].train.x, loaded["shear+noise"].train.x)
