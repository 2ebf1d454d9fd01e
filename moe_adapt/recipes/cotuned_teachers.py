"""Recipe: teachers obtained by Co-Tuning on different label sets, amalgamated by MUKI.

Issue #11, recipe 3. One pre-trained source model (Co-Tuning's `source` stage) is
transferred to K disjoint label sets of a target task, each with few labels; MUKI then
integrates the K transferred teachers into one student over the union of the label sets,
trained on unlabeled target-domain images. Stages (each checkpointed under
`<workdir>/checkpoints/<stage>` and skipped when finished):

1. `source`: co_tuning's pre-training on the source classes (shared through the stage
   cache with every run, co_tuning's own runs included, whose source fields agree).
2. Calibration of the source head and, per teacher, its category relationship, computed
   on the teacher's own labeled examples (co_tuning).
3. `teacher_<k>_<variant>`: teacher k, fine-tuned from the source model on label set k by
   co_tuning's `variant` (e.g. `co_tuning_direct`, or `fine_tune` as the control), with
   the labeled examples of its classes: those of the union's stratified subset at
   `data.sampling_rate`, so all teachers together see exactly the oracle's labels.
4. Teacher scores on the transfer set (muka: `teachers.dropout` MC dropout on the
   teacher's features before its target head), cached in `<workdir>/scores_<variant>/`.
5. `student_<s>_from_<variant>`: muka's student variant s (muki, hard, vanilla_kd, ...)
   trained without labels from the teachers of `variant`; `student_oracle`: the same
   student trained by CE on the union's labeled subset; `student_oracle_all`: on the whole
   transfer set with its labels (muka's oracle).
6. `union_<variant>`: co_tuning's single-task model on all classes of the union, same
   labels (what splitting the label set costs).
7. Evaluation on the target test split of the union classes (after each stage).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from moe_adapt import data, models
from moe_adapt.methods import _checks, co_tuning, muka
from moe_adapt.train import benchmarks, evaluation, stages
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import workdir as workdir_lib

PyTree = Any

DISTILL_VARIANTS = ("muki", "hard", "no_margin", "single_pass", "vanilla_kd", "uhc")
ORACLE_VARIANTS = ("oracle", "oracle_all")
STUDENT_VARIANTS = (*DISTILL_VARIANTS, *ORACLE_VARIANTS)
STUDENT_INITS = ("source", "scratch")


# ----------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------


def _check_label_sets(label_sets) -> tuple[tuple[int, ...], ...]:
  accepted = "a tuple of >= 2 disjoint, non-empty tuples of class indices, e.g. ((3, 4), (6, 9))"
  if isinstance(label_sets, str | bytes) or not isinstance(label_sets, Sequence):
    raise ValueError(f"teachers.label_sets={label_sets!r} is invalid; accepted: {accepted}")
  if len(label_sets) < 2:
    raise ValueError(f"teachers.label_sets={label_sets!r} has < 2 label sets; accepted: {accepted}")
  seen: set[int] = set()
  for k, label_set in enumerate(label_sets):
    if isinstance(label_set, str | bytes) or not isinstance(label_set, Sequence) or not label_set:
      raise ValueError(
        f"teachers.label_sets[{k}]={label_set!r} is invalid; accepted: a non-empty tuple of "
        "class indices"
      )
    for c in label_set:
      if isinstance(c, bool) or not isinstance(c, int) or c < 0:
        raise ValueError(
          f"teachers.label_sets[{k}]={tuple(label_set)!r} is invalid; accepted: class indices >= 0"
        )
      if c in seen:
        raise ValueError(
          f"teachers.label_sets={tuple(map(tuple, label_sets))!r} lists class {c} twice; "
          f"accepted: {accepted}"
        )
      seen.add(c)
  return tuple(tuple(s) for s in label_sets)


def union_classes(config) -> tuple[int, ...]:
  """The student's label space: the teachers' label sets concatenated in teacher order."""
  return tuple(c for label_set in _check_label_sets(config.teachers.label_sets) for c in label_set)


def validate_config(config) -> None:
  """Checks every field this recipe reads; raises ValueError naming the field."""
  integer = functools.partial(_checks.integer, config)
  number = functools.partial(_checks.number, config)
  _check_label_sets(config.teachers.label_sets)
  _checks.names(config, "teachers.variants", co_tuning.VARIANTS)
  _checks.names(config, "union.variants", co_tuning.VARIANTS, allow_empty=True)
  _checks.names(config, "student.variants", STUDENT_VARIANTS)
  _checks.choice(config, "student.init", STUDENT_INITS)
  for name in ("teachers.dropout", "student.dropout"):
    number(name, low=0.0, high=1.0, low_open=False)
  integer("data.transfer_per_class", 0)
  for name in ("student.steps", "student.batch_size", "muki.num_mc_samples"):
    integer(name, 1)
  for name in (
    "student.lr",
    "muki.score_temperature",
    "muki.kd_temperature",
    "vanilla_kd.temperature",
    "uhc.temperature",
  ):
    number(name, low=0.0)
  _checks.choice(config, "muki.integration", muka.INTEGRATION_MODES)
  if not isinstance(config.muki.margin, bool):
    raise ValueError(f"muki.margin={config.muki.margin!r} is invalid; accepted: True or False")
  # Every field the recipe shares with co_tuning (data, model, source, calibration,
  # finetune, co_tuning, l2_sp, ...), named as in this config.
  co_tuning.validate_config(co_tuning_config(config))


def co_tuning_config(config) -> ml_collections.ConfigDict:
  """The co_tuning config of the union task: this config plus the fields co_tuning reads.

  The target classes are the union of the label sets; the source model is always
  pre-trained here (no checkpoint). Shared fields keep their names and values, so the
  `source` stage's cache key equals co_tuning's for the same source settings.
  """
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.target_classes = union_classes(config)
  c.model.source_checkpoint = ""
  c.model.num_source_classes = 0
  c.variants = tuple(dict.fromkeys((*config.teachers.variants, *config.union.variants)))
  # co_tuning's validation hold-out (20 % of the target pool, fixed per seed) and no
  # selection grid: the teachers use the configured lr, λ and α.
  c.data.val_fraction = 0.2
  c.selection = ml_collections.ConfigDict({"lr_grid": (), "trade_off_grid": (), "alpha_grid": ()})
  return c


# ----------------------------------------------------------------------------
# Setup: the union task, the teachers' tasks, the student's transfer set
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TeacherSetup(co_tuning.Setup):
  """co_tuning's Setup of teacher `index`: its own PRNG streams (head init, batches)."""

  index: int = 0

  def key(self, stage: str) -> jax.Array:
    base = super().key(stage)
    return base if stage == "source" else jax.random.fold_in(base, 1 + self.index)


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
  teachers: tuple[TeacherSetup, ...]
  student: muka.Setup

  @property
  def chunks(self) -> tuple[tuple[int, ...], ...]:
    """Teacher k's classes as indices into the union label order."""
    return self.student.chunks


