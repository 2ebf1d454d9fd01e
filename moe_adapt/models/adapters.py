"""Adapters as composable Linen modules, and helpers that keep their parameters separable.

An `AdapterConfig` tells `TransformerBlock` (shared by the BERT encoder and the ViT) what to
insert:

- 'houlsby': a `BottleneckAdapter` after the attention output projection and another after
  the FFN output projection, each before the residual add (Houlsby et al., 2019);
- 'pfeiffer': one `BottleneckAdapter` after the FFN output projection only;
- 'lora': the projections named in `lora_targets` become `LoRADense` (frozen base kernel
  plus a rank-r update B·A with B = 0 at init, so the model starts exactly as pretrained);
- 'none': the plain backbone;
- 'adamix', 'adamix_lora': AdaMix mixtures of M bottleneck adapters / LoRA updates, routed
  at random per forward pass (registered by `moe_adapt.models.adamix`; they use the
  `num_experts`, `share`, `mixture_inference` and `fixed_expert` fields).

Separability (what AdapterSoup, sign analysis and checkpointing rely on): every adapter
parameter sits under a key starting with 'adapter' (a submodule such as `adapter_mlp`) or
'lora' (leaves `lora_a`, `lora_b` beside a frozen `kernel`). `split_params` cuts a
parameter tree into (backbone, adapters) trees of the same nesting, `merge_params` glues
them back, and `trainable_mask` / `trainable_optimizer` freeze everything else.

Extension point (mixtures such as AdaMix): the block never names a module class; it asks
`make_adapter(config, placement, dim, name=...)` for each placement and
`make_projection(config, target, features, name=...)` for each projection. Both dispatch on
`config.kind` through a registry, so a `MixtureAdapter` (M experts per insertion point,
routed per forward pass with `self.make_rng(...)` unless `deterministic`) is added with
`register_adapter_kind('adamix', AdapterKind(placements=('mlp',), make_adapter=...))` and
new fields on `AdapterConfig`. Modules built by the factories take `(x, *, deterministic)`;
they must name their parameters with the prefixes above.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_adapt.models.adapter_modules import (
  ACTIVATIONS,
  BottleneckAdapter,
  Dense,
  LoRADense,
  activation_fn,
  check_width,
)
from moe_adapt.models.adapter_params import (
  ADAPTER_PREFIXES,
  HEAD_KEY,
  TRAIN_MODES,
  check_params_tree,
  count_params,
  is_adapter_key,
  merge_params,
  split_params,
  trainable_mask,
  trainable_optimizer,
)

# The modules and the parameter-tree helpers live in adapter_modules and adapter_params;
# their names stay importable here.
__all__ = [
  "ACTIVATIONS",
  "ADAPTER_PREFIXES",
  "HEAD_KEY",
  "LORA_PAIRINGS",
  "MIXTURE_INFERENCE",
  "PLACEMENTS",
  "POSITIONS",
  "PROJECTIONS",
  "SHARES",
  "TRAIN_MODES",
  "AdapterConfig",
  "AdapterKind",
  "BottleneckAdapter",
  "Dense",
  "LoRADense",
  "activation_fn",
  "adapter_kinds",
  "check_mixture_options",
  "check_width",
  "count_params",
  "is_adapter_key",
  "make_adapter",
  "make_projection",
  "merge_lora",
  "merge_params",
  "param_counts",
  "register_adapter_kind",
  "split_params",
  "trainable_mask",
  "trainable_optimizer",
]

PLACEMENTS = ("attention", "mlp")
# Projection names inside `TransformerBlock`; the valid entries of `lora_targets`.
PROJECTIONS = ("query", "key", "value", "out", "mlp_in", "mlp_out")
# Mixture options (AdaMix): which projection has one shared copy, and what an eval forward does.
SHARES = ("none", "up", "down")
MIXTURE_INFERENCE = ("merged", "random", "random_example", "fixed")
# Where a bottleneck adapter sits relative to its sublayer's dropout (see `AdapterConfig`).
POSITIONS = ("after_dropout", "before_dropout")
# How AdaMix-LoRA with share='none' routes and merges A and B (see `AdapterConfig`).
LORA_PAIRINGS = ("independent", "paired")
_DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """What to insert into each transformer block.

  Attributes:
    kind: a registered kind: 'none', 'houlsby', 'pfeiffer', 'lora' (see module docstring).
    bottleneck: hidden width r of bottleneck adapters (down d → r, up r → d).
    activation: bottleneck non-linearity, a key of `ACTIVATIONS`.
    init_scale: std of the normal init of both bottleneck kernels (biases start at 0), so
      the adapter starts near the identity; > 0 keeps both projections receiving gradients.
    lora_rank: rank r of LoRA updates.
    lora_alpha: LoRA scale numerator; the update is (lora_alpha / lora_rank)·x·A·B.
    lora_targets: projections that get LoRA, from `PROJECTIONS`.
    lora_dropout: dropout on the LoRA branch's input during training.
    num_experts: experts M per mixture (kinds 'adamix', 'adamix_lora'), >= 1.
    share: which projection of a mixture has a single copy shared by all experts, from
      `SHARES`: 'up' (bottleneck up-projection / LoRA B; AdaMix's released setting),
      'down' (down-projection / LoRA A) or 'none' (both routed).
    mixture_inference: what a deterministic (eval) forward of a mixture does, from
      `MIXTURE_INFERENCE`: 'merged' (uniform average of the experts' weights applied as one
      module, AdaMix's default), 'random' (random routing as in training, one expert per
      projection for the whole batch; needs a 'routing' rng), 'random_example' (a fresh
      expert per example and projection on every forward, as the official code's random
      inference; needs a 'routing' rng) or 'fixed' (always expert `fixed_expert`).
    fixed_expert: the expert index used by mixture_inference='fixed', in [0, num_experts).
    position: where bottleneck adapters sit in their sublayer, from `POSITIONS`:
      'after_dropout' (dense → dropout → adapter → residual + LN; Houlsby's and Pfeiffer's
      code) or 'before_dropout' (dense → adapter → dropout → residual + LN; the official
      AdaMix code).
    lora_pairing: AdaMix-LoRA with share='none' only, from `LORA_PAIRINGS`:
      'independent' (the official code: A and B routed by separate draws, merged as
      mean(A)·mean(B)) or 'paired' (expert i is the pair (A_i, B_i), one draw routes both,
      merged as mean(A_i·B_i)).
  """

  kind: str = "none"
  bottleneck: int = 64
  activation: str = "gelu"
  init_scale: float = 1e-2
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("query", "value")
  lora_dropout: float = 0.0
  num_experts: int = 4
  share: str = "up"
  mixture_inference: str = "merged"
  fixed_expert: int = 0
  position: str = "after_dropout"
  lora_pairing: str = "independent"

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"kind={self.kind!r} is unknown; accepted: {', '.join(_KINDS)}")
    if not isinstance(self.bottleneck, int) or self.bottleneck < 1:
      raise ValueError(f"bottleneck={self.bottleneck!r} must be a positive int")
    activation_fn(self.activation)
    if not self.init_scale >= 0:
      raise ValueError(f"init_scale={self.init_scale!r} must be >= 0")
    if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
      raise ValueError(f"lora_rank={self.lora_rank!r} must be a positive int")
    if not self.lora_alpha > 0:
      raise ValueError(f"lora_alpha={self.lora_alpha!r} must be > 0")
    if not 0 <= self.lora_dropout < 1:
      raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
    check_mixture_options(
      num_experts=self.num_experts,
      share=self.share,
      mixture_inference=self.mixture_inference,
      fixed_expert=self.fixed_expert,
    )
    if self.position not in POSITIONS:
      raise ValueError(f"position={self.position!r} is unknown; accepted: {', '.join(POSITIONS)}")
    if self.lora_pairing not in LORA_PAIRINGS:
      raise ValueError(
        f"lora_pairing={self.lora_pairing!r} is unknown; accepted: {', '.join(LORA_PAIRINGS)}"
      )
    # Lists from config files become tuples, so the config stays hashable.
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    bad = [t for t in self.lora_targets if t not in PROJECTIONS]
    if bad or (_KINDS[self.kind].make_projection is not None and not self.lora_targets):
      raise ValueError(
        f"lora_targets={self.lora_targets!r} must be a non-empty subset of: "
        f"{', '.join(PROJECTIONS)}"
      )

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank


def check_mixture_options(
  *, num_experts: int, share: str, mixture_inference: str, fixed_expert: int
) -> None:
  """Raises ValueError naming the first invalid mixture option (see `AdapterConfig`)."""

  def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

  if not is_int(num_experts) or num_experts < 1:
    raise ValueError(f"num_experts={num_experts!r} is invalid; accepted: an int >= 1")
  if share not in SHARES:
    raise ValueError(f"share={share!r} is unknown; accepted: {', '.join(SHARES)}")
  if mixture_inference not in MIXTURE_INFERENCE:
    raise ValueError(
      f"mixture_inference={mixture_inference!r} is unknown; accepted: "
      f"{', '.join(MIXTURE_INFERENCE)}"
    )
  if not is_int(fixed_expert) or not 0 <= fixed_expert < num_experts:
    raise ValueError(
      f"fixed_expert={fixed_expert!r} is invalid; accepted: an int in [0, num_experts="
      f"{num_experts})"
    )


class AdapterKind(NamedTuple):
  """How one adapter kind plugs into `TransformerBlock`.

  Attributes:
    placements: where `make_adapter` modules go, a subset of `PLACEMENTS`.
    make_adapter: `(config, dim, *, name, dtype) -> module(x [.., dim], *, deterministic)`.
    make_projection: `(config, features, *, name, use_bias, kernel_init, dtype) -> module`
      replacing each projection named in `config.lora_targets`.
  """

  placements: tuple[str, ...] = ()
  make_adapter: Callable[..., nn.Module] | None = None
  make_projection: Callable[..., nn.Module] | None = None


def _bottleneck(config: AdapterConfig, dim: int, *, name: str, dtype: Any) -> nn.Module:
  return BottleneckAdapter(
    dim, config.bottleneck, config.activation, config.init_scale, dtype=dtype, name=name
  )


def _lora(config: AdapterConfig, features: int, *, name: str, **kwargs: Any) -> nn.Module:
  return LoRADense(
    features,
    config.lora_rank,
    config.lora_alpha,
    dropout_rate=config.lora_dropout,
    name=name,
    **kwargs,
  )


_KINDS: dict[str, AdapterKind] = {
  "none": AdapterKind(),
  "houlsby": AdapterKind(placements=("attention", "mlp"), make_adapter=_bottleneck),
  "pfeiffer": AdapterKind(placements=("mlp",), make_adapter=_bottleneck),
  "lora": AdapterKind(make_projection=_lora),
}


def register_adapter_kind(kind: str, spec: AdapterKind) -> None:
  """Makes `AdapterConfig(kind=kind)` insert what `spec` describes (e.g. a mixture)."""
  if kind in _KINDS:
    raise ValueError(f"adapter kind={kind!r} is already registered")
  bad = [p for p in spec.placements if p not in PLACEMENTS]
  if bad or (spec.placements and spec.make_adapter is None):
    raise ValueError(
      f"placements={spec.placements!r} must be a subset of {PLACEMENTS} and need make_adapter"
    )
  _KINDS[kind] = spec


def adapter_kinds() -> tuple[str, ...]:
  """Registered adapter kinds."""
  return tuple(_KINDS)


def make_adapter(
  config: AdapterConfig, placement: str, dim: int, *, name: str, dtype: Any = None
) -> nn.Module | None:
  """The adapter module for `placement` ('attention' or 'mlp'), or None if there is none."""
  if placement not in PLACEMENTS:
    raise ValueError(f"placement={placement!r} is unknown; accepted: {', '.join(PLACEMENTS)}")
  spec = _KINDS[config.kind]
  if placement not in spec.placements:
    return None
  return spec.make_adapter(config, dim, name=name, dtype=dtype)


def make_projection(
  config: AdapterConfig,
  target: str,
  features: int,
  *,
  name: str,
  use_bias: bool = True,
  kernel_init: Callable[..., jax.Array] = _DEFAULT_KERNEL_INIT,
  dtype: Any = None,
) -> nn.Module:
  """The projection `target` (one of `PROJECTIONS`): plain `Dense` or the kind's wrapper."""
  if target not in PROJECTIONS:
    raise ValueError(f"target={target!r} is unknown; accepted: {', '.join(PROJECTIONS)}")
  spec = _KINDS[config.kind]
  kwargs = dict(name=name, use_bias=use_bias, kernel_init=kernel_init, dtype=dtype)
  if spec.make_projection is not None and target in config.lora_targets:
    return spec.make_projection(config, features, **kwargs)
  return Dense(features, **kwargs)


def merge_lora(params: Mapping[str, Any], config: AdapterConfig) -> dict[str, Any]:
  """Folds every LoRA update into its kernel (W + (alpha/r)·A·B) and drops A and B.

  The result loads into the same model built with `AdapterConfig(kind='none')`: inference
  then costs nothing extra, which is what 'inference parameters' counts.
  """
  check_params_tree(params, "params")

  def fold(tree: Mapping[str, Any]) -> dict[str, Any]:
    if "lora_a" in tree or "lora_b" in tree:
      a, b = tree.get("lora_a"), tree.get("lora_b")
      if a is None or b is None or "kernel" not in tree or jnp.ndim(a) != 2:
        raise ValueError(f"merge_lora: expected 2-D lora_a, lora_b and kernel; got {list(tree)}")
      out = {k: v for k, v in tree.items() if not k.startswith("lora")}
      out["kernel"] = tree["kernel"] + config.lora_scale * (a @ b)
      return out
    return {k: fold(v) if isinstance(v, Mapping) else v for k, v in tree.items()}

  return fold(params)


def param_counts(params: Mapping[str, Any], *, train: str, config: AdapterConfig) -> dict[str, int]:
  """Parameter counts for reports: {'total', 'trainable', 'inference'}.

  'trainable' follows `trainable_mask(params, train=train)`; 'inference' is what a deployed
  model holds: LoRA updates are folded into their kernels (`merge_lora`), bottleneck
  adapters stay.
  """
  inference = merge_lora(params, config) if config.kind == "lora" else params
  return {
    "total": count_params(params),
    "trainable": count_params(params, trainable_mask(params, train=train)),
    "inference": count_params(inference),
  }
