"""Co-Tuning's data and setup: the source and target tasks, the fixed validation hold-out.

The benchmark's source domain (its source classes) is the pre-training task; the target
domain's target classes are the transfer task: its train and val splits form a pool, of
which `data.val_fraction` of each class is held out once per seed as the validation set
(the same at every sampling rate, as the paper's fixed 20 %), and `data.sampling_rate` of
the rest, stratified, is the training set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from moe_adapt import data, models
from moe_adapt.methods import co_tuning_source as source_lib
from moe_adapt.methods.co_tuning_checks import is_legacy_checkpoint
from moe_adapt.train import benchmarks
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import workdir as workdir_lib


def select_classes(
  split: data.Split, classes: Sequence[int], *, where: str, require_all: bool = True
) -> data.Split:
  """The examples of `classes`, relabelled 0..len(classes)-1 in that order.

  Raises:
    ValueError: naming `where` and the class when a class has no example (unless
      `require_all` is False: a validation split may lack a class).
  """
  classes = np.asarray(classes, np.int64)
  keep = np.isin(split.y, classes)
  relabel = np.full(max(int(classes.max()), int(split.y.max(initial=0))) + 1, -1, np.int32)
  relabel[classes] = np.arange(len(classes), dtype=np.int32)
  y = relabel[split.y[keep]]
  counts = np.bincount(y, minlength=len(classes))
  if require_all and np.any(counts == 0):
    missing = [int(classes[i]) for i in np.flatnonzero(counts == 0)]
    raise ValueError(
      f"{where} has no example of class(es) {missing}; accepted: classes present in it"
    )
  return data.Split(split.x[keep], y)


def cap_per_class(split: data.Split, num_classes: int, cap: int) -> data.Split:
  """The first `cap` examples of each class (all when cap == 0), in split order.

  Splits are already shuffled by the benchmark, so this is a fixed random subset.
  """
  if cap == 0:
    return split
  keep = np.zeros(len(split.y), bool)
  for c in range(num_classes):
    keep[np.flatnonzero(split.y == c)[:cap]] = True
  return data.Split(split.x[keep], split.y[keep])


def subsample(
  split: data.Split,
  rate: float,
  rng: np.random.Generator,
  *,
  class_names: Sequence[str],
  where: str,
  allow_empty: bool,
) -> data.Split:
  """A stratified random subset: round(rate · n_c) examples of each class c, in split order.

  Raises:
    ValueError: naming `data.sampling_rate` and the class, when a class would keep no
      example and `allow_empty` is False.
  """
  keep = []
  for c, name in enumerate(class_names):
    idx = np.flatnonzero(split.y == c)
    n = round(rate * len(idx))
    if n == 0 and not allow_empty:
      raise ValueError(
        f"data.sampling_rate={rate} leaves target class {name!r} with no {where} example "
        f"(round({rate} × {len(idx)}) = 0); accepted: a sampling rate >= "
        f"{0.5 / max(len(idx), 1):.3g}, or more examples per class "
        "(data.target_train_per_class)"
      )
    keep.append(np.sort(rng.permutation(idx)[:n]))
  idx = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
  return data.Split(split.x[idx], split.y[idx])


def concat_splits(*splits: data.Split) -> data.Split:
  """The examples of `splits`, one after another."""
  return data.Split(
    np.concatenate([s.x for s in splits]), np.concatenate([s.y for s in splits]).astype(np.int32)
  )


def hold_out(
  split: data.Split, fraction: float, rng: np.random.Generator, *, num_classes: int
) -> tuple[data.Split, data.Split]:
  """(rest, held_out): round(fraction · n_c) random examples of each class c held out.

  Both parts keep split order. Used once per seed for the target validation set, so that
  it does not depend on the sampling rate (You et al. hold out 20 % of the training data).

  Raises:
    ValueError: naming `data.val_fraction` when nothing would be held out.
  """
  held = []
  for c in range(num_classes):
    idx = np.flatnonzero(split.y == c)
    held.append(rng.permutation(idx)[: round(fraction * len(idx))])
  held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  if len(held) == 0:
    raise ValueError(
      f"data.val_fraction={fraction} holds out no target example of {len(split.y)}; "
      "accepted: a fraction that leaves at least one validation example"
    )
  rest = np.setdiff1d(np.arange(len(split.y)), held)
  return data.Split(split.x[rest], split.y[rest]), data.Split(split.x[held], split.y[held])


@dataclasses.dataclass(frozen=True)
class Task:
  """Source and target splits (host NumPy), labels relabelled to 0..C-1.

  The source splits are None when the source model comes from a checkpoint.
  """

  source_domain: str
  target_domain: str
  source_names: tuple[str, ...]
  target_names: tuple[str, ...]
  source_train: data.Split | None
  source_val: data.Split | None
  source_test: data.Split | None
  target_train: data.Split  # the sampled subset of the pool left after the hold-out
  target_val: data.Split  # the fixed hold-out (data.val_fraction of the pool, every rate)
  target_test: data.Split
  input_shape: tuple[int, int, int]


def _class_indices(name: str, value: Sequence[int], benchmark) -> tuple[int, ...]:
  classes = tuple(value) or tuple(range(benchmark.num_classes))
  bad = [c for c in classes if c >= benchmark.num_classes]
  if bad:
    raise ValueError(
      f"{name} has class(es) {bad} beyond benchmark {benchmark.name!r}'s {benchmark.num_classes} "
      f"classes; accepted: indices in [0, {benchmark.num_classes})"
    )
  return classes


def _domains_and_classes(cfg, benchmark) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
  """(target domain, source classes, target classes) of `config.data`, checked."""
  target_domain = cfg.target_domain or benchmark.default_targets[0]
  for field, domain in (
    ("data.source_domain", cfg.source_domain),
    ("data.target_domain", target_domain),
  ):
    if domain and domain not in benchmark.domains:
      raise ValueError(
        f"{field}={domain!r} is not a domain of benchmark {benchmark.name!r}; accepted: "
        f"{', '.join(benchmark.domains)}"
      )
  target_classes = _class_indices("data.target_classes", cfg.target_classes, benchmark)
  source_classes = ()
  if cfg.source_domain:
    source_classes = _class_indices("data.source_classes", cfg.source_classes, benchmark)
    shared = sorted(set(source_classes) & set(target_classes))
    if cfg.source_domain == target_domain and shared:
      # Without a domain shift only disjoint label sets keep the two tasks' images apart.
      raise ValueError(
        f"data.source_domain and data.target_domain are both {target_domain!r} and "
        f"data.source_classes and data.target_classes share class(es) {shared}: the same "
        "images would serve both tasks; accepted: another target domain or disjoint classes"
      )
  return target_domain, source_classes, target_classes


def _target_splits(config, domain_splits, target_domain: str, target_classes, names):
  """(train, val, test) of the target task: the rate's subset, the hold-out, the test split."""
  cfg = config.data
  # The val split may lack a class (it is small, cut at random; it may be empty anyway).
  target = {
    part: select_classes(
      getattr(domain_splits, part),
      target_classes,
      where=f"target domain {target_domain!r} ({part} split)",
      require_all=part != "val",
    )
    for part in ("train", "val", "test")
  }
  # The target training pool: the benchmark's (capped) train and val splits together.
  pool = concat_splits(
    cap_per_class(target["train"], len(target_classes), cfg.target_train_per_class),
    cap_per_class(target["val"], len(target_classes), cfg.target_val_per_class),
  )
  # The validation hold-out is fixed per seed before sampling (its own generator), so it is
  # the same at every sampling rate, as the paper's fixed 20 % split.
  holdout_rng = np.random.default_rng(np.random.SeedSequence([config.seed, 11]))
  train, val = hold_out(pool, float(cfg.val_fraction), holdout_rng, num_classes=len(names))
  rng = np.random.default_rng(np.random.SeedSequence([config.seed, 7]))
  rate = float(cfg.sampling_rate)
  train = subsample(train, rate, rng, class_names=names, where="training", allow_empty=False)
  return train, val, target["test"]


