"""Co-Tuning's category relationship: the calibrated source head and p(y_s | y_t).

The source head's temperature T is fitted on held-out source data (its ECE before and
after measured on the source test split); the relationship R[y_t] = p(y_s | y_t) comes
from the calibrated source probabilities softmax(G(F(x)) / T) on target data, by the
direct approach (per-class means) or the reverse one (the paper's Algorithm 1). Both
are in `core.category_mapping`; this module feeds them and measures the result (how much
the source head says about the target classes, how peaked the rows are).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt import core, models
from moe_adapt.methods.co_tuning_checks import RELATIONSHIPS
from moe_adapt.methods.co_tuning_data import Setup
from moe_adapt.train import evaluation
from moe_adapt.train import workdir as workdir_lib

PyTree = Any


def make_logits_fn(setup: Setup) -> Callable:
  """`(variables, x [N, ...]) -> source logits [N, C_s]`, eval mode, batched."""
  model = setup.source_model

  @jax.jit
  def batch_fn(variables, xb):
    feats = model.apply(variables, xb, train=False, method=models.Classifier.features)
    logits = model.apply({"params": variables["params"]}, feats, method=models.Classifier.classify)
    return logits

  def logits_fn(variables, x: np.ndarray) -> np.ndarray:
    bs = setup.config.eval_batch_size
    logits = evaluation.map_batched(functools.partial(batch_fn, variables), x, bs)
    return logits.reshape(len(x), setup.num_source_classes)  # also when N = 0

  return logits_fn


def calibrated_probs(
  logits_fn: Callable, variables: PyTree, x: np.ndarray, temperature: float
) -> np.ndarray:
  """softmax(G(F(x)) / T): [N, C_s] calibrated source probabilities (`make_logits_fn`'s)."""
  return np.asarray(jax.nn.softmax(jnp.asarray(logits_fn(variables, x)) / temperature, -1))


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
  z = jnp.asarray(logits, jnp.float32) / temperature
  return float(core.losses.cross_entropy(z, jnp.asarray(labels, jnp.int32)).mean())


def calibrate(setup: Setup, source_logits_fn: Callable, variables: PyTree) -> dict:
  """The temperature of the source head and its ECE / NLL before and after.

  T is fitted on the source val split and measured on the source test split; without
  source data, T = calibration.temperature and nothing is measured.
  """
  cfg, task = setup.config.calibration, setup.task
  if task.source_val is None:
    return {
      "temperature": float(cfg.temperature),
      "fitted": False,
      "note": "no source data: calibration.temperature is used as given",
    }
  val_logits = source_logits_fn(variables, task.source_val.x)
  if cfg.temperature > 0:
    temperature, fitted = float(cfg.temperature), False
  else:
    temperature = float(core.calibration.fit_temperature(val_logits, task.source_val.y))
    fitted = True
  test_logits = source_logits_fn(variables, task.source_test.x)
  y = task.source_test.y

  def ece(t: float) -> float:
    probs = jax.nn.softmax(jnp.asarray(test_logits) / t, axis=-1)
    return float(core.calibration.expected_calibration_error(probs, y, num_bins=cfg.num_bins))

  return {
    "temperature": temperature,
    "fitted": fitted,
    "fitted_on": f"{task.source_domain} val ({len(task.source_val.y)} examples)",
    "measured_on": f"{task.source_domain} test ({len(y)} examples)",
    "accuracy": float(np.mean(np.argmax(test_logits, -1) == y)),
    "ece_before": ece(1.0),
    "ece_after": ece(temperature),
    "nll_before": _nll(test_logits, y, 1.0),
    "nll_after": _nll(test_logits, y, temperature),
    "num_bins": cfg.num_bins,
  }


def compute_relationship(
  kind: str,
  train_probs: np.ndarray,
  train_labels: np.ndarray,
  val_probs: np.ndarray,
  val_labels: np.ndarray,
  num_target_classes: int,
  *,
  max_iter: int,
) -> np.ndarray:
  """[C_t, C_s] p(y_s | y_t) from calibrated source probabilities on target data.

  `direct`: per-class means over the training and validation subsets pooled (as the
  official code). `reverse`: Algorithm 1, fitted on the training subset, its L2 strength C
  chosen and its map calibrated on the validation subset (on the training subset when the
  validation subset is empty).

  Returns:
    (relationship [C_t, C_s], selection): selection is {} for `direct`, {'C',
    'temperature', 'val_accuracy'} (floats) for `reverse`.
  """
  if kind not in RELATIONSHIPS:
    raise ValueError(f"relationship kind={kind!r} is unknown; accepted: {', '.join(RELATIONSHIPS)}")
  if kind == "direct":
    probs = np.concatenate([train_probs, val_probs.reshape(-1, train_probs.shape[1])])
    labels = np.concatenate([train_labels, val_labels]).astype(np.int32)
    r = core.category_mapping.direct_relationship(probs, labels, num_target_classes)
    return np.asarray(r), {}
  has_val = len(val_labels) > 0
  r, selected = core.category_mapping.reverse_relationship(
    train_probs,
    train_labels,
    num_target_classes,
    val_source_probs=val_probs if has_val else None,
    val_labels=val_labels if has_val else None,
    max_iter=max_iter,
    return_selection=True,
  )
  grid = core.category_mapping.DEFAULT_L2_GRID
  return np.asarray(r), {
    "C": float(grid[int(selected["grid_index"])]),  # exact, not its float32 copy
    "temperature": float(selected["temperature"]),
    "val_accuracy": float(selected["val_accuracy"]),
  }


def relationship_accuracy(
  relationship: np.ndarray, probs: np.ndarray, labels: np.ndarray, prior: np.ndarray
) -> float:
  """Accuracy of predicting y_t from the source head alone through the relationship.

  p(y_t | y_s) ∝ R[y_t, y_s] · p(y_t) (Bayes with the target class prior), then
  p(y_t | x) = Σ_s p(y_t | y_s) f_0(x)_s: how much the source head tells about the target
  classes (a diagnostic of the task, not a variant).
  """
  joint = relationship * prior[:, None]  # [C_t, C_s]
  t_given_s = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1e-30)
  scores = probs @ t_given_s.T  # [N, C_t]
  return float(np.mean(np.argmax(scores, -1) == labels))