def _restrict(split: data.Split, positions: Sequence[int]) -> data.Split:
  """The examples whose label is in `positions`, relabelled 0..len-1 (an empty split stays)."""
  relabel = np.full(max(max(positions), int(split.y.max(initial=0))) + 1, -1, np.int32)
  relabel[list(positions)] = np.arange(len(positions), dtype=np.int32)
  keep = np.isin(split.y, positions)
  return data.Split(split.x[keep], relabel[split.y[keep]])


def teacher_task(task: co_tuning.Task, positions: Sequence[int]) -> co_tuning.Task:
  """The union task restricted to the classes at `positions` of the union label order."""
  return dataclasses.replace(
    task,
    target_names=tuple(task.target_names[p] for p in positions),
    target_train=_restrict(task.target_train, positions),
    target_val=_restrict(task.target_val, positions),
    target_test=_restrict(task.target_test, positions),
  )


def make_setup(config) -> Setup:
  """Loads the data, builds the tasks and models; every data-dependent check happens here."""
  validate_config(config)
  num_classes = benchmarks.benchmark(config.data).num_classes
  bad = [c for c in union_classes(config) if c >= num_classes]
  if bad:
    raise ValueError(
      f"teachers.label_sets has class(es) {bad} beyond benchmark {config.data.benchmark!r}'s "
      f"{num_classes} classes; accepted: indices in [0, {num_classes})"
    )
  ct_config = co_tuning_config(config)
  union = co_tuning.make_setup(ct_config)
  task, rep = union.task, mesh_lib.replicated(union.mesh)
  backbone = union.target_model.backbone
  bounds = np.cumsum([0, *map(len, config.teachers.label_sets)])
  chunks = tuple(tuple(range(bounds[k], bounds[k + 1])) for k in range(len(bounds) - 1))

  teachers = []
  for k, chunk in enumerate(chunks):
    t_task = teacher_task(task, chunk)
    teachers.append(
      TeacherSetup(
        config=ct_config,
        task=t_task,
        mesh=union.mesh,
        source_model=union.source_model,
        target_model=models.Classifier(backbone=backbone, num_classes=len(chunk)),
        x_source=union.x_source,
        y_source=union.y_source,
        x_target=jax.device_put(t_task.target_train.x, rep),
        y_target=jax.device_put(t_task.target_train.y, rep),
        index=k,
      )
    )

  # The transfer set: co_tuning's whole target pool of the union (train capped at
  # transfer_per_class, and val), validation hold-out included; the labeled subset is part
  # of it (both pools take each class's first images in split order).
  transfer_config = co_tuning_config(config)
  transfer_config.data.target_train_per_class = config.data.transfer_per_class
  transfer_config.data.sampling_rate = 1.0
  transfer_task = co_tuning.make_task(transfer_config)
  transfer = co_tuning.concat_splits(transfer_task.target_train, transfer_task.target_val)

  def classifier(num_classes: int, rate: float) -> models.DropoutClassifier:
    return models.DropoutClassifier(backbone=backbone, num_classes=num_classes, rate=rate)

  student = muka.Setup(
    config=config,
    domain=task.target_domain,
    class_names=task.target_names,
    chunks=chunks,
    train=transfer,
    test=task.target_test,
    input_shape=task.input_shape,
    mesh=union.mesh,
    teacher_models=tuple(classifier(len(c), config.teachers.dropout) for c in chunks),
    student_model=classifier(len(task.target_names), config.student.dropout),
    x_train=jax.device_put(transfer.x, rep),
  )
  return Setup(config=config, union=union, teachers=tuple(teachers), student=student)


