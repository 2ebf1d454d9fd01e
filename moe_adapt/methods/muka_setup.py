"""MUKA's configuration, data and models: validation, the teachers' label sets, `Setup`.

The method itself (scores, integration, students) is `methods.muka`; this module holds what
its stages share: the checks of every config field, the teachers' label chunks, the
transfer / test / validation sets of the domain, and the teacher and student classifiers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt import data, models
from moe_adapt.methods import _checks
from moe_adapt.train import benchmarks
from moe_adapt.train import mesh as mesh_lib

PyTree = Any

INTEGRATION_MODES = ("hard", "soft")
STUDENT_VARIANTS = ("muki", "hard", "no_margin", "single_pass", "vanilla_kd", "uhc", "oracle")
VARIANTS = (*STUDENT_VARIANTS, "teachers")


# ----------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------


def _check_variants(variants) -> None:
  if isinstance(variants, str) or not isinstance(variants, Sequence) or not variants:
    raise ValueError(
      f"variants={variants!r} is invalid; accepted: a non-empty tuple of {', '.join(VARIANTS)}"
    )
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"variants has unknown {v!r}; accepted: {', '.join(VARIANTS)}")
  if len(set(variants)) != len(variants):
    raise ValueError(f"variants={tuple(variants)!r} lists a variant twice")


def validate_config(config) -> None:
  """Checks every field this method reads; raises ValueError naming the field."""

  integer = functools.partial(_checks.integer, config)
  number = functools.partial(_checks.number, config)

  for name in ("seed", "teachers.seed", "data.benchmark_seed", "num_devices"):
    integer(name, 0)
  for name in ("data.train_per_class", "data.test_per_class"):
    integer(name, 0)
  if "val_per_class" in config.data:
    integer("data.val_per_class", 0)
  if "select_checkpoints" in config.student:
    integer("student.select_checkpoints", 1)
  integer("teachers.num_teachers", 2)
  if "overlap" in config.teachers:  # its upper bound depends on the class count: make_setup
    integer("teachers.overlap", 0)
  for name in (
    "teachers.steps",
    "teachers.batch_size",
    "student.steps",
    "student.batch_size",
    "muki.num_mc_samples",
    "eval_batch_size",
    "checkpoint_every",
    "log_every",
  ):
    integer(name, 1)
  for name in (
    "teachers.lr",
    "student.lr",
    "muki.score_temperature",
    "muki.kd_temperature",
    "vanilla_kd.temperature",
    "uhc.temperature",
  ):
    number(name, low=0.0)
  number("model.dropout", low=0.0, high=1.0, low_open=False)
  if config.muki.integration not in INTEGRATION_MODES:
    raise ValueError(
      f"muki.integration={config.muki.integration!r} is unknown; accepted: "
      f"{', '.join(INTEGRATION_MODES)}"
    )
  if not isinstance(config.muki.margin, bool):
    raise ValueError(f"muki.margin={config.muki.margin!r} is invalid; accepted: True or False")
  if not isinstance(config.data.domain, str):
    raise ValueError(f"data.domain={config.data.domain!r} is invalid; accepted: a string")
  _check_variants(config.variants)
  _check_teacher_options(config.teachers.get("backbone_options", ()))


def _check_teacher_options(options) -> None:
  """`teachers.backbone_options`: () or a sequence of dicts (one per teacher)."""
  if (
    isinstance(options, str)
    or not isinstance(options, Sequence)
    or not all(isinstance(o, Mapping) for o in options)
  ):
    raise ValueError(
      f"teachers.backbone_options={options!r} is invalid; accepted: () or one dict of "
      "backbone options per teacher, e.g. ({'hidden_dim': 128}, {'hidden_dim': 512})"
    )


# ----------------------------------------------------------------------------
# Data: the teachers' label chunks, the transfer and test sets
# ----------------------------------------------------------------------------


def label_chunks(
  num_classes: int, num_teachers: int, *, overlap: int = 0
) -> tuple[tuple[int, ...], ...]:
  """Teacher label sets: contiguous chunks of range(C), each extended into the next one.

  The base chunks have ⌊C / K⌋ classes each, the last takes the remainder (the official
  split). Teacher k's set is its chunk followed by the first `overlap` classes of teacher
  k+1's chunk (the last teacher's: of teacher 0's chunk, cyclically), so neighbouring
  teachers share `overlap` classes and every class belongs to one or two teachers. Teacher
  k's local class i is global class `chunks[k][i]`. overlap=0 gives the disjoint chunks.

  Raises:
    ValueError: naming teachers.num_teachers unless 2 <= K <= C; naming teachers.overlap
      unless 0 <= overlap <= ⌊C / K⌋ − 1 (every teacher keeps a class of its own).
  """
  if not 2 <= num_teachers <= num_classes:
    raise ValueError(
      f"teachers.num_teachers={num_teachers} is invalid for {num_classes} classes; accepted: "
      f"an integer in [2, {num_classes}] (each teacher needs at least one class)"
    )
  size = num_classes // num_teachers
  if isinstance(overlap, bool) or not isinstance(overlap, int | np.integer):
    raise ValueError(f"teachers.overlap={overlap!r} is invalid; accepted: an integer >= 0")
  if not 0 <= overlap <= size - 1:
    raise ValueError(
      f"teachers.overlap={overlap} is invalid for {num_classes} classes and {num_teachers} "
      f"teachers; accepted: an integer in [0, {size - 1}] (chunks of {size} classes: every "
      "teacher keeps a class of its own)"
    )
  bounds = [k * size for k in range(num_teachers)] + [num_classes]
  base = [tuple(range(bounds[k], bounds[k + 1])) for k in range(num_teachers)]
  return tuple(base[k] + base[(k + 1) % num_teachers][: int(overlap)] for k in range(num_teachers))


def cap_per_class(split: data.Split, num_classes: int, cap: int, *, where: str) -> data.Split:
  """The first `cap` examples of each class (all when cap == 0), in split order.

  Splits are already shuffled by the benchmark, so this is a fixed random subset.

  Raises:
    ValueError: naming `where` and the class when a class has no example.
  """
  keep = np.zeros(len(split.y), bool)
  for c in range(num_classes):
    idx = np.flatnonzero(split.y == c)
    if not len(idx):
      raise ValueError(f"{where} has no example of class {c}; accepted: every class present")
    keep[idx[:cap] if cap else idx] = True
  return data.Split(split.x[keep], split.y[keep])


# ----------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the stages share, derived from the config and the data."""

  config: Any
  domain: str
  class_names: tuple[str, ...]
  chunks: tuple[tuple[int, ...], ...]  # teacher k's global class indices (may overlap)
  train: data.Split  # the transfer set (labels used only by teachers and the oracle)
  test: data.Split
  input_shape: tuple[int, ...]  # of one example: (H, W, C) or (D,)
  mesh: jax.sharding.Mesh
  teacher_models: tuple[models.DropoutClassifier, ...]
  student_model: models.DropoutClassifier
  x_train: jax.Array  # [N, *input_shape] the transfer set's inputs, replicated
  # Labelled validation data for the students' checkpoint selection (None: no selection).
  val: data.Split | None = None

  @property
  def num_teachers(self) -> int:
    return len(self.chunks)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def overlapping(self) -> bool:
    """Whether some class belongs to more than one teacher."""
    return sum(map(len, self.chunks)) != len(set().union(*self.chunks))

  def membership(self) -> np.ndarray:
    """[K, C] float32: 1 where class c is in teacher k's label set."""
    mask = np.zeros((self.num_teachers, self.num_classes), np.float32)
    for k, chunk in enumerate(self.chunks):
      mask[k, list(chunk)] = 1.0
    return mask

  def teacher_examples(self, k: int) -> np.ndarray:
    """Indices into the transfer set of teacher k's classes."""
    return np.flatnonzero(np.isin(self.train.y, self.chunks[k]))

  def teacher_labels(self, k: int) -> np.ndarray:
    """int32 [N_k]: teacher k's local labels (index in chunks[k]) of `teacher_examples(k)`."""
    local = np.full(self.num_classes, -1, np.int32)  # global class -> teacher k's index
    local[list(self.chunks[k])] = np.arange(len(self.chunks[k]), dtype=np.int32)
    return local[self.train.y[self.teacher_examples(k)]]

  def key(self, stage: str, index: int = 0) -> jax.Array:
    """The PRNG key of a stage; steps fold their index into it."""
    if stage == "teacher":  # teachers do not depend on the run's seed
      return jax.random.fold_in(jax.random.key(self.config.teachers.seed), index)
    stage_ids = {"student_init": 1, "student": 2, "mc": 3}
    return jax.random.fold_in(jax.random.key(self.config.seed), stage_ids[stage])


