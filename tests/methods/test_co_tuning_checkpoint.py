"""Co-Tuning from a Hugging Face / timm checkpoint directory (issue #23 item 3, #24 item 2).

- The source model read from the tiny ResNet-50 fixtures (transformers and timm naming)
  gives the reference implementation's logits through co_tuning's own Classifier, with
  the checkpoint's head as the source head and its class names.
- Input normalisation from preprocessor_config.json / timm's config, ImageNet otherwise.
- Bad input, one message naming model.source_checkpoint: not a checkpoint directory, a file
  of a checkpoint directory, a text model, a classifier without a head, a PyTorch pickle.
- With a source domain (slow): T fitted on its val split, its training split never used.
- End to end (slow): the accelerator preset `co_tuning.py:cub,tiny` through the CLI on a
  CUB-200-format mock TFDS dataset from the ResNet-50 fixture.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from moe_adapt import data, models
from moe_adapt.methods import co_tuning, co_tuning_data, co_tuning_source
from moe_adapt.models import hf_io
from tests.methods import configs_util
from tests.subprocess_util import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "models" / "fixtures" / "hf"
CONFIGS = configs_util.config_module("co_tuning")


@pytest.mark.parametrize(
  "name, architecture", [("resnet50", "resnet"), ("resnet50_timm", "timm_resnet")]
)
def test_source_model_gives_the_reference_logits(name, architecture):
  loaded = co_tuning_source.load_source_model(str(FIXTURES / name))
  assert loaded.architecture == architecture
  assert set(loaded.variables) == {"params", "batch_stats"}
  assert set(loaded.variables["params"]) == {"backbone", "head"}
  reference = safetensors.numpy.load_file(str(FIXTURES / name / "reference.safetensors"))
  model = models.Classifier(backbone=loaded.module, num_classes=len(loaded.class_names))
  x = jnp.asarray(reference["pixel_values"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  logits = np.asarray(model.apply(loaded.variables, x, train=False))
  want = reference["logits"]
  np.testing.assert_allclose(logits, want, atol=1e-5 * np.abs(want).max())
  expected_names = (
    tuple(f"LABEL_{j}" for j in range(5))
    if name == "resnet50"
    else tuple(f"source_{j}" for j in range(5))
  )
  assert loaded.class_names == expected_names
  np.testing.assert_allclose(loaded.mean, co_tuning_source.IMAGENET_MEAN)
  np.testing.assert_allclose(loaded.std, co_tuning_source.IMAGENET_STD)


def _copy_fixture(tmp_path, name: str) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_normalisation_comes_from_the_checkpoint(tmp_path):
  hf = _copy_fixture(tmp_path, "resnet50")
  (hf / "preprocessor_config.json").write_text(
    json.dumps({"do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25] * 3})
  )
  loaded = co_tuning_source.load_source_model(str(hf))
  np.testing.assert_allclose(loaded.mean, [0.5] * 3)
  np.testing.assert_allclose(loaded.std, [0.25] * 3)
  timm = _copy_fixture(tmp_path, "resnet50_timm")
  config = json.loads((timm / "config.json").read_text())
  config["pretrained_cfg"] = {"mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0]}
  config["label_names"] = ["a", "b", "c", "d", "e"]
  (timm / "config.json").write_text(json.dumps(config))
  loaded = co_tuning_source.load_source_model(str(timm))
  np.testing.assert_allclose(loaded.mean, [0.1, 0.2, 0.3])
  assert loaded.class_names == ("a", "b", "c", "d", "e")
  # normalize_task works in place on every split: (x - mean) / std.
  splits = [data.Split(np.ones((2, 4, 4, 3), np.float32), np.zeros(2, np.int32)) for _ in "abc"]
  task = co_tuning.Task("", "t", ("s",), ("t",), None, None, None, *splits, (4, 4, 3))
  co_tuning_data.normalize_task(task, np.float32([0.5] * 3), np.float32([0.25] * 3))
  for split in splits:
    np.testing.assert_allclose(split.x, 2.0)  # (1 - 0.5) / 0.25


def test_bad_checkpoints_name_the_field(tmp_path):
  field = r"model\.source_checkpoint="
  with pytest.raises(ValueError, match=field + r"'.*' is not a checkpoint directory"):
    co_tuning_source.load_source_model(str(tmp_path))
  with pytest.raises(ValueError, match=field + r"'.*bert' holds a 'bert' checkpoint; accepted"):
    co_tuning_source.load_source_model(str(FIXTURES / "bert"))
  headless = _copy_fixture(tmp_path, "resnet50")
  tensors = safetensors.numpy.load_file(str(headless / "model.safetensors"))
  hf_io.save_file(
    {k: v for k, v in tensors.items() if not k.startswith("classifier.")},
    headless / "model.safetensors",
  )
  with pytest.raises(ValueError, match=field + r"'.*' has no linear classification head"):
    co_tuning_source.load_source_model(str(headless))
  # The weights file of a checkpoint directory, given where the project's layout is read.
  config = CONFIGS.get_config("cub")
  config.model.source_checkpoint = str(FIXTURES / "resnet50" / "model.safetensors")
  with pytest.raises(ValueError, match=r"model\.num_source_classes=0 is invalid"):
    co_tuning.validate_config(config)  # a file in the project's layout does not say it
  config.model.num_source_classes = 5
  co_tuning.validate_config(config)
  template = {"params": {"head": {"bias": np.zeros(5, np.float32)}}}
  with pytest.raises(ValueError, match=r"is a file of a Hugging Face / timm checkpoint dir"):
    co_tuning.load_source_checkpoint(config.model.source_checkpoint, template)
  config.model.source_checkpoint = "resnet50.pth"
  with pytest.raises(ValueError, match=field + r"'resnet50\.pth' is invalid \(a PyTorch pickle\)"):
    co_tuning.validate_config(config)


def test_cub_preset_reads_a_dataset_without_domains():
  config = CONFIGS.get_config("cub,tiny")
  assert config.data.options.domain_key is None
  assert config.data.options.image_size == 32
  assert config.model.num_source_classes == 0  # the checkpoint's head says it
  config.model.source_checkpoint = str(FIXTURES / "resnet50")
  co_tuning.validate_config(config)


@pytest.mark.slow
def test_cub_tiny_preset_runs_from_the_resnet50_fixture(tmp_path):
  """About 2 minutes on 2 busy cores: compiling the 50-layer training step dominates."""
  from moe_adapt.data import tfds_builders

  builder = tfds_builders.prepare_mock(
    "cub200", tmp_path / "tfds", per_class={"train": 16, "test": 4}
  )
  workdir = tmp_path / "run"
  env = {"XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "moe_adapt.main",
      "--config=configs/co_tuning.py:cub,tiny",
      f"--config.model.source_checkpoint={FIXTURES / 'resnet50'}",
      f"--config.data.options.tfds_name={builder.name}/{builder.builder_config.name}",
      f"--config.data.options.data_dir={tmp_path / 'tfds'}",
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
  assert results["target_domains"] == ["mock_cub200"]
  assert results["source_domains"] == []
  assert results["source_classes"] == [f"LABEL_{j}" for j in range(5)]
  assert results["source_model"]["architecture"] == "resnet"
  assert results["source_calibration"]["fitted"] is False
  assert results["source_calibration"]["temperature"] == pytest.approx(1 / 0.8840456604957581)
  assert set(results["metrics"]) == {"fine_tune", "l2_sp", "co_tuning_direct", "co_tuning_reverse"}
  for variant, metrics in results["metrics"].items():
    assert 0.0 <= metrics["mock_cub200"]["accuracy"] <= 1.0, variant
  for kind in ("direct", "reverse"):
    matrix = np.asarray(results["relationships"][kind]["matrix"])
    assert matrix.shape == (3, 5)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_a_checkpoint_with_a_source_validation_split_fits_the_temperature(tmp_path):
  """No source training data is needed: T is fitted on the source domain's val split.

  About 13 s (compiling the 50-layer inference pass).
  """
  from moe_adapt.data import tfds_builders

  builder = tfds_builders.prepare_mock(
    "domainnet",
    tmp_path / "tfds",
    num_classes=5,
    per_class={"train": 16, "test": 8},
    domains=("clipart", "painting"),
  )
  config = CONFIGS.get_config("cub,tiny")
  config.data.options.tfds_name = f"{builder.name}/{builder.builder_config.name}"
  config.data.options.data_dir = str(tmp_path / "tfds")
  config.data.options.domain_key = "domain"
  config.data.options.val_fraction = 0.3
  config.data.source_domain, config.data.target_domain = "clipart", "painting"
  config.calibration.temperature = 0.0  # fit it
  config.model.source_checkpoint = str(FIXTURES / "resnet50")
  co_tuning.validate_config(config)
  setup = co_tuning.make_setup(config)
  assert setup.x_source is None  # the source training split is never placed on device
  assert len(setup.task.source_names) == 5  # the benchmark's classes, the head's count
  source = co_tuning.pretrained_source(setup, str(tmp_path / "run"), writer=None)
  calibration = co_tuning.calibrate(setup, co_tuning.make_logits_fn(setup), source)
  assert calibration["fitted"] is True
  assert calibration["fitted_on"].startswith("clipart val")
  assert calibration["temperature"] > 0
