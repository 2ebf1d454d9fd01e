"""Weight-space merging of experts/adapters: averaging, sign analysis, pruning, TIES.

`stacked` is a pytree whose leaves share a leading axis K (one slice per member). All
functions are pure and jit-able; merged leaves come back in their input dtype, statistics
in float32. They are written to be memory-bound: sums over the K members are unrolled inside
jitted programs so that XLA fuses them into a single pass over each leaf, and pruning uses a
fixed number of counting passes instead of a sort (`_select`). Called eagerly, `ties_merge`
trims leaves in buckets of ~256 MB grouped by shape, so its memory stays within ~2× the
input and its compilations are shared by identical layers (`benchmarks/merge_scale.py`).

The functions of stacked members take any pytree of [K, ...] leaves, so K members raveled
into one [K, P] leaf (`ravel_stacked`) are a valid input too. Averaging and the sign
statistics then run as one pass over one buffer instead of one small program per leaf,
which is what reaches copy bandwidth on small adapter sets (see `benchmarks/merge.py`); the
trim of `ties_merge` then ranks each member's whole vector instead of each leaf (as does
`magnitude_prune` of one member's raveled [P] vector, and `ties_merge(..., trim='member')`).

The rest of the family is re-exported here: task arithmetic, DARE, DARE-TIES and Model
Breadcrumbs (`merging_family`), Fisher merging, RegMean and AdaMerging (`merging_learned`).
`docs/merging.md` lists which reference each option reproduces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from moe_adapt.core import _select
from moe_adapt.core._merge_utils import (
  ZERO_SIGNS,
  check_floating,
  elect_and_merge,
  in_buckets,
  leaves_with_names,
  stacked_leaves,
  sum_members,
  validate_choice,
  validate_density,
)
from moe_adapt.core.merging_family import (
  breadcrumbs,
  dare,
  dare_ties,
  random_prune,
  stack_members,
  task_arithmetic,
  task_vectors,
)
from moe_adapt.core.merging_learned import (
  AdaMergingResult,
  adamerging,
  diagonal_fisher,
  fisher_merge,
  input_gram,
  regmean_merge,
)

# Kept under its old name: tests and benchmarks prune rows directly.
_prune_rows = _select.prune_rows
TRIMS = ("leaf", "member")

__all__ = [
  "AdaMergingResult",
  "adamerging",
  "breadcrumbs",
  "dare",
  "dare_ties",
  "diagonal_fisher",
  "fisher_merge",
  "input_gram",
  "magnitude_prune",
  "pairwise_sign_disagreement",
  "random_prune",
  "ravel_stacked",
  "regmean_merge",
  "sign_disagreement",
  "stack_members",
  "task_arithmetic",
  "task_vectors",
  "ties_merge",
  "weighted_average",
]

PyTree = Any


def ravel_stacked(stacked: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
  """Ravels K stacked members into one [K, P] buffer, P = parameters of one member.

  Row k is member k's leaves raveled in pytree order (`jax.flatten_util.ravel_pytree`), in
  the leaves' promoted dtype. Ravel once, when the members are loaded, and merge many times:
  the ravel itself is a copy of all K members. `unravel` maps a [P] vector (e.g. the output
  of `weighted_average(flat)`) back to one member's pytree, leaves in their input dtypes;
  use `jax.vmap(unravel)` for a [K', P] stack.

  Args:
    stacked: pytree of [K, ...] floating leaves.

  Returns:
    (flat [K, P], unravel: [P] -> pytree like one member).
  """
  leaves, treedef, _ = stacked_leaves(stacked, floating=True)
  _, unravel = ravel_pytree(jax.tree_util.tree_unflatten(treedef, [leaf[0] for leaf in leaves]))
  return jax.vmap(lambda member: ravel_pytree(member)[0])(stacked), unravel


def weighted_average(stacked: PyTree, weights: jax.Array | None = None) -> PyTree:
  r"""Weighted average of K members, leaf by leaf.

  .. math::
    \bar\theta = \sum_k \tilde w_k \theta_k,\qquad \tilde w = w / \textstyle\sum_k w_k

  Uniform weights when `weights` is None: AdapterSoup's Eq. 1, f(x, (1/l) Σ_i θ_i)
  (Chronopoulou, Peters, Fraser & Dodge, "AdapterSoup: Weight Averaging to Improve
  Generalization of Pretrained Language Models", Findings of EACL 2023), the mixing rule of
  Nguyen & Le (ACL 2024, Eq. 1), AdaMix's merge of its M modules (Wang et al., EMNLP 2022,
  §3.3) and the uniform model soup (Wortsman et al., ICML 2022). If the weights sum to
  exactly 0 (e.g. all zero), the uniform average is returned instead of dividing by 0, so
  the result stays finite. Accumulates in float32.

  Args:
    stacked: pytree of [K, ...] floating leaves.
    weights: optional [K] weights (any sign; normalised by their sum).

  Returns:
    pytree like one member: leaves [...] in their input dtype.
  """
  leaves, treedef, k = stacked_leaves(stacked, floating=True)
  if weights is not None and jnp.shape(weights) != (k,):
    raise ValueError(
      f"weights has shape {jnp.shape(weights)}; accepted: ({k},), one weight per member"
    )
  return jax.tree_util.tree_unflatten(treedef, _weighted_average(leaves, weights))


@jax.jit
def _weighted_average(leaves: list[jax.Array], weights: jax.Array | None) -> list[jax.Array]:
  # Jitted so that an eager call is one fused pass per leaf, not op-by-op dispatch.
  k = leaves[0].shape[0]
  if weights is None:
    w = jnp.full((k,), 1.0 / k, jnp.float32)
  else:
    w = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(w)
    is_zero = total == 0
    # The safe denominator keeps the unused branch (and its gradient) finite.
    w = jnp.where(is_zero, 1.0 / k, w / jnp.where(is_zero, 1.0, total))

  def average(leaf: jax.Array) -> jax.Array:
    # A sum unrolled over members inside jit fuses into one elementwise pass. Measured on
    # CPU it is 10× faster than a reduction over the leading axis and, unlike a dot, stays
    # exact float32 (no TF32/bf16 matmul passes) and fast for bfloat16 leaves.
    return sum_members(lambda i: w[i] * leaf[i].astype(jnp.float32), k).astype(leaf.dtype)

  return [average(leaf) for leaf in leaves]


def sign_disagreement(stacked: PyTree) -> jax.Array:
  r"""Fraction of parameter positions where the members' signs conflict.

  .. math::
    \mathrm{SD} = \frac{\#\{i : \exists k, l\ \theta_{k,i} > 0 > \theta_{l,i}\}}{N}

  over all N positions of all leaves (N = total size of one member). Zeros never count as a
  difference but stay in the denominator. For K = 2 this is the fraction of sign difference
  (FSD: share of element-wise products < 0) of Nguyen & Le, ACL 2024, "Generalizability of
  Mixture of Domain-Specific Adapters from the Lens of Signed Weight Directions and its
  Application to Effective Model Pruning" (pairwise definition: Alg. 3, App. A.5); for
  K > 2 it is the set version (some pair of members conflicts at the position). K = 1
  gives 0.

  Args:
    stacked: pytree of [K, ...] leaves.

  Returns:
    float32 scalar in [0, 1].
  """
  leaves, _, _ = stacked_leaves(stacked, floating=False)
  return _sign_disagreement(leaves)


@jax.jit
def _sign_disagreement(leaves: list[jax.Array]) -> jax.Array:
  conflicts, positions = jnp.zeros((), jnp.float32), 0
  for leaf in leaves:
    k = leaf.shape[0]
    any_pos = functools.reduce(jnp.logical_or, [leaf[i] > 0 for i in range(k)])
    any_neg = functools.reduce(jnp.logical_or, [leaf[i] < 0 for i in range(k)])
    both = any_pos & any_neg
    # Count exactly in int32 per leaf, add up leaves in float32 (totals may pass 2**31).
    conflicts = conflicts + jnp.sum(both, dtype=jnp.int32).astype(jnp.float32)
    positions += int(np.prod(leaf.shape[1:], dtype=np.int64))
  return conflicts / max(positions, 1)


def pairwise_sign_disagreement(stacked: PyTree) -> jax.Array:
  r"""[K, K] matrix of the fraction of sign difference (FSD) of every pair of members.

  .. math::
    \mathrm{FSD}_{kl} = \frac{\#\{i : \theta_{k,i}\,\theta_{l,i} < 0\}}{N}

  over all N positions of all leaves (zeros stay in the denominator), as in Nguyen & Le, ACL 2024
  (the FSD matrix of the adapters, §5.2; FSD of a pair: Alg. 3, App. A.5). Symmetric with a zero
  diagonal; entry (k, l) equals `sign_disagreement` of members k and l alone.

  Args:
    stacked: pytree of [K, ...] leaves.

  Returns:
    float32 [K, K] with entries in [0, 1].
  """
  leaves, _, _ = stacked_leaves(stacked, floating=False)
  return _pairwise_sign_disagreement(leaves)


@jax.jit
def _pairwise_sign_disagreement(leaves: list[jax.Array]) -> jax.Array:
  k = leaves[0].shape[0]
  counts, positions = jnp.zeros((k, k), jnp.float32), 0
  for leaf in leaves:
    flat = jnp.reshape(leaf, (k, -1))
    pos, neg = _pack_bits(flat > 0), _pack_bits(flat < 0)
    # #(k positive, l negative) for all pairs: popcount of the AND of packed sign bits, 32
    # positions per word. Exact, one pass over the leaf, K²/32 word operations per position;
    # measured on CPU 2.5–9× faster than an integer (or float) matmul of the 0/1 masks.
    pos_neg = jnp.sum(
      lax.population_count(pos[:, None, :] & neg[None, :, :]), axis=-1, dtype=jnp.int32
    )
    counts = counts + (pos_neg + pos_neg.T).astype(jnp.float32)
    positions += flat.shape[1]
  return counts / max(positions, 1)


def _pack_bits(mask: jax.Array) -> jax.Array:
  """Boolean [K, n] -> uint32 [K, ceil(n / 32)], bit j of word w = mask[:, 32·w + j].

  The padding bits are 0, so they never count as a position of either sign.
  """
  k, n = mask.shape
  words = -(-n // 32)
  bits = jnp.pad(mask, ((0, 0), (0, 32 * words - n))).reshape(k, words, 32).astype(jnp.uint32)
  # Distinct bits never carry, so the sum is their bitwise OR.
  return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def magnitude_prune(tree: PyTree, density: float, *, keep_rule: str = "round") -> PyTree:
  r"""Keeps the `density` fraction of largest-magnitude entries in each leaf, zeroes the rest.

  .. math::
    \mathrm{prune}(x)_i = x_i \cdot [\,|x_i| \text{ is among the } m \text{ largest of the
    leaf}\,],\quad m = \mathrm{round}(d \cdot n)\ (\ge 1 \text{ if } d > 0)

  The "trim" step of TIES-merging (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving
  Interference When Merging Models") and plain magnitude pruning, which is what Nguyen &
  Le's "FSD-based pruning" of a trained adapter does (ACL 2024, §7, Alg. 2). `round` is Python's
  (half to even). Ties are broken deterministically: among equal magnitudes at the
  threshold, the lowest flat (row-major) indices are kept, so exactly m entries survive.

  Args:
    tree: pytree of floating leaves.
    density: fraction d in [0, 1] to keep, a Python float. Static (it sets m).
    keep_rule: how m follows from d and the leaf size n: `round` (above; the default),
      `floor` = int(d·n) (PEFT), `floor_min1` = max(1, int(d·n)) (mergekit), `floor_plus1` =
      int(d·n) + 1 (the TIES reference code, which also keeps every entry tied with the m-th
      largest; here ties go to the lowest indices, so the two agree when magnitudes differ).

  Returns:
    pytree like `tree`, leaves in their input dtype.
  """
  density = validate_density(density)
  validate_choice(keep_rule, "keep_rule", _select.KEEP_RULES)
  names, leaves, treedef = leaves_with_names(tree, "tree")
  check_floating(names, leaves)
  keeps = _select.keeps([jnp.shape(leaf) for leaf in leaves], density, keep_rule)
  pruned = in_buckets(_magnitude_prune_groups, leaves, [keeps])
  return jax.tree_util.tree_unflatten(treedef, pruned)


def ties_merge(
  stacked: PyTree,
  *,
  density: float,
  scale: float | jax.Array = 1.0,
  keep_rule: str = "round",
  zero_sign: str = "zero",
  trim: str = "leaf",
) -> PyTree:
  r"""TIES-merging of K task vectors: trim, elect sign, disjoint mean, scale.

  For each leaf, with τ̂_k = magnitude_prune(τ_k, density) per member:

  .. math::
    \gamma = \mathrm{sign}\Big(\sum_k \hat\tau_k\Big),\quad
    A_i = \{k : \hat\tau_{k,i} \ne 0,\ \mathrm{sign}(\hat\tau_{k,i}) = \gamma_i\},\quad
    \tau_{m,i} = \lambda \cdot \frac{1}{|A_i|} \sum_{k \in A_i} \hat\tau_{k,i}

  (0 where A_i is empty), λ = `scale`. From Yadav et al., NeurIPS 2023, "TIES-Merging:
  Resolving Interference When Merging Models"; the elected sign is the sign of the total
  mass. TIES is meant for task vectors — deltas θ_k − θ_base from a common base — so pass
  deltas and add the result back to the base yourself; applied to raw weights it prunes
  and sign-votes the weights themselves, which is not the method.

  The defaults are this library's; each reference is one setting away. PEFT's
  `ties` (`merge_utils`): keep_rule='floor', zero_sign='positive'. mergekit's `ties`
  (equal weights): keep_rule='floor_min1', zero_sign='positive'. The TIES reference code:
  keep_rule='floor_plus1', zero_sign='majority', trim='member'.

  Args:
    stacked: pytree of [K, ...] floating leaves (task vectors).
    density: fraction of each member's leaf to keep in the trim step, a Python float in
      [0, 1]. Static.
    scale: λ, multiplies the merged vector.
    keep_rule: entries kept out of n per trimmed vector, as in `magnitude_prune`.
    zero_sign: elected sign where the trimmed members sum to exactly 0: `zero` (nothing
      agrees, the merge is 0 there; the default), `positive` (+1: PEFT, mergekit) or
      `majority` (the sign of the sum of the elected signs of the leaf, or of the whole
      vector with trim='member': the TIES code).
    trim: `leaf` ranks magnitudes within each leaf of each member (PEFT, mergekit);
      `member` ranks each member's whole vector, all leaves raveled together (the TIES
      code; leaves of mixed dtypes are ranked in their promoted dtype).

  Returns:
    pytree like one member: leaves [...] in their input dtype.
  """
  density = validate_density(density)
  validate_choice(keep_rule, "keep_rule", _select.KEEP_RULES)
  validate_choice(zero_sign, "zero_sign", ZERO_SIGNS)
  validate_choice(trim, "trim", TRIMS)
  leaves, treedef, _ = stacked_leaves(stacked, floating=True)
  sizes = [int(np.prod(jnp.shape(leaf)[1:], dtype=np.int64)) for leaf in leaves]
  keeps = _select.keeps(
    [(sum(sizes),)] if trim == "member" else [(n,) for n in sizes], density, keep_rule
  )
  if trim == "member":
    merged = _ties_merge_whole(leaves, keeps, scale, zero_sign=zero_sign)
  else:
    merged = in_buckets(_ties_merge_groups, leaves, [keeps], scale, zero_sign=zero_sign)
  return jax.tree_util.tree_unflatten(treedef, merged)


@jax.jit
def _magnitude_prune_groups(
  groups: list[list[jax.Array]], keeps: list[jax.Array]
) -> list[list[jax.Array]]:
  # A group's N same-shaped leaves are pruned as the N rows of one array.
  rows = [jnp.stack([jnp.reshape(leaf, (-1,)) for leaf in g]) for g in groups]
  pruned_rows = _select.prune_rows(rows, [k[0] for k in keeps])  # equal within a group
  return [[r.reshape(leaf.shape) for r, leaf in zip(p, g)] for g, p in zip(groups, pruned_rows)]


@functools.partial(jax.jit, static_argnames="zero_sign")
def _ties_merge_groups(
  groups: list[list[jax.Array]], keeps: list[jax.Array], scale: jax.Array, *, zero_sign: str
) -> list[list[jax.Array]]:
  # Each group's N leaves of one shape [K, ...] are trimmed as one [N·K, n] array of rows and
  # merged as one [N, K, n] stack: the program's size follows the number of shapes, not of
  # leaves, and buckets of the same shapes share one compilation.
  k = groups[0][0].shape[0]
  rows = [jnp.concatenate([jnp.reshape(leaf, (k, -1)) for leaf in g]) for g in groups]
  outs = []
  for g, trimmed in zip(groups, _select.prune_rows(rows, [kk[0] for kk in keeps])):
    stack = trimmed.reshape(len(g), k, -1)
    merged = elect_and_merge([stack[:, i].astype(jnp.float32) for i in range(k)], zero_sign)
    outs.append(
      [(m * scale).astype(leaf.dtype).reshape(leaf.shape[1:]) for m, leaf in zip(merged, g)]
    )
  return outs


@functools.partial(jax.jit, static_argnames="zero_sign")
def _ties_merge_whole(
  leaves: list[jax.Array], keeps: list[jax.Array], scale: jax.Array, *, zero_sign: str
) -> list[jax.Array]:
  # One [K, P] row per member: ranked, elected and merged as one vector, then split.
  k = leaves[0].shape[0]
  rows = [jnp.reshape(leaf, (k, -1)) for leaf in leaves]
  dtype = jnp.result_type(*rows)
  (flat,) = _select.prune_rows([jnp.concatenate([r.astype(dtype) for r in rows], 1)], keeps)
  merged = elect_and_merge([flat[i].astype(jnp.float32) for i in range(k)], zero_sign) * scale
  parts = jnp.split(merged, np.cumsum([r.shape[1] for r in rows])[:-1])
  return [p.astype(leaf.dtype).reshape(leaf.shape[1:]) for p, leaf in zip(parts, leaves)]
