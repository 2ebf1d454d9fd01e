"""The stages of the cotuned_teachers recipe: Co-Tuning's teachers, MUKI's students.

Each stage is built from the methods' pieces: a teacher is `co_tuning.finetune_variant` on
the union task restricted to its label set (`co_tuning_data.restrict`); the students are
muka's student step on the teachers' MC-dropout scores (`muka.teacher_scores`,
`muka.variant_targets`); the union models are co_tuning's own variants.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_adapt import models
from moe_adapt.methods import co_tuning, muka
from moe_adapt.train import evaluation, stages
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import workdir as workdir_lib

PyTree = Any

DISTILL_VARIANTS = ("muki", "hard", "no_margin", "single_pass", "vanilla_kd", "uhc")
ORACLE_VARIANTS = ("oracle", "oracle_all")


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the stages share.

  Attributes:
    config: the recipe's config.
    union: co_tuning's Setup of the union task (labeled subset at `data.sampling_rate`).
    teachers: teacher k's co_tuning Setup: the union task restricted to label set k.
    student: muka's Setup: the transfer set (the target domain's training images of the
      union classes, labels used only by `oracle_all`), the union test split, the
      teachers' MC-dropout models and the student model; chunks = label sets in union order.
  """

  config: Any
  union: co_tuning.Setup
  teachers: tuple[co_tuning.Setup, ...]
  student: muka.Setup

  @property
  def chunks(self) -> tuple[tuple[int, ...], ...]:
    """Teacher k's classes as indices into the union label order."""
    return self.student.chunks


def relationships_for(
  setup: co_tuning.Setup, source: PyTree, logits_fn, temperature: float, kinds: Sequence[str]
) -> dict[str, np.ndarray]:
  """kind -> [C_t, C_s] relationship on `setup`'s labeled target examples (co_tuning)."""
  task = setup.task
  p_train = co_tuning.calibrated_probs(logits_fn, source, task.target_train.x, temperature)
  p_val = co_tuning.calibrated_probs(logits_fn, source, task.target_val.x, temperature)
  return {
    kind: co_tuning.compute_relationship(
      kind,
      p_train,
      task.target_train.y,
      p_val,
      task.target_val.y,
      setup.num_target_classes,
      max_iter=setup.config.co_tuning.reverse_max_iter,
    )[0]  # the relationship; the reverse approach's choices are not logged here
    for kind in kinds
  }


def needed_kinds(variants: Sequence[str]) -> list[str]:
  """The relationship kinds the co_tuning variants use."""
  return [k for k in co_tuning.RELATIONSHIPS if f"co_tuning_{k}" in variants]


def teacher_variables(state: PyTree) -> dict:
  """A fine-tuned co_tuning state as the {'params': {'backbone', 'head'}, 'batch_stats'} of
  muka's DropoutClassifier (the target head H becomes the head; G is dropped)."""
  params = state["params"]
  return {
    "params": {"backbone": params["backbone"], "head": params["target_head"]},
    "batch_stats": state["batch_stats"],
  }


@functools.partial(jax.jit, static_argnums=0)
def _logits_batch(model: models.DropoutClassifier, variables: dict, xb: jax.Array) -> jax.Array:
  # `model` is static (Linen modules hash by their fields): one compile per architecture.
  return model.apply(variables, xb, train=False)


def concat_teachers_outcomes(setup: Setup, teachers: Sequence[dict]) -> dict[str, list[int]]:
  """Per-example test outcomes of argmax over the teachers' concatenated logits."""
  st = setup.student
  x, bs = st.test.x, setup.config.eval_batch_size
  logits = []
  for k, variables in enumerate(teachers):
    logits_fn = functools.partial(_logits_batch, st.teacher_models[k], variables)
    logits.append(evaluation.map_batched(logits_fn, x, bs))
  return results_lib.outcomes(np.concatenate(logits, axis=1), st.test.y)


def concat_teachers_accuracy(setup: Setup, teachers: Sequence[dict]) -> float:
  """Test accuracy of argmax over the teachers' concatenated logits (no student, no labels)."""
  return results_lib.accuracy(concat_teachers_outcomes(setup, teachers))


def owner_rate(setup: Setup, confidences: np.ndarray) -> float:
  """Fraction of transfer examples whose most confident teacher owns the gold label [N, K]."""
  owner = np.zeros(setup.student.num_classes, np.int64)
  for k, chunk in enumerate(setup.chunks):
    owner[list(chunk)] = k
  return float(np.mean(np.argmax(confidences, axis=1) == owner[setup.student.train.y]))


