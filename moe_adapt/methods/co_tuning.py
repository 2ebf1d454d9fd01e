"""Co-Tuning: collaborative fine-tuning through a calibrated category relationship.

You, Kou, Long, Wang. "Co-Tuning for Transfer Learning", NeurIPS 2020.

A pre-trained source model (backbone F + source head G over C_s source classes) is
transferred to a target task with another label set (C_t classes). Instead of discarding
G, Co-Tuning translates every target label y_t into a distribution over the source classes,
R[y_t] = p(y_s | y_t), and fine-tunes F, G and a new target head H together with

  L = CE(H(F(x)), y_t) + λ · soft-CE(G(F(x)), R[y_t]);

prediction uses H only. Stages and steps (each training stage checkpointed under
`<workdir>/checkpoints/<stage>` and skipped when finished):

1. `source`: the source model, pre-trained by ERM on the source training split, or loaded
   from `model.source_checkpoint`: a Hugging Face / timm ResNet checkpoint directory
   (config.json + safetensors, read by `models.checkpoints`; its linear classification head
   is the source head, its images are normalised as its preprocessing says) or a file in
   this project's layout (`save_source_checkpoint`). A trained source depends only on the
   source data, model and `source` fields, so every run of a sweep reuses it through the
   stage cache.
2. Calibration: a temperature T of the source head fitted on the source val split; the
   source head's ECE before and after is measured on the source test split. A checkpoint
   needs no source training data: with `data.source_domain` set, only that domain's val and
   test splits are used (T fitted there); without any source data, T =
   `calibration.temperature` (> 0; the official code hard-codes T for its ImageNet
   ResNet-50). Target data cannot fit T: its labels are not source classes.
   The target data: the benchmark's target train and val splits form a pool, of which
   `data.val_fraction` (20 %) of each class is held out once per seed as the validation
   set (the same at every sampling rate, as in the paper); `data.sampling_rate` of the rest
   is the training set.
3. Relationships from the calibrated source probabilities softmax(G(F(x)) / T): `direct`
   (per-class means over train + validation pooled, as the official code) and/or `reverse`
   (the paper's Algorithm 1, fitted on train; its L2 strength C and its temperature chosen
   on validation and logged under `selection`). Diagnostics (the source head's accuracy
   through the relationship, the rows' peakedness) use validation, never test.
4. Fine-tuning, all from the same pre-trained weights and the same new head initialisation,
   with the official recipe (SGD, Nesterov momentum 0.9, weight decay 5e-4, lr for F and
   G and 10× lr for H, a step decay). Each variant is trained once per candidate of the
   same grid (`selection.lr_grid`, crossed with `selection.trade_off_grid` for Co-Tuning
   and `selection.alpha_grid` for L2-SP); the candidate with the best validation accuracy
   is reported and its choice logged under `selection`:

   - `fine_tune`: CE on H (G unused);
   - `l2_sp`: CE + α/2·||θ_F − θ_F⁰||² + β/2·||θ_H||² instead of weight decay
     (Li, Grandvalet, Davoine, ICML 2018);
   - `co_tuning_direct`, `co_tuning_reverse`: the Co-Tuning loss with that relationship.

   All variants run one compiled step: the relationship, the pre-trained anchor and the
   loss coefficients are arguments, the weight decay an optimiser hyperparameter.
5. Evaluation of H on the target test split (accuracy, ECE, per-example outcomes).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_adapt import core, data, models
from moe_adapt.methods import _checks
from moe_adapt.train import benchmarks, stages
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import workdir as workdir_lib

PyTree = Any

RELATIONSHIPS = ("direct", "reverse")
VARIANTS = ("fine_tune", "l2_sp", *(f"co_tuning_{kind}" for kind in RELATIONSHIPS))
_CO_TUNING_PREFIX = "co_tuning_"
# model.source_checkpoint: a file of these suffixes is in this project's layout
# (save_source_checkpoint); any other path is a Hugging Face / timm checkpoint directory.
CHECKPOINT_SUFFIXES = (".npz", ".safetensors")
# PyTorch pickles, refused by name (their weights must be converted to safetensors first).
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Checkpoint architectures (models.checkpoints.ARCHITECTURES) usable as the source model.
SOURCE_ARCHITECTURES = ("resnet", "timm_resnet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------


def _check_class_list(name: str, value) -> None:
  if isinstance(value, str | bytes) or not isinstance(value, Sequence):
    raise ValueError(f"{name}={value!r} is invalid; accepted: a tuple of class indices (or ())")
  for c in value:
    if isinstance(c, bool) or not isinstance(c, int) or c < 0:
      raise ValueError(f"{name}={tuple(value)!r} is invalid; accepted: class indices >= 0")
  if len(set(value)) != len(value):
    raise ValueError(f"{name}={tuple(value)!r} lists a class twice")


def _check_variants(variants) -> None:
  if isinstance(variants, str) or not isinstance(variants, Sequence) or not variants:
    raise ValueError(
      f"variants={variants!r} is invalid; accepted: a non-empty tuple of {', '.join(VARIANTS)}"
    )
  for v in variants:
    if v in VARIANTS:
      continue
    if isinstance(v, str) and v.startswith(_CO_TUNING_PREFIX):
      kind = v[len(_CO_TUNING_PREFIX) :]
      raise ValueError(
        f"variants has {v!r}, whose relationship kind {kind!r} is unknown; accepted kinds: "
        f"{', '.join(RELATIONSHIPS)} (variants co_tuning_direct, co_tuning_reverse)"
      )
    raise ValueError(f"variants has unknown {v!r}; accepted: {', '.join(VARIANTS)}")
  if len(set(variants)) != len(variants):
    raise ValueError(f"variants={tuple(variants)!r} lists a variant twice")


def _check_grid(name: str, value, *, positive: bool) -> None:
  bound = "> 0" if positive else ">= 0"
  accepted = f"accepted: a tuple of distinct numbers {bound} (() = the single configured value)"
  if isinstance(value, str | bytes) or not isinstance(value, Sequence):
    raise ValueError(f"{name}={value!r} is invalid; {accepted}")
  for v in value:
    bad = isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v)
    if bad or v < 0 or (positive and v == 0):
      raise ValueError(f"{name}={tuple(value)!r} is invalid; {accepted}")
  if len(set(value)) != len(value):
    raise ValueError(f"{name}={tuple(value)!r} lists a value twice; {accepted}")


def validate_config(config) -> None:
  """Checks every field this method reads; raises ValueError naming the field."""

  integer = functools.partial(_checks.integer, config)
  # Intervals here are closed above unless a call says otherwise.
  number = functools.partial(_checks.number, config, high_open=False)

  for name in ("seed", "source.seed", "data.benchmark_seed", "num_devices"):
    integer(name, 0)
  for name in ("data.target_train_per_class", "data.target_val_per_class"):
    integer(name, 0)
  for name in (
    "source.steps",
    "source.batch_size",
    "finetune.steps",
    "finetune.batch_size",
    "co_tuning.reverse_max_iter",
    "calibration.num_bins",
    "eval_batch_size",
    "checkpoint_every",
    "log_every",
  ):
    integer(name, 1)
  number("data.sampling_rate", low=0.0, high=1.0, low_open=True)
  number("data.val_fraction", low=0.0, high=1.0, low_open=True, high_open=True)
  for name in ("selection.lr_grid", "selection.trade_off_grid", "selection.alpha_grid"):
    _check_grid(name, _checks.field(config, name), positive=name == "selection.lr_grid")
  for name in ("source.lr", "finetune.lr", "finetune.head_lr_mult", "finetune.head_init_std"):
    number(name, low=0.0, low_open=True)
  number("finetune.momentum", low=0.0, high=1.0, low_open=False, high_open=True)
  number("finetune.lr_decay_at", low=0.0, high=1.0, low_open=True)
  number("finetune.lr_decay", low=0.0, high=1.0, low_open=True)
  for name in (
    "finetune.weight_decay",
    "co_tuning.trade_off",
    "l2_sp.alpha",
    "l2_sp.beta",
    "calibration.temperature",
  ):
    number(name, low=0.0, low_open=False)
  if not isinstance(config.finetune.nesterov, bool):
    raise ValueError(f"finetune.nesterov={config.finetune.nesterov!r} is invalid; accepted: bool")
  _check_variants(config.variants)
  _check_class_list("data.source_classes", config.data.source_classes)
  _check_class_list("data.target_classes", config.data.target_classes)
  for name in ("data.source_domain", "data.target_domain", "model.source_checkpoint"):
    if not isinstance(_checks.field(config, name), str):
      raise ValueError(f"{name}={_checks.field(config, name)!r} is invalid; accepted: a string")

  checkpoint = config.model.source_checkpoint
  if not checkpoint and not config.data.source_domain:
    raise ValueError(
      "model.source_checkpoint is empty and so is data.source_domain: nothing to pre-train on; "
      "accepted: model.source_checkpoint=PATH of a pre-trained source model (a Hugging Face / "
      f"timm checkpoint directory, or a {' or '.join(CHECKPOINT_SUFFIXES)} file of "
      "co_tuning.save_source_checkpoint), or a data.source_domain of the benchmark to "
      "pre-train on"
    )
  if checkpoint.endswith(_TORCH_SUFFIXES):
    raise ValueError(
      f"model.source_checkpoint={checkpoint!r} is invalid (a PyTorch pickle); accepted: a "
      "Hugging Face / timm checkpoint directory (config.json + model.safetensors) or a "
      f"{' or '.join(CHECKPOINT_SUFFIXES)} file of co_tuning.save_source_checkpoint"
    )
  if checkpoint and not config.data.source_domain:
    # A directory's head gives the number of source classes (0 = take it from there).
    integer("model.num_source_classes", 1 if is_legacy_checkpoint(checkpoint) else 0)
  if not config.data.source_domain and config.calibration.temperature == 0:
    raise ValueError(
      "calibration.temperature=0 (fit on held-out source data) needs data.source_domain; "
      "accepted: calibration.temperature > 0 when the source model comes without source data "
      "(e.g. 1/0.8840456604957581, the official code's constant for torchvision's ResNet-50)"
    )


# ----------------------------------------------------------------------------
# Data: the source and target tasks
# ----------------------------------------------------------------------------


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


def make_task(config, *, source_names: Sequence[str] | None = None) -> Task:
  """Loads the benchmark and builds the source and target tasks of the config.

  `source_names` (a source checkpoint's class names) name the source classes when there is
  no source domain; otherwise they are `source_<j>` for `model.num_source_classes` classes.
  """
  cfg = config.data
  benchmark = benchmarks.benchmark(cfg)
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
  # The val split may lack a class (it is small, cut at random; it may be empty anyway).
  target = {
    part: select_classes(
      getattr(splits[target_domain], part),
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
  train, val = hold_out(pool, float(cfg.val_fraction), holdout_rng, num_classes=len(target_names))
  rng = np.random.default_rng(np.random.SeedSequence([config.seed, 7]))
  rate = float(cfg.sampling_rate)
  train = subsample(train, rate, rng, class_names=target_names, where="training", allow_empty=False)
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
    target_test=target["test"],
    input_shape=tuple(benchmark.input_shape),
  )


# ----------------------------------------------------------------------------
# Setup: models, mesh, device arrays
# ----------------------------------------------------------------------------


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

  def key(self, stage: str) -> jax.Array:
    """The PRNG key of a stage; steps fold their index into it."""
    if stage == "source":  # the source model does not depend on the run's seed
      return jax.random.fold_in(jax.random.key(self.config.source.seed), 0)
    stage_ids = {"target_head": 1, "finetune": 2}
    return jax.random.fold_in(jax.random.key(self.config.seed), stage_ids[stage])

  def constrain(self, x: jax.Array) -> jax.Array:
    """Shards the leading (batch) axis over the mesh when it divides evenly."""
    if self.mesh.size == 1 or x.shape[0] % self.mesh.size:
      return x
    spec = P("data", *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def make_setup(config) -> Setup:
  """Loads the data, builds the models and places the training arrays on the mesh.

  Every data-dependent check happens here (the CLI calls it before it writes anything):
  the source checkpoint, domains, classes, the sampled subsets.
  """
  checkpoint = config.model.source_checkpoint
  loaded = None
  if checkpoint and is_legacy_checkpoint(checkpoint):
    if not workdir_lib.as_path(checkpoint).is_file():
      raise ValueError(_missing_checkpoint_message(checkpoint))
  elif checkpoint:
    loaded = load_source_model(checkpoint)
    wanted = config.model.num_source_classes
    if not config.data.source_domain and wanted and wanted != len(loaded.class_names):
      raise ValueError(
        f"model.num_source_classes={wanted} but the head of model.source_checkpoint="
        f"'{checkpoint}' has {len(loaded.class_names)} classes; accepted: 0 (take the "
        "checkpoint's) or that number"
      )
  task = make_task(config, source_names=None if loaded is None else loaded.class_names)
  if loaded is not None:
    _check_checkpoint_task(loaded, task, checkpoint)
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


def _eval_batches(x: np.ndarray, batch_size: int):
  """Fixed-size batches (the last one padded) so evaluation compiles once."""
  for start in range(0, len(x), batch_size):
    xb = x[start : start + batch_size]
    if len(xb) < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - len(xb), *xb.shape[1:]), xb.dtype)])
    yield xb


# ----------------------------------------------------------------------------
# Stage 1: the source model
# ----------------------------------------------------------------------------


def init_source(setup: Setup, tx: optax.GradientTransformation) -> PyTree:
  """The source model's variables at initialisation and its optimiser state."""
  sample = jnp.zeros((1, *setup.task.input_shape), jnp.float32)
  variables = setup.source_model.init(setup.key("source"), sample, train=False)
  params = variables["params"]
  return {
    "params": params,
    "batch_stats": variables.get("batch_stats", {}),
    "opt_state": tx.init(params),
  }


def make_source_step(setup: Setup, tx: optax.GradientTransformation) -> Callable:
  """ERM on the source training split (BatchNorm in training mode)."""
  cfg = setup.config.source

  def step(state, step, x, y):
    key = jax.random.fold_in(setup.key("source"), step + 1)
    idx = jax.random.randint(key, (cfg.batch_size,), 0, y.shape[0])
    xb = setup.constrain(x[idx])

    def loss_fn(params):
      logits, updates = setup.source_model.apply(
        {"params": params, "batch_stats": state["batch_stats"]},
        xb,
        train=True,
        mutable=["batch_stats"],
      )
      stats = updates.get("batch_stats", state["batch_stats"])  # none without BatchNorm
      return core.losses.cross_entropy(logits, y[idx]).mean(), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": stats, "opt_state": opt_state}, {"loss": loss}

  return stages.bind(jax.jit(step, donate_argnums=0), setup.x_source, setup.y_source)


def is_legacy_checkpoint(path: str) -> bool:
  """Whether `model.source_checkpoint` names a file of `save_source_checkpoint`."""
  return str(path).endswith(CHECKPOINT_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class SourceModel:
  """A source model read from a Hugging Face / timm checkpoint directory.

  Attributes:
    architecture: one of SOURCE_ARCHITECTURES.
    module: the backbone, images [B, H, W, C] (normalised) -> features [B, D].
    variables: {'params': {'backbone', 'head'}, 'batch_stats': {'backbone'}}, host float32;
      the head (kernel [D, C_s], bias [C_s]) is the checkpoint's classification head.
    class_names: the C_s source class names (config.json's id2label / label_names, else
      `source_<j>`).
    mean: [C] per-channel input mean, subtracted from images in [0, 1].
    std: [C] per-channel input standard deviation, dividing them after.
  """

  architecture: str
  module: nn.Module
  variables: dict
  class_names: tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray

  def info(self, path: str) -> dict:
    return {
      "checkpoint": str(path),
      "architecture": self.architecture,
      "num_source_classes": len(self.class_names),
      "input_mean": self.mean.tolist(),
      "input_std": self.std.tolist(),
    }


def _class_names(config: Mapping, num_classes: int) -> tuple[str, ...]:
  """Source class names from a transformers (id2label) or timm (label_names) config."""
  id2label = config.get("id2label") or {}
  try:
    names = tuple(str(id2label[str(j)]) for j in range(num_classes))
  except KeyError:
    names = tuple(config.get("label_names") or ())
  return names if len(names) == num_classes else tuple(f"source_{j}" for j in range(num_classes))


def _normalisation(directory, config: Mapping) -> tuple[np.ndarray, np.ndarray]:
  """The checkpoint's input normalisation: its preprocessor_config.json (transformers),
  its config.json's pretrained_cfg / mean, std (timm), else ImageNet's (both libraries'
  default for ResNets)."""
  path = workdir_lib.as_path(directory) / "preprocessor_config.json"
  if path.is_file():
    pre = json.loads(path.read_text())
    if not pre.get("do_normalize", True):
      return np.zeros(3, np.float32), np.ones(3, np.float32)
    mean, std = pre.get("image_mean"), pre.get("image_std")
  else:
    timm_cfg = config.get("pretrained_cfg") or config
    mean, std = timm_cfg.get("mean"), timm_cfg.get("std")
  mean = IMAGENET_MEAN if mean is None else mean
  std = IMAGENET_STD if std is None else std
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def load_source_model(path: str) -> SourceModel:
  """Reads `model.source_checkpoint` = a Hugging Face / timm checkpoint directory.

  Raises:
    ValueError: naming model.source_checkpoint when the directory does not hold a
      checkpoint, holds another architecture than a ResNet, has no linear classification
      head, or its tensors do not match its config (the loader's message is included).
  """
  directory = workdir_lib.as_path(path)
  field = f"model.source_checkpoint='{path}'"
  if not (directory / "config.json").is_file():
    raise ValueError(
      f"{field} is not a checkpoint directory (no config.json there); accepted: a Hugging "
      "Face / timm checkpoint directory (config.json + model.safetensors), or a "
      f"{' or '.join(CHECKPOINT_SUFFIXES)} file of co_tuning.save_source_checkpoint"
    )
  try:
    ckpt = models.checkpoints.load_checkpoint(directory)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"{field} cannot be loaded: {e}") from None
  if ckpt.architecture not in SOURCE_ARCHITECTURES:
    raise ValueError(
      f"{field} holds a {ckpt.architecture!r} checkpoint; accepted: "
      f"{', '.join(SOURCE_ARCHITECTURES)} (an image classifier whose head is the source head)"
    )
  if ckpt.head is None:
    raise ValueError(
      f"{field} has no linear classification head; accepted: an image-classification "
      "checkpoint (e.g. ResNetForImageClassification, timm resnet50 with fc.*): Co-Tuning "
      "needs the source head"
    )
  module, variables = models.checkpoints.classifier(ckpt)
  del module  # Classifier(ckpt.module, C_s); the Setup builds its own from ckpt.module.
  num_classes = int(ckpt.head["bias"].shape[0])
  mean, std = _normalisation(directory, ckpt.config)
  return SourceModel(
    architecture=ckpt.architecture,
    module=ckpt.module,
    variables={"params": variables["params"], "batch_stats": variables.get("batch_stats", {})},
    class_names=_class_names(ckpt.config, num_classes),
    mean=mean,
    std=std,
  )


def _check_checkpoint_task(loaded: SourceModel, task: Task, path: str) -> None:
  """The task's images and source classes fit the checkpoint."""
  channels = task.input_shape[-1]
  if channels != loaded.mean.shape[0]:
    raise ValueError(
      f"model.source_checkpoint='{path}' takes {loaded.mean.shape[0]}-channel images but "
      f"benchmark images have shape {task.input_shape}; accepted: a benchmark with "
      f"{loaded.mean.shape[0]} channels"
    )
  if len(task.source_names) != len(loaded.class_names):
    raise ValueError(
      f"data.source_classes select {len(task.source_names)} source classes but the head of "
      f"model.source_checkpoint='{path}' has {len(loaded.class_names)}; accepted: the "
      "checkpoint's classes, in its order"
    )


def normalize_task(task: Task, mean: np.ndarray, std: np.ndarray) -> Task:
  """The task with every image split normalised, (x - mean) / std per channel, in place."""
  for split in (
    task.source_train,
    task.source_val,
    task.source_test,
    task.target_train,
    task.target_val,
    task.target_test,
  ):
    if split is not None:
      np.subtract(split.x, mean, out=split.x)
      np.divide(split.x, std, out=split.x)
  return task


def _flatten_variables(variables: Mapping) -> dict[str, np.ndarray]:
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    flat["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
  return flat


def _missing_checkpoint_message(path) -> str:
  return (
    f"model.source_checkpoint='{path}' does not exist; accepted: the path of a pre-trained "
    f"source model ({' or '.join(CHECKPOINT_SUFFIXES)}) written by "
    "co_tuning.save_source_checkpoint or by a converter that uses the same array names"
  )


def save_source_checkpoint(path: str | os.PathLike, variables: Mapping) -> None:
  """Writes `{'params': ..., 'batch_stats': ...}` of a source Classifier as flat arrays.

  The format `model.source_checkpoint` reads: one array per leaf, named by its path
  joined with '/' (e.g. `params/backbone/Conv_0/kernel`), in an .npz or (by suffix)
  .safetensors file. A converter from another framework writes the same names. The
  path may be local or remote (`gs://...`).
  """
  target = workdir_lib.as_path(path)
  flat = _flatten_variables(variables)
  if target.suffix == ".safetensors":
    import safetensors.numpy

    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in flat.items()})
  elif target.suffix == ".npz":
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    data = buffer.getvalue()
  else:
    raise ValueError(f"path={os.fspath(path)!r} is invalid; accepted: a .npz or .safetensors file")
  workdir_lib.write_bytes_atomic(target, data)


