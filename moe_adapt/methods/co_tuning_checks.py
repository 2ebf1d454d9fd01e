"""Co-Tuning's config fields: its variants, relationship kinds and the checks of every field.

`moe_adapt.methods.co_tuning` re-exports the public names (`VARIANTS`, `RELATIONSHIPS`,
`validate_config`, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from moe_adapt.methods import _checks

RELATIONSHIPS = ("direct", "reverse")
VARIANTS = ("fine_tune", "l2_sp", *(f"co_tuning_{kind}" for kind in RELATIONSHIPS))
_CO_TUNING_PREFIX = "co_tuning_"
# The variant the others are compared with (paired differences; launch.collect.BASELINES).
BASELINE = "fine_tune"
# model.source_checkpoint: a file of these suffixes is in this project's layout
# (save_source_checkpoint); any other path is a Hugging Face / timm checkpoint directory.
CHECKPOINT_SUFFIXES = (".npz", ".safetensors")
# PyTorch pickles, refused by name (their weights must be converted to safetensors first).
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def relationship_kind(variant: str) -> str | None:
  """The relationship kind a `co_tuning_<kind>` variant uses; None for the baselines."""
  return variant[len(_CO_TUNING_PREFIX) :] if variant.startswith(_CO_TUNING_PREFIX) else None


def is_legacy_checkpoint(path: str) -> bool:
  """Whether `model.source_checkpoint` names a file of `save_source_checkpoint`."""
  return str(path).endswith(CHECKPOINT_SUFFIXES)


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
  _check_numbers(config)
  _check_lists(config)
  _check_source(config)


def _check_numbers(config) -> None:
  """Counts, rates, learning rates and coefficients, and the selection grids."""
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


def _check_lists(config) -> None:
  _check_variants(config.variants)
  _checks.runs_baseline(config, "variants", BASELINE)
  _check_class_list("data.source_classes", config.data.source_classes)
  _check_class_list("data.target_classes", config.data.target_classes)
  for name in ("data.source_domain", "data.target_domain", "model.source_checkpoint"):
    if not isinstance(_checks.field(config, name), str):
      raise ValueError(f"{name}={_checks.field(config, name)!r} is invalid; accepted: a string")


def _check_source(config) -> None:
  """The source model comes from somewhere: a checkpoint or source data to pre-train on."""
  integer = functools.partial(_checks.integer, config)
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
