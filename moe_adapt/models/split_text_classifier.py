"""A BERT sentence classifier cut in two: frozen lower layers, trainable top layers + head.

Fine-tuning only the top `n` of a pretrained encoder's L blocks lets the lower part run
once per text: `lower_hidden` computes the hidden states after block L − n (dropout off),
and `TopClassifier` trains on them (blocks L − n … L − 1, masked mean pooling, dropout,
head). `full_params` joins the frozen lower params and a trained top into the params of a
`text_classifier.TextClassifier` (mean pooling, the same dropout), whose `train=True`
forward pass runs dropout in EVERY layer (embeddings, each block's attention probabilities
and sub-layer outputs, the pooled features): the model that Monte-Carlo dropout samples.

Inputs of `TopClassifier` are one float32 array [B, T, D + 1]: the hidden states [B, T, D]
with the attention mask [B, T] as a last channel (`pack`), so that a model of one input
fits the training and evaluation loops of the vector methods.

Params: `TopClassifier`'s are {'encoder': {'layer_<i>' for the top blocks}, 'head'}, the
same names as `TextClassifier`'s {'encoder': {'embeddings', 'layer_0' …}, 'head'}, so the
two trees merge key by key.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.models import bert, text_classifier

PyTree = Any


def check_train_layers(config: bert.BertConfig, train_layers: int, *, field: str) -> int:
  """The first trained block's index L − n; ValueError naming `field` unless 1 <= n <= L."""
  total = config.num_hidden_layers
  if isinstance(train_layers, bool) or not isinstance(train_layers, int | np.integer):
    raise ValueError(f"{field}={train_layers!r} is invalid; accepted: an integer in [1, {total}]")
  if not 1 <= train_layers <= total:
    raise ValueError(
      f"{field}={train_layers} is invalid for an encoder of {total} blocks; accepted: an "
      f"integer in [1, {total}]"
    )
  return total - int(train_layers)


def pack(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Hidden states [N, T, D] and mask [N, T] → float32 [N, T, D + 1] (mask last)."""
  return np.concatenate(
    [np.asarray(hidden, np.float32), np.asarray(mask, np.float32)[..., None]], axis=-1
  )


class _TopBlocks(nn.Module):
  """Blocks `start` … L − 1 of `config`'s encoder, [B, T, D] → [B, T, D]."""

  config: bert.BertConfig
  start: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
    cfg = self.config
    for i in range(self.start, cfg.num_hidden_layers):
      # The same block as `bert.BertEncoder` builds, under the same name.
      x = bert.TransformerBlock(
        cfg.num_attention_heads,
        cfg.intermediate_size,
        dropout_rate=cfg.hidden_dropout_prob,
        attention_dropout_rate=cfg.attention_probs_dropout_prob,
        layer_norm_eps=cfg.layer_norm_eps,
        activation=cfg.activation,
        pre_norm=False,
        kernel_init=nn.initializers.truncated_normal(0.02),
        name=f"layer_{i}",
      )(x, mask, deterministic=deterministic)
    return x


class TopClassifier(nn.Module):
  """Packed hidden states [B, T, D + 1] after block `start` → logits [B, num_classes].

  Attributes:
    config: the whole encoder's architecture (its dropout rates are the blocks').
    num_classes: C.
    start: the first block run here (L − the number of trained blocks).
    rate: dropout on the pooled features before the head (`TextClassifier.dropout_rate`).
  """

  config: bert.BertConfig
  num_classes: int
  start: int
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, stochastic: bool = False) -> jax.Array:
    """Dropout runs (in every block here and before the head) when `train` or `stochastic`."""
    deterministic = not (train or stochastic)
    hidden, mask = x[..., :-1], x[..., -1]
    hidden = _TopBlocks(self.config, self.start, name="encoder")(
      hidden, mask, deterministic=deterministic
    )
    pooled = bert.mean_pool(hidden, mask)
    pooled = nn.Dropout(self.rate)(pooled, deterministic=deterministic)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(pooled)


def full_classifier(
  config: bert.BertConfig, num_classes: int, rate: float
) -> text_classifier.TextClassifier:
  """The whole network `full_params` parameterises: `apply(v, ids, mask, train=)`."""
  return text_classifier.TextClassifier(config, num_classes, pooling="mean", dropout_rate=rate)


def lower_params(encoder_params: Mapping[str, Any], start: int) -> dict[str, Any]:
  """The embeddings and blocks 0 … start − 1 of an encoder's params."""
  return {k: v for k, v in encoder_params.items() if k == "embeddings" or _block(k) < start}


def top_params(encoder_params: Mapping[str, Any], start: int) -> dict[str, Any]:
  """Blocks start … L − 1 of an encoder's params (`TopClassifier`'s 'encoder')."""
  return {k: v for k, v in encoder_params.items() if k.startswith("layer_") and _block(k) >= start}


def _block(name: str) -> int:
  return int(name.split("_")[1]) if name.startswith("layer_") else -1


def full_params(lower: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
  """`TextClassifier` params from `lower_params(...)` and a `TopClassifier`'s params."""
  return {"encoder": {**dict(lower), **dict(top["encoder"])}, "head": top["head"]}


@functools.cache
def _lower_fn(config: bert.BertConfig, start: int):
  module = bert.BertEncoder(dataclasses.replace(config, num_hidden_layers=start), add_pooler=False)

  @jax.jit
  def forward(params, ids, mask):
    return module.apply({"params": params}, ids, mask, deterministic=True).hidden

  return forward


def lower_hidden(
  config: bert.BertConfig,
  lower: Mapping[str, Any],
  start: int,
  token_ids: np.ndarray,
  attention_mask: np.ndarray,
  *,
  batch_size: int,
) -> np.ndarray:
  """Packed hidden states float32 [N, T, D + 1] after block `start` (dropout off).

  Batches have one shape (the last padded with copies of the first row, cut off after),
  so the forward pass compiles once.
  """
  n = len(token_ids)
  forward = _lower_fn(config, start)
  out = []
  for i in range(0, n, batch_size):
    ids, mask = token_ids[i : i + batch_size], attention_mask[i : i + batch_size]
    pad = batch_size - len(ids)
    if pad:
      ids = np.concatenate([ids, np.repeat(token_ids[:1], pad, axis=0)])
      mask = np.concatenate([mask, np.repeat(attention_mask[:1], pad, axis=0)])
    out.append(pack(np.asarray(forward(lower, ids, mask)), mask))
  if not out:
    return np.zeros((0, token_ids.shape[1], config.hidden_size + 1), np.float32)
  return np.concatenate(out)[:n]