def make_task(config, *, source_names: Sequence[str] | None = None) -> Task:
  """Loads the benchmark and builds the source and target tasks of the config.

  `source_names` (a source checkpoint's class names) name the source classes when there is
  no source domain; otherwise they are `source_<j>` for `model.num_source_classes` classes.
  """
  cfg = config.data
  benchmark = benchmarks.benchmark(cfg)
  target_domain, source_classes, target_classes = _domains_and_classes(cfg, benchmark)
  names = benchmark.class_names
  splits = benchmark.load(seed=cfg.benchmark_seed)

  source = {"train": None, "val": None, "test": None}
  if cfg.source_domain:
    source_names = tuple(names[c] for c in source_classes)
    for part in source:
      # Only training needs every class; val and test fit and measure the temperature.
      source[part] = select_classes(
        getattr(splits[cfg.source_domain], part),
        source_classes,
        where=f"source domain {cfg.source_domain!r} ({part} split)",
        require_all=part == "train",
      )
  elif source_names is not None:
    source_names = tuple(source_names)
  else:
    source_names = tuple(f"source_{j}" for j in range(config.model.num_source_classes))

  target_names = tuple(names[c] for c in target_classes)
  train, val, test = _target_splits(
    config, splits[target_domain], target_domain, target_classes, target_names
  )
  return Task(
    source_domain=cfg.source_domain,
    target_domain=target_domain,
    source_names=source_names,
    target_names=target_names,
    source_train=source["train"],
    source_val=source["val"],
    source_test=source["test"],
    target_train=train,
    target_val=val,
    target_test=test,
    input_shape=tuple(benchmark.input_shape),
  )


