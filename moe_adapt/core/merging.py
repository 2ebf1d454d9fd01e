"""Weight-space merging of experts/adapters: averaging, sign analysis, pruning, TIES.

`stacked` is a pytree whose leaves share a leading axis K (one slice per member). All
functions are pure and jit-able; merged leaves come back in their input dtype, statistics
in float32. They are written to be memory-bound: each public function runs as one jitted
program (also when called eagerly), sums over the K members are unrolled inside it so that
XLA fuses them into a single pass over each leaf, and pruning uses a fixed number of
counting passes instead of a sort.

The functions of stacked members take any pytree of [K, ...] leaves, so K members raveled
into one [K, P] leaf (`ravel_stacked`) are a valid input too. Averaging and the sign
statistics then run as one pass over one buffer instead of one small program per leaf,
which is what reaches copy bandwidth on small adapter sets (see `benchmarks/merge.py`); the
trim of `ties_merge` then ranks each member's whole vector instead of each leaf (as does
`magnitude_prune` of one member's raveled [P] vector).
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

__all__ = [
  "magnitude_prune",
  "pairwise_sign_disagreement",
  "ravel_stacked",
  "sign_disagreement",
  "ties_merge",
  "weighted_average",
]

PyTree = Any


def _leaves_with_names(tree: PyTree, arg: str) -> tuple[list[str], list[jax.Array], Any]:
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if not path_leaves:
    raise ValueError(f"{arg} has no leaves; accepted: a pytree with at least one array")
  names = [f"{arg}{jax.tree_util.keystr(path)}" for path, _ in path_leaves]
  return names, [leaf for _, leaf in path_leaves], treedef


def _stacked_leaves(stacked: PyTree, *, floating: bool) -> tuple[list[jax.Array], Any, int]:
  """Flattens `stacked`, checking that every leaf has the same leading axis K."""
  names, leaves, treedef = _leaves_with_names(stacked, "stacked")
  sizes = set()
  for name, leaf in zip(names, leaves):
    if jnp.ndim(leaf) < 1:
      raise ValueError(f"{name} is a scalar; accepted: leaves with a leading member axis K")
    if floating and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f"{name} has dtype {jnp.result_type(leaf)}; accepted: floating-point leaves")
    sizes.add(jnp.shape(leaf)[0])
  if len(sizes) != 1 or 0 in sizes:
    raise ValueError(
      f"stacked leaves have leading axes {sorted(sizes)}; accepted: one common size K >= 1"
    )
  return leaves, treedef, sizes.pop()


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
  leaves, treedef, _ = _stacked_leaves(stacked, floating=True)
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
  leaves, treedef, k = _stacked_leaves(stacked, floating=True)
  if weights is not None and jnp.shape(weights) != (k,):
    raise ValueError(
      f"weights has shape {jnp.shape(weights)}; accepted: ({k},), one weight per member"
    )
  return jax.tree_util.tree_unflatten(treedef, _weighted_average(leaves, weights))


def _sum_members(term, k: int) -> jax.Array:
  """Σ_{i<k} term(i), unrolled at trace time so XLA fuses it into one elementwise pass."""
  return functools.reduce(jnp.add, [term(i) for i in range(k)])


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
    return _sum_members(lambda i: w[i] * leaf[i].astype(jnp.float32), k).astype(leaf.dtype)

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
  leaves, _, _ = _stacked_leaves(stacked, floating=False)
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
  leaves, _, _ = _stacked_leaves(stacked, floating=False)
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


def _keep_count(size: int, density: float) -> int:
  """Entries kept in a leaf of `size`: Python round(density·size), at least 1 if density > 0."""
  if density <= 0.0 or size == 0:
    return 0
  return min(size, max(1, round(density * size)))


def _magnitude_bits(x: jax.Array) -> jax.Array:
  """|x| as unsigned integers whose order equals the order of |x| (IEEE, sign bit clear)."""
  width = jnp.dtype(x.dtype).itemsize * 8
  uint = {16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[width]
  return lax.bitcast_convert_type(jnp.abs(x), uint)


def _digit_bits() -> int:
  """Bits resolved per pass of the radix search.

  1 bit (one comparison per element and pass) is fastest on CPU, where the search is
  compute-bound (measured: 4-bit digits are 4× slower there). Accelerators are memory-bound,
  so 4-bit digits (15 comparisons per element, a quarter of the passes) suit them better.
  """
  return 1 if jax.default_backend() == "cpu" else 4


def _radix_search(
  admissible, num_segments: int, dtype, num_bits: int, digit_bits: int, active=True
) -> jax.Array:
  """Per segment, the largest unsigned value v with `admissible(v)` true, found MSB first.

  `admissible(candidates)` maps [S, D] candidates to [S, D] booleans and must be monotone
  in the candidate (true up to some value, false above). Each of ceil(num_bits/digit_bits)
  steps tries the D = 2^digit_bits − 1 nonzero values of the next digit at once. With
  `active` false (a traced bool) the loop runs zero steps and returns zeros.
  """
  num_steps = -(-num_bits // digit_bits)
  top_shift = num_steps * digit_bits - digit_bits
  digits = jnp.arange(1, 2**digit_bits, dtype=dtype)[None, :]

  def refine(step, thr):
    shift = (top_shift - digit_bits * step).astype(dtype)
    ok = admissible(thr[:, None] | jnp.left_shift(digits, shift))
    # Admissibility is monotone in the digit, so the number admissible is the best digit.
    return thr | jnp.left_shift(jnp.sum(ok, axis=-1).astype(dtype), shift)

  steps = jnp.where(active, num_steps, 0)
  return lax.fori_loop(0, steps, refine, jnp.zeros((num_segments,), dtype))


def _count_true(mask: jax.Array) -> jax.Array:
  """int32 counts of true entries along the last axis of a boolean [..., C] (16 | C).

  Adds 16 strided slices of the row in uint8 first, then the C/16 partial counts: XLA:CPU
  vectorises that column sum, while summing the booleans straight into int32 along the
  row ran ~6× slower (measured on 38M entries).
  """
  *lead, c = mask.shape
  partial = jnp.sum(mask.reshape(*lead, 16, c // 16), axis=-2, dtype=jnp.uint8)
  return jnp.sum(partial, axis=-1, dtype=jnp.int32)


def _chunk_size(shapes: list[tuple[int, int]]) -> int:
  """The largest power-of-two chunk ≤ 4096 whose row padding stays ≤ 25% of the data."""
  total = sum(r * n for r, n in shapes)
  size = 4096
  while size > 64:
    padding = sum(r * (-(-n // size) * size - n) for r, n in shapes)
    if padding <= total // 4:
      break
    size //= 2
  return size


def _top_magnitude_masks(
  rows_list: list[jax.Array], keeps: list[jax.Array], digit_bits: int
) -> list[jax.Array]:
  """Boolean [R, n] masks of the keep largest-|x| entries of each row, for every array.

  Every row of every array is a segment with its own threshold: the keep-th largest
  magnitude, found by a radix search on the bit pattern of |x|, one byte at a time (see
  `_same_dtype_masks`): memory-bound counting passes instead of a sort. Ties at the
  threshold go to the lowest index of the row.
  """
  bits = [_magnitude_bits(r) for r in rows_list]
  masks: list[jax.Array | None] = [None] * len(rows_list)
  for dtype in {b.dtype for b in bits}:
    group = [i for i, b in enumerate(bits) if b.dtype == dtype]
    group_masks = _same_dtype_masks([bits[i] for i in group], [keeps[i] for i in group], digit_bits)
    for i, mask in zip(group, group_masks):
      masks[i] = mask
  return masks


def _same_dtype_masks(
  bits: list[jax.Array], keeps: list[jax.Array], digit_bits: int
) -> list[jax.Array]:
  """`_top_magnitude_masks` for magnitude bit patterns [R, n] of one unsigned dtype.

  So that the compiled program does not grow with the number of leaves, all arrays are
  first copied into one [T, C] buffer of chunks (each row zero-padded to a multiple of C),
  counted per chunk, and the counts added up per segment (row).

  The threshold is found one byte at a time, most significant first. Stage j keeps, per
  segment, the bytes above it already fixed (prefix P) and the count `n_above` of entries
  whose higher bytes exceed P; it copies byte j of the entries whose higher bytes equal P
  into a uint8 buffer (0 elsewhere) and finds the largest byte value b with
  n_above + #(byte ≥ b) ≥ keep by a radix search over that buffer (candidates are ≥ 1, so
  the zeros never count). Every counting pass thus reads 1 byte per entry instead of 4
  (float32): 4 passes over the data plus 31 over bytes. On 2 CPU cores this made
  `ties_merge` 1.7–4.2× faster than 31 passes over uint32 (K = 2…32 MiniLM- and
  BERT-base-sized adapter sets); the passes are still bound by XLA:CPU's compare-and-count
  throughput (~2 GB/s), not by memory.

  The tie-breaking search over the index runs zero steps unless a nonzero magnitude is
  tied across a segment's boundary, since tied zeros do not change the pruned values.
  """
  dtype = bits[0].dtype
  width = jnp.dtype(dtype).itemsize * 8
  shapes = [b.shape for b in bits]
  size = _chunk_size(shapes)
  chunks_per_row = [-(-n // size) for _, n in shapes]
  starts = np.cumsum([0] + [r for r, _ in shapes])
  num_segments = int(starts[-1])
  # Static maps from each chunk to its segment and to its offset within the segment's row.
  seg_of_chunk = np.concatenate(
    [s + np.repeat(np.arange(r), m) for s, (r, _), m in zip(starts, shapes, chunks_per_row)]
  ).astype(np.int32)
  offset_of_chunk = np.concatenate(
    [np.tile(np.arange(m) * size, r) for (r, _), m in zip(shapes, chunks_per_row)]
  ).astype(np.uint32)
  chunks = jnp.concatenate(
    [
      jnp.pad(b, ((0, 0), (0, m * size - n))).reshape(r * m, size)
      for b, (r, n), m in zip(bits, shapes, chunks_per_row)
    ]
  )[:, None, :]  # [T, 1, C]; the zero padding is never counted (every candidate is > 0)
  keep = jnp.concatenate([jnp.full((r,), k, jnp.int32) for k, (r, _) in zip(keeps, shapes)])

  def per_segment(predicate, candidates: jax.Array) -> jax.Array:
    """[S, D] counts per segment of the entries where predicate(candidates) holds."""
    per_chunk = _count_true(predicate(candidates[seg_of_chunk][:, :, None]))  # [T, D]
    return jax.ops.segment_sum(
      per_chunk, seg_of_chunk, num_segments=num_segments, indices_are_sorted=True
    )

  thr = jnp.zeros((num_segments,), dtype)
  n_above = jnp.zeros((num_segments,), jnp.int32)  # entries > thr in the bytes fixed so far
  for shift in range(width - 8, -1, -8):
    byte = (chunks >> shift).astype(jnp.uint8)
    if shift + 8 < width:
      prefix = (thr >> (shift + 8))[seg_of_chunk][:, None, None]
      byte = jnp.where((chunks >> (shift + 8)) == prefix, byte, jnp.uint8(0))
    need = keep - n_above
    best = _radix_search(
      lambda c, byte=byte, need=need: per_segment(lambda cc: byte >= cc, c) >= need[:, None],
      num_segments,
      jnp.uint8,
      7 if shift + 8 == width else 8,  # the sign bit of |x| is always 0
      digit_bits,
    )
    n_above = n_above + per_segment(lambda cc, byte=byte: byte > cc, best[:, None])[:, 0]
    thr = thr | (best.astype(dtype) << shift)
  n_at = per_segment(lambda cc: chunks == cc, thr[:, None])[:, 0]
  excess = (n_above + n_at > keep) & (thr > 0)
  room = keep - n_above
  tied = chunks == thr[seg_of_chunk][:, None, None]  # [T, 1, C]
  index = (offset_of_chunk[:, None] + np.arange(size, dtype=np.uint32))[:, None, :]

  # Largest p with #(tied entries at index < p) <= room: exactly `room` tied entries.
  limit = _radix_search(
    lambda c: per_segment(lambda cc: tied & (index < cc), c) <= room[:, None],
    num_segments,
    jnp.uint32,
    max(1, max(n for _, n in shapes).bit_length()),
    digit_bits,
    active=jnp.any(excess),
  )
  limit = jnp.where(excess, limit, np.uint32(np.iinfo(np.uint32).max))  # else keep all ties
  masks = []
  for b, (r, _), start in zip(bits, shapes, starts):
    t, p = thr[start : start + r, None], limit[start : start + r, None]
    row_index = lax.broadcasted_iota(jnp.uint32, b.shape, 1)
    masks.append((b > t) | ((b == t) & (row_index < p)))
  return masks


@functools.partial(jax.jit, static_argnames="digit_bits")
def _prune_rows(
  rows_list: list[jax.Array], keeps: list[jax.Array], digit_bits: int | None = None
) -> list[jax.Array]:
  """Prunes each row of every [R, n] array to its keep largest magnitudes.

  Jitted with the keep counts as traced values, so a call outside jit compiles once per
  tree structure and shapes, whatever the density (inside a caller's jit it is inlined).
  keep = n keeps everything and keep = 0 nothing, without special cases.
  """
  digit_bits = _digit_bits() if digit_bits is None else digit_bits
  masks = _top_magnitude_masks(rows_list, keeps, digit_bits)
  return [jnp.where(m, r, jnp.zeros((), r.dtype)) for m, r in zip(masks, rows_list)]


def _validate_density(density: float) -> float:
  if (
    isinstance(density, bool)
    or not isinstance(density, int | float | np.floating)
    or not 0.0 <= density <= 1.0
  ):
    raise ValueError(f"density={density!r} is invalid; accepted: a Python float in [0, 1] (static)")
  return float(density)


def magnitude_prune(tree: PyTree, density: float) -> PyTree:
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

  Returns:
    pytree like `tree`, leaves in their input dtype.
  """
  density = _validate_density(density)
  names, leaves, treedef = _leaves_with_names(tree, "tree")
  for name, leaf in zip(names, leaves):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f"{name} has dtype {jnp.result_type(leaf)}; accepted: floating-point leaves")
  keeps = _keeps([jnp.shape(leaf) for leaf in leaves], density)
  return jax.tree_util.tree_unflatten(treedef, _magnitude_prune(leaves, keeps))