def _splits(config, benchmark: data.Benchmark, domain: str) -> tuple[data.Split, ...]:
  """(transfer set, test set, validation set or None) of `domain`, capped per class.

  Raises:
    ValueError: a class without examples, or checkpoint selection without a val split.
  """
  cfg, c = config.data, benchmark.num_classes
  splits = benchmark.load(seed=cfg.benchmark_seed)[domain]
  train = cap_per_class(splits.train, c, cfg.train_per_class, where=f"domain {domain!r} (train)")
  test = cap_per_class(splits.test, c, cfg.test_per_class, where=f"domain {domain!r} (test)")
  if config.student.get("select_checkpoints", 1) <= 1:
    return train, test, None
  if not len(splits.val.y):
    raise ValueError(
      f"student.select_checkpoints={config.student.select_checkpoints} needs labelled "
      f"validation data, but domain {domain!r} of {benchmark.name!r} has an empty val "
      "split; accepted: 1 (no selection: the last step) or a benchmark with a val split"
    )
  cap = cfg.get("val_per_class", 0)
  return train, test, cap_per_class(splits.val, c, cap, where=f"domain {domain!r} (val)")


def _classifiers(config, chunks, num_classes: int) -> tuple[tuple, models.DropoutClassifier]:
  """(teacher classifiers, one per chunk; the student over all `num_classes`).

  Heterogeneous teachers: teacher k's backbone options are model.options updated by
  teachers.backbone_options[k] (the student always uses model.options).
  """
  per_teacher = tuple(config.teachers.get("backbone_options", ()))
  if per_teacher and len(per_teacher) != len(chunks):
    raise ValueError(
      f"teachers.backbone_options has {len(per_teacher)} entries for {len(chunks)} teachers; "
      "accepted: () or one dict per teacher"
    )

  def classifier(num: int, overrides: Mapping[str, Any] | None = None) -> models.DropoutClassifier:
    options = {**config.model.options.to_dict(), **dict(overrides or {})}
    backbone = models.get_backbone(config.model.backbone, **options)
    return models.DropoutClassifier(backbone=backbone, num_classes=num, rate=config.model.dropout)

  teachers = tuple(
    classifier(len(chunk), per_teacher[k] if per_teacher else None)
    for k, chunk in enumerate(chunks)
  )
  return teachers, classifier(num_classes)


