"""Tensor specs of Hugging Face checkpoints: where each named tensor goes in our Flax modules.

For each architecture `models.checkpoints` reads, the Flax module a `config.json`
describes and its `Specs`: checkpoint tensor name (base-model prefix stripped) →
`hf_io.TensorSpec` (the Flax path, the expected torch shape and the layout conversion).
BERT, RoBERTa and DistilBERT (`bert_family_specs`), ViT (`vit_specs`), ResNets in
transformers' (`hf_resnet_specs`) and timm's (`timm_resnet_specs`) naming.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from moe_adapt.models import bert, hf_io, resnet, vit

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
# Checkpoint tensor name → its Flax place, shape and layout.
Specs = dict[str, hf_io.TensorSpec]


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


def _linear(out: Specs, name: str, path: tuple[str, ...], d_out: int, d_in: int) -> None:
  out[f"{name}.weight"] = hf_io.TensorSpec((*path, "kernel"), (d_out, d_in), "linear")
  out[f"{name}.bias"] = hf_io.TensorSpec((*path, "bias"), (d_out,))


def _layer_norm(out: Specs, name: str, path: tuple[str, ...], dim: int) -> None:
  out[f"{name}.weight"] = hf_io.TensorSpec((*path, "scale"), (dim,))
  out[f"{name}.bias"] = hf_io.TensorSpec((*path, "bias"), (dim,))


def _batch_norm(out: Specs, name: str, path: tuple[str, ...], dim: int) -> None:
  for torch_name, collection, leaf in (
    ("weight", "params", "scale"),
    ("bias", "params", "bias"),
    ("running_mean", "batch_stats", "mean"),
    ("running_var", "batch_stats", "var"),
  ):
    out[f"{name}.{torch_name}"] = hf_io.TensorSpec((collection, *path, leaf), (dim,))


def _conv(out: Specs, name: str, path: tuple[str, ...], shape: tuple[int, ...]) -> None:
  out[f"{name}.weight"] = hf_io.TensorSpec(("params", *path, "kernel"), shape, "conv")


def bert_family_specs(
  architecture: str, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[nn.Module, Specs]:
  """`BertEncoder` and specs of a 'bert', 'roberta' or 'distilbert' `config.json`; the pooler
  is built when the checkpoint has one (`shapes`: its tensor shapes, prefix stripped)."""
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


def vit_specs(config: Mapping[str, Any]) -> tuple[nn.Module, Specs]:
  """`vit.ViT` (pool 'cls') and specs of a transformers ViT `config.json`; the pooler is not
  read (ViT image classifiers do not use it)."""
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
  specs: Specs = {
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
) -> tuple[nn.Module, Specs]:
  """Specs of a ResNet in a given naming; `names` maps our parts to checkpoint names."""
  block_cls = _BLOCKS[block]
  module = resnet.ResNet(stage_sizes=depths, block_cls=block_cls, num_filters=width)
  specs: Specs = {}
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


def hf_resnet_specs(config: Mapping[str, Any]) -> tuple[nn.Module, Specs]:
  """`resnet.ResNet` and specs of a transformers ResNet `config.json` (standard widths only;
  ValueError naming the unsupported field otherwise)."""
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


def timm_resnet_specs(
  config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[nn.Module, Specs]:
  """`resnet.ResNet` and specs of a timm ResNet (`TIMM_RESNETS`); its stem width and input
  channels are read from the shape of `conv1.weight`."""
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