def relationship_peakedness(relationship: np.ndarray) -> dict:
  """How concentrated the rows of a [C_t, C_s] relationship are.

  Returns {'mean_row_max': mean over target classes of max_s R[t, s], 'mean_row_entropy':
  mean row entropy in nats, 'max_entropy': log C_s (a uniform row)}.
  """
  r = np.clip(relationship, 1e-12, 1.0)
  entropy = -np.sum(relationship * np.log(r), axis=1)
  return {
    "mean_row_max": float(np.mean(np.max(relationship, axis=1))),
    "mean_row_entropy": float(np.mean(entropy)),
    "max_entropy": float(np.log(relationship.shape[1])),
  }


def save_heatmap(
  path: str | os.PathLike,
  relationship: np.ndarray,
  target_names: Sequence[str],
  source_names: Sequence[str],
  *,
  title: str,
) -> None:
  """The [C_t, C_s] relationship as an annotated heat map PNG (rows: target classes).

  `path` may be local or remote (`gs://...`); the file is replaced in one step.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  c_t, c_s = relationship.shape
  annotate = c_t * c_s <= 400
  fig, ax = plt.subplots(figsize=(min(2.0 + 0.9 * c_s, 24), min(1.5 + 0.6 * c_t, 24)))
  image = ax.imshow(relationship, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
  if c_s <= 40 and c_t <= 40:
    ax.set_xticks(range(c_s), source_names, rotation=45, ha="right")
    ax.set_yticks(range(c_t), target_names)
  if annotate:
    for i in range(c_t):
      for j in range(c_s):
        value = relationship[i, j]
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="black" if value > 0.6 else "white")  # fmt: skip
  ax.set_xlabel("source class y_s")
  ax.set_ylabel("target class y_t")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label="p(y_s | y_t)")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  workdir_lib.write_bytes_atomic(path, buffer.getvalue())
