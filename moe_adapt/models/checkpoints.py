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
tensor. Inputs follow Flax layouts: images [B, H, W, C] (transformers takes NCHW).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import numpy as np

from moe_adapt.models import bert, hf_io, resnet, vit
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
# timm ResNets: (block, blocks per stage).
TIMM_RESNETS = {
  "resnet18": ("basic", (2, 2, 2, 2)),
  "resnet34": ("basic", (3, 4, 6, 3)),
  "resnet50": ("bottleneck", (3, 4, 6, 3)),
  "resnet101": ("bottleneck", (3, 4, 23, 3)),
  "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
_BLOCKS = {"basic": resnet.BasicBlock, "bottleneck": resnet.Bottleneck}
# DistilBERT tensor names → the BERT names of the same weights (same post-LN block).
_DISTILBERT_TO_BERT = {
  "attention.q_lin": "attention.self.query",
  "attention.k_lin": "attention.self.key",
  "attention.v_lin": "attention.self.value",
  "attention.out_lin": "attention.output.dense",
  "sa_layer_norm": "attention.output.LayerNorm",
  "ffn.lin1": "intermediate.dense",
  "ffn.lin2": "output.dense",
  "output_layer_norm": "output.LayerNorm",
}
_Specs = dict[str, hf_io.TensorSpec]


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


def distilbert_config(config: Mapping[str, Any]) -> bert.BertConfig:
  """The `BertConfig` of a DistilBERT `config.json` (no token types, LayerNorm eps 1e-12)."""
  try:
    return bert.BertConfig(
      vocab_size=config["vocab_size"],
      hidden_size=config["dim"],
      num_hidden_layers=config["n_layers"],
      num_attention_heads=config["n_heads"],
      intermediate_size=config["hidden_dim"],
      max_position_embeddings=config.get("max_position_embeddings", 512),
      type_vocab_size=0,
      layer_norm_eps=1e-12,
      hidden_act=config.get("activation", "gelu"),
      hidden_dropout_prob=config.get("dropout", 0.1),
      attention_probs_dropout_prob=config.get("attention_dropout", 0.1),
      pad_token_id=config.get("pad_token_id", 0),
    )
  except KeyError as e:
    raise ValueError(f"DistilBERT config.json lacks {e.args[0]!r}") from None


def _linear(out: _Specs, name: str, path: tuple[str, ...], d_out: int, d_in: int) -> None:
  out[f"{name}.weight"] = hf_io.TensorSpec((*path, "kernel"), (d_out, d_in), "linear")
  out[f"{name}.bias"] = hf_io.TensorSpec((*path, "bias"), (d_out,))


def _layer_norm(out: _Specs, name: str, path: tuple[str, ...], dim: int) -> None:
  out[f"{name}.weight"] = hf_io.TensorSpec((*path, "scale"), (dim,))
  out[f"{name}.bias"] = hf_io.TensorSpec((*path, "bias"), (dim,))


def _batch_norm(out: _Specs, name: str, path: tuple[str, ...], dim: int) -> None:
  for torch_name, collection, leaf in (
    ("weight", "params", "scale"),
    ("bias", "params", "bias"),
    ("running_mean", "batch_stats", "mean"),
    ("running_var", "batch_stats", "var"),
  ):
    out[f"{name}.{torch_name}"] = hf_io.TensorSpec((collection, *path, leaf), (dim,))


def _conv(out: _Specs, name: str, path: tuple[str, ...], shape: tuple[int, ...]) -> None:
  out[f"{name}.weight"] = hf_io.TensorSpec(("params", *path, "kernel"), shape, "conv")


def _bert_family(
  architecture: str, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[nn.Module, _Specs]:
  add_pooler = "pooler.dense.weight" in shapes
  if architecture == "distilbert":
    cfg = distilbert_config(config)
    bert_specs = bert.hf_tensor_specs(cfg, add_pooler=False)
    specs = {}
    for name, spec in bert_specs.items():
      for distil, bert_name in _DISTILBERT_TO_BERT.items():
        name = name.replace(bert_name, distil)
      specs[name.replace("encoder.layer.", "transformer.layer.")] = spec
    return bert.BertEncoder(cfg, add_pooler=False), specs
  cfg = bert.BertConfig.from_dict(config)
  return bert.BertEncoder(cfg, add_pooler=add_pooler), bert.hf_tensor_specs(
    cfg, add_pooler=add_pooler
  )


def _vit(config: Mapping[str, Any]) -> tuple[nn.Module, _Specs]:
  if not config.get("qkv_bias", True):
    raise ValueError("ViT config.json qkv_bias=False is unsupported; accepted: True")
  p, image, channels = config["patch_size"], config["image_size"], config.get("num_channels", 3)
  if image % p:
    raise ValueError(f"ViT config.json image_size={image} is not a multiple of patch_size={p}")
  act = config.get("hidden_act", "gelu")
  if act not in bert._HF_ACTIVATIONS:
    raise ValueError(
      f"ViT config.json hidden_act={act!r} is unsupported; accepted: "
      f"{', '.join(bert._HF_ACTIVATIONS)}"
    )
  d, mlp = config["hidden_size"], config["intermediate_size"]
  module = vit.ViT(
    patch_size=p,
    hidden_size=d,
    depth=config["num_hidden_layers"],
    num_heads=config["num_attention_heads"],
    mlp_dim=mlp,
    pool="cls",
    dropout_rate=config.get("hidden_dropout_prob", 0.0),
    layer_norm_eps=config.get("layer_norm_eps", 1e-12),
    activation=bert._HF_ACTIVATIONS[act],
  )
  tokens = (image // p) ** 2 + 1
  specs: _Specs = {
    "embeddings.cls_token": hf_io.TensorSpec(("params", "cls"), (1, 1, d)),
    "embeddings.position_embeddings": hf_io.TensorSpec(
      ("params", "pos_embed", "embedding"), (1, tokens, d)
    ),
  }
  _conv(specs, "embeddings.patch_embeddings.projection", ("patch_embed",), (d, channels, p, p))
  specs["embeddings.patch_embeddings.projection.bias"] = hf_io.TensorSpec(
    ("params", "patch_embed", "bias"), (d,)
  )
  for n in range(config["num_hidden_layers"]):
    hf, ours = f"encoder.layer.{n}", ("params", f"block_{n}")
    for proj in ("query", "key", "value"):
      _linear(specs, f"{hf}.attention.attention.{proj}", (*ours, "attention", proj), d, d)
    _linear(specs, f"{hf}.attention.output.dense", (*ours, "attention", "out"), d, d)
    _layer_norm(specs, f"{hf}.layernorm_before", (*ours, "attention_norm"), d)
    _layer_norm(specs, f"{hf}.layernorm_after", (*ours, "mlp_norm"), d)
    _linear(specs, f"{hf}.intermediate.dense", (*ours, "mlp_in"), mlp, d)
    _linear(specs, f"{hf}.output.dense", (*ours, "mlp_out"), d, mlp)
  _layer_norm(specs, "layernorm", ("params", "norm"), d)
  return module, specs


def _resnet_specs(
  *,
  block: str,
  depths: tuple[int, ...],
  width: int,
  channels: int,
  names: Mapping[str, Any],
) -> tuple[nn.Module, _Specs]:
  """Specs of a ResNet in a given naming; `names` maps our parts to checkpoint names."""
  block_cls = _BLOCKS[block]
  module = resnet.ResNet(stage_sizes=depths, block_cls=block_cls, num_filters=width)
  specs: _Specs = {}
  _conv(specs, names["stem_conv"], ("stem_conv",), (width, channels, 7, 7))
  _batch_norm(specs, names["stem_bn"], ("stem_bn",), width)
  in_ch = width
  for i, depth in enumerate(depths):
    filters = width * 2**i
    out_ch = filters * block_cls.expansion
    for j in range(depth):
      ours = f"stage{i + 1}_block{j + 1}"
      if block == "bottleneck":
        convs = [(in_ch, filters, 1), (filters, filters, 3), (filters, out_ch, 1)]
      else:
        convs = [(in_ch, filters, 3), (filters, out_ch, 3)]
      for k, (c_in, c_out, size) in enumerate(convs):
        _conv(specs, names["conv"](i, j, k), (ours, f"conv{k + 1}"), (c_out, c_in, size, size))
        _batch_norm(specs, names["bn"](i, j, k), (ours, f"bn{k + 1}"), c_out)
      if (i > 0 and j == 0) or in_ch != out_ch:
        _conv(specs, names["proj_conv"](i, j), (ours, "proj_conv"), (out_ch, in_ch, 1, 1))
        _batch_norm(specs, names["proj_bn"](i, j), (ours, "proj_bn"), out_ch)
      in_ch = out_ch
  return module, specs


def _hf_resnet(config: Mapping[str, Any]) -> tuple[nn.Module, _Specs]:
  block = config.get("layer_type", "bottleneck")
  if block not in _BLOCKS:
    raise ValueError(
      f"ResNet config.json layer_type={block!r} is unsupported; accepted: basic, bottleneck"
    )
  for field in ("downsample_in_first_stage", "downsample_in_bottleneck"):
    if config.get(field, False):
      raise ValueError(f"ResNet config.json {field}=True is unsupported; accepted: False")
  if config.get("hidden_act", "relu") != "relu":
    raise ValueError(
      f"ResNet config.json hidden_act={config['hidden_act']!r} is unsupported; accepted: relu"
    )
  width, depths = config["embedding_size"], tuple(config["depths"])
  expansion = _BLOCKS[block].expansion
  want = [width * expansion * 2**i for i in range(len(depths))]
  if list(config["hidden_sizes"]) != want:
    raise ValueError(
      f"ResNet config.json hidden_sizes={config['hidden_sizes']} is unsupported; accepted: "
      f"embedding_size·{expansion}·2^i = {want} (the standard ResNet widths)"
    )

  def layer(i: int, j: int) -> str:
    return f"encoder.stages.{i}.layers.{j}"

  names = {
    "stem_conv": "embedder.embedder.convolution",
    "stem_bn": "embedder.embedder.normalization",
    "conv": lambda i, j, k: f"{layer(i, j)}.layer.{k}.convolution",
    "bn": lambda i, j, k: f"{layer(i, j)}.layer.{k}.normalization",
    "proj_conv": lambda i, j: f"{layer(i, j)}.shortcut.convolution",
    "proj_bn": lambda i, j: f"{layer(i, j)}.shortcut.normalization",
  }
  return _resnet_specs(
    block=block, depths=depths, width=width, channels=config.get("num_channels", 3), names=names
  )


def _timm_resnet(
  config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[nn.Module, _Specs]:
  block, depths = TIMM_RESNETS[config["architecture"]]
  if "conv1.weight" not in shapes or len(shapes["conv1.weight"]) != 4:
    raise hf_io.WeightLoadError(
      f"timm {config['architecture']} checkpoint has no 4-D conv1.weight (the stem conv)"
    )
  width, channels = shapes["conv1.weight"][0], shapes["conv1.weight"][1]
  names = {
    "stem_conv": "conv1",
    "stem_bn": "bn1",
    "conv": lambda i, j, k: f"layer{i + 1}.{j}.conv{k + 1}",
    "bn": lambda i, j, k: f"layer{i + 1}.{j}.bn{k + 1}",
    "proj_conv": lambda i, j: f"layer{i + 1}.{j}.downsample.0",
    "proj_bn": lambda i, j: f"layer{i + 1}.{j}.downsample.1",
  }
  return _resnet_specs(block=block, depths=depths, width=width, channels=channels, names=names)


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
) -> tuple[str, dict[str, Any], nn.Module, _Specs, dict[str, str]]:
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
    module, specs = _bert_family(found, config, shapes)
  elif found == "vit":
    module, specs = _vit(config)
  elif found == "resnet":
    module, specs = _hf_resnet(config)
  else:
    module, specs = _timm_resnet(config, shapes)
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
