"""AdaMix: mixtures of adaptation modules with stochastic routing and weight-averaged inference.

AdaMix (Wang et al., EMNLP 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient
Model Tuning") keeps M copies ("experts") of an adaptation module at each insertion point.
Importing this module registers two `AdapterConfig` kinds (`moe_adapt.models` imports it):

- 'adamix': one `MixtureAdapter` per block after the FFN output projection, before the
  residual add (the Pfeiffer place): M bottleneck adapters `x + up(act(down(x)))`;
- 'adamix_lora': the projections in `config.lora_targets` become `MixtureLoRADense`:
  a frozen base kernel plus `(alpha/r)·dropout(x)·A_i·B_i` with M routed copies of A and/or
  B (with both routed, A and B are drawn separately, as the official code, or as pairs
  (A_i, B_i) with `lora_pairing='paired'`).

Routing. In training (`deterministic=False`) every routed projection of every layer draws
ONE expert for the whole batch with `core.routing.random_route` on its own key from the
'routing' rng stream, so choices are independent per layer and between down and up (a
down_i may pair with an up_j). Only the chosen slice of the stacked parameters is read
(dynamic indexing), so a step costs one adapter's FLOPs and the other experts get zero
gradient. Pass `rngs={'routing': key, 'dropout': key2}` to `apply`; AdaMix's consistency
regularisation runs two forward passes with two different routing keys.

Inference (`deterministic=True`) follows `config.mixture_inference`:

- 'merged' (AdaMix's default): the uniform average of the experts' weights, applied as ONE
  module (single-adapter FLOPs). `merge_mixture_params` turns a trained tree into the
  equivalent single-adapter tree ('pfeiffer', or the plain backbone for LoRA; in
  `adamix_merge`);
- 'random': route at random as in training (one expert per projection for the whole
  batch). A caller who passes the SAME 'routing' key to every eval batch evaluates one
  fixed random sub-model (the keys derived per layer do not depend on the batch);
  different keys give the spread of single routing choices;
- 'random_example': a fresh expert per example and projection on every forward (the
  official code's stochastic inference; different keys per batch give fresh draws);
- 'fixed': always expert `config.fixed_expert` (the paper's "route to module 1" ablation).

Parameters (stacked on a leading expert axis; a shared projection has no expert axis):

  adapter_mlp/down/{kernel [M, d, r], bias [M, r]}, adapter_mlp/up/{kernel [M, r, d], bias
  [M, d]}; LoRA projections: kernel [in, out], bias [out] (the backbone's leaves),
  lora_a [M, in, r] (or [in, r] with share='down'), lora_b [r, out] (or [M, r, out]).

The chosen expert indices are sown into the 'intermediates' collection ('expert' for a
routed Dense, 'expert_a' / 'expert_b' for LoRA) when that collection is mutable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_adapt.core import merging, routing
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.models.adamix_merge import (
  MIXTURE_KINDS,
  merge_mixture_params,
  mixture_lora_delta,
  mixture_param_counts,
)

# The merged equivalents live in adamix_merge; their names stay importable here.
__all__ = [
  "MIXTURE_KINDS",
  "MixtureAdapter",
  "MixtureDense",
  "MixtureLoRADense",
  "merge_mixture_params",
  "mixture_lora_delta",
  "mixture_param_counts",
]

ROUTING_RNG = "routing"


def _expert_index(
  module: nn.Module, mode: str, num_experts: int, fixed_expert: int, batch: int
) -> jax.Array:
  """The expert(s) one routed projection uses on this call: int32 [] ('random', 'fixed') or
  [batch] ('random_example': one per example)."""
  if mode == "fixed":
    return jnp.asarray(fixed_expert, jnp.int32)
  # Flax falls back to the 'params' stream (e.g. during init); without either it would raise
  # a terse InvalidRngError, so say what to pass instead.
  if not module.has_rng(ROUTING_RNG) and not module.has_rng("params"):
    where = "/".join(module.path) or type(module).__name__
    raise ValueError(
      f"{where}: AdaMix routing needs a {ROUTING_RNG!r} PRNG key in training and with "
      f"mixture_inference='random'; call apply(..., rngs={{'{ROUTING_RNG}': key}})"
    )
  shape = (batch,) if mode == "random_example" else ()
  return routing.random_route(module.make_rng(ROUTING_RNG), num_experts, shape)


def _take(stacked: jax.Array, index: jax.Array) -> jax.Array:
  """Slice `index` [] of the leading expert axis (its gradient is zero on the other slices),
  or the slices [B, ...] of per-example indices [B]."""
  if jnp.ndim(index):
    return stacked[index]
  return jax.lax.dynamic_index_in_dim(stacked, index, axis=0, keepdims=False)


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [B, ..., i] @ w: one w [i, o] for all, or w [B, i, o] per example → [B, ..., o]."""
  if w.ndim == 2:
    return jnp.dot(x, w)
  return jnp.einsum("b...i,bio->b...o", x, w)


