"""Hugging Face checkpoints (safetensors + config.json) as Flax modules and parameters.

`load_checkpoint(directory)` reads the architecture from `config.json` and returns the
matching Flax backbone, its variables and, when the checkpoint has one, its linear
classification head:

- 'bert': model_type 'bert' (MiniLM too) → `bert.BertEncoder`; head `classifier.*`.
- 'roberta': model_type 'roberta' → `bert.BertEncoder` (RoBERTa positions).
- 'distilbert': model_type 'distilbert' → `bert.BertEncoder` (no token types).
- 'vit': model_type 'vit' → `vit.ViT` (pool 'cls'); head `classifier.*`.
- 'resnet': model_type 'resnet' (transformers, e.g. microsoft/resnet-50) →
  `resnet.ResNet`; head `classifier.1.*`.
- 'timm_resnet': a timm config.json with architecture 'resnet18' … 'resnet152' →
  `resnet.ResNet`; head `fc.*`. (Key layout from timm's documented state-dict names; timm
  itself could not run in the reference venv, see scripts/make_hf_reference.py.)

Task-model checkpoints (`BertForSequenceClassification`, `ViTForImageClassification`,
`ResNetForImageClassification`) are read too: the base model's prefix ('bert.', 'vit.',
'resnet.', ...) is stripped and the linear head is returned as `Checkpoint.head`
({'kernel' [D, C], 'bias' [C]}, the `nn.Dense` of `Classifier` and `TextClassifier`;
`classifier(checkpoint)` builds those). Heads that are not one Linear (RoBERTa's and
DistilBERT's two-layer heads) are reported as unexpected tensors. Buffers are ignored
(`position_ids`, `num_batches_tracked`), and so is a ViT's tanh pooler, which ViT image
classifiers do not use (their head reads the final LayerNorm's class token, our `ViT`'s
output).

Tensors are streamed one at a time (`hf_io.read_tensors`): names and shapes are checked
against the architecture from the file headers first, so a wrong checkpoint fails before
any data is read, with one `WeightLoadError` naming every missing, unexpected and mis-shaped
tensor. Inputs follow Flax layouts: images [B, H, W, C] (transformers takes NCHW). The
per-architecture tensor layouts (module + specs) live in `checkpoint_specs`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import numpy as np

from moe_adapt.models import bert, hf_io, vit
from moe_adapt.models import checkpoint_specs as specs_lib
from moe_adapt.models.checkpoint_specs import TIMM_RESNETS
from moe_adapt.models.checkpoint_specs import distilbert_config as distilbert_config
from moe_adapt.models.classifier import Classifier
from moe_adapt.models.text_classifier import TextClassifier

ARCHITECTURES = ("bert", "roberta", "distilbert", "vit", "resnet", "timm_resnet")
# Prefixes of the base model inside transformers' task models.
_PREFIXES = {
  "bert": "bert.",
  "roberta": "roberta.",
  "distilbert": "distilbert.",
  "vit": "vit.",
  "resnet": "resnet.",
}
# The linear classification head's tensor prefix, per architecture.
_HEADS = {
  "bert": "classifier.",
  "vit": "classifier.",
  "resnet": "classifier.1.",
  "timm_resnet": "fc.",
}
# Buffers, and unused modules (see the module docstring), by name suffix / prefix.
_IGNORED_SUFFIXES = ("position_ids", "token_type_ids", "num_batches_tracked")
_IGNORED_PREFIXES = {"vit": ("pooler.",)}


class Checkpoint(NamedTuple):
  """A loaded checkpoint.

  Attributes:
    architecture: one of `ARCHITECTURES`.
    module: the Flax backbone (BERT family: `BertEncoder`, token ids [B, T] → `BertOutput`;
      ViT and ResNet: images [B, H, W, C] → features [B, D]).
    variables: {'params': ...} (+ 'batch_stats' for ResNets), float32.
    head: {'kernel': [D, C], 'bias': [C]} of a linear classification head, or None.
    config: the checkpoint's `config.json`.
  """

  architecture: str
  module: nn.Module
  variables: dict[str, Any]
  head: dict[str, Any] | None
  config: dict[str, Any]

  @property
  def params(self) -> dict[str, Any]:
    return self.variables["params"]


def architecture_of(config: Mapping[str, Any]) -> str:
  """The architecture (one of `ARCHITECTURES`) a `config.json` describes."""
  model_type = config.get("model_type")
  if model_type is not None:
    if model_type in _PREFIXES:
      return model_type
    raise ValueError(
      f"config.json model_type={model_type!r} is unsupported; accepted: "
      f"{', '.join(_PREFIXES)} (transformers), or a timm config with architecture in "
      f"{', '.join(TIMM_RESNETS)}"
    )
  timm_arch = config.get("architecture")
  if timm_arch in TIMM_RESNETS:
    return "timm_resnet"
  raise ValueError(
    f"config.json has no supported model_type (transformers) or architecture (timm; got "
    f"{timm_arch!r}); accepted model_type: {', '.join(_PREFIXES)}; architecture: "
    f"{', '.join(TIMM_RESNETS)}"
  )


# Tensor-name fragments that identify an architecture, for error messages.
_SIGNATURES = (
  ("transformer.layer.0.attention.q_lin.weight", "distilbert"),
  ("encoder.layer.0.layernorm_before.weight", "vit"),
  ("encoder.layer.0.attention.self.query.weight", "bert or roberta"),
  ("encoder.stages.0.layers.0.layer.0.convolution.weight", "resnet (transformers)"),
  ("layer1.0.conv1.weight", "timm resnet"),
)


def _looks_like(names: set[str]) -> str:
  for fragment, arch in _SIGNATURES:
    if any(name.endswith(fragment) for name in names):
      return f"its tensor names look like {arch}"
  return ""


def _is_ignored(architecture: str, name: str) -> bool:
  return name.endswith(_IGNORED_SUFFIXES) or name.startswith(
    _IGNORED_PREFIXES.get(architecture, ())
  )


def _head_dim(module: nn.Module) -> int:
  if isinstance(module, bert.BertEncoder):
    return module.config.hidden_size
  if isinstance(module, vit.ViT):
    return module.hidden_size
  return module.output_dim


def plan(
  directory: str | os.PathLike[str], *, architecture: str | None = None
) -> tuple[str, dict[str, Any], nn.Module, specs_lib.Specs, dict[str, str]]:
  """Checks a checkpoint against its architecture without reading tensor data.

  Returns:
    (architecture, config, module, specs, rename): `specs` maps checkpoint names (prefix
    stripped) to their Flax places, `rename` file tensor names to those names.

  Raises:
    ValueError: unsupported or mismatching architecture; `WeightLoadError` (a ValueError)
      naming every missing, unexpected and mis-shaped tensor.
  """
  config = hf_io.read_config(directory)
  found = architecture_of(config)
  if architecture is not None and architecture != found:
    if architecture not in ARCHITECTURES:
      raise ValueError(
        f"architecture={architecture!r} is unknown; accepted: {', '.join(ARCHITECTURES)}"
      )
    raise ValueError(f"{directory} holds a {found!r} checkpoint, not {architecture!r}")
  files = hf_io.weight_files(directory)
  prefix = _PREFIXES.get(found, "")
  file_shapes = hf_io.tensor_shapes(files)
  rename = {}
  for name in file_shapes:
    short = name[len(prefix) :] if prefix and name.startswith(prefix) else name
    if not _is_ignored(found, short):
      rename[name] = short
  shapes = {rename[k]: v for k, v in file_shapes.items() if k in rename}
  if found in ("bert", "roberta", "distilbert"):
    module, specs = specs_lib.bert_family_specs(found, config, shapes)
  elif found == "vit":
    module, specs = specs_lib.vit_specs(config)
  elif found == "resnet":
    module, specs = specs_lib.hf_resnet_specs(config)
  else:
    module, specs = specs_lib.timm_resnet_specs(config, shapes)
  head = _HEADS.get(found)
  if head and f"{head}weight" in shapes:
    classes, dim = shapes[f"{head}weight"][0], _head_dim(module)
    specs[f"{head}weight"] = hf_io.TensorSpec(("head", "kernel"), (classes, dim), "linear")
    specs[f"{head}bias"] = hf_io.TensorSpec(("head", "bias"), (classes,))
  hf_io.check_tensors(
    specs, shapes, what=f"a {found} model of {directory}/config.json", hint=_looks_like(set(shapes))
  )
  return found, config, module, specs, rename


def load_checkpoint(
  directory: str | os.PathLike[str], *, architecture: str | None = None
) -> Checkpoint:
  """Loads a transformers / timm checkpoint directory into Flax (see the module docstring).

  Args:
    directory: holds `config.json` and `model.safetensors` (or sharded safetensors with
      `model.safetensors.index.json`).
    architecture: if given, the architecture the checkpoint must be (one of
      `ARCHITECTURES`); otherwise read from `config.json`.

  Raises:
    FileNotFoundError: no config or weights; ValueError: unsupported architecture or
      config; `WeightLoadError`: tensors that do not match the architecture.
  """
  found, config, module, specs, rename = plan(directory, architecture=architecture)
  tree = hf_io.read_tensors(hf_io.weight_files(directory), specs, rename)
  head = tree.pop("head", None)
  return Checkpoint(found, module, tree, head, config)


# ImageNet's per-channel mean and std of images in [0, 1]: the input normalisation of
# transformers' and timm's ResNets when the checkpoint does not state its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_normalization(directory: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
  """(mean [C], std [C]) that the checkpoint's image model expects of images in [0, 1].

  From its `preprocessor_config.json` (transformers: image_mean, image_std;
  do_normalize=False gives mean 0, std 1), else its `config.json`'s `pretrained_cfg` or
  top-level `mean` / `std` (timm), else ImageNet's.
  """
  path = pathlib.Path(directory) / "preprocessor_config.json"
  if path.is_file():
    pre = json.loads(path.read_text(encoding="utf-8"))
    if not pre.get("do_normalize", True):
      return np.zeros(3, np.float32), np.ones(3, np.float32)
    mean, std = pre.get("image_mean"), pre.get("image_std")
  else:
    config = hf_io.read_config(directory)
    timm_cfg = config.get("pretrained_cfg") or config
    mean, std = timm_cfg.get("mean"), timm_cfg.get("std")
  mean = IMAGENET_MEAN if mean is None else mean
  std = IMAGENET_STD if std is None else std
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def classifier(checkpoint: Checkpoint) -> tuple[nn.Module, dict[str, Any]]:
  """The checkpoint's backbone and linear head as one classifier: (module, variables).

  BERT: `TextClassifier` with pooling 'pooler' (as `BertForSequenceClassification`), ids and
  mask [B, T] → logits [B, C]; ViT and ResNet: `Classifier`, images [B, H, W, C] → logits.

  Raises:
    ValueError: the checkpoint has no linear head.
  """
  if checkpoint.head is None:
    raise ValueError(
      f"the {checkpoint.architecture} checkpoint has no linear classification head "
      f"({_HEADS.get(checkpoint.architecture, 'none supported')}*)"
    )
  classes = int(checkpoint.head["bias"].shape[0])
  if isinstance(checkpoint.module, bert.BertEncoder):
    if checkpoint.module.add_pooler is False:
      raise ValueError("a BERT classifier needs the pooler (pooler.dense.*), absent here")
    module = TextClassifier(checkpoint.module.config, classes, pooling="pooler")
    return module, {"params": {"encoder": checkpoint.params, "head": checkpoint.head}}
  variables = {
    name: {"backbone": tree, **({"head": checkpoint.head} if name == "params" else {})}
    for name, tree in checkpoint.variables.items()
  }
  return Classifier(checkpoint.module, classes), variables
