"""MUKA's supervised stages, its baselines' targets, and evaluation.

Around the method (`methods.muka`: scores, integration, distillation) these are plain
supervised pieces: teacher k is trained by cross-entropy on the labelled transfer examples
of its classes (stage `teacher_<k>`, shared by the runs of a sweep through the stage
cache), a student stage optionally keeps the best of several checkpoints on labelled
validation data, and models are evaluated on the test split. The distillation targets
of the baselines are here too: vanilla KD's (`merged_logits`) and UHC's (`uhc_targets`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_adapt import core, models
from moe_adapt.methods.muka_setup import PyTree, Setup, init_model
from moe_adapt.train import evaluation, stages, steps
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import results as results_lib

# The config fields each reusable stage depends on (see train/stage_cache.py). Teachers do
# not depend on the run's seed nor on anything about the student.
TEACHER_FIELDS = (
  "data.benchmark",
  "data.options",
  "data.benchmark_seed",
  "data.domain",
  "data.train_per_class",
  "model",
  "teachers",
  "num_devices",
)


def make_teacher_step(setup: Setup, k: int, tx: optax.GradientTransformation) -> Callable:
  """`jitted(state, step, x, y)`: CE on teacher k's classes (y = local index in chunks[k])."""
  cfg, model = setup.config.teachers, setup.teacher_models[k]
  base = setup.key("teacher", k)

  def step(state, step, x, y):
    key = jax.random.fold_in(base, step + 1)
    idx_key, drop_key = jax.random.split(key)
    idx = jax.random.randint(idx_key, (cfg.batch_size,), 0, y.shape[0])
    xb = mesh_lib.constrain_batch(x[idx], setup.mesh)

    def loss(logits):
      return core.losses.cross_entropy(logits, y[idx]).mean()

    state, value = steps.supervised_update(
      state, model, tx, xb, loss, rngs={"dropout": drop_key}, train=True, stochastic=True
    )
    return state, {"loss": value}

  return jax.jit(step, donate_argnums=0)


def train_teachers(setup: Setup, workdir: str, writer) -> list[dict]:
  """Stages `teacher_<k>`: each teacher's {'params', 'batch_stats'}."""
  cfg = setup.config.teachers
  rep = mesh_lib.replicated(setup.mesh)
  teachers = []
  for k in range(setup.num_teachers):
    tx = optax.adam(cfg.lr)
    state = init_model(setup.teacher_models[k], setup.key("teacher", k), setup.input_shape, tx)
    x = jax.device_put(setup.train.x[setup.teacher_examples(k)], rep)
    y = jax.device_put(setup.teacher_labels(k), rep)
    step = stages.bind(make_teacher_step(setup, k, tx), x, y)
    state = mesh_lib.replicate(state, setup.mesh)
    state = stages.run_stage(
      setup.config,
      workdir,
      f"teacher_{k}",
      step,
      state,
      cfg.steps,
      writer=writer,
      stage_fields={f"teacher_{k}": TEACHER_FIELDS},
    )
    teachers.append({"params": state["params"], "batch_stats": state["batch_stats"]})
  return teachers


def train_student(
  setup: Setup, workdir: str, stage: str, step_fn: Callable, start: PyTree, writer
) -> tuple[dict, dict | None]:
  """Stage `<stage>`: one student from `start`; its checkpoint chosen on validation.

  With `student.select_checkpoints` = n > 1 the stage runs in n segments and keeps the
  checkpoint (of the n segment ends) with the best accuracy on the labelled validation
  split (`setup.val`; ties to the earlier), as the official code keeps its best evaluated
  checkpoint. Target test data is never looked at.

  Returns:
    ({'params', 'batch_stats'} of the chosen checkpoint, the selection record or None).
  """
  cfg = setup.config
  n = cfg.student.get("select_checkpoints", 1)
  # Copies: donation inside the loop must not invalidate the shared starting point.
  state = jax.tree.map(jnp.copy, start)
  _, kept = stages.run_in_segments(
    cfg,
    workdir,
    stage,
    step_fn,
    state,
    cfg.student.steps,
    n,
    writer=writer,
    stage_fields={},
    keep=lambda st: {"params": st["params"], "batch_stats": st["batch_stats"]},
  )
  if n == 1:
    return kept[-1][1], None
  scores = {
    step: float(np.mean(_predict(setup, setup.student_model, v, setup.val.x) == setup.val.y))
    for step, v in kept
  }
  best = stages.choose(scores)
  record = {
    "checkpoint_step": best,
    "val_accuracy": scores[best],
    "scores": {f"step{step}": acc for step, acc in scores.items()},
  }
  return dict(kept)[best], record


