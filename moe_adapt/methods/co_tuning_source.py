"""Co-Tuning's source model from a file: checkpoint directories and this project's files.

`model.source_checkpoint` names either a Hugging Face / timm ResNet checkpoint directory
(config.json + safetensors, read by `models.checkpoints`; its linear classification head is
the source head, its preprocessing normalises the images) or an .npz / .safetensors file
of `save_source_checkpoint` (one array per variable, named by its path).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np

from moe_adapt import models
from moe_adapt.methods.co_tuning_checks import CHECKPOINT_SUFFIXES
from moe_adapt.train import workdir as workdir_lib

# Checkpoint architectures (models.checkpoints.ARCHITECTURES) usable as the source model.
SOURCE_ARCHITECTURES = ("resnet", "timm_resnet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class SourceModel:
  """A source model read from a Hugging Face / timm checkpoint directory.

  Attributes:
    architecture: one of SOURCE_ARCHITECTURES.
    module: the backbone, images [B, H, W, C] (normalised) -> features [B, D].
    variables: {'params': {'backbone', 'head'}, 'batch_stats': {'backbone'}}, host float32;
      the head (kernel [D, C_s], bias [C_s]) is the checkpoint's classification head.
    class_names: the C_s source class names (config.json's id2label / label_names, else
      `source_<j>`).
    mean: [C] per-channel input mean, subtracted from images in [0, 1].
    std: [C] per-channel input standard deviation, dividing them after.
  """

  architecture: str
  module: nn.Module
  variables: dict
  class_names: tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray

  def info(self, path: str) -> dict:
    return {
      "checkpoint": str(path),
      "architecture": self.architecture,
      "num_source_classes": len(self.class_names),
      "input_mean": self.mean.tolist(),
      "input_std": self.std.tolist(),
    }

  def check_task(self, input_shape: tuple[int, ...], num_source_classes: int, path: str) -> None:
    """The task's images [H, W, C] and its source classes fit this checkpoint."""
    if input_shape[-1] != self.mean.shape[0]:
      raise ValueError(
        f"model.source_checkpoint='{path}' takes {self.mean.shape[0]}-channel images but "
        f"benchmark images have shape {input_shape}; accepted: a benchmark with "
        f"{self.mean.shape[0]} channels"
      )
    if num_source_classes != len(self.class_names):
      raise ValueError(
        f"data.source_classes select {num_source_classes} source classes but the head of "
        f"model.source_checkpoint='{path}' has {len(self.class_names)}; accepted: the "
        "checkpoint's classes, in its order"
      )


def _class_names(config: Mapping, num_classes: int) -> tuple[str, ...]:
  """Source class names from a transformers (id2label) or timm (label_names) config."""
  id2label = config.get("id2label") or {}
  try:
    names = tuple(str(id2label[str(j)]) for j in range(num_classes))
  except KeyError:
    names = tuple(config.get("label_names") or ())
  return names if len(names) == num_classes else tuple(f"source_{j}" for j in range(num_classes))


def _normalisation(directory, config: Mapping) -> tuple[np.ndarray, np.ndarray]:
  """The checkpoint's input normalisation: its preprocessor_config.json (transformers),
  its config.json's pretrained_cfg / mean, std (timm), else ImageNet's (both libraries'
  default for ResNets)."""
  path = workdir_lib.as_path(directory) / "preprocessor_config.json"
  if path.is_file():
    pre = json.loads(path.read_text())
    if not pre.get("do_normalize", True):
      return np.zeros(3, np.float32), np.ones(3, np.float32)
    mean, std = pre.get("image_mean"), pre.get("image_std")
  else:
    timm_cfg = config.get("pretrained_cfg") or config
    mean, std = timm_cfg.get("mean"), timm_cfg.get("std")
  mean = IMAGENET_MEAN if mean is None else mean
  std = IMAGENET_STD if std is None else std
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def load_source_model(path: str) -> SourceModel:
  """Reads `model.source_checkpoint` = a Hugging Face / timm checkpoint directory.

  Raises:
    ValueError: naming model.source_checkpoint when the directory does not hold a
      checkpoint, holds another architecture than a ResNet, has no linear classification
      head, or its tensors do not match its config (the loader's message is included).
  """
  directory = workdir_lib.as_path(path)
  field = f"model.source_checkpoint='{path}'"
  if not (directory / "config.json").is_file():
    raise ValueError(
      f"{field} is not a checkpoint directory (no config.json there); accepted: a Hugging "
      "Face / timm checkpoint directory (config.json + model.safetensors), or a "
      f"{' or '.join(CHECKPOINT_SUFFIXES)} file of co_tuning.save_source_checkpoint"
    )
  try:
    ckpt = models.checkpoints.load_checkpoint(directory)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"{field} cannot be loaded: {e}") from None
  if ckpt.architecture not in SOURCE_ARCHITECTURES:
    raise ValueError(
      f"{field} holds a {ckpt.architecture!r} checkpoint; accepted: "
      f"{', '.join(SOURCE_ARCHITECTURES)} (an image classifier whose head is the source head)"
    )
  if ckpt.head is None:
    raise ValueError(
      f"{field} has no linear classification head; accepted: an image-classification "
      "checkpoint (e.g. ResNetForImageClassification, timm resnet50 with fc.*): Co-Tuning "
      "needs the source head"
    )
  module, variables = models.checkpoints.classifier(ckpt)
  del module  # Classifier(ckpt.module, C_s); the Setup builds its own from ckpt.module.
  num_classes = int(ckpt.head["bias"].shape[0])
  mean, std = _normalisation(directory, ckpt.config)
  return SourceModel(
    architecture=ckpt.architecture,
    module=ckpt.module,
    variables={"params": variables["params"], "batch_stats": variables.get("batch_stats", {})},
    class_names=_class_names(ckpt.config, num_classes),
    mean=mean,
    std=std,
  )