# ----------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------


def relationships_for(
  setup: co_tuning.Setup, source: PyTree, logits_fn, temperature: float, kinds: Sequence[str]
) -> dict[str, np.ndarray]:
  """kind -> [C_t, C_s] relationship on `setup`'s labeled target examples (co_tuning)."""
  task = setup.task

  def probs(x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.softmax(jnp.asarray(logits_fn(source, x)) / temperature, -1))

  p_train, p_val = probs(task.target_train.x), probs(task.target_val.x)
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


def _save_partial(workdir: str, metrics: dict) -> None:
  """The metrics so far, rewritten after every evaluated stage (long runs cut short)."""
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(workdir_lib.as_path(workdir) / PARTIAL_FILE, metrics)


def _with_domain(metrics: dict, domain: str) -> dict:
  """muka's student metrics plus `<domain>` (= the union accuracy), as DESIGN.md's results."""
  return {domain: {"accuracy": metrics["union"]["accuracy"]}, **metrics}


def _student_results(st: muka.Setup, variables: dict, domain: str) -> tuple[dict, dict]:
  """A student's metrics and per-example outcomes, each with `<domain>` = the union's."""
  metrics, outcomes = muka.evaluate_student_outcomes(st, variables)
  return _with_domain(metrics, domain), {domain: outcomes["union"], **outcomes}


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md."""
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  union, st = setup.union, setup.student
  domain = union.task.target_domain
  logging.info(
    "cotuned_teachers: label sets %s of %s, %d labeled / %d transfer / %d test images",
    [[union.task.target_names[p] for p in chunk] for chunk in setup.chunks],
    domain,
    len(union.task.target_train.y),
    len(st.train.y),
    len(st.test.y),
  )
  writer = metrics_lib.MetricWriter(workdir)
  metrics, diagnostics, per_example = {}, {}, {}

  # 1-2. The shared source model, its calibration, the relationships.
  source = co_tuning.pretrained_source(union, workdir, writer)
  logits_fn = co_tuning.make_logits_fn(union)
  calibration = co_tuning.calibrate(union, logits_fn, source)
  temperature = calibration["temperature"]
  ct_config = union.config
  tx = co_tuning.make_optimizer(ct_config)

  # 3. Teachers: one co_tuning fine-tuning per (teacher variant, label set).
  teachers_by_variant = {}
  for k, t_setup in enumerate(setup.teachers):
    relationships = relationships_for(
      t_setup, source, logits_fn, temperature, needed_kinds(config.teachers.variants)
    )
    step_fn = co_tuning.make_finetune_step(t_setup, tx)
    start = co_tuning.finetune_start(t_setup, source)
    for variant in config.teachers.variants:
      state = co_tuning.finetune_variant(
        t_setup,
        workdir,
        variant,
        source=source,
        start=start,
        relationships=relationships,
        step_fn=step_fn,
        tx=tx,
        writer=writer,
        stage=f"teacher_{k}_{variant}",
      )
      variables = teacher_variables(state)
      teachers_by_variant.setdefault(variant, []).append(variables)
      name = f"teacher_{k}_{variant}"
      metrics[name], per_example[name] = muka.evaluate_teacher_outcomes(st, k, variables)
      _save_partial(workdir, metrics)

  # 4-5. Teacher scores, then the students (all from one start, one compiled step).
  student_tx = optax.adam(config.student.lr)
  student_step = muka.make_student_step(st, student_tx)
  student_init = student_start(setup, source, student_tx)
  distill = [v for v in config.student.variants if v in DISTILL_VARIANTS]
  for t_variant, teachers in teachers_by_variant.items():
    scores_dir = workdir_lib.as_path(workdir) / f"scores_{t_variant}"
    scores_dir.mkdir(parents=True, exist_ok=True)
    scores = muka.teacher_scores(st, teachers, str(scores_dir))
    outcomes = concat_teachers_outcomes(setup, teachers)
    concat = {"accuracy": results_lib.accuracy(outcomes)}
    metrics[f"teachers_concat_{t_variant}"] = {domain: concat, "mean": dict(concat)}
    per_example[f"teachers_concat_{t_variant}"] = {domain: outcomes}
    diagnostics[t_variant] = {
      "mc_selects_owner": owner_rate(setup, scores["mc"]),
      "single_selects_owner": owner_rate(setup, scores["single"]),
      "mc_mean": [float(v) for v in scores["mc"].mean(axis=0)],
    }
    for variant in distill:
      targets = muka.variant_targets(st, variant, scores)
      variables = train_student(
        setup,
        workdir,
        f"student_{variant}_from_{t_variant}",
        student_step,
        student_init,
        st.x_train,
        targets,
        writer,
      )
      name = f"{variant}_from_{t_variant}"
      metrics[name], per_example[name] = _student_results(st, variables, domain)
      _save_partial(workdir, metrics)
  for variant in config.student.variants:
    if variant in ORACLE_VARIANTS:
      x, targets = oracle_targets(setup, variant)
      variables = train_student(
        setup, workdir, f"student_{variant}", student_step, student_init, x, targets, writer
      )
      metrics[variant], per_example[variant] = _student_results(st, variables, domain)
      _save_partial(workdir, metrics)

  # 6. co_tuning's single-task models on the union, with the same labels (last: the
  # students are the recipe's point, and a run cut short has them).
  if config.union.variants:
    relationships = relationships_for(
      union, source, logits_fn, temperature, needed_kinds(config.union.variants)
    )
    step_fn = co_tuning.make_finetune_step(union, tx)
    start = co_tuning.finetune_start(union, source)
    predict = co_tuning.make_target_predict(union)
    for variant in config.union.variants:
      state = co_tuning.finetune_variant(
        union,
        workdir,
        variant,
        source=source,
        start=start,
        relationships=relationships,
        step_fn=step_fn,
        tx=tx,
        writer=writer,
        stage=f"union_{variant}",
      )
      result, outcomes = co_tuning.evaluate_target_outcomes(union, predict, state)
      metrics[f"union_{variant}"] = {domain: result, "mean": {"accuracy": result["accuracy"]}}
      per_example[f"union_{variant}"] = {domain: outcomes}
      _save_partial(workdir, metrics)

  writer.close()

  task = union.task
  return {
    "method": "cotuned_teachers",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "source_domains": [task.source_domain],
    "target_domains": [domain],
    "source_classes": list(task.source_names),
    "teacher_classes": [[task.target_names[p] for p in chunk] for chunk in setup.chunks],
    "sampling_rate": float(config.data.sampling_rate),
    "num_examples": {
      "labeled": len(task.target_train.y),
      "labeled_per_teacher": [len(t.task.target_train.y) for t in setup.teachers],
      "transfer": len(st.train.y),
      "test": len(st.test.y),
    },
    "source_calibration": calibration,
    "confidences": diagnostics,
    "metrics": metrics,
    results_lib.PER_EXAMPLE: per_example,
  }
