"""Training metrics as JSON lines: `<workdir>/metrics.jsonl`.

One line per logged step: `{"stage": str, "step": int, <metric>: number, ...,
"time": unix seconds}`. The file is only ever appended to, so a resumed run
logs again the steps between its last checkpoint and the kill; `read_metrics`
keeps the last line of each (stage, step). Non-finite values are written as
`NaN` / `Infinity` (Python's json reads them back).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
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

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / METRICS_FILE
    self._file = None
    if jax.process_index() != 0:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    # A kill in the middle of a write may leave a last line without its newline;
    # start on a fresh line so that the partial one stays the only damaged line.
    needs_newline = False
    if self.path.exists() and self.path.stat().st_size > 0:
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        needs_newline = f.read(1) != b"\n"
    self._file = open(self.path, "a", encoding="utf-8")  # Closed in close().
    if needs_newline:
      self._file.write("\n")
      self._file.flush()

  def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends one line `{"stage", "step", **metrics, "time"}` and flushes it.

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
    if self._file is None:  # Not process 0.
      return
    values = {str(k): _to_number(str(k), v) for k, v in jax.device_get(dict(metrics)).items()}
    record = {"stage": stage, "step": step, **values, "time": time.time()}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

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
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.is_file():
    return []
  records: dict[tuple[str, int], dict] = {}
  skipped = 0
  with open(path, encoding="utf-8") as f:
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
