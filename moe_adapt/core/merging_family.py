"""Task-vector merges beyond averaging and TIES: task arithmetic, DARE, Breadcrumbs.

All take `stacked` task vectors — a pytree of [K, ...] leaves, member k's leaf being
θ_k − θ_base (`task_vectors` makes them) — and return one merged task vector (leaves [...],
in their input dtype) to add to the base, except `task_arithmetic` given a `base`, which
returns the merged model. `sign_disagreement` and `pairwise_sign_disagreement` apply to the
same inputs, so every merge here can be read next to the sign conflicts of its members.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.core import _select
from moe_adapt.core._merge_utils import (
  ZERO_SIGNS,
  elect_and_merge,
  in_buckets,
  leaves_with_names,
  like_members,
  stacked_leaves,
  sum_members,
  validate_choice,
  validate_density,
)

PyTree = Any


def stack_members(members: Sequence[PyTree]) -> PyTree:
  """Stacks K member pytrees into one pytree of [K, ...] leaves.

  Args:
    members: K ≥ 1 pytrees of one structure, with equal shapes and dtypes leaf by leaf.

  Returns:
    pytree like `members[0]` whose leaves are [K, ...].
  """
  if not members:
    raise ValueError("members is empty; accepted: a sequence of at least one pytree")
  _, first, treedef = leaves_with_names(members[0], "members[0]")
  fake = [jnp.expand_dims(leaf, 0) for leaf in first]
  for k, member in enumerate(members[1:], start=1):
    like_members(member, f"members[{k}]", treedef, fake, stacked=False)
  leaves = [jax.tree_util.tree_leaves(m) for m in members]
  return jax.tree_util.tree_unflatten(treedef, [jnp.stack(group) for group in zip(*leaves)])


def task_vectors(stacked: PyTree, base: PyTree) -> PyTree:
  """τ_k = θ_k − θ_base for K stacked models and their common base.

  Args:
    stacked: pytree of [K, ...] floating leaves (fine-tuned models).
    base: pytree like one member ([...] leaves, same dtypes).

  Returns:
    pytree of [K, ...] leaves in the input dtypes.
  """
  leaves, treedef, _ = stacked_leaves(stacked, floating=True)
  base_leaves = like_members(base, "base", treedef, leaves, stacked=False)
  return jax.tree_util.tree_unflatten(treedef, _subtract(leaves, base_leaves))


@jax.jit
def _subtract(leaves: list[jax.Array], base: list[jax.Array]) -> list[jax.Array]:
  return [x - b[None] for x, b in zip(leaves, base)]


def task_arithmetic(
  stacked: PyTree,
  base: PyTree | None = None,
  *,
  scale: float | jax.Array = 1.0,
  weights: jax.Array | None = None,
) -> PyTree:
  r"""Task arithmetic: the scaled sum of task vectors, added to the base when one is given.

  .. math::
    \tau_m = \lambda \sum_k w_k \tau_k,\qquad \theta_m = \theta_{base} + \tau_m

  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (λ is chosen on
  validation data; the paper sweeps 0 … 1). PEFT's `task_arithmetic` is λ = 1 with its
  weights; mergekit's `task_arithmetic` is this with `lambda` = λ (normalize off). Weights
  are not normalised (negative ones subtract a task).

  Args:
    stacked: pytree of [K, ...] floating leaves: task vectors τ_k, or, with `base`, the
      fine-tuned models θ_k (τ_k = θ_k − base).
    base: optional pytree like one member.
    scale: λ.
    weights: optional [K] weights w_k (1 when None).

  Returns:
    τ_m without `base`, θ_base + τ_m with it; leaves [...] in their input dtype.
  """
  leaves, treedef, k = stacked_leaves(stacked, floating=True)
  if weights is not None and jnp.shape(weights) != (k,):
    raise ValueError(
      f"weights has shape {jnp.shape(weights)}; accepted: ({k},), one weight per member"
    )
  base_leaves = None if base is None else like_members(base, "base", treedef, leaves, stacked=False)
  w = jnp.ones((k,), jnp.float32) if weights is None else weights
  return jax.tree_util.tree_unflatten(treedef, _task_arithmetic(leaves, base_leaves, scale, w))


@jax.jit
def _task_arithmetic(leaves, base, scale, w) -> list[jax.Array]:
  w = jnp.asarray(w, jnp.float32) * scale
  out = []
  for i, leaf in enumerate(leaves):
    if base is None:
      merged = sum_members(lambda j, leaf=leaf: w[j] * leaf[j].astype(jnp.float32), leaf.shape[0])
    else:
      b = base[i].astype(jnp.float32)
      merged = b + sum_members(
        lambda j, leaf=leaf, b=b: w[j] * (leaf[j].astype(jnp.float32) - b), leaf.shape[0]
      )
    out.append(merged.astype(leaf.dtype))
  return out


def random_prune(
  key: jax.Array, stacked: PyTree, *, density: float, rescale: bool = True
) -> PyTree:
  r"""DARE's drop-and-rescale of each member: keep each entry with probability d, ÷ d.

  .. math::
    \tilde\tau_{k,i} = m_{k,i}\,\tau_{k,i} / d,\qquad m_{k,i} \sim \mathrm{Bernoulli}(d)

  Yu, Yu, Yu, Huang & Li, "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch", ICML 2024 (DARE). The same operation as PEFT's
  `random_pruning(..., rescale=True)` (random streams differ); mergekit's `dare_*` drop the
  same way but rescale the kept entries so that the tensor keeps its L1 norm, instead of by
  1/d. The mask of leaf j is drawn from `fold_in(key, j)`, so it does not depend on how the
  other leaves are merged; d = 0 gives zeros.

  Args:
    key: PRNG key.
    stacked: pytree of [K, ...] floating leaves (task vectors).
    density: keep probability d in [0, 1], a Python float.
    rescale: divide the kept entries by d (DARE); False keeps them as they are.

  Returns:
    pytree like `stacked`, leaves in their input dtype.
  """
  density = validate_density(density)
  leaves, treedef, _ = stacked_leaves(stacked, floating=True)
  indices = [np.uint32(i) for i in range(len(leaves))]
  out = in_buckets(_random_prune, leaves, [indices], key, density, rescale)
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _random_prune(groups, indices, key, density: float, rescale: bool) -> list[list[jax.Array]]:
  # One vmapped draw per group of same-shaped leaves (leaf j's key is fold_in(key, j)).
  factor = 1.0 / density if rescale and density > 0 else 1.0
  outs = []
  for g, idx in zip(groups, indices):
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.stack(idx))
    keep = jax.vmap(lambda kk, leaf=g[0]: jax.random.bernoulli(kk, density, leaf.shape))(keys)
    outs.append(
      [
        jnp.where(keep[n], leaf.astype(jnp.float32) * factor, 0.0).astype(leaf.dtype)
        for n, leaf in enumerate(g)
      ]
    )
  return outs


def dare(
  key: jax.Array,
  stacked: PyTree,
  *,
  density: float,
  rescale: bool = True,
  scale: float | jax.Array = 1.0,
) -> PyTree:
  r"""DARE + task arithmetic: λ Σ_k random_prune(τ_k), PEFT's `dare_linear`.

  Yu et al., ICML 2024 (see `random_prune`): dropping 90 % of a fine-tuned delta and
  rescaling the rest keeps its ability, which lets several deltas be summed with less
  interference.

  Args:
    key: PRNG key (member k's mask of leaf j comes from `fold_in(key, j)`, row k).
    stacked: pytree of [K, ...] floating leaves (task vectors).
    density: keep probability d in [0, 1], a Python float.
    rescale: divide kept entries by d.
    scale: λ.

  Returns:
    merged task vector: pytree like one member, leaves in their input dtype.
  """
  return task_arithmetic(random_prune(key, stacked, density=density, rescale=rescale), scale=scale)


def dare_ties(
  key: jax.Array,
  stacked: PyTree,
  *,
  density: float,
  scale: float | jax.Array = 1.0,
  zero_sign: str = "zero",
) -> PyTree:
  r"""DARE-TIES: drop-and-rescale each member, then TIES' sign election and disjoint mean.

  PEFT's and mergekit's `dare_ties` (Yu et al., ICML 2024, with the elect and disjoint-merge
  steps of Yadav et al., NeurIPS 2023). With zero_sign='positive' the sign where the dropped
  members sum to exactly 0 is +1, as in PEFT and mergekit; the default 0 merges such places
  to 0, as `ties_merge` does.

  Args:
    key: PRNG key.
    stacked: pytree of [K, ...] floating leaves (task vectors).
    density: keep probability d in [0, 1], a Python float.
    scale: λ.
    zero_sign: `zero`, `positive` or `majority`, as in `ties_merge`.

  Returns:
    merged task vector: pytree like one member, leaves in their input dtype.
  """
  validate_choice(zero_sign, "zero_sign", ZERO_SIGNS)
  dropped = random_prune(key, stacked, density=density)
  leaves, treedef, _ = stacked_leaves(dropped, floating=True)
  return jax.tree_util.tree_unflatten(treedef, _elect(leaves, scale, zero_sign))


@functools.partial(jax.jit, static_argnums=2)
def _elect(leaves, scale, zero_sign: str) -> list[jax.Array]:
  return [
    (
      elect_and_merge([x[i].astype(jnp.float32) for i in range(x.shape[0])], zero_sign) * scale
    ).astype(x.dtype)
    for x in leaves
  ]


def breadcrumbs(
  stacked: PyTree,
  *,
  density: float,
  top_fraction: float,
  scale: float | jax.Array = 1.0,
  keep_rule: str = "round",
) -> PyTree:
  r"""Model Breadcrumbs: drop each leaf's largest outliers and its smallest entries, then sum.

  Per member and leaf of n entries ranked by magnitude (largest first, ties to the lower
  index), keep ranks [t, t + m): m = entries kept at `density` (`keep_rule`, as in
  `magnitude_prune`), t = round(top_fraction · n) (int(·) with the floor rules), lowered
  to n − m if the two do not fit; then λ Σ_k of the sparse members.

  Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
  Masks", ECCV 2024. keep_rule='floor' reproduces mergekit's `breadcrumbs`
  (`magnitude_outliers`: target int(d·n), top int(γ·n), γ = top_fraction) with unit weights.

  Args:
    stacked: pytree of [K, ...] floating leaves (task vectors).
    density: fraction kept, a Python float in [0, 1].
    top_fraction: fraction of largest magnitudes dropped first (the paper's β), in [0, 1].
    scale: λ.
    keep_rule: `round`, `floor`, `floor_min1` or `floor_plus1`.

  Returns:
    merged task vector: pytree like one member, leaves in their input dtype.
  """
  density = validate_density(density)
  top_fraction = validate_density(top_fraction, "top_fraction")
  validate_choice(keep_rule, "keep_rule", _select.KEEP_RULES)
  leaves, treedef, _ = stacked_leaves(stacked, floating=True)
  upper, lower = [], []
  for leaf in leaves:
    n = int(np.prod(jnp.shape(leaf)[1:], dtype=np.int64))
    m = _select.keep_count(n, density, keep_rule)
    top = round(top_fraction * n) if keep_rule == "round" else int(top_fraction * n)
    top = min(top, n - m)
    upper.append(np.int32(top + m))
    lower.append(np.int32(top))
  merged = in_buckets(_breadcrumbs_groups, leaves, [upper, lower], scale)
  return jax.tree_util.tree_unflatten(treedef, merged)


@jax.jit
def _breadcrumbs_groups(groups, upper, lower, scale) -> list[list[jax.Array]]:
  # The top-(t+m) and top-t sets are nested (one total order), so their difference is ranks
  # [t, t+m): two selections, one subtraction.
  k = groups[0][0].shape[0]
  rows = [jnp.concatenate([jnp.reshape(leaf, (k, -1)) for leaf in g]) for g in groups]
  keep_upper = _select.prune_rows(rows, [u[0] for u in upper])  # equal within a group
  keep_lower = _select.prune_rows(rows, [lo[0] for lo in lower])
  outs = []
  for g, hi, lo in zip(groups, keep_upper, keep_lower):
    kept = (hi.astype(jnp.float32) - lo.astype(jnp.float32)).reshape(len(g), k, -1)
    merged = sum_members(lambda i, kept=kept: kept[:, i], k) * scale
    outs.append([m.astype(leaf.dtype).reshape(leaf.shape[1:]) for m, leaf in zip(merged, g)])
  return outs
