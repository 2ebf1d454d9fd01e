"""Meta-DMoE's aggregator: combines the N expert features of one example into one feature.

The N expert feature vectors of an example are N tokens. There is no CLS token and no
positional or expert-ID embedding, so the result is invariant to the order of the experts,
and a masked expert has exactly the effect of leaving it out (meta-training drops the expert
of the episode's own domain).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

KINDS = ("transformer", "mean", "max")

# PyTorch's LayerNorm default, as in the reference implementation.
LN_EPSILON = 1e-5


def _check_tokens(tokens: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Validates tokens [B, N, D] and mask; returns the mask as bool [B, N]."""
  if tokens.ndim != 3 or 0 in tokens.shape:
    raise ValueError(
      f"Aggregator: tokens must be a non-empty array [B, N, D]; got shape {tuple(tokens.shape)}"
    )
  batch, num_tokens, _ = tokens.shape
  if mask is None:
    return jnp.ones((batch, num_tokens), bool)
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_ or mask.shape not in ((num_tokens,), (batch, num_tokens)):
    raise ValueError(
      f"Aggregator: mask must be None or bool of shape [N]={(num_tokens,)} or "
      f"[B, N]={(batch, num_tokens)} (True = expert present); got {mask.dtype}"
      f"{list(mask.shape)}"
    )
  return jnp.broadcast_to(mask, (batch, num_tokens))


def masked_mean(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of tokens [B, N, D] over the tokens where mask [B, N] is True -> [B, D] float32.

  An example without any present token gives zeros.
  """
  tokens = jnp.where(mask[..., None], tokens.astype(jnp.float32), 0.0)
  count = jnp.sum(mask, axis=1, dtype=jnp.float32)[:, None]
  return jnp.sum(tokens, axis=1) / jnp.maximum(count, 1.0)


def masked_max(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Maximum of tokens [B, N, D] over the tokens where mask [B, N] is True -> [B, D].

  An example without any present token gives zeros.
  """
  low = jnp.array(-jnp.inf, tokens.dtype)
  out = jnp.max(jnp.where(mask[..., None], tokens, low), axis=1)
  return jnp.where(jnp.any(mask, axis=1)[:, None], out, jnp.zeros_like(out))


class _EncoderBlock(nn.Module):
  """Pre-LN transformer block over the token axis, with key masking."""

  num_heads: int
  mlp_ratio: float
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, attn_mask: jax.Array, deterministic: bool) -> jax.Array:
    """x [B, N, D], attn_mask bool [B, 1, 1, N] (keys that may be attended to) -> [B, N, D]."""
    dim = x.shape[-1]
    y = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name="norm_attn")(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      dropout_rate=self.dropout,
      broadcast_dropout=False,
      force_fp32_for_softmax=True,
      name="attn",
    )(y, mask=attn_mask, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout)(y, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name="norm_mlp")(x)
    y = nn.Dense(max(1, round(self.mlp_ratio * dim)), dtype=self.dtype, name="mlp_in")(y)
    y = nn.gelu(y, approximate=False)  # exact GELU, as torch.nn.GELU()
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    y = nn.Dense(dim, dtype=self.dtype, name="mlp_out")(y)
    return x + nn.Dropout(self.dropout)(y, deterministic=deterministic)


