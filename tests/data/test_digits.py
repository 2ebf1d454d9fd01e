"""Tests for the digits_rot benchmark."""

import numpy as np
import pytest

from moe_adapt import data
from moe_adapt.data import digits, images, registry


@pytest.fixture(name="bench", scope="module")
def fixture_bench():
  return data.get_benchmark("digits_rot")


@pytest.fixture(name="loaded", scope="module")
def fixture_loaded(bench):
  return bench.load(seed=0)


def test_metadata(bench):
  assert bench.domains == ("rot0", "rot15", "rot30", "rot45", "rot60", "rot75")
  assert bench.num_classes == 10 and len(bench.class_names) == 10
  assert bench.input_shape == (16, 16, 1)
  assert bench.default_targets == ("rot75",)
  bench.check_domains(bench.default_sources, bench.default_targets)


def test_shapes_dtypes_ranges_and_sizes(bench, loaded):
  total = 0
  for domain in bench.domains:
    for split in loaded[domain]:
      assert split.x.dtype == np.float32 and split.y.dtype == np.int32
      assert split.x.shape[1:] == (16, 16, 1) and split.y.shape == split.x.shape[:1]
      assert split.x.min() >= 0.0 and split.x.max() <= 1.0
      total += len(split.y)
    sizes = [len(s.y) for s in loaded[domain]]
    assert sizes in ([210, 30, 60], [209, 30, 60])
    assert len(np.unique(loaded[domain].train.y)) == 10  # Every class in every domain.
  assert total == 1797


def test_label_counts_match_the_source(loaded):
  ys = np.concatenate([s.y for splits in loaded.values() for s in splits])
  _, source_y = digits._source()
  np.testing.assert_array_equal(np.bincount(ys, minlength=10), np.bincount(source_y))


def test_each_domain_is_its_own_images_resized_then_rotated(loaded):
  """Links the output to disjoint source indices: domain k = rotate(resize(x[plan_k]), 15k)."""
  source_x, source_y = digits._source()
  plans = registry.plan_domains(
    len(source_x), digits.DOMAINS, seed=0, val_fraction=0.1, test_fraction=0.2
  )
  used = np.concatenate([np.concatenate(p) for p in plans.values()])
  assert len(np.unique(used)) == len(used) == 1797
  for domain, angle in zip(digits.DOMAINS, digits.ANGLES):
    for split, idx in zip(loaded[domain], plans[domain]):
      expected = images.rotate(images.resize(source_x[idx], (16, 16)), angle)
      np.testing.assert_allclose(split.x, np.clip(expected, 0, 1), atol=1e-6)
      np.testing.assert_array_equal(split.y, source_y[idx])


def test_rotation_is_applied(loaded):
  """Upright class centroids recognise rot75 images far better once turned back by -75°."""
  upright = loaded["rot0"].train
  centroids = np.stack([upright.x[upright.y == c].mean(0) for c in range(10)])

  def accuracy(x, y):
    dist = ((x[:, None] - centroids[None]) ** 2).sum(axis=(2, 3, 4))
    return (dist.argmin(1) == y).mean()

  test = loaded["rot75"].test
  as_is = accuracy(test.x, test.y)
  turned_back = accuracy(images.rotate(test.x, -75), test.y)
  turned_further = accuracy(images.rotate(test.x, 75), test.y)
  assert turned_back > 0.7 and turned_back > as_is + 0.3 and turned_back > turned_further + 0.3


def test_determinism_and_seed_dependence(bench, loaded):
  again = bench.load(seed=0)
  other = bench.load(seed=1)
  for domain in bench.domains:
    for a, b in zip(loaded[domain], again[domain]):
      np.testing.assert_array_equal(a.x, b.x)
      np.testing.assert_array_equal(a.y, b.y)
  assert not np.array_equal(loaded["rot30"].train.y, other["rot30"].train.y)


def test_options():
  small = data.get_benchmark("digits_rot", image_size=8, val_fraction=0.2, test_fraction=0.3)
  assert small.input_shape == (8, 8, 1)
  loaded = small.load(seed=0)
  assert loaded["rot0"].train.x.shape == (150, 8, 8, 1)
  assert [len(s.y) for s in loaded["rot15"]] == [150, 60, 90]


@pytest.mark.parametrize(
  "options, match",
  [
    ({"image_size": 4}, "image_size must be an int >= 8; got 4"),
    ({"image_size": 16.0}, "image_size"),
    ({"image_size": True}, "image_size"),
    ({"val_fraction": 0.0}, "val_fraction must be a number in"),
    ({"test_fraction": 0.95}, "val_fraction \\+ test_fraction must be < 1"),
  ],
)
def test_bad_options(options, match):
  with pytest.raises(ValueError, match=match):
    data.get_benchmark("digits_rot", **options)
