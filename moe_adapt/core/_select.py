"""Top-magnitude selection by a radix search on bit patterns (private to the merging modules).

`prune_rows` keeps the m largest-|x| entries of each row of a list of [R, n] arrays without
sorting: per row it finds the m-th largest magnitude by counting passes over the bytes of
|x|'s bit pattern, then breaks ties at that threshold by index. The compiled program holds no
constant as large as the data: chunk-to-row maps and entry indices are computed inside it
from iotas, so compile time and memory do not grow with the input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# How many entries of n a density keeps, per rule (see `keep_count`).
KEEP_RULES = ("round", "floor", "floor_min1", "floor_plus1")


def keep_count(size: int, density: float, rule: str = "round") -> int:
  """Entries kept in a leaf of `size` at `density` under a keep-count `rule`.

  - `round`: Python round(d·n) (half to even), at least 1 if d > 0 (this library's default);
  - `floor`: int(d·n), PEFT's `magnitude_based_pruning`;
  - `floor_min1`: max(1, int(d·n)) if d > 0, mergekit's magnitude sparsification;
  - `floor_plus1`: int(d·n) + 1, the TIES reference code (`topk_values_mask` keeps |x| ≥ the
    (n − int(d·n))-th smallest).

  All are capped at n, and d = 0 keeps nothing.
  """
  if density <= 0.0 or size == 0:
    return 0
  if rule == "round":
    m = max(1, round(density * size))
  elif rule == "floor":
    m = int(density * size)
  elif rule == "floor_min1":
    m = max(1, int(density * size))
  elif rule == "floor_plus1":
    m = int(density * size) + 1
  else:
    raise ValueError(f"keep_rule={rule!r} is invalid; accepted: {', '.join(KEEP_RULES)}")
  return min(size, m)


def keeps(shapes: list[tuple[int, ...]], density: float, rule: str = "round") -> list[np.ndarray]:
  """Keep counts per leaf, as int32 scalars that the jitted helpers trace.

  Tracing them (rather than making them static) lets all densities share one compilation.
  """
  return [np.int32(keep_count(int(np.prod(s, dtype=np.int64)), density, rule)) for s in shapes]


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


class _Chunks(NamedTuple):
  """Every row of one dtype in one buffer of chunks, and the maps from chunks to rows."""

  chunks: jax.Array  # [T, 1, C] bit patterns, each row zero-padded to a multiple of C
  size: int  # C
  shapes: list[tuple[int, int]]  # (R, n) of each array
  starts: np.ndarray  # first segment (row) of each array, and S at the end
  num_segments: int  # S, the rows of all arrays
  seg_of_chunk: jax.Array  # [T] int32, sorted: the segment whose chunks include t
  offset_of_chunk: jax.Array  # [T] uint32: the chunk's first index inside its row

  def per_segment(self, predicate: Callable, candidates: jax.Array) -> jax.Array:
    """[S, D] counts per segment of the entries where predicate(candidates) holds."""
    per_chunk = _count_true(predicate(candidates[self.seg_of_chunk][:, :, None]))  # [T, D]
    return jax.ops.segment_sum(
      per_chunk, self.seg_of_chunk, num_segments=self.num_segments, indices_are_sorted=True
    )


def _chunked(bits: list[jax.Array]) -> _Chunks:
  """The [T, 1, C] buffer of `bits` ([R, n] each) and its maps, computed in the program."""
  shapes = [b.shape for b in bits]
  size = _chunk_size(shapes)
  chunks_per_row = np.concatenate([np.full(r, -(-n // size)) for r, n in shapes])  # [S]
  starts = np.cumsum([0] + [r for r, _ in shapes])
  num_segments = int(starts[-1])
  num_chunks = int(chunks_per_row.sum())
  first_chunk = np.concatenate([[0], np.cumsum(chunks_per_row)[:-1]]).astype(np.int32)  # [S]
  # seg_of_chunk[t] = the segment whose chunks include t: a running count of segment starts.
  marks = jnp.zeros((num_chunks,), jnp.int32).at[first_chunk[1:]].add(1, mode="drop")
  seg_of_chunk = jnp.cumsum(marks)  # [T], sorted
  chunk_id = lax.iota(jnp.int32, num_chunks)
  offset_of_chunk = ((chunk_id - jnp.asarray(first_chunk)[seg_of_chunk]) * size).astype(jnp.uint32)
  chunks = jnp.concatenate(
    [
      jnp.pad(b, ((0, 0), (0, -(-n // size) * size - n))).reshape(-1, size)
      for b, (_, n) in zip(bits, shapes)
    ]
  )[:, None, :]  # [T, 1, C]; the zero padding is never counted (every candidate is > 0)
  return _Chunks(chunks, size, shapes, starts, num_segments, seg_of_chunk, offset_of_chunk)


def _byte_threshold(
  ch: _Chunks, keep: jax.Array, dtype: Any, digit_bits: int
) -> tuple[jax.Array, jax.Array]:
  """Per segment, (the keep-th largest bit pattern thr, #entries > thr), byte by byte."""
  width = jnp.dtype(dtype).itemsize * 8
  chunks = ch.chunks
  thr = jnp.zeros((ch.num_segments,), dtype)
  n_above = jnp.zeros((ch.num_segments,), jnp.int32)  # entries > thr in the bytes fixed so far
  for shift in range(width - 8, -1, -8):
    byte = (chunks >> shift).astype(jnp.uint8)
    if shift + 8 < width:
      prefix = (thr >> (shift + 8))[ch.seg_of_chunk][:, None, None]
      byte = jnp.where((chunks >> (shift + 8)) == prefix, byte, jnp.uint8(0))
    need = keep - n_above
    best = _radix_search(
      lambda c, byte=byte, need=need: ch.per_segment(lambda cc: byte >= cc, c) >= need[:, None],
      ch.num_segments,
      jnp.uint8,
      7 if shift + 8 == width else 8,  # the sign bit of |x| is always 0
      digit_bits,
    )
    n_above = n_above + ch.per_segment(lambda cc, byte=byte: byte > cc, best[:, None])[:, 0]
    thr = thr | (best.astype(dtype) << shift)
  return thr, n_above


def _tie_limits(
  ch: _Chunks, thr: jax.Array, n_above: jax.Array, keep: jax.Array, digit_bits: int
) -> jax.Array:
  """Per segment, the index below which entries tied at `thr` are kept ([S] uint32)."""
  chunks = ch.chunks
  n_at = ch.per_segment(lambda cc: chunks == cc, thr[:, None])[:, 0]
  excess = (n_above + n_at > keep) & (thr > 0)
  room = keep - n_above
  tied = chunks == thr[ch.seg_of_chunk][:, None, None]  # [T, 1, C]

  def tied_below(cc: jax.Array) -> jax.Array:
    # The entry's index in its row, formed inside the count so that it fuses into the pass.
    index = ch.offset_of_chunk[:, None, None] + lax.broadcasted_iota(jnp.uint32, (1, 1, ch.size), 2)
    return tied & (index < cc)

  # Largest p with #(tied entries at index < p) <= room: exactly `room` tied entries.
  limit = _radix_search(
    lambda c: ch.per_segment(tied_below, c) <= room[:, None],
    ch.num_segments,
    jnp.uint32,
    max(1, max(n for _, n in ch.shapes).bit_length()),
    digit_bits,
    active=jnp.any(excess),
  )
  return jnp.where(excess, limit, np.uint32(np.iinfo(np.uint32).max))  # else keep all ties


def _same_dtype_masks(
  bits: list[jax.Array], keeps: list[jax.Array], digit_bits: int
) -> list[jax.Array]:
  """`_top_magnitude_masks` for magnitude bit patterns [R, n] of one unsigned dtype.

  So that the compiled program does not grow with the number of leaves, all arrays are
  first copied into one [T, C] buffer of chunks (each row zero-padded to a multiple of C),
  counted per chunk, and the counts added up per segment (row). The maps from chunk to
  segment and to the chunk's offset in its row are computed in the program from the [S]
  first chunks of the segments, and an entry's index inside the counting pass that needs
  it: a constant of the data's size made compilation take minutes and gigabytes.

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
  ch = _chunked(bits)
  keep = jnp.concatenate([jnp.full((r,), k, jnp.int32) for k, (r, _) in zip(keeps, ch.shapes)])
  thr, n_above = _byte_threshold(ch, keep, bits[0].dtype, digit_bits)
  limit = _tie_limits(ch, thr, n_above, keep, digit_bits)
  masks = []
  for b, (r, _), start in zip(bits, ch.shapes, ch.starts):
    t, p = thr[start : start + r, None], limit[start : start + r, None]
    row_index = lax.broadcasted_iota(jnp.uint32, b.shape, 1)
    masks.append((b > t) | ((b == t) & (row_index < p)))
  return masks


@functools.partial(jax.jit, static_argnames="digit_bits")
def prune_rows(
  rows_list: list[jax.Array], keeps: list[jax.Array], digit_bits: int | None = None
) -> list[jax.Array]:
  """Prunes each row of every [R, n] array to its keep largest magnitudes.

  Jitted with the keep counts as traced values, so a call outside jit compiles once per
  tree structure and shapes, whatever the density (inside a caller's jit it is inlined).
  keep = n keeps everything and keep = 0 nothing, without special cases. Ties at the
  threshold go to the lowest indices of the row, so exactly `keep` entries survive and the
  kept set of a smaller keep is a subset of a larger one's.
  """
  digit_bits = _digit_bits() if digit_bits is None else digit_bits
  masks = _top_magnitude_masks(rows_list, keeps, digit_bits)
  return [jnp.where(m, r, jnp.zeros((), r.dtype)) for m, r in zip(masks, rows_list)]
