"""A small MLP feature extractor for vector inputs (e.g. frozen sentence embeddings)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class MLP(nn.Module):
  """Vectors [B, D] → features [B, hidden_dim]: `num_layers` × (Dense → GELU).

  With `hidden_dim == 0` (or `num_layers == 0`) it is the identity, so a classifier on
  top of it is linear in the input (a linear probe on the embeddings).

  Attributes:
    hidden_dim: width of every hidden layer; 0 = no layer.
    num_layers: number of Dense → GELU layers.
    dtype: computation dtype (parameters stay float32).
  """

  hidden_dim: int = 256
  num_layers: int = 1
  dtype: Any = jnp.float32

  def __post_init__(self):
    for field in ("hidden_dim", "num_layers"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"MLP: {field}={value!r} is invalid; accepted: an int >= 0")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps vectors [B, D] to features [B, hidden_dim] ([B, D] when there is no layer).

    Args:
      x: vectors [B, D].
      train: unused (no dropout or normalisation inside); accepted for the backbone API.
    """
    del train
    if x.ndim != 2 or 0 in x.shape:
      raise ValueError(f"MLP: x must be a non-empty batch of vectors [B, D]; got {x.shape}")
    x = jnp.asarray(x, self.dtype)
    if not self.hidden_dim:
      return x
    for i in range(self.num_layers):
      x = nn.gelu(nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"dense_{i}")(x), False)
    return x