def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y [B, ..., o] + bias [o] (shared) or [B, o] (per example)."""
  if bias.ndim == 1:
    return y + bias
  return y + bias.reshape(bias.shape[:1] + (1,) * (y.ndim - 2) + bias.shape[1:])


def _stacked_init(init: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """Initialiser of [M, ...] drawing each expert's slice independently with `init`."""

  def stacked(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.vmap(lambda k: init(k, shape[1:], dtype))(jax.random.split(key, shape[0]))

  return stacked


def _copies_init(init: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """Initialiser of [M, ...] with M identical copies of ONE draw of `init` over [...].

  AdaMix-LoRA deep-copies one Kaiming-initialised A, so the experts start identical; the
  draw is on the slice shape so that fan-in counts the input width only.
  """

  def copies(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jnp.broadcast_to(init(key, shape[1:], dtype), shape)

  return copies


class MixtureDense(nn.Module):
  """`x @ kernel + bias` with M stacked experts routed per call, [..., in] → [..., features].

  With `routed=False` it is a plain dense layer with one shared copy (no expert axis), so a
  mixture's shared projection has the same leaves as `adapters.Dense`.

  Attributes:
    features: output width.
    num_experts: M.
    routed: whether the parameters carry the expert axis (kernel [M, in, out], bias [M, out]).
    mixture_inference: 'merged', 'random' or 'fixed' (see the module docstring).
    fixed_expert: the expert of mixture_inference='fixed'.
    kernel_init: initialiser of ONE expert's kernel [in, out]; experts draw independently.
    dtype: computation dtype (parameters stay float32); None follows the input.
  """

  features: int
  num_experts: int = 4
  routed: bool = True
  mixture_inference: str = "merged"
  fixed_expert: int = 0
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  dtype: Any = None

  def __post_init__(self):
    adapters_lib.check_mixture_options(
      num_experts=self.num_experts,
      share="none",
      mixture_inference=self.mixture_inference,
      fixed_expert=self.fixed_expert,
    )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    shape = (x.shape[-1], self.features)
    if self.routed:
      m = self.num_experts
      kernel = self.param("kernel", _stacked_init(self.kernel_init), (m, *shape), jnp.float32)
      bias = self.param("bias", nn.initializers.zeros, (m, self.features), jnp.float32)
      mode = self.mixture_inference if deterministic else "random"  # What this call does.
      if mode == "merged":
        merged = merging.weighted_average({"kernel": kernel, "bias": bias})
        kernel, bias = merged["kernel"], merged["bias"]
      else:
        index = _expert_index(self, mode, m, self.fixed_expert, x.shape[0])
        self.sow("intermediates", "expert", index)
        kernel, bias = _take(kernel, index), _take(bias, index)
    else:
      kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    return _add_bias(_matmul(x.astype(dtype), kernel.astype(dtype)), bias.astype(dtype))


class MixtureAdapter(nn.Module):
  """M residual bottleneck adapters `x + up(act(down(x)))`, [..., dim] → [..., dim].

  `down` (dim → bottleneck) and `up` (bottleneck → dim) are `MixtureDense` layers routed
  independently; the one named by `share` has a single shared copy. Kernels start
  normal(init_scale), each expert drawn independently, biases at zero.

  Attributes:
    dim: input and output width d.
    bottleneck: hidden width r.
    num_experts: M.
    share: 'up', 'down' or 'none' (see `adapters.AdapterConfig`).
    activation: a key of `adapters.ACTIVATIONS`.
    init_scale: std of the kernels' normal init.
    mixture_inference: 'merged', 'random' or 'fixed'.
    fixed_expert: the expert of mixture_inference='fixed'.
    dtype: computation dtype (parameters stay float32).
  """

  dim: int
  bottleneck: int
  num_experts: int = 4
  share: str = "up"
  activation: str = "gelu"
  init_scale: float = 1e-2
  mixture_inference: str = "merged"
  fixed_expert: int = 0
  dtype: Any = None

  def __post_init__(self):
    adapters_lib.check_mixture_options(
      num_experts=self.num_experts,
      share=self.share,
      mixture_inference=self.mixture_inference,
      fixed_expert=self.fixed_expert,
    )
    adapters_lib.activation_fn(self.activation)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    if x.shape[-1] != self.dim:
      raise ValueError(f"MixtureAdapter(dim={self.dim}) got input with last axis {x.shape}")
    adapters_lib.check_width("bottleneck", self.bottleneck, self.dim, "the hidden size")

    def dense(features: int, routed: bool, name: str) -> MixtureDense:
      return MixtureDense(
        features,
        self.num_experts,
        routed,
        self.mixture_inference,
        self.fixed_expert,
        kernel_init=nn.initializers.normal(self.init_scale),
        dtype=self.dtype,
        name=name,
      )

    h = dense(self.bottleneck, self.share != "down", "down")(x, deterministic=deterministic)
    h = adapters_lib.activation_fn(self.activation)(h)
    h = dense(self.dim, self.share != "up", "up")(h, deterministic=deterministic)
    return x + h.astype(x.dtype)


class MixtureLoRADense(nn.Module):
  """Dense layer plus a mixture of low-rank updates: `x W + b + (alpha/r)·dropout(x) A_i B_j`.

  `kernel` [in, out] and `bias` [out] have the names of `adapters.Dense` / `LoRADense`, so
  pretrained weights load unchanged. lora_a [M, in, r] starts as M identical copies of one
  Kaiming-uniform draw (AdaMix-LoRA deep-copies one A), lora_b starts at zero, so at init
  the output equals the base layer's exactly. With share='up' B is one shared [r, out]
  (AdaMix's setting), with 'down' A is one shared [in, r], with 'none' both are routed:
  by separate draws (pairing='independent', the official code) or as pairs (A_i, B_i) by
  one draw ('paired'). In the merged forward `x W + b + x ΔW` uses ΔW of
  `mixture_lora_delta` (except for 'paired', as the low-rank product (x·mean(A))·mean(B)).

  Attributes:
    features: output width.
    rank: LoRA rank r.
    alpha: the update is scaled by alpha / rank.
    num_experts: M.
    share: 'up' (B shared), 'down' (A shared) or 'none'.
    mixture_inference: 'merged', 'random' or 'fixed'.
    fixed_expert: the expert of mixture_inference='fixed'.
    pairing: share='none' only: 'independent' or 'paired' (see `adapters.AdapterConfig`).
    dropout_rate: dropout on the LoRA branch's input during training.
    use_bias: whether the base layer has a bias.
    kernel_init: initialiser of the base kernel.
    dtype: computation dtype (parameters stay float32).
  """

  features: int
  rank: int
  alpha: float
  num_experts: int = 4
  share: str = "up"
  mixture_inference: str = "merged"
  fixed_expert: int = 0
  pairing: str = "independent"
  dropout_rate: float = 0.0
  use_bias: bool = True
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  dtype: Any = None

  def __post_init__(self):
    adapters_lib.check_mixture_options(
      num_experts=self.num_experts,
      share=self.share,
      mixture_inference=self.mixture_inference,
      fixed_expert=self.fixed_expert,
    )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    in_features, m, r = x.shape[-1], self.num_experts, self.rank
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
    y = jnp.dot(x, kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(dtype)

    a_routed, b_routed = self.share != "down", self.share != "up"
    # variance_scaling(1/3, fan_in, uniform) == torch's kaiming_uniform_(a=sqrt(5)).
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    a_shape = (m, in_features, r) if a_routed else (in_features, r)
    lora_a = self.param(
      "lora_a", _copies_init(a_init) if a_routed else a_init, a_shape, jnp.float32
    )
    b_shape = (m, r, self.features) if b_routed else (r, self.features)
    lora_b = self.param("lora_b", nn.initializers.zeros, b_shape, jnp.float32)

    h = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    scale = self.alpha / self.rank
    mode = self.mixture_inference if deterministic else "random"  # What this call does.
    paired = a_routed and b_routed and self.pairing == "paired"
    if mode == "merged" and paired:
      # Pairs (A_i, B_i): averaging A and B separately would add cross terms; merge in ΔW.
      delta = mixture_lora_delta(lora_a, lora_b, scale=scale, pairing="paired")
      return y + jnp.dot(h, delta.astype(dtype))
    if mode == "merged":
      a = merging.weighted_average(lora_a) if a_routed else lora_a
      b = merging.weighted_average(lora_b) if b_routed else lora_b
    else:
      a, b = lora_a, lora_b
      batch = x.shape[0]
      # 'paired': one draw routes A and B, so training sees the M updates A_i·B_i;
      # 'independent' (official): separate draws, training sees all M² products A_i·B_j.
      index = _expert_index(self, mode, m, self.fixed_expert, batch)
      if a_routed:
        self.sow("intermediates", "expert_a", index)
        a = _take(lora_a, index)
      if b_routed:
        if a_routed and not paired:
          index = _expert_index(self, mode, m, self.fixed_expert, batch)
        self.sow("intermediates", "expert_b", index)
        b = _take(lora_b, index)
    update = _matmul(_matmul(h, a.astype(dtype)), b.astype(dtype))
    return y + scale * update


def _make_adapter(
  config: adapters_lib.AdapterConfig, dim: int, *, name: str, dtype: Any
) -> nn.Module:
  return MixtureAdapter(
    dim,
    config.bottleneck,
    config.num_experts,
    config.share,
    config.activation,
    config.init_scale,
    config.mixture_inference,
    config.fixed_expert,
    dtype=dtype,
    name=name,
  )


def _make_projection(
  config: adapters_lib.AdapterConfig, features: int, *, name: str, **kwargs: Any
) -> nn.Module:
  return MixtureLoRADense(
    features,
    config.lora_rank,
    config.lora_alpha,
    config.num_experts,
    config.share,
    config.mixture_inference,
    config.fixed_expert,
    config.lora_pairing,
    dropout_rate=config.lora_dropout,
    name=name,
    **kwargs,
  )


# A re-import (e.g. importlib.reload) must not fail on the existing registration.
if "adamix" not in adapters_lib.adapter_kinds():
  adapters_lib.register_adapter_kind(
    "adamix", adapters_lib.AdapterKind(placements=("mlp",), make_adapter=_make_adapter)
  )
if "adamix_lora" not in adapters_lib.adapter_kinds():
  adapters_lib.register_adapter_kind(
    "adamix_lora", adapters_lib.AdapterKind(make_projection=_make_projection)
  )
