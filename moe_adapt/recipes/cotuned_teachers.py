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

import functools
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from moe_adapt import data, models
from moe_adapt.methods import _checks, co_tuning, co_tuning_data, muka
from moe_adapt.recipes.cotuned_teachers_stages import (
  DISTILL_VARIANTS,
  ORACLE_VARIANTS,
  Report,
  Setup,
  train_students,
  train_teachers,
  train_union,
)
from moe_adapt.train import benchmarks
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib

PyTree = Any
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
  # The baseline of the recipe's table, vanilla_kd_from_fine_tune: vanilla KD from
  # fine-tuned teachers (launch.collect.BASELINES).
  _checks.runs_baseline(config, "teachers.variants", co_tuning.BASELINE)
  _checks.runs_baseline(config, "student.variants", "vanilla_kd")
  _checks.runs_baseline(config, "union.variants", co_tuning.BASELINE)
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
  # Every co_tuning variant the recipe trains (and co_tuning's baseline, so that its check
  # of the list holds; the recipe checks its own lists).
  variants = (co_tuning.BASELINE, *config.teachers.variants, *config.union.variants)
  c.variants = tuple(dict.fromkeys(variants))
  # co_tuning's validation hold-out (20 % of the target pool, fixed per seed) and no
  # selection grid: the teachers use the configured lr, λ and α.
  c.data.val_fraction = 0.2
  c.selection = ml_collections.ConfigDict({"lr_grid": (), "trade_off_grid": (), "alpha_grid": ()})
  return c


# ----------------------------------------------------------------------------
# Setup: the union task, the teachers' tasks, the student's transfer set
# ----------------------------------------------------------------------------
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
  union = co_tuning.make_setup(co_tuning_config(config))
  bounds = np.cumsum([0, *map(len, config.teachers.label_sets)])
  chunks = tuple(tuple(range(bounds[k], bounds[k + 1])) for k in range(len(bounds) - 1))
  # Teacher k: the union task restricted to label set k, with its own head and batch streams.
  teachers = tuple(
    co_tuning_data.restrict(union, chunk, stream=1 + k) for k, chunk in enumerate(chunks)
  )
  return Setup(
    config=config, union=union, teachers=teachers, student=student_setup(config, union, chunks)
  )


def transfer_set(config) -> data.Split:
  """The student's transfer set: co_tuning's whole target pool of the union.

  The target domain's training images of the union classes (at most
  `data.transfer_per_class` each) and its val split, validation hold-out included; the
  labeled subset is part of it (both pools take each class's first images in split order).
  """
  transfer_config = co_tuning_config(config)
  transfer_config.data.target_train_per_class = config.data.transfer_per_class
  transfer_config.data.sampling_rate = 1.0
  task = co_tuning_data.make_task(transfer_config)
  return co_tuning_data.concat_splits(task.target_train, task.target_val)


def student_setup(config, union: co_tuning.Setup, chunks) -> muka.Setup:
  """muka's Setup of the students: the transfer set, the union's test split, the teachers'
  MC-dropout models (chunks = their label sets in union order) and the student model."""
  transfer = transfer_set(config)
  backbone, task = union.target_model.backbone, union.task

  def classifier(num_classes: int, rate: float) -> models.DropoutClassifier:
    return models.DropoutClassifier(backbone=backbone, num_classes=num_classes, rate=rate)

  return muka.Setup(
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
    x_train=jax.device_put(transfer.x, mesh_lib.replicated(union.mesh)),
  )


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md."""
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  union, st = setup.union, setup.student
  logging.info(
    "cotuned_teachers: label sets %s of %s, %d labeled / %d transfer / %d test images",
    [[union.task.target_names[p] for p in chunk] for chunk in setup.chunks],
    st.domain,
    len(union.task.target_train.y),
    len(st.train.y),
    len(st.test.y),
  )
  writer = metrics_lib.MetricWriter(workdir)
  report = Report(workdir)

  # 1-2. The shared source model, its calibration; 3. the teachers.
  source = co_tuning.pretrained_source(union, workdir, writer)
  logits_fn = co_tuning.make_logits_fn(union)
  calibration = co_tuning.calibrate(union, logits_fn, source)
  calibrated = (logits_fn, calibration["temperature"])
  tx = co_tuning.make_optimizer(union.config)
  teachers = train_teachers(setup, workdir, source, calibrated, tx, writer, report)
  # 4-5. Teacher scores, then the students.
  diagnostics = train_students(setup, workdir, source, teachers, writer, report)
  # 6. The single-task models on the union (last: the students are the recipe's point, and
  # a run cut short has them).
  if config.union.variants:
    train_union(setup, workdir, source, calibrated, tx, writer, report)
  writer.close()
  return {
    **_run_header(setup),
    "source_calibration": calibration,
    "confidences": diagnostics,
    "metrics": report.metrics,
    results_lib.PER_EXAMPLE: report.per_example,
  }


def _run_header(setup: Setup) -> dict:
  """The results' description of the run: method, data, class names, example counts."""
  config, task, st = setup.config, setup.union.task, setup.student
  return {
    "method": "cotuned_teachers",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "source_domains": [task.source_domain],
    "target_domains": [task.target_domain],
    "source_classes": list(task.source_names),
    "teacher_classes": [[task.target_names[p] for p in chunk] for chunk in setup.chunks],
    "sampling_rate": float(config.data.sampling_rate),
    "num_examples": {
      "labeled": len(task.target_train.y),
      "labeled_per_teacher": [len(t.task.target_train.y) for t in setup.teachers],
      "transfer": len(st.train.y),
      "test": len(st.test.y),
    },
  }