def normalize_task(task: Task, mean: np.ndarray, std: np.ndarray) -> Task:
  """The task with every image split normalised, (x - mean) / std per channel, in place."""
  for part in ("train", "val", "test"):
    for split in (getattr(task, f"source_{part}"), getattr(task, f"target_{part}")):
      if split is None:
        continue
      np.subtract(split.x, mean, out=split.x)
      np.divide(split.x, std, out=split.x)
  return task


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the stages share, derived from the config and the data."""

  config: Any
  task: Task
  mesh: jax.sharding.Mesh
  source_model: models.Classifier  # backbone + source head ({'backbone', 'head'})
  target_model: models.Classifier  # the same backbone + a target head; used for `classify`
  x_source: jax.Array | None  # [N_s, H, W, C] source training images, replicated
  y_source: jax.Array | None  # [N_s] int32
  x_target: jax.Array  # [N_t, H, W, C] sampled target training images, replicated
  y_target: jax.Array  # [N_t] int32
  # A checkpoint directory's source model: {'params': {'backbone', 'head'}, 'batch_stats'}
  # (host NumPy), and what `pretrained_source` returns; None otherwise.
  source_variables: dict | None = None
  source_info: dict | None = None  # the checkpoint's architecture and input normalisation

  @property
  def num_source_classes(self) -> int:
    return len(self.task.source_names)

  @property
  def num_target_classes(self) -> int:
    return len(self.task.target_names)

  # > 0: this setup's new head and batches draw their own streams (`restrict`'s sub-tasks).
  stream: int = 0

  def key(self, stage: str) -> jax.Array:
    """The PRNG key of a stage; steps fold their index into it."""
    if stage == "source":  # the source model does not depend on the run's seed
      return jax.random.fold_in(jax.random.key(self.config.source.seed), 0)
    stage_ids = {"target_head": 1, "finetune": 2}
    key = jax.random.fold_in(jax.random.key(self.config.seed), stage_ids[stage])
    return jax.random.fold_in(key, self.stream) if self.stream else key


def make_setup(config) -> Setup:
  """Loads the data, builds the models and places the training arrays on the mesh.

  Every data-dependent check happens here (the CLI calls it before it writes anything):
  the source checkpoint, domains, classes, the sampled subsets.
  """
  checkpoint = config.model.source_checkpoint
  loaded = None
  if checkpoint and is_legacy_checkpoint(checkpoint):
    if not workdir_lib.as_path(checkpoint).is_file():
      raise ValueError(source_lib.missing_checkpoint_message(checkpoint))
  elif checkpoint:
    loaded = source_lib.load_source_model(checkpoint)
    wanted = config.model.num_source_classes
    if not config.data.source_domain and wanted and wanted != len(loaded.class_names):
      raise ValueError(
        f"model.num_source_classes={wanted} but the head of model.source_checkpoint="
        f"'{checkpoint}' has {len(loaded.class_names)} classes; accepted: 0 (take the "
        "checkpoint's) or that number"
      )
  task = make_task(config, source_names=None if loaded is None else loaded.class_names)
  if loaded is not None:
    loaded.check_task(task.input_shape, len(task.source_names), checkpoint)
    task = normalize_task(task, loaded.mean, loaded.std)
    backbone = loaded.module
    logging.info(
      "co_tuning: source model %s from %s (%d classes; model.backbone is not used); "
      "inputs normalised with mean %s, std %s",
      loaded.architecture,
      checkpoint,
      len(loaded.class_names),
      loaded.mean.tolist(),
      loaded.std.tolist(),
    )
  else:
    backbone = models.get_backbone(config.model.backbone, **config.model.options.to_dict())
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  source_model = models.Classifier(backbone=backbone, num_classes=len(task.source_names))
  target_model = models.Classifier(backbone=backbone, num_classes=len(task.target_names))
  rep = mesh_lib.replicated(mesh)
  x_s = y_s = None
  if task.source_train is not None and not config.model.source_checkpoint:
    x_s = jax.device_put(task.source_train.x, rep)
    y_s = jax.device_put(task.source_train.y, rep)
  return Setup(
    config=config,
    task=task,
    mesh=mesh,
    source_model=source_model,
    target_model=target_model,
    x_source=x_s,
    y_source=y_s,
    x_target=jax.device_put(task.target_train.x, rep),
    y_target=jax.device_put(task.target_train.y, rep),
    source_variables=None if loaded is None else loaded.variables,
    source_info=None if loaded is None else loaded.info(checkpoint),
  )


def restrict_task(task: Task, positions: Sequence[int]) -> Task:
  """The task with its target classes cut to those at `positions` of its label order."""
  return dataclasses.replace(
    task,
    target_names=tuple(task.target_names[p] for p in positions),
    **{
      f"target_{part}": select_classes(
        getattr(task, f"target_{part}"), positions, where=part, require_all=False
      )
      for part in ("train", "val", "test")
    },
  )


def restrict(setup: Setup, positions: Sequence[int], *, stream: int) -> Setup:
  """The setup of the sub-task of target classes `positions`, with its own PRNG `stream`.

  The source model, its data and the mesh are shared; the new head, the training arrays
  and the head and batch streams (folded with `stream` >= 1) are the sub-task's.
  """
  if stream < 1:
    raise ValueError(f"stream={stream!r} is invalid; accepted: an integer >= 1")
  task = restrict_task(setup.task, positions)
  rep = mesh_lib.replicated(setup.mesh)
  backbone = setup.target_model.backbone
  return dataclasses.replace(
    setup,
    task=task,
    target_model=models.Classifier(backbone=backbone, num_classes=len(positions)),
    x_target=jax.device_put(task.target_train.x, rep),
    y_target=jax.device_put(task.target_train.y, rep),
    stream=stream,
  )
