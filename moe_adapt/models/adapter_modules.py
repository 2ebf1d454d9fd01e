"""The adapter modules: a plain projection, LoRA, and the residual bottleneck adapter.

Each takes `(x, *, deterministic)`, the interface `adapters.make_adapter` and
`adapters.make_projection` build against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "swish": jax.nn.swish,
  "tanh": jnp.tanh,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation called `name` ('gelu' is the exact erf form)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"activation={name!r} is unknown; accepted: {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def check_width(name: str, value: int, limit: int, what: str) -> None:
  """Raises ValueError unless 1 <= value <= limit (e.g. a bottleneck within the hidden size)."""
  if not 1 <= value <= limit:
    raise ValueError(f"{name}={value} exceeds {what} {limit}; accepted: an int in [1, {limit}]")


class Dense(nn.Module):
  """`x @ kernel + bias` with the projection interface `(x, *, deterministic)`.

  Parameter names ('kernel' [in, out], 'bias' [out]) are those of `nn.Dense`, so a
  `LoRADense` at the same path holds the same backbone leaves plus its own.
  """

  features: int
  use_bias: bool = True
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    del deterministic  # Same signature as the adapter projections.
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(dtype)
    return y


class LoRADense(nn.Module):
  """Dense layer plus a low-rank update: `x W + b + (alpha / r)·dropout(x) A B`.

  A [in, r] starts Kaiming-uniform (as in the LoRA paper's code) and B [r, out] at zero, so
  at init the output equals the base layer's exactly. The base kernel is frozen by the
  optimizer (`trainable_mask`), not here, so 'all' mode can still fine-tune it.
  """

  features: int
  rank: int
  alpha: float
  dropout_rate: float = 0.0
  use_bias: bool = True
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    in_features = x.shape[-1]
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
    y = jnp.dot(x, kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(dtype)
    # variance_scaling(1/3, fan_in, uniform) == torch's kaiming_uniform_(a=sqrt(5)).
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    lora_a = self.param("lora_a", a_init, (in_features, self.rank), jnp.float32)
    lora_b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features), jnp.float32)
    h = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    update = jnp.dot(jnp.dot(h, lora_a.astype(dtype)), lora_b.astype(dtype))
    return y + (self.alpha / self.rank) * update


class BottleneckAdapter(nn.Module):
  """`x + up(act(down(x)))`: a residual bottleneck on the last axis, [..., dim] → [..., dim]."""

  dim: int
  bottleneck: int
  activation: str = "gelu"
  init_scale: float = 1e-2
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    del deterministic
    if x.shape[-1] != self.dim:
      raise ValueError(f"BottleneckAdapter(dim={self.dim}) got input with last axis {x.shape}")
    check_width("bottleneck", self.bottleneck, self.dim, "the hidden size")
    init = nn.initializers.normal(self.init_scale)
    h = Dense(self.bottleneck, kernel_init=init, dtype=self.dtype, name="down")(x)
    h = activation_fn(self.activation)(h)
    h = Dense(self.dim, kernel_init=init, dtype=self.dtype, name="up")(h)
    return x + h.astype(x.dtype)