def ties_merge(stacked: PyTree, *, density: float, scale: float | jax.Array = 1.0) -> PyTree:
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

  Args:
    stacked: pytree of [K, ...] floating leaves (task vectors).
    density: fraction of each member's leaf to keep in the trim step, a Python float in
      [0, 1]. Static.
    scale: λ, multiplies the merged vector.

  Returns:
    pytree like one member: leaves [...] in their input dtype.
  """
  density = _validate_density(density)
  leaves, treedef, _ = _stacked_leaves(stacked, floating=True)
  keeps = _keeps([jnp.shape(leaf)[1:] for leaf in leaves], density)
  merged = _ties_merge(leaves, keeps, scale)
  return jax.tree_util.tree_unflatten(treedef, merged)


def _keeps(shapes: list[tuple[int, ...]], density: float) -> list[np.ndarray]:
  """Keep counts per member leaf, as int32 scalars that the jitted helpers trace.

  Tracing them (rather than making them static) lets all densities share one compilation.
  """
  return [np.int32(_keep_count(int(np.prod(shape, dtype=np.int64)), density)) for shape in shapes]


@jax.jit
def _magnitude_prune(leaves: list[jax.Array], keeps: list[jax.Array]) -> list[jax.Array]:
  rows = _prune_rows([jnp.reshape(leaf, (1, -1)) for leaf in leaves], keeps)
  return [r.reshape(leaf.shape) for r, leaf in zip(rows, leaves)]


@jax.jit
def _ties_merge(
  leaves: list[jax.Array], keeps: list[jax.Array], scale: jax.Array
) -> list[jax.Array]:
  k = leaves[0].shape[0]
  trimmed_rows = _prune_rows([jnp.reshape(leaf, (k, -1)) for leaf in leaves], keeps)

  def merge(leaf: jax.Array, trimmed: jax.Array) -> jax.Array:
    members = [trimmed[i].astype(jnp.float32) for i in range(k)]
    elected = jnp.sign(sum(members))
    # Zero entries have sign 0 and never match an elected sign of ±1; where the elected
    # sign is 0 nothing agrees and the result is 0.
    agree = [(jnp.sign(m) == elected) & (elected != 0) for m in members]
    count = sum(a.astype(jnp.int32) for a in agree)
    total = sum(jnp.where(a, m, 0.0) for a, m in zip(agree, members))
    merged = total / jnp.maximum(count, 1).astype(jnp.float32) * scale
    return merged.astype(leaf.dtype).reshape(leaf.shape[1:])

  return [merge(leaf, t) for leaf, t in zip(leaves, trimmed_rows)]