def make_setup(config) -> Setup:
  """Loads the data and builds the models; every data-dependent check happens here.

  Raises:
    ValueError: naming the field: an unknown domain, more teachers than classes, a class
      without training or test examples.
  """
  benchmark = benchmarks.benchmark(config.data)
  domain = config.data.domain or benchmark.domains[0]
  if domain not in benchmark.domains:
    raise ValueError(
      f"data.domain={domain!r} is not a domain of benchmark {benchmark.name!r}; accepted: "
      f"{', '.join(benchmark.domains)}"
    )
  chunks = label_chunks(
    benchmark.num_classes,
    config.teachers.num_teachers,
    overlap=config.teachers.get("overlap", 0),
  )
  train, test, val = _splits(config, benchmark, domain)
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  teacher_models, student_model = _classifiers(config, chunks, benchmark.num_classes)
  return Setup(
    config=config,
    domain=domain,
    class_names=tuple(benchmark.class_names),
    chunks=chunks,
    train=train,
    test=test,
    input_shape=tuple(benchmark.input_shape),
    mesh=mesh,
    teacher_models=teacher_models,
    student_model=student_model,
    x_train=jax.device_put(train.x, mesh_lib.replicated(mesh)),
    val=val,
  )


def init_model(model: models.DropoutClassifier, key: jax.Array, input_shape, tx) -> PyTree:
  """{'params', 'batch_stats', 'opt_state'} of a freshly initialised model."""
  variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  params = variables["params"]
  return {
    "params": params,
    "batch_stats": variables.get("batch_stats", {}),
    "opt_state": tx.init(params),
  }
