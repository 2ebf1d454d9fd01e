"""A small Vision Transformer backbone whose blocks are the BERT encoder's blocks.

`ViT` maps images [B, H, W, C] to features [B, D] and is a backbone for
`moe_adapt.models.Classifier` (params {'backbone': ..., 'head': ...}), so the same
adapter helpers (`adapters.split_params`, `trainable_mask(train='adapters')`, ...) apply to
image and text models alike. Its blocks are `bert.TransformerBlock` with `pre_norm=True`,
so an `AdapterConfig` inserts Houlsby/Pfeiffer adapters and LoRA exactly as in the encoder.
Defaults suit 28×28 Fashion-MNIST: 4×4 patches (49 tokens + CLS), width 128, depth 4.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_adapt.models import adapters as adapters_lib
from moe_adapt.models import bert
from moe_adapt.models.classifier import Classifier

POOLINGS = ("cls", "mean")


class _PositionEmbedding(nn.Module):
  """Adds a learned embedding per token position: [B, N, D] → [B, N, D]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    embedding = self.param(
      "embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]), jnp.float32
    )
    return x + embedding.astype(x.dtype)


class ViT(nn.Module):
  """Vision Transformer backbone: images [B, H, W, C] → features [B, hidden_size].

  Attributes:
    patch_size: side of the square patches; H and W must be multiples of it.
    hidden_size: token width D.
    depth: number of transformer blocks.
    num_heads: attention heads (must divide hidden_size).
    mlp_dim: FFN hidden width.
    pool: 'cls' (a learned class token's final state) or 'mean' (mean over patch tokens).
    dropout_rate: dropout after embeddings and inside blocks, when training.
    layer_norm_eps: epsilon of every LayerNorm (HF ViT checkpoints use 1e-12).
    activation: FFN activation, a key of `adapters.ACTIVATIONS` ('gelu' is exact).
    adapter: adapters to insert into every block.
    dtype: computation dtype (parameters stay float32).
  """

  patch_size: int = 4
  hidden_size: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 256
  pool: str = "cls"
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"
  adapter: adapters_lib.AdapterConfig = adapters_lib.AdapterConfig()
  dtype: Any = None

  def __post_init__(self):
    for field in ("patch_size", "hidden_size", "depth", "num_heads", "mlp_dim"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ViT: {field}={value!r} is invalid; accepted: an int >= 1")
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"ViT: hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
      )
    if self.pool not in POOLINGS:
      raise ValueError(f"ViT: pool={self.pool!r} is unknown; accepted: {', '.join(POOLINGS)}")
    if not 0 <= self.dropout_rate < 1:
      raise ValueError(f"ViT: dropout_rate={self.dropout_rate!r} must be in [0, 1)")
    adapters_lib.activation_fn(self.activation)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if x.ndim == 3:
      x = x[..., None]  # [B, H, W] grayscale
    if x.ndim != 4 or x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      raise ValueError(
        f"ViT: images must be [B, H, W, C] with H and W multiples of patch_size="
        f"{self.patch_size}; got shape {tuple(x.shape)}"
      )
    p = self.patch_size
    x = nn.Conv(
      self.hidden_size,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      name="patch_embed",
    )(x)
    x = x.reshape(x.shape[0], -1, self.hidden_size)  # [B, N, D]
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size), jnp.float32)
      x = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[2])), x], 1
      )
    x = _PositionEmbedding(name="pos_embed")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for i in range(self.depth):
      x = bert.TransformerBlock(
        self.num_heads,
        self.mlp_dim,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.dropout_rate,
        layer_norm_eps=self.layer_norm_eps,
        activation=self.activation,
        pre_norm=True,
        adapter=self.adapter,
        kernel_init=nn.initializers.xavier_uniform(),
        dtype=self.dtype,
        name=f"block_{i}",
      )(x, deterministic=not train)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm")(x)
    return x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)


def vit_classifier(num_classes: int, **vit_options: Any) -> Classifier:
  """`Classifier(ViT(**vit_options), num_classes)`: logits [B, C], `features` [B, D]."""
  return Classifier(ViT(**vit_options), num_classes)