def load_source_checkpoint(path: str | os.PathLike, template: Mapping) -> dict:
  """Reads a `save_source_checkpoint` file into the structure of `template`.

  Args:
    path: the .npz or .safetensors file (`model.source_checkpoint`), local or remote.
    template: `{'params': ..., 'batch_stats': ...}` of the configured source Classifier.

  Raises:
    ValueError: naming model.source_checkpoint when the file is missing, or its arrays do
      not match the template (missing or extra names, shapes).
  """
  source = workdir_lib.as_path(path)
  if not source.is_file():
    raise ValueError(_missing_checkpoint_message(path))
  data = source.read_bytes()  # Local or remote (gs://): both readers take bytes.
  if source.suffix == ".safetensors":
    import safetensors.numpy

    stored = safetensors.numpy.load(data)
  else:
    with np.load(io.BytesIO(data)) as f:
      stored = {k: f[k] for k in f.files}
  expected = _flatten_variables(template)
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  wrong = [
    f"{k}: {stored[k].shape} (expected {expected[k].shape})"
    for k in expected
    if k in stored and stored[k].shape != expected[k].shape
  ]
  if (missing or extra or wrong) and (source.parent / "config.json").is_file():
    raise ValueError(
      f"model.source_checkpoint='{path}' is a file of a Hugging Face / timm checkpoint "
      f"directory; accepted: that directory, model.source_checkpoint='{source.parent}'"
    )
  if missing or extra or wrong:
    details = "; ".join(
      part
      for part in (
        f"missing {missing[:5]}" if missing else "",
        f"unexpected {extra[:5]}" if extra else "",
        f"shapes {wrong[:5]}" if wrong else "",
      )
      if part
    )
    raise ValueError(
      f"model.source_checkpoint='{path}' does not match the configured model "
      f"({_size_text(template)}): {details}"
    )
  leaves_with_path = jax.tree_util.tree_leaves_with_path(template)
  values = [
    np.asarray(stored["/".join(str(getattr(k, "key", k)) for k in p)], np.asarray(leaf).dtype)
    for p, leaf in leaves_with_path
  ]
  return jax.tree.unflatten(jax.tree.structure(template), values)


