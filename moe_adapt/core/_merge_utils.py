"""Input checks and shared steps of the merging modules (private)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# Elected sign where the trimmed members sum to exactly 0 (see `elect_and_merge`).
ZERO_SIGNS = ("zero", "positive", "majority")


def leaves_with_names(tree: PyTree, arg: str) -> tuple[list[str], list[jax.Array], Any]:
  """Flattens `tree`; names are `arg` plus each leaf's key path, for error messages."""
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if not path_leaves:
    raise ValueError(f"{arg} has no leaves; accepted: a pytree with at least one array")
  names = [f"{arg}{jax.tree_util.keystr(path)}" for path, _ in path_leaves]
  return names, [leaf for _, leaf in path_leaves], treedef


def check_floating(names: list[str], leaves: list[jax.Array]) -> None:
  for name, leaf in zip(names, leaves):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f"{name} has dtype {jnp.result_type(leaf)}; accepted: floating-point leaves")


def stacked_leaves(
  stacked: PyTree, *, floating: bool, arg: str = "stacked"
) -> tuple[list[jax.Array], Any, int]:
  """Flattens `stacked`, checking that every leaf has the same leading axis K."""
  names, leaves, treedef = leaves_with_names(stacked, arg)
  sizes = set()
  for name, leaf in zip(names, leaves):
    if jnp.ndim(leaf) < 1:
      raise ValueError(f"{name} is a scalar; accepted: leaves with a leading member axis K")
    sizes.add(jnp.shape(leaf)[0])
  if floating:
    check_floating(names, leaves)
  if len(sizes) != 1 or 0 in sizes:
    raise ValueError(
      f"{arg} leaves have leading axes {sorted(sizes)}; accepted: one common size K >= 1"
    )
  return leaves, treedef, sizes.pop()


def like_members(
  tree: PyTree, arg: str, treedef: Any, leaves: list[jax.Array], *, stacked: bool
) -> list[jax.Array]:
  """Leaves of `tree`, checked to have the structure, shapes and dtypes of the members.

  With `stacked`, `tree`'s leaves are [K, ...] like `leaves`; otherwise [...] like one member.
  """
  names, others, other_def = leaves_with_names(tree, arg)
  if other_def != treedef:
    raise ValueError(
      f"{arg} has structure {other_def}; accepted: the structure of the members, {treedef}"
    )
  for name, other, leaf in zip(names, others, leaves):
    want = jnp.shape(leaf) if stacked else jnp.shape(leaf)[1:]
    if jnp.shape(other) != want:
      raise ValueError(f"{name} has shape {jnp.shape(other)}; accepted: {want}")
    if jnp.result_type(other) != jnp.result_type(leaf):
      raise ValueError(
        f"{name} has dtype {jnp.result_type(other)}; accepted: the members' {jnp.result_type(leaf)}"
      )
  return others


# Input bytes merged per program by the per-leaf trims. Their temporaries are ~3× what a
# program reads: merging a 110 M-parameter tree (K = 2) in one program peaked at 5.3× the
# input in host memory, in buckets of this size at ~3× (benchmarks/merge_scale.py).
BUCKET_BYTES = 1 << 28


def buckets(leaves: list[jax.Array]) -> list[list[list[int]]]:
  """Leaf indices, grouped by (shape, dtype) and packed into buckets of ~`BUCKET_BYTES`.

  Each bucket is a list of groups of same-shaped leaves; a group larger than a bucket is
  split into equal parts (at least one leaf each), so that the buckets of many identical
  layers repeat and share a compilation.
  """
  by_kind: dict = {}
  for i, leaf in enumerate(leaves):
    by_kind.setdefault((jnp.shape(leaf), jnp.result_type(leaf)), []).append(i)
  parts = []
  for (shape, dtype), group in by_kind.items():
    nbytes = int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize
    per_part = max(1, BUCKET_BYTES // max(nbytes, 1))
    parts += [(group[j : j + per_part], nbytes) for j in range(0, len(group), per_part)]
  out, current, size = [], [], 0
  for group, nbytes in parts:
    if current and size + nbytes * len(group) > BUCKET_BYTES:
      out.append(current)
      current, size = [], 0
    current.append(group)
    size += nbytes * len(group)
  return [*out, current]


def in_buckets(program, leaves: list[jax.Array], per_leaf: list[list], *args, **kwargs) -> list:
  """Runs `program` bucket by bucket (`buckets`) and returns its outputs in leaf order.

  `program(groups, *per_group, *args, **kwargs)` takes the bucket's groups of same-shaped
  leaves and, for each list in `per_leaf`, the values of each group's leaves (lists like
  `groups`), and returns one list of outputs per group, one per leaf.
  """
  out = [None] * len(leaves)
  for bucket in buckets(leaves):
    groups = [[leaves[i] for i in group] for group in bucket]
    per_group = [[[values[i] for i in group] for group in bucket] for values in per_leaf]
    for group, results in zip(bucket, program(groups, *per_group, *args, **kwargs)):
      for i, result in zip(group, results):
        out[i] = result
  return out


def validate_density(density: float, arg: str = "density") -> float:
  if (
    isinstance(density, bool)
    or not isinstance(density, int | float | np.floating)
    or not 0.0 <= density <= 1.0
  ):
    raise ValueError(f"{arg}={density!r} is invalid; accepted: a Python float in [0, 1] (static)")
  return float(density)


def validate_choice(value: str, arg: str, accepted: tuple[str, ...]) -> str:
  if value not in accepted:
    raise ValueError(f"{arg}={value!r} is invalid; accepted: {', '.join(accepted)}")
  return value


def sum_members(term, k: int) -> jax.Array:
  """Σ_{i<k} term(i), unrolled at trace time so XLA fuses it into one elementwise pass."""
  return functools.reduce(jnp.add, [term(i) for i in range(k)])


def elect_and_merge(members: list[jax.Array], zero_sign: str) -> jax.Array:
  """TIES' elect + disjoint mean of K float32 arrays of one shape.

  γ = sign(Σ_k x_k), and where that sum is exactly 0: 0 (`zero`: nothing agrees, the result
  is 0), +1 (`positive`: PEFT and mergekit) or the sign of Σ γ over the array (`majority`: the
  TIES reference code's global majority, over each member's whole vector there; −1 if that
  vote is tied). The result is
  the mean of the entries whose sign equals γ (0 where none does).
  """
  elected = jnp.sign(sum(members))
  if zero_sign == "positive":
    elected = jnp.where(elected == 0, 1.0, elected)
  elif zero_sign == "majority":
    vote = jnp.sign(jnp.sum(elected))
    # A tied vote counts as negative, as the code's `where(sign > 0, x > 0, x < 0)` does.
    elected = jnp.where(elected == 0, jnp.where(vote == 0, -1.0, vote), elected)
  # Zero entries have sign 0 and never match an elected sign of ±1; where the elected
  # sign is 0 nothing agrees and the result is 0.
  agree = [(jnp.sign(m) == elected) & (elected != 0) for m in members]
  count = sum(a.astype(jnp.int32) for a in agree)
  total = sum(jnp.where(a, m, 0.0) for a, m in zip(agree, members))
  return total / jnp.maximum(count, 1).astype(jnp.float32)
