"""A BERT-style encoder in Flax Linen that loads HF-format checkpoints.

HF transformers v5 dropped Flax, so this is the Flax side of an HF `BertModel`:
embeddings (word + position + token type, LayerNorm), post-LN blocks (self-attention with a
padding mask, FFN with exact GELU), an optional tanh pooler, and `mean_pool`. The same
module runs RoBERTa (`model_type='roberta'`: positions count non-padding tokens from
pad_token_id + 1) and DistilBERT (`type_vocab_size=0`: no token-type embeddings); the
loaders of all three are in `checkpoints.py`; the config is `bert_config`, the HF name map
and loaders `bert_weights`.
`TransformerBlock` is shared with the ViT (`pre_norm=True` there), so adapters insert the
same way in both (see `adapters.py`).

Parameter names (HF name → ours; Linear weights [out, in] are transposed to kernels):
  embeddings.word_embeddings.weight         → embeddings/word_embeddings/embedding
  embeddings.{position,token_type}_embeddings.weight → embeddings/..._embeddings/embedding
  embeddings.LayerNorm.{weight,bias}        → embeddings/layer_norm/{scale,bias}
  encoder.layer.N.attention.self.{query,key,value}.* → layer_N/attention/{query,key,value}/*
  encoder.layer.N.attention.output.dense.*  → layer_N/attention/out/*
  encoder.layer.N.attention.output.LayerNorm.* → layer_N/attention_norm/*
  encoder.layer.N.intermediate.dense.*      → layer_N/mlp_in/*
  encoder.layer.N.output.dense.*            → layer_N/mlp_out/*
  encoder.layer.N.output.LayerNorm.*        → layer_N/mlp_norm/*
  pooler.dense.*                            → pooler/*
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.models import adapters as adapters_lib
from moe_adapt.models.bert_config import HF_ACTIVATIONS, MODEL_TYPES, BertConfig
from moe_adapt.models.bert_weights import (
  WeightLoadError,
  hf_tensor_specs,
  hf_weight_map,
  load_hf_weights,
  load_minilm,
)

# The config and the checkpoint loaders live in bert_config and bert_weights; their names
# stay importable here (`checkpoints` reads the activation map as `bert._HF_ACTIVATIONS`).
_HF_ACTIVATIONS = HF_ACTIVATIONS
__all__ = [
  "MODEL_TYPES",
  "BertConfig",
  "BertEncoder",
  "BertOutput",
  "SelfAttention",
  "TransformerBlock",
  "WeightLoadError",
  "hf_tensor_specs",
  "hf_weight_map",
  "l2_normalize",
  "load_hf_weights",
  "load_minilm",
  "mean_pool",
]


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `hidden` [B, T, D] over the positions where `mask` [B, T] is nonzero → [B, D].

  An all-padding row gives zeros instead of NaN.
  """
  if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
    raise ValueError(
      f"mean_pool needs hidden [B, T, D] and mask [B, T]; got {hidden.shape}, {mask.shape}"
    )
  weights = mask.astype(hidden.dtype)[..., None]
  total = jnp.sum(hidden * weights, axis=1)
  return total / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)


