"""Training metrics as JSON lines: `<workdir>/metrics.jsonl`.

One line per logged step: `{"stage": str, "step": int, <metric>: number, ...,
"time": unix seconds}`. The file is only ever appended to, so a resumed run
logs again the steps between its last checkpoint and the kill; `read_metrics`
keeps the last line of each (stage, step). Non-finite values are written as
`NaN` / `Infinity` (Python's json reads them back).

Remote workdirs (`gs://...`): an object cannot be appended to, so the writer
keeps the whole file's text in memory and rewrites the object (one atomic write)
when at least `remote_flush_s` seconds have passed since the last rewrite, on
`flush()` and on `close()`. Readers always see whole lines; a kill loses at most
the lines of the last `remote_flush_s` seconds (object stores also limit how
often one object may be rewritten, about once a second on GCS).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from moe_adapt.train import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"
# Least seconds between two rewrites of a remote metrics object (see the module docstring).
REMOTE_FLUSH_S = 5.0
_RESERVED = ("stage", "step", "time")


def _to_number(name: str, value: Any) -> float | int | bool:
  """A Python scalar from a Python/NumPy/JAX scalar; ValueError naming `name` otherwise."""
  if isinstance(value, bool | int | float):
    return value
  array = np.asarray(value)
  if array.ndim != 0 or array.dtype.kind not in "biuf":
    raise ValueError(
      f"metric {name!r} must be a real scalar; got shape {array.shape} dtype {array.dtype}"
    )
  return array.item()


class MetricWriter:
  """Appends metric lines to `<workdir>/metrics.jsonl`; only JAX process 0 writes."""

  def __init__(self, workdir: str | os.PathLike, *, remote_flush_s: float = REMOTE_FLUSH_S):
    """Opens the metrics file of `workdir` (local or remote) for appending.

    Args:
      workdir: the run's directory.
      remote_flush_s: for a remote workdir, the least seconds between two rewrites
        of the object (0: rewrite at every `write`); unused for a local one.

    Raises:
      ValueError: `remote_flush_s` is not a number >= 0.
    """
    if isinstance(remote_flush_s, bool) or not isinstance(remote_flush_s, int | float):
      raise ValueError(f"remote_flush_s={remote_flush_s!r} is invalid; accepted: a number >= 0")
    if not remote_flush_s >= 0:
      raise ValueError(f"remote_flush_s={remote_flush_s!r} is invalid; accepted: a number >= 0")
    self.path = workdir_lib.as_path(workdir) / METRICS_FILE
    self._remote_flush_s = float(remote_flush_s)
    self._file = None  # Local: the file opened for appending.
    self._text: list[str] | None = None  # Remote: the whole file's text, in pieces.
    self._unwritten = False  # Remote: whether `_text` holds lines not yet written out.
    self._last_flush = time.monotonic()
    if jax.process_index() != 0:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    old = b""
    if self.path.exists():
      if workdir_lib.is_local(self.path):
        if self.path.stat().length > 0:
          with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            old = f.read(1)
      else:
        old = self.path.read_bytes()
    # A kill in the middle of a write may leave a last line without its newline;
    # start on a fresh line so that the partial one stays the only damaged line.
    start = "\n" if old and not old.endswith(b"\n") else ""
    if workdir_lib.is_local(self.path):
      self._file = self.path.open("a", encoding="utf-8")  # Closed in close().
      if start:
        self._file.write(start)
        self._file.flush()
    else:
      self._text = [old.decode("utf-8", errors="replace") + start]

  def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends one line `{"stage", "step", **metrics, "time"}` and flushes it.

    Locally the line is on disk when this returns; remotely see `remote_flush_s`.

    Args:
      stage: the training stage, e.g. "experts".
      step: the step index the metrics belong to (int >= 0).
      metrics: name -> real scalar (Python, NumPy or JAX; device values are fetched).

    Raises:
      ValueError: a metric is not a scalar, or its name is 'stage', 'step' or 'time'.
    """
    if not isinstance(stage, str) or not stage:
      raise ValueError(f"stage={stage!r} is invalid; accepted: a non-empty string")
    step = _to_number("step", step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise ValueError(f"step={step!r} is invalid; accepted: an int >= 0")
    if not isinstance(metrics, Mapping):
      raise ValueError(f"metrics must be a mapping name -> scalar; got {type(metrics)}")
    clash = [k for k in metrics if k in _RESERVED]
    if clash:
      raise ValueError(f"metric names {clash} are reserved; accepted: names other than {_RESERVED}")
    if self._file is None and self._text is None:  # Not process 0, or closed.
      return
    values = {str(k): _to_number(str(k), v) for k, v in jax.device_get(dict(metrics)).items()}
    record = {"stage": stage, "step": step, **values, "time": time.time()}
    line = json.dumps(record) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    self._text.append(line)
    self._unwritten = True
    if time.monotonic() - self._last_flush >= self._remote_flush_s:
      self.flush()

  def flush(self) -> None:
    """Makes every line written so far visible to readers (a remote object is rewritten)."""
    if self._file is not None:
      self._file.flush()
    elif self._text is not None and self._unwritten:
      text = "".join(self._text)
      self._text = [text]  # One piece: the next rewrite joins only the new lines.
      self.path.write_bytes(text.encode("utf-8"))  # Atomic: one object write.
      self._unwritten = False
      self._last_flush = time.monotonic()

  def close(self) -> None:
    """Flushes and closes; later writes are ignored."""
    self.flush()
    if self._file is not None:
      self._file.close()
    self._file, self._text = None, None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The logged metric records of a workdir, one per (stage, step).

  When a (stage, step) was logged more than once (a resumed run repeats the
  steps after its last checkpoint), the last line wins. Records come in the
  order of their last occurrence in the file. Unparsable lines (a write cut
  short by a kill) are skipped with a warning.

  Returns:
    A list of dicts, [] when there is no metrics file.
  """
  path = workdir_lib.as_path(workdir) / METRICS_FILE
  if not path.is_file():
    return []
  records: dict[tuple[str, int], dict] = {}
  skipped = 0
  with path.open("r", encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        key = (record["stage"], record["step"])
      except (json.JSONDecodeError, KeyError, TypeError):
        skipped += 1
        continue
      records.pop(key, None)  # Re-insert so that dict order follows the last occurrence.
      records[key] = record
  if skipped:
    warnings.warn(f"{path}: skipped {skipped} unparsable line(s)", RuntimeWarning, stacklevel=2)
  return list(records.values())