# ----------------------------------------------------------------------------
# Students
# ----------------------------------------------------------------------------


def student_start(setup: Setup, source: PyTree, tx: optax.GradientTransformation) -> PyTree:
  """The student's initial {'params', 'batch_stats', 'opt_state'} (replicated).

  `student.init='source'`: the pre-trained source backbone (and its BatchNorm statistics)
  with a new head over the union, as MUKI's student starts from the pre-trained PLM;
  'scratch': muka's random initialisation.
  """
  st = setup.student
  state = muka.init_model(st.student_model, st.key("student_init"), st.input_shape, tx)
  if setup.config.student.init == "source":
    params = {**state["params"], "backbone": source["params"]["backbone"]}
    state = {"params": params, "batch_stats": source["batch_stats"], "opt_state": tx.init(params)}
  return mesh_lib.replicate(state, st.mesh)


def oracle_targets(setup: Setup, variant: str) -> tuple[jax.Array, dict]:
  """(images [N, H, W, C], targets of muka's student step) of an oracle variant.

  `oracle`: the union's labeled subset (the teachers' labels, pooled); `oracle_all`: the
  whole transfer set with its labels.
  """
  if variant == "oracle":
    x, y = setup.union.x_target, np.asarray(setup.union.y_target)
  else:
    x, y = setup.student.x_train, setup.student.train.y
  c = setup.student.num_classes
  return x, {
    "targets": np.eye(c, dtype=np.float32)[y],
    "weights": np.ones(len(y), np.float32),
    "temperature": 1.0,
    "scale": 1.0,
    "groups": np.zeros(c, np.int32),
  }


def train_student(
  setup: Setup, workdir: str, stage: str, step_fn, start: PyTree, x: jax.Array, t: dict, writer
) -> dict:
  """One student stage (muka's compiled step) on images `x` with targets `t`; its variables."""
  rep = mesh_lib.replicated(setup.student.mesh)
  arrays = jax.device_put(
    (
      t["targets"].astype(np.float32),
      t["weights"].astype(np.float32),
      t["groups"],
      {"temperature": np.float32(t["temperature"]), "scale": np.float32(t["scale"])},
    ),
    rep,
  )
  # Copies: donation inside the loop must not invalidate the shared starting point.
  state = jax.tree.map(jnp.copy, start)
  cfg = setup.config
  state = stages.run_stage(
    cfg,
    workdir,
    stage,
    stages.bind(step_fn, x, *arrays),
    state,
    cfg.student.steps,
    writer=writer,
    stage_fields={},
  )
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


PARTIAL_FILE = "partial_metrics.json"


@dataclasses.dataclass
class Report:
  """The run's metrics and per-example outcomes by variant, as they are evaluated.

  After every evaluated stage the metrics so far are rewritten to `<workdir>/PARTIAL_FILE`,
  so a long run cut short still shows what it finished.
  """

  workdir: str
  metrics: dict = dataclasses.field(default_factory=dict)
  per_example: dict = dataclasses.field(default_factory=dict)

  def add(self, name: str, metrics: dict, outcomes: dict) -> None:
    self.metrics[name], self.per_example[name] = metrics, outcomes
    if jax.process_index() == 0:
      path = workdir_lib.as_path(self.workdir) / PARTIAL_FILE
      workdir_lib.write_json_atomic(path, self.metrics)


def _with_domain(metrics: dict, domain: str) -> dict:
  """muka's student metrics plus `<domain>` (= the union accuracy), as DESIGN.md's results."""
  return {domain: {"accuracy": metrics["union"]["accuracy"]}, **metrics}


def _student_results(st: muka.Setup, variables: dict, domain: str) -> tuple[dict, dict]:
  """A student's metrics and per-example outcomes, each with `<domain>` = the union's."""
  metrics, outcomes = muka.evaluate_student_outcomes(st, variables)
  return _with_domain(metrics, domain), {domain: outcomes["union"], **outcomes}


# ----------------------------------------------------------------------------
# The stages (run in this order by cotuned_teachers.run)
# ----------------------------------------------------------------------------


