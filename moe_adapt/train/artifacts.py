"""Per-run artifacts cached in the workdir: computed once, read back by a resumed run.

Two forms, both written atomically (`workdir.write_*_atomic`) by JAX process 0 and readable
from local or remote (`gs://`) workdirs:

- `JsonCache`: small results by key (e.g. one accuracy per evaluated mixture), a JSON
  object rewritten as values arrive;
- `cached_arrays`: one computation's arrays (e.g. teacher confidences over a transfer set),
  an .npz file checked against the shapes the run expects.

The workdir belongs to one config (`workdir.prepare_workdir`), so names and keys need not
name the config.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import workdir as workdir_lib


class JsonCache:
  """JSON values by key, persisted to `<workdir>/<filename>`.

  `get(key, compute)` returns the stored value, or calls `compute()` and stores its result,
  so a resumed run computes nothing twice. A local file is rewritten at once; a remote
  object (`gs://`) at most every `remote_flush_s` seconds (object stores limit how often an
  object may be rewritten) and on `flush()`.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    filename: str,
    *,
    remote_flush_s: float = metrics_lib.REMOTE_FLUSH_S,
  ):
    if isinstance(remote_flush_s, bool) or not (
      isinstance(remote_flush_s, int | float) and remote_flush_s >= 0
    ):
      raise ValueError(f"remote_flush_s={remote_flush_s!r} is invalid; accepted: a number >= 0")
    self.path = workdir_lib.as_path(workdir) / filename
    self.values: dict[str, Any] = {}
    if self.path.is_file():
      self.values = dict(workdir_lib.read_json(self.path))
    self.computed = 0
    self._wait_s = remote_flush_s if not workdir_lib.is_local(self.path) else 0.0
    self._unwritten = False
    self._last_flush = time.monotonic()

  def get(self, key: str, compute: Callable[[], Any]) -> Any:
    """The value stored under `key`, computed (and stored) the first time."""
    if key not in self.values:
      self.values[key] = workdir_lib.to_json_compatible(compute())
      self.computed += 1
      self._unwritten = True
      if time.monotonic() - self._last_flush >= self._wait_s:
        self.flush()
    return self.values[key]

  def flush(self) -> None:
    """Writes the values not yet in the file (JAX process 0 only)."""
    if self._unwritten and jax.process_index() == 0:
      workdir_lib.write_json_atomic(self.path, self.values)
    self._unwritten = False
    self._last_flush = time.monotonic()


def cached_arrays(
  workdir: str | os.PathLike,
  filename: str,
  compute: Callable[[], Mapping[str, np.ndarray]],
  *,
  expected_shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
  """`compute()`'s arrays, read from `<workdir>/<filename>` (.npz) when it is there.

  Args:
    workdir: the run's workdir (local or remote).
    filename: the .npz file's name.
    compute: () -> {name: array}; called only when the file is absent.
    expected_shapes: {name: shape} the arrays must have; a stored file that differs is an
      error, never silently reused.

  Raises:
    ValueError: the stored file does not hold `expected_shapes`.
  """
  path = workdir_lib.as_path(workdir) / filename
  if path.is_file():
    with np.load(io.BytesIO(path.read_bytes())) as f:  # Local or remote (gs://).
      stored = {name: f[name] for name in f.files}
    shapes = {name: stored[name].shape for name in stored}
    if shapes != dict(expected_shapes):
      raise ValueError(
        f"{path} holds arrays {shapes}, but this run needs {dict(expected_shapes)}; accepted: "
        "the file this run wrote (remove it, or use another --workdir)"
      )
    return stored
  arrays = {name: np.asarray(value) for name, value in compute().items()}
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    workdir_lib.write_bytes_atomic(path, buffer.getvalue())
  return arrays
