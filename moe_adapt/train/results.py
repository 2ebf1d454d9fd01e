"""Per-example outcomes in results.json: what a paired significance test needs.

A run's results.json carries, next to `metrics`, the top-level key
```
"per_example": {"<variant>": {"<domain>": {"correct": [1, 0, ...], "pred": [...], "label": [...]}}}
```
with one entry per test example of the domain, in the test split's fixed order (the
same for every variant and seed of a benchmark, so that examples pair up across them).
`launch.collect` resamples these lists for its paired bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

PER_EXAMPLE = "per_example"


def outcomes(predictions: Any, labels: Any) -> dict[str, list[int]]:
  """The per-example entry of one variant on one domain.

  Args:
    predictions: [N] predicted classes, or [N, C] scores (logits or probabilities)
      whose argmax over the last axis is the prediction.
    labels: [N] integer labels.

  Returns:
    {'correct': [N] 0/1, 'pred': [N], 'label': [N]} as plain Python ints (JSON-ready).

  Raises:
    ValueError: predictions and labels do not pair up ([N] or [N, C] against [N]).
  """
  pred = np.asarray(predictions)
  if pred.ndim == 2:
    pred = np.argmax(pred, axis=-1)
  labels = np.asarray(labels)
  if pred.ndim != 1 or labels.shape != pred.shape:
    raise ValueError(
      f"predictions of shape {np.shape(predictions)} do not pair with labels of shape "
      f"{labels.shape}; accepted: [N] or [N, C] predictions with [N] labels"
    )
  pred = pred.astype(np.int64)
  labels = labels.astype(np.int64)
  return {
    "correct": (pred == labels).astype(int).tolist(),
    "pred": pred.tolist(),
    "label": labels.tolist(),
  }


def accuracy(entry: Mapping[str, Any]) -> float:
  """The accuracy of a per-example entry (mean of its `correct` list)."""
  return float(np.mean(entry["correct"]))
