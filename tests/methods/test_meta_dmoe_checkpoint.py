"""Meta-DMoE's shared backbone from a Hugging Face / timm ResNet checkpoint directory.

`backbone.checkpoint=DIR`: the checkpoint's network becomes the experts' and the student's
architecture, its weights their shared starting point (a new head for the benchmark's
classes), and its input normalisation is applied to the images. The fixtures under
`tests/models/fixtures/hf` were made by transformers (`scripts/make_hf_reference.py`); the
loaded backbone must reproduce transformers' pooled features on the fixture's inputs.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from moe_adapt import data, models
from moe_adapt.data import tfds_builders
from moe_adapt.methods import meta_dmoe
from moe_adapt.models import backbone_io
from tests.methods import configs_util

REPO = pathlib.Path(__file__).resolve().parents[2]
HF = REPO / "tests" / "models" / "fixtures" / "hf"
CONFIGS = configs_util.config_module("meta_dmoe")


@pytest.fixture(scope="module")
def mock_domainnet(tmp_path_factory):
  """A DomainNet-format mock: 3 domains × 3 classes, 12 train + 4 test images per class."""
  root = tmp_path_factory.mktemp("mockdn")
  builder = tfds_builders.prepare_mock(
    "domainnet", root, per_class={"train": 12, "test": 4}, image_sides=(24, 40)
  )
  return f"{builder.name}/{builder.builder_config.name}", str(root)


def tfds_tiny(mock, checkpoint="resnet_tiny", **overrides):
  """`meta_dmoe.py:tfds,tiny` on the mock from a fixture checkpoint."""
  name, root = mock
  config = CONFIGS.get_config("tfds,tiny")
  config.data.options.tfds_name = name
  config.data.options.data_dir = root
  config.backbone.checkpoint = str(HF / checkpoint) if checkpoint else ""
  return configs_util.with_overrides(config, **overrides)


@pytest.fixture(scope="module")
def setup(mock_domainnet):
  return meta_dmoe.make_setup(tfds_tiny(mock_domainnet))


def test_the_checkpoint_is_the_architecture_and_inputs_are_normalised(setup, mock_domainnet):
  config = tfds_tiny(mock_domainnet)
  assert config.model.backbone == "resnet50"  # replaced by the checkpoint's network
  backbone = setup.model.backbone
  assert backbone.stage_sizes == (1, 1) and backbone.num_filters == 8
  assert backbone.dtype == jnp.float32
  bf16 = meta_dmoe.make_setup(tfds_tiny(mock_domainnet, **{"model.dtype": "bfloat16"}))
  assert bf16.model.backbone.dtype == jnp.bfloat16  # model.dtype still applies
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  assert setup.checkpoint_info == {
    "checkpoint": str(HF / "resnet_tiny"),
    "architecture": "resnet",
    "input_mean": pytest.approx(mean.tolist()),
    "input_std": pytest.approx(std.tolist()),
  }
  raw = data.get_benchmark("tfds", **{k: v for k, v in config.data.options.items() if v != ""})
  raw_splits = raw.load(seed=config.seed)
  for domain, splits in setup.splits.items():
    for part, raw_part in zip(splits, raw_splits[domain], strict=True):
      np.testing.assert_allclose(part.x, (raw_part.x - mean) / std, rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(part.y, raw_part.y)
  source = np.concatenate([setup.splits[d].train.x for d in setup.sources])
  np.testing.assert_allclose(np.asarray(setup.x), source)


def test_loaded_backbone_reproduces_transformers(setup, tmp_path):
  backbone = meta_dmoe.train_backbone(setup.config, str(tmp_path), setup, writer=None)
  ref = safetensors.numpy.load_file(str(HF / "resnet_tiny" / "reference.safetensors"))
  images = ref["pixel_values"].transpose(0, 2, 3, 1)  # NCHW -> NHWC, already normalised
  float32 = setup.model.clone(backbone=setup.model.backbone.clone(dtype=jnp.float32))
  features = jax.jit(lambda v, x: float32.apply(v, x, method=models.Classifier.features))
  feats = features(backbone, images)
  want = ref["pooler_output"][:, :, 0, 0]
  np.testing.assert_allclose(feats, want, atol=1e-5 * np.abs(want).max())
  # The head is a new one for the benchmark's 3 classes, not the checkpoint's.
  assert backbone["params"]["head"]["kernel"].shape == (16, setup.benchmark.num_classes)
  assert not (tmp_path / "backbone.msgpack").exists()  # nothing trained, nothing written


def test_timm_naming_gives_the_same_architecture():
  resnet50 = backbone_io.backbone_checkpoint(str(HF / "resnet50"))
  timm = backbone_io.backbone_checkpoint(str(HF / "resnet50_timm"))
  assert (resnet50.architecture, timm.architecture) == ("resnet", "timm_resnet")
  assert timm.module.stage_sizes == resnet50.module.stage_sizes == (3, 4, 6, 3)
  assert timm.module.num_filters == resnet50.module.num_filters == 4
  assert backbone_io.backbone_checkpoint("") is None


def test_normalize_splits_is_per_channel():
  x = np.random.default_rng(0).uniform(size=(5, 4, 4, 3)).astype(np.float32)
  split = data.Split(x, np.zeros(5, np.int32))
  splits = data.DomainSplits(split, split, split)
  out = backbone_io.normalize_splits(splits, np.ones(3) / 2, np.array([2, 4, 8]))
  for part in out:
    np.testing.assert_allclose(part.x[..., 2], (x[..., 2] - 0.5) / 8, rtol=1e-6)
    assert part.x.dtype == np.float32
  np.testing.assert_array_equal(split.x, x)  # the input is not changed in place


def test_a_checkpoint_that_is_not_a_resnet_is_refused(mock_domainnet, tmp_path):
  with pytest.raises(ValueError, match=r"backbone\.checkpoint='.*bert' holds a 'bert' checkpoint"):
    meta_dmoe.make_setup(tfds_tiny(mock_domainnet, checkpoint="bert"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=r"backbone\.checkpoint='.*empty' cannot be loaded: .*"):
    backbone_io.backbone_checkpoint(str(empty))


def test_a_grayscale_benchmark_is_refused():
  config = CONFIGS.get_config("digits_rot,tiny")
  config.backbone.checkpoint = str(HF / "resnet_tiny")
  with pytest.raises(ValueError, match=r"takes 3-channel images .* accepted: an image benchmark"):
    meta_dmoe.make_setup(config)


def test_a_template_of_another_shape_is_named(setup, tmp_path):
  # The 50-layer fixture into the tiny model's variables: the first differing tensor named.
  template = meta_dmoe.init_model(setup, jax.random.key(0))
  with pytest.raises(ValueError, match=r"is a resnet whose backbone differs from the model at"):
    backbone_io.backbone_from_checkpoint(str(HF / "resnet50"), template)
  copy = shutil.copytree(HF / "resnet_tiny", tmp_path / "tiny")
  (copy / "model.safetensors").unlink()
  with pytest.raises(ValueError, match=r"cannot be loaded: .*has no model\.safetensors"):
    backbone_io.load_backbone(str(copy), template)


@pytest.mark.slow
def test_tfds_tiny_preset_runs_end_to_end_from_the_fixture(mock_domainnet, tmp_path):
  """`meta_dmoe.py:tfds,tiny` through the CLI; ~70 CPU-seconds, nearly all XLA compiles."""
  name, root = mock_domainnet
  workdir = tmp_path / "run"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "moe_adapt.main",
      "--config=configs/meta_dmoe.py:tfds,tiny",
      f"--config.backbone.checkpoint={HF / 'resnet_tiny'}",
      f"--config.data.options.tfds_name={name}",
      f"--config.data.options.data_dir={root}",
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["source_domains"] == ["clipart", "infograph"]
  assert results["target_domains"] == ["painting"]
  assert results["backbone_checkpoint"]["architecture"] == "resnet"
  assert not (workdir / "backbone.msgpack").exists()  # loaded, not trained
  expected = {"erm", "erm_continued", "expert_average", "meta_dmoe", "aggregator_pretrained"}
  assert expected <= set(results["metrics"])
  assert set(results["per_example"]) == set(results["metrics"])
  for variant, metrics in results["metrics"].items():
    correct = results["per_example"][variant]["painting"]["correct"]
    assert len(correct) == 48  # the whole target domain: 3 classes x (12 + 4) images
    assert 0.0 <= metrics["painting"]["accuracy"] <= 1.0, variant
