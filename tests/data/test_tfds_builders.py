"""Tests for moe_adapt.data.tfds_builders: array_record round trip and TFDSBenchmark."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moe_adapt import data
from moe_adapt.data import tfds_builders

NAME = "moe_adapt_benchmark/digits_rot-seed0"


@pytest.fixture(name="prepared", scope="module")
def fixture_prepared(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = data.prepare_tfds("digits_rot", data_dir, seed=0)
  return data_dir, builder


@pytest.fixture(name="reference", scope="module")
def fixture_reference():
  return data.get_benchmark("digits_rot").load(seed=0)


def test_prepare_writes_array_record_without_tensorflow(prepared):
  data_dir, builder = prepared
  assert builder.builder_config.name == "digits_rot-seed0"
  files = {p.name for p in (data_dir / NAME / "1.0.0").iterdir()}
  assert "moe_adapt_benchmark-train.array_record-00000-of-00001" in files
  assert {"dataset_info.json", "features.json"} <= files
  assert "tensorflow" not in sys.modules
  features = builder.info.features
  assert features["domain"].names == list(data.get_benchmark("digits_rot").domains)
  assert features["image"].shape == (16, 16, 1)
  assert builder.info.metadata["seed"] == 0


def test_data_source_reads_back_load_order(prepared, reference):
  data_dir, _ = prepared
  sources = tfds.data_source(NAME, data_dir=data_dir)
  for part in ("train", "val", "test"):
    source = sources[part]
    examples = source.__getitems__(range(len(source)))
    x = np.stack([e["image"] for e in examples])
    y = np.array([e["label"] for e in examples])
    domain = np.array([e["domain"] for e in examples])
    np.testing.assert_array_equal(
      x, np.concatenate([getattr(s, part).x for s in reference.values()])
    )
    np.testing.assert_array_equal(
      y, np.concatenate([getattr(s, part).y for s in reference.values()])
    )
    sizes = [len(getattr(s, part).y) for s in reference.values()]
    np.testing.assert_array_equal(domain, np.repeat(np.arange(6), sizes))


def test_tfds_benchmark_with_split_names_equals_load(prepared, reference):
  data_dir, _ = prepared
  bench = data.get_benchmark(
    "tfds", tfds_name=NAME, data_dir=data_dir, split_names=("train", "val", "test")
  )
  assert isinstance(bench, data.TFDSBenchmark)
  original = data.get_benchmark("digits_rot")
  assert bench.domains == original.domains and bench.class_names == original.class_names
  assert bench.input_shape == (16, 16, 1) and bench.default_targets == ("rot75",)
  loaded = bench.load(seed=0)
  for domain in original.domains:
    for a, b in zip(loaded[domain], reference[domain]):
      np.testing.assert_array_equal(a.x, b.x)
      np.testing.assert_array_equal(a.y, b.y)


def test_tfds_benchmark_pooled_resplits_by_seed(prepared):
  data_dir, _ = prepared
  bench = data.get_benchmark(
    "tfds", tfds_name=NAME, data_dir=data_dir, max_per_domain=100, default_targets=["rot0"]
  )
  assert bench.default_targets == ("rot0",)
  first, again, other = bench.load(seed=0), bench.load(seed=0), bench.load(seed=1)
  for domain, splits in first.items():
    assert [len(s.y) for s in splits] == [70, 10, 20]
    rows = np.concatenate([s.x.reshape(len(s.x), -1) for s in splits])
    assert len(np.unique(rows, axis=0)) == 100  # Disjoint splits, no repeats.
    np.testing.assert_array_equal(splits.train.x, again[domain].train.x)
  assert not np.array_equal(first["rot15"].train.x, other["rot15"].train.x)


def test_options_change_the_config_name(tmp_path):
  builder = data.prepare_tfds("digits_rot", tmp_path, seed=2, image_size=8)
  assert builder.builder_config.name.startswith("digits_rot-seed2-")
  source = builder.as_data_source(split="val")
  assert len(source) == 180 and source[0]["image"].shape == (8, 8, 1)


def test_prepare_errors(tmp_path):
  with pytest.raises(ValueError, match="benchmark='nope' is unknown"):
    data.prepare_tfds("nope", tmp_path)
  with pytest.raises(ValueError, match="seed"):
    data.prepare_tfds("digits_rot", tmp_path, seed=-1)
  with pytest.raises(ValueError, match="data_dir"):
    data.prepare_tfds("digits_rot", None)


def test_tfds_benchmark_errors(prepared, tmp_path):
  data_dir, _ = prepared
  with pytest.raises(ValueError, match="tfds_name is required"):
    data.get_benchmark("tfds")
  with pytest.raises(ValueError, match=r"is not a prepared TFDS dataset|is not prepared"):
    data.get_benchmark("tfds", tfds_name="moe_adapt_benchmark/missing-seed0", data_dir=tmp_path)
  with pytest.raises(
    ValueError, match=r"domain_key='site' is not a feature.*accepted: domain, image, label"
  ):
    data.get_benchmark("tfds", tfds_name=NAME, data_dir=data_dir, domain_key="site")
  with pytest.raises(ValueError, match="label_key='image' must name a ClassLabel"):
    data.get_benchmark("tfds", tfds_name=NAME, data_dir=data_dir, label_key="image")
  with pytest.raises(ValueError, match=r"split_names has unknown split\(s\) \['validation'\]"):
    data.get_benchmark(
      "tfds", tfds_name=NAME, data_dir=data_dir, split_names=("train", "validation", "test")
    )
  with pytest.raises(ValueError, match="split_names must give 3"):
    data.get_benchmark("tfds", tfds_name=NAME, data_dir=data_dir, split_names=("train", "val"))
  with pytest.raises(ValueError, match="default_targets"):
    data.get_benchmark("tfds", tfds_name=NAME, data_dir=data_dir, default_targets=["rot90"])
  with pytest.raises(ValueError, match="unknown option"):
    data.get_benchmark("tfds", tfds_name=NAME, data_dir=data_dir, domain="x")


def test_builder_class_is_registered_with_tfds():
  assert tfds_builders.BUILDER_NAME in tfds.list_builders(with_community_datasets=False)
