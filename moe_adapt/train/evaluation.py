"""Batched prediction over a whole split with one compiled shape.

A jitted function compiles once per input shape; a split of N examples in batches of B
would give a second shape for the last batch. `padded_batches` pads that batch with zeros
to B, and `map_batched` applies a function over the batches and cuts the padding off again
(`map_batches`: over several arrays at once, e.g. token ids and attention mask).
`apply_batched` is the eval-mode forward of a Flax model over a split, compiled once per
model and batch shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn


def padded_batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
  """Consecutive batches [batch_size, ...] of x [N, ...], the last one padded with zeros."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} is invalid; accepted: an int >= 1")
  for start in range(0, len(x), batch_size):
    xb = x[start : start + batch_size]
    if len(xb) < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - len(xb), *xb.shape[1:]), xb.dtype)])
    yield xb


def map_batched(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch_size: int) -> np.ndarray:
  """`fn` over `padded_batches(x, batch_size)`, concatenated and cut to N rows: [N, ...].

  `fn` maps a batch [batch_size, ...] to an array with the batch first; padded rows never
  reach the output. An empty x gives an empty array (fn is not called).
  """
  return map_batches(lambda _, xb: fn(xb), (x,), batch_size)


def map_batches(
  fn: Callable[..., Any], arrays: Sequence[np.ndarray], batch_size: int
) -> np.ndarray:
  """`fn(start, *batches)` over the padded batches of arrays [N, ...] with one N: [N, ...].

  `start` is the batch's first row; padded rows never reach the output. No rows give an
  empty array (fn is not called).
  """
  batches = zip(*(padded_batches(a, batch_size) for a in arrays))
  out = [np.asarray(fn(i * batch_size, *b)) for i, b in enumerate(batches)]
  if not out:
    return np.zeros((0,))
  return np.concatenate(out)[: len(arrays[0])]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_batch(model: nn.Module, method: str, params: Any, key: jax.Array, *inputs):
  # `model` is static (Linen modules hash by their fields): one compile per architecture.
  return model.apply({"params": params}, *inputs, train=False, method=method, rngs={"routing": key})


def apply_batched(
  model: nn.Module,
  params: Any,
  inputs: Sequence[np.ndarray],
  *,
  batch_size: int,
  method: str = "__call__",
  key: jax.Array | None = None,
  fresh_keys: bool = False,
) -> np.ndarray:
  """Eval-mode `model.apply({'params': params}, *inputs, method=method)` in batches: [N, ...].

  Routed mixtures in a random inference mode draw from `key` (None = `key(0)`): the same
  key for every batch, or with `fresh_keys` `fold_in(key, start)` for the batch starting
  at row `start` (fresh draws on every forward).
  """
  key = jax.random.key(0) if key is None else key

  def apply(start: int, *batch: np.ndarray) -> jax.Array:
    batch_key = jax.random.fold_in(key, start) if fresh_keys else key
    return _apply_batch(model, method, params, batch_key, *batch)

  return map_batches(apply, inputs, batch_size)
