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
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PLACEMENTS = ("attention", "mlp")
# Projection names inside `TransformerBlock`; the valid entries of `lora_targets`.
PROJECTIONS = ("query", "key", "value", "out", "mlp_in", "mlp_out")
ADAPTER_PREFIXES = ("adapter", "lora")
HEAD_KEY = "head"
TRAIN_MODES = ("adapters", "head", "all")
# Mixture options (AdaMix): which projection has one shared copy, and what an eval forward does.
SHARES = ("none", "up", "down")
MIXTURE_INFERENCE = ("merged", "random", "random_example", "fixed")
# Where a bottleneck adapter sits relative to its sublayer's dropout (see `AdapterConfig`).
POSITIONS = ("after_dropout", "before_dropout")
# How AdaMix-LoRA with share='none' routes and merges A and B (see `AdapterConfig`).
LORA_PAIRINGS = ("independent", "paired")
_DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()

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


def check_width(name: str, value: int, limit: int, what: str) -> None:
  """Raises ValueError unless 1 <= value <= limit (e.g. a bottleneck within the hidden size)."""
  if not 1 <= value <= limit:
    raise ValueError(f"{name}={value} exceeds {what} {limit}; accepted: an int in [1, {limit}]")


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


# ---------------------------------------------------------------------------------------
# Parameter trees: split, merge, masks, counts.
# ---------------------------------------------------------------------------------------


def is_adapter_key(key: str) -> bool:
  """Whether a parameter-tree key holds adapter parameters (prefix 'adapter' or 'lora')."""
  return key.startswith(ADAPTER_PREFIXES)


def _check_tree(params: Any, arg: str) -> None:
  if not isinstance(params, Mapping):
    raise ValueError(
      f"{arg} must be a nested mapping of parameters (variables['params']), "
      f"got {type(params).__name__}"
    )


def split_params(
  params: Mapping[str, Any], *, include_head: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Cuts `params` into (backbone, adapters), two trees with the original nesting.

  Args:
    params: a model's `variables['params']`.
    include_head: also move the top-level 'head' subtree into the second tree (what
      `train='adapters'` trains).

  Returns:
    (backbone, adapters); `merge_params(backbone, adapters)` gives `params` back. Branches
    left empty are dropped, so adapter trees of models with the same config have the same
    structure and can be stacked, averaged and compared.
  """
  _check_tree(params, "params")

  def split(tree: Mapping[str, Any], top: bool) -> tuple[dict, dict]:
    backbone, adapters = {}, {}
    for key, value in tree.items():
      if is_adapter_key(key) or (top and include_head and key == HEAD_KEY):
        adapters[key] = value
      elif isinstance(value, Mapping):
        b, a = split(value, False)
        if b:
          backbone[key] = b
        if a:
          adapters[key] = a
      else:
        backbone[key] = value
    return backbone, adapters

  return split(params, True)


def merge_params(backbone: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `split_params`: the union of two trees; a leaf present in both is an error."""
  _check_tree(backbone, "backbone")
  _check_tree(adapters, "adapters")

  def merge(a: Mapping[str, Any], b: Mapping[str, Any], path: str) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
      if key not in out:
        out[key] = value
      elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
        out[key] = merge(out[key], value, f"{path}/{key}")
      else:
        raise ValueError(f"merge_params: {path}/{key} is in both backbone and adapters")
    return out

  return merge(backbone, adapters, "")


def trainable_mask(params: Mapping[str, Any], *, train: str) -> dict[str, Any]:
  """A tree of bools like `params`: True where a leaf is trained.

  Args:
    params: a model's `variables['params']`.
    train: 'adapters' (adapter leaves and the top-level 'head'), 'head' (the 'head' only),
      or 'all'.

  Returns:
    A tree for `optax.masked(tx, mask)`; see also `trainable_optimizer`.
  """
  _check_tree(params, "params")
  if train not in TRAIN_MODES:
    raise ValueError(f"train={train!r} is unknown; accepted: {', '.join(TRAIN_MODES)}")
  if train != "all" and HEAD_KEY not in params:
    raise ValueError(
      f"train={train!r} needs a top-level '{HEAD_KEY}' in params; got {list(params)}"
    )
  if train == "adapters" and not split_params(params)[1]:
    raise ValueError(
      "train='adapters' but params hold no adapter parameters (keys starting with "
      f"{' or '.join(ADAPTER_PREFIXES)}); build the model with an AdapterConfig kind != 'none'"
    )

  def mark(tree: Any, on: bool, top: bool) -> Any:
    if not isinstance(tree, Mapping):
      return on
    out = {}
    for key, value in tree.items():
      key_on = on or train == "all"
      key_on = key_on or (top and key == HEAD_KEY)
      key_on = key_on or (train == "adapters" and is_adapter_key(key))
      out[key] = mark(value, key_on, False)
    return out

  return mark(params, False, True)


def trainable_optimizer(
  tx: optax.GradientTransformation, params: Mapping[str, Any], *, train: str
) -> optax.GradientTransformation:
  """`tx` on the leaves selected by `trainable_mask`, zero updates (frozen) elsewhere.

  This still differentiates through every leaf; where speed matters, differentiate only the
  trainable tree: `grad(lambda a: loss(merge_params(backbone, a)))`.
  """
  mask = trainable_mask(params, train=train)
  labels = jax.tree.map(lambda on: "trainable" if on else "frozen", mask)
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def count_params(tree: Any, mask: Any = None) -> int:
  """Number of scalars in a tree of arrays or shape structs (where `mask` is True, if given)."""
  # Works on arrays and on `jax.eval_shape` results alike.
  sizes = [math.prod(getattr(x, "shape", None) or jnp.shape(x)) for x in jax.tree.leaves(tree)]
  if mask is None:
    return int(sum(sizes))
  masks = jax.tree.leaves(mask)
  if len(masks) != len(sizes):
    raise ValueError(f"mask has {len(masks)} leaves but the tree has {len(sizes)}")
  return int(sum(n for n, on in zip(sizes, masks) if on))


def merge_lora(params: Mapping[str, Any], config: AdapterConfig) -> dict[str, Any]:
  """Folds every LoRA update into its kernel (W + (alpha/r)·A·B) and drops A and B.

  The result loads into the same model built with `AdapterConfig(kind='none')`: inference
  then costs nothing extra, which is what 'inference parameters' counts.
  """
  _check_tree(params, "params")

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