def softmax_np(z: np.ndarray) -> np.ndarray:
  """Softmax over the last axis (NumPy)."""
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def merged_logits(logits: Sequence[np.ndarray], chunks, num_classes: int) -> np.ndarray:
  """Teachers' logits in the union label space: [N, C], a shared class gets their mean.

  Vanilla KD's input. With disjoint chunks in label order this is the concatenation; the
  official VKD "merges overlapping logits": here, per union class, the mean of the logits
  of the teachers whose label set holds it. Every class must be covered by some teacher.

  Args:
    logits: K arrays [N, C_k], teacher k's class i being union class chunks[k][i].
    chunks: K sequences of union class indices.
    num_classes: the union size C.
  """
  total = np.zeros((len(logits[0]), num_classes), np.float64)
  count = np.zeros(num_classes, np.int64)
  for z, chunk in zip(logits, chunks):
    total[:, list(chunk)] += z
    count[list(chunk)] += 1
  if not np.all(count):
    raise ValueError(
      f"classes {np.flatnonzero(count == 0).tolist()} belong to no teacher; accepted: label "
      "sets that cover the union"
    )
  return (total / count).astype(np.float32)


def uhc_targets(setup: Setup, logits: Sequence[np.ndarray], settings: dict) -> dict:
  """UHC's targets: each teacher's softened distribution over its own classes."""
  t = setup.config.uhc.temperature
  n, c, k_num = len(setup.train.y), setup.num_classes, setup.num_teachers
  coefs = {"temperature": t, "scale": t * t}
  if setup.overlapping:
    targets = np.zeros((n, k_num, c), np.float32)
    for k, chunk in enumerate(setup.chunks):
      targets[:, k, list(chunk)] = softmax_np(logits[k] / t)
    return {**settings, **coefs, "targets": targets, "groups": setup.membership()}
  targets = np.zeros((n, c), np.float32)
  groups = np.zeros(c, np.int32)
  for k, chunk in enumerate(setup.chunks):
    targets[:, list(chunk)] = softmax_np(logits[k] / t)
    groups[list(chunk)] = k
  return {**settings, **coefs, "targets": targets, "groups": groups}


@functools.partial(jax.jit, static_argnums=0)
def _predict_batch(model: models.DropoutClassifier, variables: dict, xb: jax.Array) -> jax.Array:
  # `model` is static (Linen modules hash by their fields): one compile per architecture.
  return jnp.argmax(model.apply(variables, xb, train=False), axis=-1)


def _predict(
  setup: Setup, model: models.DropoutClassifier, variables: dict, x: np.ndarray
) -> np.ndarray:
  """Argmax predictions [N] of `model` (eval mode, dropout off)."""
  predict = functools.partial(_predict_batch, model, variables)
  return evaluation.map_batched(predict, x, setup.config.eval_batch_size)


def evaluate_student_outcomes(setup: Setup, variables: dict) -> tuple[dict, dict]:
  """`evaluate_student`'s metrics and per-example outcomes ({'union', 'subset_k'}: outcomes)."""
  y = setup.test.y
  pred = _predict(setup, setup.student_model, variables, setup.test.x)
  per_example = {"union": results_lib.outcomes(pred, y)}
  for k, chunk in enumerate(setup.chunks):
    mask = np.isin(y, chunk)
    per_example[f"subset_{k}"] = results_lib.outcomes(pred[mask], y[mask])
  out = {name: {"accuracy": results_lib.accuracy(o)} for name, o in per_example.items()}
  out["mean"] = {"accuracy": out["union"]["accuracy"]}
  return out, per_example


def evaluate_student(setup: Setup, variables: dict) -> dict:
  """Accuracy over the union labels and on each teacher's label set (test split).

  With overlapping label sets the subsets overlap (a shared class counts in both).
  """
  return evaluate_student_outcomes(setup, variables)[0]


def evaluate_teacher_outcomes(setup: Setup, k: int, variables: dict) -> tuple[dict, dict]:
  """`evaluate_teacher`'s metrics and per-example outcomes ({'subset_k': outcomes})."""
  chunk = np.asarray(setup.chunks[k])
  mask = np.isin(setup.test.y, chunk)
  pred = _predict(setup, setup.teacher_models[k], variables, setup.test.x[mask])
  outcomes = results_lib.outcomes(chunk[pred], setup.test.y[mask])
  acc = results_lib.accuracy(outcomes)
  return {f"subset_{k}": {"accuracy": acc}, "mean": {"accuracy": acc}}, {f"subset_{k}": outcomes}


def evaluate_teacher(setup: Setup, k: int, variables: dict) -> dict:
  """Teacher k's accuracy on the test examples of its own classes (argmax over them)."""
  return evaluate_teacher_outcomes(setup, k, variables)[0]


def owner_rate(setup: Setup, confidences: np.ndarray) -> float:
  """Fraction of transfer examples whose most confident teacher knows the gold label."""
  knows = setup.membership() > 0  # [K, C]
  return float(np.mean(knows[np.argmax(confidences, axis=1), setup.train.y]))
