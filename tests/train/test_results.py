"""Tests of the per-example outcomes of results.json (train/results.py)."""

import json

import numpy as np
import pytest

from moe_adapt.train import results


def test_outcomes_from_scores_and_from_predictions():
  logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 2.0, 0.0]])
  labels = np.array([1, 2, 2, 0], np.int32)
  want = {"correct": [1, 0, 1, 0], "pred": [1, 0, 2, 1], "label": [1, 2, 2, 0]}
  assert results.outcomes(logits, labels) == want
  assert results.outcomes(np.array([1, 0, 2, 1], np.int64), labels) == want
  entry = results.outcomes(logits, labels)
  assert json.loads(json.dumps(entry)) == entry  # plain ints
  assert results.accuracy(entry) == 0.5


def test_outcomes_reject_unpaired_shapes():
  with pytest.raises(ValueError, match=r"shape \(3,\) do not pair with labels of shape \(2,\)"):
    results.outcomes(np.zeros(3), np.zeros(2))
  with pytest.raises(ValueError, match=r"accepted: \[N\] or \[N, C\] predictions"):
    results.outcomes(np.zeros((2, 3, 4)), np.zeros(2))