def _flatten_variables(variables: Mapping) -> dict[str, np.ndarray]:
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    flat["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
  return flat


def missing_checkpoint_message(path) -> str:
  return (
    f"model.source_checkpoint='{path}' does not exist; accepted: the path of a pre-trained "
    f"source model ({' or '.join(CHECKPOINT_SUFFIXES)}) written by "
    "co_tuning.save_source_checkpoint or by a converter that uses the same array names"
  )


def save_source_checkpoint(path: str | os.PathLike, variables: Mapping) -> None:
  """Writes `{'params': ..., 'batch_stats': ...}` of a source Classifier as flat arrays.

  The format `model.source_checkpoint` reads: one array per leaf, named by its path
  joined with '/' (e.g. `params/backbone/Conv_0/kernel`), in an .npz or (by suffix)
  .safetensors file. A converter from another framework writes the same names. The
  path may be local or remote (`gs://...`).
  """
  target = workdir_lib.as_path(path)
  flat = _flatten_variables(variables)
  if target.suffix == ".safetensors":
    import safetensors.numpy

    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in flat.items()})
  elif target.suffix == ".npz":
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    data = buffer.getvalue()
  else:
    raise ValueError(f"path={os.fspath(path)!r} is invalid; accepted: a .npz or .safetensors file")
  workdir_lib.write_bytes_atomic(target, data)


def load_source_checkpoint(path: str | os.PathLike, template: Mapping) -> dict:
  """Reads a `save_source_checkpoint` file into the structure of `template`.

  Args:
    path: the .npz or .safetensors file (`model.source_checkpoint`), local or remote.
    template: `{'params': ..., 'batch_stats': ...}` of the configured source Classifier.

  Raises:
    ValueError: naming model.source_checkpoint when the file is missing, or its arrays do
      not match the template (missing or extra names, shapes).
  """
  source = workdir_lib.as_path(path)
  if not source.is_file():
    raise ValueError(missing_checkpoint_message(path))
  data = source.read_bytes()  # Local or remote (gs://): both readers take bytes.
  if source.suffix == ".safetensors":
    import safetensors.numpy

    stored = safetensors.numpy.load(data)
  else:
    with np.load(io.BytesIO(data)) as f:
      stored = {k: f[k] for k in f.files}
  expected = _flatten_variables(template)
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  wrong = [
    f"{k}: {stored[k].shape} (expected {expected[k].shape})"
    for k in expected
    if k in stored and stored[k].shape != expected[k].shape
  ]
  if (missing or extra or wrong) and (source.parent / "config.json").is_file():
    raise ValueError(
      f"model.source_checkpoint='{path}' is a file of a Hugging Face / timm checkpoint "
      f"directory; accepted: that directory, model.source_checkpoint='{source.parent}'"
    )
  if missing or extra or wrong:
    details = "; ".join(
      part
      for part in (
        f"missing {missing[:5]}" if missing else "",
        f"unexpected {extra[:5]}" if extra else "",
        f"shapes {wrong[:5]}" if wrong else "",
      )
      if part
    )
    raise ValueError(
      f"model.source_checkpoint='{path}' does not match the configured model "
      f"({_size_text(template)}): {details}"
    )
  leaves_with_path = jax.tree_util.tree_leaves_with_path(template)
  values = [
    np.asarray(stored["/".join(str(getattr(k, "key", k)) for k in p)], np.asarray(leaf).dtype)
    for p, leaf in leaves_with_path
  ]
  return jax.tree.unflatten(jax.tree.structure(template), values)


def _size_text(template: Mapping) -> str:
  n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(template.get("params", {})))
  return f"{n} parameters"
