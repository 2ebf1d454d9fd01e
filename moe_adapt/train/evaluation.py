"""Batched prediction over a whole split with one compiled shape.

A jitted function compiles once per input shape; a split of N examples in batches of B
would give a second shape for the last batch. `padded_batches` pads that batch with zeros
to B, and `map_batched` applies a function over the batches and cuts the padding off again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


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
  out = [np.asarray(fn(xb)) for xb in padded_batches(x, batch_size)]
  if not out:
    return np.zeros((0,))
  return np.concatenate(out)[: len(x)]
