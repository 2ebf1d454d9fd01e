"""The tiny real-format TFDS datasets: built in seconds without TensorFlow, read back as the
real ones are (`tfds.data_source`), and usable as an in-memory benchmark."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moe_adapt import data
from moe_adapt.data import tfds_builders


@pytest.fixture(scope="module")
def mocks(tmp_path_factory):
  root = tmp_path_factory.mktemp("mock_tfds")
  return root, {fmt: tfds_builders.prepare_mock(fmt, root) for fmt in tfds_builders.MOCK_FORMATS}


def _source(root, builder, split):
  return tfds.data_source(f"{builder.name}/{builder.builder_config.name}", data_dir=root)[split]


def test_domainnet_format(mocks):
  root, builders = mocks
  builder = builders["domainnet"]
  assert builder.name == "mock_domainnet"
  features = builder.info.features
  assert features["domain"].names == ["clipart", "infograph", "painting"]
  assert features["label"].names[:2] == ["aircraft_carrier", "airplane"]
  train = _source(root, builder, "train")
  assert len(train) == 3 * 3 * 4 and len(_source(root, builder, "test")) == 3 * 3 * 2
  examples = [train[i] for i in range(len(train))]
  shapes = {e["image"].shape for e in examples}
  assert len(shapes) > 1 and all(len(s) == 3 and s[2] == 3 for s in shapes)  # Varying sizes.
  assert all(e["image"].dtype == np.uint8 for e in examples)
  counts = np.bincount([e["domain"] * 3 + e["label"] for e in examples])
  assert counts.tolist() == [4] * 9
  assert "tensorflow" not in sys.modules


def test_cub200_and_glue_formats(mocks):
  root, builders = mocks
  cub = _source(root, builders["cub200"], "train")[5]
  assert set(cub) == {"image", "image/filename", "label", "bbox", "segmentation_mask"}
  assert cub["segmentation_mask"].shape == (*cub["image"].shape[:2], 1)
  assert cub["bbox"].shape == (4,) and 0 <= cub["bbox"][0] < cub["bbox"][2] <= 1
  assert cub["image/filename"].decode().startswith("002.Laysan_Albatross/train_")
  glue = builders["glue_sst2"]
  assert set(glue.info.splits) == {"train", "validation", "test"}
  train = _source(root, glue, "train")
  first = train[0]
  assert isinstance(first["sentence"], bytes) and first["label"] == 0 and first["idx"] == 0
  assert {_source(root, glue, "test")[i]["label"] for i in range(8)} == {-1}
  assert sorted(train[i]["label"] for i in range(len(train))) == [0] * 8 + [1] * 8


def test_domainnet_mock_as_an_in_memory_benchmark(mocks):
  root, builders = mocks
  name = f"mock_domainnet/{builders['domainnet'].builder_config.name}"
  bench = data.get_benchmark(
    "tfds", tfds_name=name, data_dir=str(root), split_names=("train", "test", "test"),
    image_size=16,
  )  # fmt: skip
  assert bench.domains == ("clipart", "infograph", "painting") and bench.num_classes == 3
  splits = bench.load(seed=0)
  assert splits["painting"].train.x.shape == (12, 16, 16, 3)


def test_prepare_mock_bad_input(tmp_path):
  with pytest.raises(ValueError, match="fmt='imagenet' is unknown; accepted: domainnet, cub200"):
    tfds_builders.prepare_mock("imagenet", tmp_path)
  with pytest.raises(ValueError, match="domains=\\('mars',\\) is invalid; accepted: some of"):
    tfds_builders.prepare_mock("domainnet", tmp_path, domains=("mars",))
  with pytest.raises(ValueError, match="per_class=\\{'train': 0\\} is invalid"):
    tfds_builders.prepare_mock("cub200", tmp_path, per_class={"train": 0})


def test_a_dataset_without_domains_is_one_domain(mocks):
  root, builders = mocks
  name = f"mock_cub200/{builders['cub200'].builder_config.name}"
  with pytest.raises(ValueError, match=r"domain_key='domain' is not a feature of 'mock_cub200/"):
    data.get_benchmark("tfds", tfds_name=name, data_dir=str(root), image_size=8)
  bench = data.get_benchmark(
    "tfds", tfds_name=name, data_dir=str(root), image_size=8, domain_key=None,
    split_names=("train", "test", "test"),
  )  # fmt: skip
  assert bench.domains == ("mock_cub200",) and bench.default_targets == ("mock_cub200",)
  splits = bench.load(seed=0)["mock_cub200"]
  assert splits.train.x.shape == (12, 8, 8, 3) and sorted(set(splits.train.y)) == [0, 1, 2]