def _size_text(template: Mapping) -> str:
  n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(template.get("params", {})))
  return f"{n} parameters"


# ----------------------------------------------------------------------------
# Stage 2: calibration and the category relationships
# ----------------------------------------------------------------------------


def make_logits_fn(setup: Setup) -> Callable:
  """`(variables, x [N, ...]) -> (source logits [N, C_s], features [N, D])`, eval mode."""
  model = setup.source_model

  @jax.jit
  def batch_fn(variables, xb):
    feats = model.apply(variables, xb, train=False, method=models.Classifier.features)
    logits = model.apply({"params": variables["params"]}, feats, method=models.Classifier.classify)
    return logits

  def logits_fn(variables, x: np.ndarray) -> np.ndarray:
    bs = setup.config.eval_batch_size
    out = [np.asarray(batch_fn(variables, xb)) for xb in _eval_batches(x, bs)]
    return np.concatenate(out)[: len(x)] if out else np.zeros((0, setup.num_source_classes))

  return logits_fn


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


# ----------------------------------------------------------------------------
# Stage 3: fine-tuning (all variants share one compiled step)
# ----------------------------------------------------------------------------


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and per-group learning rates, as in the official code.

  Groups: the backbone and the source head at `finetune.lr`, the new target head at
  `head_lr_mult` × lr; each × `lr_decay` after `lr_decay_at` × steps. The weight decay
  (added to the gradient before momentum, like PyTorch's SGD) is an injected
  hyperparameter, so variants set it in their optimiser state (`set_weight_decay`)
  without recompiling the step.
  """
  cfg = config.finetune
  boundary = max(1, round(cfg.lr_decay_at * cfg.steps))

  def group(lr: float) -> optax.GradientTransformation:
    schedule = optax.piecewise_constant_schedule(lr, {boundary: cfg.lr_decay})

    def sgd(learning_rate, weight_decay):
      return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
      )

    return optax.inject_hyperparams(sgd)(learning_rate=schedule, weight_decay=cfg.weight_decay)

  def labels(params):
    return {k: "head" if k == "target_head" else "base" for k in params}

  return optax.multi_transform(
    {"base": group(cfg.lr), "head": group(cfg.lr * cfg.head_lr_mult)}, labels
  )


def set_weight_decay(opt_state: PyTree, weight_decay: float) -> PyTree:
  """The optimiser state of `make_optimizer` with another weight decay."""
  return optax.tree_utils.tree_set(opt_state, weight_decay=jnp.float32(weight_decay))


def init_target_head(setup: Setup, feature_dim: int) -> dict:
  """The new target head: weights ~ N(0, head_init_std²), zero bias (official init)."""
  std = setup.config.finetune.head_init_std
  kernel = std * jax.random.normal(
    setup.key("target_head"), (feature_dim, setup.num_target_classes), jnp.float32
  )
  return {"head": {"kernel": kernel, "bias": jnp.zeros((setup.num_target_classes,), jnp.float32)}}


def variant_settings(config, variant: str, candidate: Mapping[str, float] | None = None) -> dict:
  """Loss coefficients, weight decay, lr scale and relationship kind of a variant.

  `candidate` (one of `candidates(config, variant)`) overrides the configured learning
  rate, λ (`trade_off`) or L2-SP's α (`alpha`); `lr_scale` is its lr / `finetune.lr`.
  """
  cfg = config
  candidate = dict(candidate or {})
  settings = {
    "trade_off": 0.0,
    "l2sp_alpha": 0.0,
    "l2sp_beta": 0.0,
    "lr_scale": candidate.get("lr", cfg.finetune.lr) / cfg.finetune.lr,
    "weight_decay": cfg.finetune.weight_decay,
    "relationship": None,
  }
  if variant == "l2_sp":
    # The L2-SP penalty replaces weight decay: α toward θ⁰ on the backbone, β on the head.
    alpha = candidate.get("alpha", cfg.l2_sp.alpha)
    settings.update(l2sp_alpha=alpha, l2sp_beta=cfg.l2_sp.beta, weight_decay=0.0)
  elif variant.startswith(_CO_TUNING_PREFIX):
    settings.update(
      trade_off=candidate.get("trade_off", cfg.co_tuning.trade_off),
      relationship=variant[len(_CO_TUNING_PREFIX) :],
    )
  return settings


def candidates(config, variant: str) -> list[dict[str, float]]:
  """The hyper-parameters a variant is selected from on the target validation split.

  Every variant: each learning rate of `selection.lr_grid` (the same grid for all); crossed
  with `selection.trade_off_grid` for Co-Tuning and `selection.alpha_grid` for L2-SP. An
  empty grid stands for the configured value alone.
  """
  sel = config.selection
  lrs = tuple(float(v) for v in sel.lr_grid) or (float(config.finetune.lr),)
  if variant == "l2_sp":
    name, values = "alpha", tuple(sel.alpha_grid) or (config.l2_sp.alpha,)
  elif variant.startswith(_CO_TUNING_PREFIX):
    name, values = "trade_off", tuple(sel.trade_off_grid) or (config.co_tuning.trade_off,)
  else:
    return [{"lr": lr} for lr in lrs]
  return [{"lr": lr, name: float(v)} for lr in lrs for v in values]


def candidate_stage(variant: str, candidate: Mapping[str, float]) -> str:
  """The stage (checkpoint folder) name of one candidate, e.g. `l2_sp_lr0.01_alpha0.1`."""
  return "_".join([variant, *(f"{k}{v:g}" for k, v in candidate.items())])


def _squared_distance(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def make_finetune_step(setup: Setup, tx: optax.GradientTransformation) -> Callable:
  """`jitted(state, step, x, y, relationship, anchor, coefs)`, shared by every variant.

  state: {'params': {'backbone', 'source_head', 'target_head'}, 'batch_stats', 'opt_state'};
  relationship: [C_t, C_s]; anchor: the pre-trained backbone params (L2-SP's θ⁰);
  coefs: {'trade_off', 'l2sp_alpha', 'l2sp_beta', 'lr_scale'} float32 scalars. The update
  is scaled by lr_scale: with SGD (momentum on the raw gradient, as PyTorch's) that is the
  same as every group's learning rate × lr_scale, so a learning-rate grid compiles once.
  """
  cfg = setup.config.finetune
  src, tgt = setup.source_model, setup.target_model

  def step(state, step, x, y, relationship, anchor, coefs):
    key = jax.random.fold_in(setup.key("finetune"), step)
    idx = jax.random.randint(key, (cfg.batch_size,), 0, y.shape[0])
    xb, yb = setup.constrain(x[idx]), y[idx]

    def loss_fn(params):
      variables = {"params": {"backbone": params["backbone"]}, "batch_stats": state["batch_stats"]}
      feats, updates = src.apply(
        variables, xb, train=True, mutable=["batch_stats"], method=models.Classifier.features
      )
      classify = models.Classifier.classify
      target_logits = tgt.apply({"params": {"head": params["target_head"]}}, feats, method=classify)
      source_logits = src.apply({"params": {"head": params["source_head"]}}, feats, method=classify)
      per_example = core.category_mapping.co_tuning_loss(
        target_logits, source_logits, yb, relationship, trade_off=coefs["trade_off"]
      )
      penalty = 0.5 * coefs["l2sp_alpha"] * _squared_distance(params["backbone"], anchor)
      penalty += (
        0.5
        * coefs["l2sp_beta"]
        * _squared_distance(
          params["target_head"], jax.tree.map(jnp.zeros_like, params["target_head"])
        )
      )
      ce = core.losses.cross_entropy(target_logits, yb).mean()
      # Backbones without BatchNorm (e.g. the MLP on text embeddings) return no statistics.
      aux = (updates.get("batch_stats", state["batch_stats"]), ce, penalty)
      return per_example.mean() + penalty, aux

    (loss, (stats, ce, penalty)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    updates = jax.tree.map(lambda u: coefs["lr_scale"] * u, updates)
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "batch_stats": stats, "opt_state": opt_state}
    return new, {"loss": loss, "target_ce": ce, "penalty": penalty}

  return jax.jit(step, donate_argnums=0)


# ----------------------------------------------------------------------------
# Stage 4: evaluation
# ----------------------------------------------------------------------------


def make_target_predict(setup: Setup) -> Callable:
  """`(state, x [N, ...]) -> target-head probabilities [N, C_t]`, eval mode."""
  src, tgt = setup.source_model, setup.target_model

  @jax.jit
  def batch_fn(params, stats, xb):
    variables = {"params": {"backbone": params["backbone"]}, "batch_stats": stats}
    feats = src.apply(variables, xb, train=False, method=models.Classifier.features)
    logits = tgt.apply(
      {"params": {"head": params["target_head"]}}, feats, method=models.Classifier.classify
    )
    return jax.nn.softmax(logits, axis=-1)

  def predict(state, x: np.ndarray) -> np.ndarray:
    bs = setup.config.eval_batch_size
    out = [
      np.asarray(batch_fn(state["params"], state["batch_stats"], xb)) for xb in _eval_batches(x, bs)
    ]
    return np.concatenate(out)[: len(x)]

  return predict


def evaluate_target_outcomes(setup: Setup, predict: Callable, state: PyTree) -> tuple[dict, dict]:
  """`evaluate_target`'s metrics and the per-example outcomes on the target test split."""
  test = setup.task.target_test
  probs = predict(state, test.x)
  outcomes = results_lib.outcomes(probs, test.y)
  out = {
    "accuracy": results_lib.accuracy(outcomes),
    "ece": float(
      core.calibration.expected_calibration_error(
        probs, test.y, num_bins=setup.config.calibration.num_bins
      )
    ),
  }
  if len(setup.task.target_val.y):
    out["val_accuracy"] = validation_accuracy(setup, predict, state)
  return out, outcomes


def validation_accuracy(setup: Setup, predict: Callable, state: PyTree) -> float:
  """Accuracy of the target head on the fixed target validation split."""
  val = setup.task.target_val
  return float(np.mean(np.argmax(predict(state, val.x), -1) == val.y))


def evaluate_target(setup: Setup, predict: Callable, state: PyTree) -> dict:
  """Accuracy and ECE of the target head on the target test (and val) split."""
  return evaluate_target_outcomes(setup, predict, state)[0]


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


# The config fields each reusable stage depends on (see train/stage_cache.py). The source
# model does not depend on the run's seed or on anything about the target task.
STAGE_FIELDS = {
  "source": (
    "data.benchmark",
    "data.options",
    "data.benchmark_seed",
    "data.source_domain",
    "data.source_classes",
    "model.backbone",
    "model.options",
    "source",
    "num_devices",
  ),
}


def pretrained_source(setup: Setup, workdir: str, writer) -> dict:
  """The source model's {'params', 'batch_stats'}: trained (stage `source`) or loaded."""
  config = setup.config
  if setup.source_variables is not None:
    return mesh_lib.replicate(setup.source_variables, setup.mesh)
  tx = optax.adam(config.source.lr)
  state = init_source(setup, tx)
  if config.model.source_checkpoint:
    template = {"params": state["params"], "batch_stats": state["batch_stats"]}
    variables = load_source_checkpoint(config.model.source_checkpoint, template)
    return mesh_lib.replicate(variables, setup.mesh)
  state = mesh_lib.replicate(state, setup.mesh)
  state = stages.run_stage(
    setup.config,
    workdir,
    "source",
    make_source_step(setup, tx),
    state,
    config.source.steps,
    writer=writer,
    stage_fields=STAGE_FIELDS,
  )
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def finetune_start(setup: Setup, source: PyTree) -> dict:
  """Where every variant starts: {'backbone', 'source_head'} pre-trained, a new 'target_head'.

  Args:
    setup: the run's Setup (its target model sets the new head's size C_t).
    source: the source model's {'params': {'backbone', 'head'}, 'batch_stats'}.
  """
  feature_dim = setup.source_model.apply(
    source,
    jnp.zeros((1, *setup.task.input_shape), jnp.float32),
    train=False,
    method=models.Classifier.features,
  ).shape[-1]
  return {
    "backbone": source["params"]["backbone"],
    "source_head": source["params"]["head"],
    "target_head": init_target_head(setup, feature_dim)["head"],
  }


def finetune_variant(
  setup: Setup,
  workdir: str,
  variant: str,
  *,
  source: PyTree,
  start: PyTree,
  relationships: Mapping[str, np.ndarray],
  step_fn: Callable,
  tx: optax.GradientTransformation,
  writer,
  stage: str | None = None,
  candidate: Mapping[str, float] | None = None,
) -> PyTree:
  """Runs (or resumes) the fine-tuning stage of one variant; returns its final state.

  Args:
    setup: the run's Setup (its target training split is what is fine-tuned on).
    workdir: the run's directory.
    variant: one of VARIANTS; a `co_tuning_<kind>` variant needs `relationships[kind]`.
    source: the pre-trained {'params', 'batch_stats'} (BatchNorm statistics, L2-SP anchor).
    start: `finetune_start(setup, source)`; left intact (the stage works on copies).
    relationships: kind -> [C_t, C_s] relationship.
    step_fn, tx: `make_finetune_step(setup, tx)` and `make_optimizer(config)`.
    writer: the metric writer.
    stage: the stage (checkpoint folder) name; default the variant's name.
    candidate: hyper-parameters overriding the config's (see `variant_settings`).

  Returns:
    {'params': {'backbone', 'source_head', 'target_head'}, 'batch_stats', 'opt_state'}.
  """
  settings = variant_settings(setup.config, variant, candidate)
  kind = settings["relationship"]
  rep = mesh_lib.replicated(setup.mesh)
  uniform = np.full(
    (setup.num_target_classes, setup.num_source_classes), 1.0 / setup.num_source_classes, np.float32
  )
  relationship = jax.device_put(relationships[kind] if kind else uniform, rep)
  anchor = jax.device_put(source["params"]["backbone"], rep)
  coefs = jax.device_put(
    {k: np.float32(settings[k]) for k in ("trade_off", "l2sp_alpha", "l2sp_beta", "lr_scale")},
    rep,
  )
  state = {
    "params": start,
    "batch_stats": source["batch_stats"],
    "opt_state": set_weight_decay(tx.init(start), settings["weight_decay"]),
  }
  # Copies: donation inside the loop must not invalidate the shared starting point.
  state = jax.tree.map(jnp.copy, mesh_lib.replicate(state, setup.mesh))
  bound = stages.bind(step_fn, setup.x_target, setup.y_target, relationship, anchor, coefs)
  return stages.run_stage(
    setup.config,
    workdir,
    stage or variant,
    bound,
    state,
    setup.config.finetune.steps,
    writer=writer,
    stage_fields=STAGE_FIELDS,
  )


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md.

  `setup` (from `make_setup(config)`) may be passed when the caller already
  built it to check the inputs.
  """
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  task = setup.task
  logging.info(
    "co_tuning: source %s %s, target %s %s: %d train / %d val / %d test",
    task.source_domain or "(checkpoint)",
    task.source_names,
    task.target_domain,
    task.target_names,
    len(task.target_train.y),
    len(task.target_val.y),
    len(task.target_test.y),
  )
  writer = metrics_lib.MetricWriter(workdir)
  primary = jax.process_index() == 0

  # 1. The source model.
  source = pretrained_source(setup, workdir, writer)

  # 2. Calibration on held-out source data, then the relationships on target data.
  source_logits = make_logits_fn(setup)
  calibration = calibrate(setup, source_logits, source)
  temperature = calibration["temperature"]

  def calibrated_probs(x):
    return np.asarray(jax.nn.softmax(jnp.asarray(source_logits(source, x)) / temperature, -1))

  probs_train = calibrated_probs(task.target_train.x)
  probs_val = calibrated_probs(task.target_val.x)
  # Diagnostics use the validation split only (the test split is for the final numbers).
  labels_pool = np.concatenate([task.target_train.y, task.target_val.y])
  prior = np.bincount(labels_pool, minlength=setup.num_target_classes) / len(labels_pool)
  kinds = [k for k in RELATIONSHIPS if f"{_CO_TUNING_PREFIX}{k}" in config.variants]
  relationships, relationship_info, selection = {}, {}, {}
  for kind in kinds:
    r, chosen = compute_relationship(
      kind,
      probs_train,
      task.target_train.y,
      probs_val,
      task.target_val.y,
      setup.num_target_classes,
      max_iter=config.co_tuning.reverse_max_iter,
    )
    relationships[kind] = r
    if chosen:
      selection[f"relationship_{kind}"] = chosen
    heatmap = f"relationship_{kind}.png"
    if primary:
      save_heatmap(
        workdir_lib.as_path(workdir) / heatmap,
        r,
        task.target_names,
        task.source_names,
        title=f"p(y_s | y_t), {kind} (rate {config.data.sampling_rate:g}, seed {config.seed})",
      )
    relationship_info[kind] = {
      "matrix": np.round(r, 6).tolist(),
      "heatmap": heatmap,
      "source_head_accuracy_on_target_val": relationship_accuracy(
        r, probs_val, task.target_val.y, prior
      ),
      **relationship_peakedness(r),
    }

  # 3. Fine-tuning: every variant from the same starting point, once per candidate of its
  # grid; the candidate with the best target validation accuracy is kept (ties: the first).
  tx = make_optimizer(config)
  step_fn = make_finetune_step(setup, tx)
  start = finetune_start(setup, source)
  predict = make_target_predict(setup)
  metrics, per_example, tried = {}, {}, {}
  for variant in config.variants:
    grid = candidates(config, variant)
    best, best_state, tried[variant] = None, None, []
    for candidate in grid:
      state = finetune_variant(
        setup,
        workdir,
        variant,
        source=source,
        start=start,
        relationships=relationships,
        step_fn=step_fn,
        tx=tx,
        writer=writer,
        stage=variant if len(grid) == 1 else candidate_stage(variant, candidate),
        candidate=candidate,
      )
      val_accuracy = validation_accuracy(setup, predict, state)
      tried[variant].append({**candidate, "val_accuracy": val_accuracy})
      if best is None or val_accuracy > best["val_accuracy"]:
        best, best_state = tried[variant][-1], state
    selection[variant] = dict(best)
    result, outcomes = evaluate_target_outcomes(setup, predict, best_state)
    metrics[variant] = {task.target_domain: result}
    per_example[variant] = {task.target_domain: outcomes}
    metrics[variant]["mean"] = {"accuracy": metrics[variant][task.target_domain]["accuracy"]}
  writer.close()

  return {
    "method": "co_tuning",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "source_domains": [task.source_domain] if task.source_domain else [],
    "target_domains": [task.target_domain],
    "source_classes": list(task.source_names),
    "target_classes": list(task.target_names),
    "sampling_rate": float(config.data.sampling_rate),
    "num_examples": {
      "source_train": 0 if task.source_train is None else len(task.source_train.y),
      "target_train": len(task.target_train.y),
      "target_val": len(task.target_val.y),
      "target_test": len(task.target_test.y),
    },
    "source_model": setup.source_info or {"checkpoint": config.model.source_checkpoint},
    "source_calibration": calibration,
    "relationships": relationship_info,
    "metrics": metrics,
    "selection": selection,
    "selection_candidates": tried,
    results_lib.PER_EXAMPLE: per_example,
  }