class Aggregator(nn.Module):
  """Combines N expert feature tokens of one example into one feature.

  No positional embedding: the output is invariant to the order of the tokens, and a masked
  token has exactly the effect of removing it (its values are never read).

  Attributes:
    kind: 'transformer' (`depth` pre-LN blocks — LN → multi-head self-attention over the N
      tokens → residual; LN → MLP(D → mlp_ratio·D, GELU, → D) → residual — then the masked
      mean over tokens), or the parameter-free 'mean' / 'max' over the present tokens.
    depth: number of transformer blocks.
    num_heads: attention heads; must divide D.
    mlp_ratio: MLP hidden size / D.
    dropout: rate on the attention weights, the attention output and the MLP, applied when
      called with deterministic=False (needs rngs={'dropout': key}).
    dtype: computation dtype of the transformer (parameters stay float32).
  """

  kind: str = "transformer"
  depth: int = 1
  num_heads: int = 4
  mlp_ratio: float = 2.0
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Aggregator: kind={self.kind!r} is unknown; accepted: {', '.join(KINDS)}")
    for field, value in (("depth", self.depth), ("num_heads", self.num_heads)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Aggregator: {field}={value!r} is invalid; accepted: an int >= 1")
    if not self.mlp_ratio > 0:
      raise ValueError(f"Aggregator: mlp_ratio={self.mlp_ratio!r} is invalid; accepted: > 0")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"Aggregator: dropout={self.dropout!r} is invalid; accepted: [0, 1)")
    super().__post_init__()

  @nn.nowrap
  def init(self, rngs, *args, **kwargs):
    """Module.init; the variables always hold 'params' (an empty dict for 'mean' / 'max')."""
    variables = dict(super().init(rngs, *args, **kwargs))
    variables.setdefault("params", {})
    return variables

  @nn.compact
  def __call__(
    self, tokens: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True
  ) -> jax.Array:
    """Aggregates expert tokens.

    Args:
      tokens: [B, N, D] expert features of each example.
      mask: None (all present), or bool [N] or [B, N]; True = expert present.
      deterministic: no dropout when True; otherwise needs rngs={'dropout': key}.

    Returns:
      [B, D] in `dtype`; zeros for an example without any present token.
    """
    mask = _check_tokens(tokens, mask)
    if self.kind == "mean":
      return masked_mean(tokens, mask).astype(self.dtype)
    if self.kind == "max":
      return masked_max(tokens, mask).astype(self.dtype)
    if tokens.shape[-1] % self.num_heads:
      raise ValueError(
        f"Aggregator: num_heads={self.num_heads} must divide the token size D={tokens.shape[-1]}"
      )
    # Zero the masked tokens so that their values (even NaN) cannot reach the output.
    x = jnp.where(mask[..., None], tokens, 0).astype(self.dtype)
    attn_mask = mask[:, None, None, :]
    for i in range(self.depth):
      x = _EncoderBlock(
        num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio,
        dropout=self.dropout,
        dtype=self.dtype,
        name=f"block_{i}",
      )(x, attn_mask, deterministic)
    return masked_mean(x, mask).astype(self.dtype)


class _PretrainHead(nn.Module):
  """LayerNorm + Dense(num_classes), float32 logits."""

  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=jnp.float32, name="norm")(features)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="dense")(x)


class AggregatorClassifier(nn.Module):
  """Aggregator + pretraining head (LayerNorm + Dense(num_classes)).

  Params {'aggregator': ..., 'head': ...}; 'aggregator' is an empty dict for the
  parameter-free kinds. `aggregate` needs only {'params': {'aggregator': ...}}.
  """

  aggregator: Aggregator
  num_classes: int

  def __post_init__(self):
    if not isinstance(self.aggregator, Aggregator):
      raise ValueError(
        f"AggregatorClassifier: aggregator={self.aggregator!r} is invalid; accepted: an Aggregator"
      )
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(
        f"AggregatorClassifier: num_classes={self.num_classes!r} is invalid; accepted: an int >= 1"
      )
    super().__post_init__()

  def setup(self):
    self.head = _PretrainHead(self.num_classes)

  @nn.nowrap
  def init(self, rngs, *args, **kwargs):
    """Module.init; params always hold 'aggregator' (an empty dict for 'mean' / 'max')."""
    variables = dict(super().init(rngs, *args, **kwargs))
    params = dict(variables.get("params", {}))
    params.setdefault("aggregator", {})
    variables["params"] = params
    return variables

  def __call__(
    self, tokens: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True
  ) -> jax.Array:
    """Tokens [B, N, D] (mask as in Aggregator) -> logits [B, num_classes] (float32)."""
    return self.head(self.aggregate(tokens, mask, deterministic=deterministic))

  def aggregate(
    self, tokens: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True
  ) -> jax.Array:
    """Tokens [B, N, D] -> aggregated feature [B, D]; uses only params['aggregator']."""
    return self.aggregator(tokens, mask, deterministic=deterministic)