def train_teachers(
  setup: Setup, workdir: str, source: PyTree, calibrated: tuple, tx, writer, report: Report
) -> dict[str, list[dict]]:
  """Stages `teacher_<k>_<variant>`: co_tuning's fine-tuning of each label set by each
  teacher variant, evaluated on its classes. `calibrated`: (source logits_fn, T).

  Returns:
    teacher variant -> the K teachers' {'params', 'batch_stats'} as muka's classifiers.
  """
  teachers_by_variant = {}
  for k, t_setup in enumerate(setup.teachers):
    kinds = needed_kinds(setup.config.teachers.variants)
    relationships = relationships_for(t_setup, source, *calibrated, kinds)
    kwargs = co_tuning.finetune_kwargs(t_setup, source, relationships, tx, writer)
    for variant in setup.config.teachers.variants:
      stage = f"teacher_{k}_{variant}"
      state = co_tuning.finetune_variant(t_setup, workdir, variant, stage=stage, **kwargs)
      variables = teacher_variables(state)
      teachers_by_variant.setdefault(variant, []).append(variables)
      report.add(
        f"teacher_{k}_{variant}", *muka.evaluate_teacher_outcomes(setup.student, k, variables)
      )
  return teachers_by_variant


def teachers_diagnostics(
  setup: Setup, workdir: str, t_variant: str, teachers: Sequence[dict], report: Report
) -> tuple[dict, dict]:
  """The teachers' scores on the transfer set (cached in `scores_<variant>/`), their
  concatenation's test accuracy (reported) and how often the most confident teacher owns
  the label. Returns (scores, diagnostics)."""
  scores_dir = workdir_lib.as_path(workdir) / f"scores_{t_variant}"
  scores_dir.mkdir(parents=True, exist_ok=True)
  scores = muka.teacher_scores(setup.student, teachers, str(scores_dir))
  outcomes = concat_teachers_outcomes(setup, teachers)
  concat = {"accuracy": results_lib.accuracy(outcomes)}
  domain = setup.student.domain
  report.add(
    f"teachers_concat_{t_variant}", {domain: concat, "mean": dict(concat)}, {domain: outcomes}
  )
  return scores, {
    "mc_selects_owner": owner_rate(setup, scores["mc"]),
    "single_selects_owner": owner_rate(setup, scores["single"]),
    "mc_mean": [float(v) for v in scores["mc"].mean(axis=0)],
  }


def train_students(
  setup: Setup, workdir: str, source: PyTree, teachers_by_variant: dict, writer, report: Report
) -> dict:
  """Stages `student_<s>_from_<variant>` (muka's student variants from each teacher
  variant's scores) and `student_oracle`, `student_oracle_all`: one start, one compiled
  step. Returns the teachers' diagnostics by teacher variant."""
  config, st = setup.config, setup.student
  tx = optax.adam(config.student.lr)
  step_fn = muka.make_student_step(st, tx)
  start = student_start(setup, source, tx)
  distill = [v for v in config.student.variants if v in DISTILL_VARIANTS]
  diagnostics = {}
  for t_variant, teachers in teachers_by_variant.items():
    scores, diagnostics[t_variant] = teachers_diagnostics(
      setup, workdir, t_variant, teachers, report
    )
    for variant in distill:
      targets = muka.variant_targets(st, variant, scores)
      stage = f"student_{variant}_from_{t_variant}"
      variables = train_student(setup, workdir, stage, step_fn, start, st.x_train, targets, writer)
      report.add(f"{variant}_from_{t_variant}", *_student_results(st, variables, st.domain))
  for variant in config.student.variants:
    if variant in ORACLE_VARIANTS:
      x, targets = oracle_targets(setup, variant)
      stage = f"student_{variant}"
      variables = train_student(setup, workdir, stage, step_fn, start, x, targets, writer)
      report.add(variant, *_student_results(st, variables, st.domain))
  return diagnostics


def train_union(
  setup: Setup, workdir: str, source: PyTree, calibrated: tuple, tx, writer, report: Report
) -> None:
  """Stages `union_<variant>`: co_tuning's single-task models on all classes of the union,
  with the same labels (what splitting the label set costs)."""
  union, variants = setup.union, setup.config.union.variants
  relationships = relationships_for(union, source, *calibrated, needed_kinds(variants))
  kwargs = co_tuning.finetune_kwargs(union, source, relationships, tx, writer)
  predict = co_tuning.make_target_predict(union)
  domain = union.task.target_domain
  for variant in variants:
    state = co_tuning.finetune_variant(union, workdir, variant, stage=f"union_{variant}", **kwargs)
    result, outcomes = co_tuning.evaluate_target_outcomes(union, predict, state)
    metrics = {domain: result, "mean": {"accuracy": result["accuracy"]}}
    report.add(f"union_{variant}", metrics, {domain: outcomes})