def l2_normalize(x: jax.Array, *, eps: float = 1e-12) -> jax.Array:
  """`x / ||x||` over the last axis (sentence-transformers' Normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class SelfAttention(nn.Module):
  """Multi-head self-attention, [B, T, D] → [B, T, D], keys masked by a padding mask."""

  num_heads: int
  dropout_rate: float = 0.0
  adapter: adapters_lib.AdapterConfig = adapters_lib.AdapterConfig()
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = None

  @nn.compact
  def __call__(
    self, x: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True
  ) -> jax.Array:
    batch, length, dim = x.shape
    if dim % self.num_heads:
      raise ValueError(f"hidden size {dim} is not divisible by num_heads={self.num_heads}")
    head_dim = dim // self.num_heads

    def project(target: str, y: jax.Array) -> jax.Array:
      module = adapters_lib.make_projection(
        self.adapter, target, dim, name=target, kernel_init=self.kernel_init, dtype=self.dtype
      )
      return module(y, deterministic=deterministic)

    q, k, v = (
      project(t, x).reshape(batch, length, self.num_heads, head_dim)
      for t in ("query", "key", "value")
    )
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(head_dim)
    if mask is not None:
      # Same effect as HF's additive finfo.min bias: padded keys get ~zero weight.
      logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, dim)
    return project("out", context)


class TransformerBlock(nn.Module):
  """One encoder block, [B, T, D] → [B, T, D], post-LN (BERT) or pre-LN (ViT).

  post-LN: x = LN(x + adapter_attention(drop(attn(x)))); x = LN(x + adapter_mlp(drop(ffn(x))))
  pre-LN:  x = x + adapter_attention(drop(attn(LN(x)))); x = x + adapter_mlp(drop(ffn(LN(x))))
  With `adapter.position='before_dropout'` the adapter comes first: drop(adapter(ffn(x))).
  Adapters that `adapter` does not ask for are skipped (identity).
  """

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"
  pre_norm: bool = False
  adapter: adapters_lib.AdapterConfig = adapters_lib.AdapterConfig()
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = None

  @nn.compact
  def __call__(
    self, x: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True
  ) -> jax.Array:
    dim = x.shape[-1]
    cfg = self.adapter

    def sublayer(x: jax.Array, placement: str, fn: Any, norm: str) -> jax.Array:
      layer_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=norm)
      h = fn(layer_norm(x) if self.pre_norm else x)
      adapter = adapters_lib.make_adapter(
        cfg, placement, dim, name=f"adapter_{placement}", dtype=self.dtype
      )
      dropout = nn.Dropout(self.dropout_rate)
      # cfg.position: the official AdaMix code adapts before the dropout, Houlsby's after.
      if adapter is not None and cfg.position == "before_dropout":
        h = dropout(adapter(h, deterministic=deterministic), deterministic=deterministic)
      else:
        h = dropout(h, deterministic=deterministic)
        if adapter is not None:
          h = adapter(h, deterministic=deterministic)
      return x + h if self.pre_norm else layer_norm(x + h)

    def attention(y: jax.Array) -> jax.Array:
      return SelfAttention(
        self.num_heads,
        self.attention_dropout_rate,
        cfg,
        kernel_init=self.kernel_init,
        dtype=self.dtype,
        name="attention",
      )(y, mask, deterministic=deterministic)

    def mlp(y: jax.Array) -> jax.Array:
      def dense(target: str, features: int) -> nn.Module:
        return adapters_lib.make_projection(
          cfg, target, features, name=target, kernel_init=self.kernel_init, dtype=self.dtype
        )

      y = dense("mlp_in", self.mlp_dim)(y, deterministic=deterministic)
      y = adapters_lib.activation_fn(self.activation)(y)
      return dense("mlp_out", dim)(y, deterministic=deterministic)

    x = sublayer(x, "attention", attention, "attention_norm")
    return sublayer(x, "mlp", mlp, "mlp_norm")


class BertOutput(NamedTuple):
  hidden: jax.Array  # [B, T, D] last-layer hidden states
  pooled: jax.Array | None  # [B, D] tanh(dense(hidden[:, 0])), None without a pooler


class BertEncoder(nn.Module):
  """BERT encoder: token ids [B, T] (+ padding mask [B, T]) → `BertOutput`.

  Attributes:
    config: the architecture.
    adapter: what to insert into each block (default: nothing).
    add_pooler: build the tanh pooler (HF `BertModel` has one; mean pooling does not need
      it, and an unused pooler would only add frozen-but-counted parameters).
    dtype: computation dtype (parameters stay float32); None keeps the input's float32.
  """

  config: BertConfig
  adapter: adapters_lib.AdapterConfig = adapters_lib.AdapterConfig()
  add_pooler: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(
    self,
    token_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> BertOutput:
    cfg = self.config
    if token_ids.ndim != 2:
      raise ValueError(f"token_ids must be [B, T]; got shape {token_ids.shape}")
    length = token_ids.shape[1]
    # RoBERTa's positions start after the padding index.
    offset = cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0
    if length + offset > cfg.max_position_embeddings:
      raise ValueError(
        f"token_ids has {length} positions > max_position_embeddings={cfg.max_position_embeddings}"
        + (f" - {offset} (RoBERTa's offset)" if offset else "")
      )
    for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
      if arr is not None and arr.shape != token_ids.shape:
        raise ValueError(f"{name} shape {arr.shape} != token_ids shape {token_ids.shape}")
    if attention_mask is None:
      attention_mask = jnp.ones_like(token_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(token_ids)

    init = nn.initializers.truncated_normal(0.02)
    dim = cfg.hidden_size
    # Grouped under 'embeddings' so the tree mirrors HF's layout.
    x = _Embeddings(cfg, dtype=self.dtype, name="embeddings")(
      token_ids, token_type_ids, deterministic=deterministic
    )
    for i in range(cfg.num_hidden_layers):
      x = TransformerBlock(
        cfg.num_attention_heads,
        cfg.intermediate_size,
        dropout_rate=cfg.hidden_dropout_prob,
        attention_dropout_rate=cfg.attention_probs_dropout_prob,
        layer_norm_eps=cfg.layer_norm_eps,
        activation=cfg.activation,
        pre_norm=False,
        adapter=self.adapter,
        kernel_init=init,
        dtype=self.dtype,
        name=f"layer_{i}",
      )(x, attention_mask, deterministic=deterministic)
    pooled = None
    if self.add_pooler:
      pooled = jnp.tanh(nn.Dense(dim, kernel_init=init, dtype=self.dtype, name="pooler")(x[:, 0]))
    return BertOutput(x, pooled)


class _Embeddings(nn.Module):
  """word + position + token-type embeddings, then LayerNorm and dropout: [B, T] → [B, T, D]."""

  config: BertConfig
  dtype: Any = None

  @nn.compact
  def __call__(
    self, token_ids: jax.Array, token_type_ids: jax.Array, *, deterministic: bool
  ) -> jax.Array:
    cfg = self.config
    init = nn.initializers.truncated_normal(0.02)

    def embed(num: int, name: str) -> nn.Embed:
      return nn.Embed(num, cfg.hidden_size, embedding_init=init, dtype=self.dtype, name=name)

    if cfg.model_type == "roberta":
      # fairseq's make_positions: padding tokens (by id, not by mask) sit at pad_token_id.
      real = (token_ids != cfg.pad_token_id).astype(jnp.int32)
      positions = jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
    else:
      positions = jnp.arange(token_ids.shape[1])[None, :]
    x = embed(cfg.vocab_size, "word_embeddings")(token_ids) + embed(
      cfg.max_position_embeddings, "position_embeddings"
    )(positions)
    if cfg.type_vocab_size:
      x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


# ---------------------------------------------------------------------------------------
