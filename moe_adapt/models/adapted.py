"""A pretrained backbone with adapters and a new head: building, initialising, splitting.

The fine-tuning harness (`methods.finetune`) inserts adapters (`adapters.AdapterConfig`)
into a text encoder (`text_classifier.TextClassifier`) or a ViT (`vit.vit_classifier`),
starts the backbone from pretrained weights, and trains only a part of the parameters:
`split_trainable` cuts a params tree into the frozen and the trained part, `join` puts
them back together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moe_adapt.models import adapters as adapters_lib
from moe_adapt.models import bert, checkpoints, text_classifier, vit

PyTree = Any

# Encoders that `model.init` can start text tasks from: their WordPiece vocabulary can be the
# benchmarks' (MiniLM's, i.e. bert-base-uncased's); RoBERTa's BPE ids would not match.
INIT_ARCHITECTURES = ("bert", "distilbert")


def build_classifier(
  backbone_config: bert.BertConfig | Mapping[str, Any],
  num_classes: int,
  *,
  adapter: adapters_lib.AdapterConfig,
  dropout: float,
  dtype: Any = None,
) -> nn.Module:
  """The classifier with `adapter` inserted: `apply(v, *inputs, train=)` -> logits [B, C].

  Args:
    backbone_config: a `BertConfig` (a text encoder, mean pooling) or the ViT's options.
    num_classes: C.
    adapter: the adapters to insert.
    dropout: on the pooled features (text) / inside the blocks (ViT).
    dtype: the computation dtype of the encoder and adapters (None = the inputs').
  """
  if isinstance(backbone_config, bert.BertConfig):
    return text_classifier.TextClassifier(
      backbone_config,
      num_classes,
      adapter=adapter,
      pooling="mean",
      dropout_rate=dropout,
      dtype=dtype,
    )
  return vit.vit_classifier(
    num_classes, adapter=adapter, dropout_rate=dropout, dtype=dtype, **dict(backbone_config)
  )


def hidden_size(backbone_config: bert.BertConfig | Mapping[str, Any]) -> int:
  """The backbone's width (the ViT's default when its options leave it out)."""
  if isinstance(backbone_config, Mapping):
    return backbone_config.get("hidden_size", vit.ViT.hidden_size)
  return backbone_config.hidden_size


def encoder_from_checkpoint(init: str, *, max_token_id: int) -> tuple[bert.BertConfig, PyTree]:
  """(BertConfig, encoder params) of the HF checkpoint directory `model.init`, checked: a
  BERT-family encoder whose vocabulary holds every token id up to `max_token_id`."""
  checkpoint = checkpoints.load_checkpoint(init)
  if checkpoint.architecture not in INIT_ARCHITECTURES:
    raise ValueError(
      f"model.init={init!r} holds a {checkpoint.architecture!r} checkpoint; accepted for "
      f"text benchmarks: {', '.join(INIT_ARCHITECTURES)} (the benchmarks' token ids are "
      "bert-base-uncased WordPiece ids)"
    )
  config = checkpoint.module.config
  if max_token_id >= config.vocab_size:
    raise ValueError(
      f"model.init={init!r} has vocab_size={config.vocab_size}, but the benchmark's token ids "
      f"reach {max_token_id}; accepted: a checkpoint with the benchmark tokenizer's vocabulary"
    )
  return config, checkpoint.params


def init_params(
  model: nn.Module,
  key: jax.Array,
  dummy_inputs: tuple[np.ndarray, ...],
  *,
  backbone: PyTree | None,
  backbone_key: str,
) -> PyTree:
  """Fresh params of `model` (adapters, head) with the backbone's leaves from `backbone`.

  Args:
    model: the classifier.
    key: its initialisation key.
    dummy_inputs: one example's positional inputs, [1, ...] each.
    backbone: the backbone's parameters without adapters (e.g. pretrained ones); None keeps
      the random initialisation.
    backbone_key: the top-level params key of the backbone ('encoder' or 'backbone').
  """
  params = model.init(key, *dummy_inputs)["params"]
  params = jax.tree.map(jnp.asarray, params)
  if backbone is None:
    return params
  own, adapter_leaves = adapters_lib.split_params(params[backbone_key])
  given = dict(backbone)
  if "pooler" in given and "pooler" not in own:
    given.pop("pooler")
  if jax.tree.map(jnp.shape, own) != jax.tree.map(jnp.shape, given):
    raise ValueError(f"pretrained {backbone_key} params do not match the model's {backbone_key}")
  return {**params, backbone_key: adapters_lib.merge_params(given, adapter_leaves)}


def backbone_of(params: PyTree, backbone_key: str) -> PyTree:
  """The backbone's own parameters (adapters removed) of a full params tree."""
  return adapters_lib.split_params(params[backbone_key])[0]


def split_trainable(params: PyTree, train: str) -> tuple[PyTree, PyTree]:
  """(frozen, trainable) trees for `train` in 'adapters', 'head', 'all'; `join` joins."""
  if train == "all":
    return {}, dict(params)
  if train == "head":
    frozen = {k: v for k, v in params.items() if k != adapters_lib.HEAD_KEY}
    return frozen, {adapters_lib.HEAD_KEY: params[adapters_lib.HEAD_KEY]}
  return adapters_lib.split_params(params, include_head=True)


def join(frozen: PyTree, trainable: PyTree) -> PyTree:
  """Inverse of `split_trainable`."""
  return adapters_lib.merge_params(frozen, trainable)


def param_counts(params: PyTree, *, train_mode: str, inference_params: PyTree) -> dict[str, int]:
  """{'total', 'trainable' (without the head), 'head', 'inference'} scalar counts.

  `inference_params` is what a deployed model holds (e.g. LoRA folded, mixtures merged).
  """
  _, trainable = split_trainable(params, train_mode)
  head = adapters_lib.count_params(params[adapters_lib.HEAD_KEY])
  return {
    "total": adapters_lib.count_params(params),
    "trainable": adapters_lib.count_params(trainable) - head,
    "head": head,
    "inference": adapters_lib.count_params(inference_params),
  }
