"""Meta-DMoE's config fields: one clear ValueError naming the field, per section.

`validate_config` checks every field the method reads (both paths); `check_sizes` checks
the episode and support sizes against the data once it is known (both setups).
"""

from __future__ import annotations

from moe_adapt.methods import _checks

DISTILL = ("features", "logits", "both")
STACK_MAPS = ("auto", "unrolled", "map", "vmap")
AGGREGATORS = ("transformer", "mean", "max")

_POSITIVE_INTS = (
  "experts.num_experts",
  "experts.steps",
  "experts.batch_size",
  "aggregator.pretrain_steps",
  "aggregator.batch_size",
  "aggregator.depth",
  "aggregator.num_heads",
  "student.steps",
  "student.batch_size",
  "meta.steps",
  "meta.support_size",
  "meta.query_size",
  "meta.inner_steps",
  "adapt.support_size",
  "adapt.repeats",
  "eval_batch_size",
  "checkpoint_every",
  "log_every",
)
_POSITIVE_RATES = (
  "experts.lr",
  "aggregator.lr",
  "student.lr",
  "meta.inner_lr",
  "meta.student_lr",
  "backbone.lr",
)
_SWITCHES = ("model.shared_init", "meta.mask_in_domain_expert", "meta.first_order", "meta.remat")


def validate_config(config) -> None:
  """Checks every field this method reads; raises ValueError naming the field."""
  _check_sizes_and_rates(config)
  _check_switches(config)
  _check_backbone_and_selection(config)
  _check_choices(config)
  streaming(config)


def _check_sizes_and_rates(config) -> None:
  """The seed, the step counts and batch sizes (ints >= 1) and the learning rates (> 0)."""
  if not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f"seed={config.seed!r} is invalid; accepted: an integer >= 0")
  for name in _POSITIVE_INTS:
    value = _checks.field(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}={value!r} is invalid; accepted: an integer >= 1")
  for name in _POSITIVE_RATES:
    value = _checks.field(config, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
      raise ValueError(f"{name}={value!r} is invalid; accepted: a number > 0")
  for name in ("backbone.steps", "backbone.batch_size", "selection.meta_checkpoints"):
    _checks.integer(config, name, 1)
  _checks.integer(config, "meta.inner_lr_dim", 1)
  _checks.integer(config, "meta.steps_per_epoch", 0)
  _checks.number(config, "meta.lr_decay", low=0.0, high=1.0, high_open=False)
  _checks.number(config, "meta.logits_weight", low=0.0)


def _check_switches(config) -> None:
  """The boolean switches (ablations and the meta-gradient's options)."""
  for name in _SWITCHES:
    if not isinstance(_checks.field(config, name), bool):
      raise ValueError(
        f"{name}={_checks.field(config, name)!r} is invalid; accepted: True or False"
      )


def _check_backbone_and_selection(config) -> None:
  """`backbone.checkpoint` and the source-side selection's candidates."""
  if not isinstance(config.backbone.checkpoint, str):
    raise ValueError(
      f"backbone.checkpoint={config.backbone.checkpoint!r} is invalid; accepted: a path "
      "(a file written by models.backbone_io.save_backbone, or a Hugging Face / timm ResNet "
      "checkpoint directory) or '' (train the backbone stage)"
    )
  factors = config.selection.inner_lr_factors
  if (
    isinstance(factors, str)
    or not isinstance(factors, tuple | list)
    or not factors
    or not all(isinstance(f, int | float) and not isinstance(f, bool) and f > 0 for f in factors)
  ):
    raise ValueError(
      f"selection.inner_lr_factors={factors!r} is invalid; accepted: a non-empty tuple of "
      "numbers > 0 (multiples of the meta-trained inner step size)"
    )
  if config.selection.meta_checkpoints > config.meta.steps:
    raise ValueError(
      f"selection.meta_checkpoints={config.selection.meta_checkpoints} exceeds "
      f"meta.steps={config.meta.steps}; accepted: 1..{config.meta.steps}"
    )


def _check_choices(config) -> None:
  """The named choices, the experts' mesh shape, the compute dtype and the device count."""
  if not isinstance(config.meta.aggregator_lr, (int, float)) or config.meta.aggregator_lr < 0:
    raise ValueError(
      f"meta.aggregator_lr={config.meta.aggregator_lr!r} is invalid; accepted: a number >= 0"
    )
  _checks.choice(config, "meta.distill", DISTILL)
  _checks.choice(config, "experts.stack_map", STACK_MAPS)
  shape = config.experts.mesh_shape
  if shape != () and (
    isinstance(shape, str)
    or not isinstance(shape, tuple | list)
    or len(shape) != 2
    or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
  ):
    raise ValueError(
      f"experts.mesh_shape={shape!r} is invalid; accepted: () (the data-parallel mesh) or "
      "(data, expert), two ints >= 1, e.g. (2, 4)"
    )
  _checks.choice(config, "aggregator.kind", AGGREGATORS)
  _checks.compute_dtype(config)
  if not isinstance(config.num_devices, int) or config.num_devices < 0:
    raise ValueError(
      f"num_devices={config.num_devices!r} is invalid; accepted: 0 (all devices) or a count"
    )


def streaming(config) -> bool:
  """`data.streaming` (False when the preset has no such field).

  Raises:
    ValueError: naming data.streaming when it is not a bool.
  """
  value = config.data.get("streaming", False)
  if not isinstance(value, bool):
    raise ValueError(f"data.streaming={value!r} is invalid; accepted: True or False")
  return value


def check_in_memory(config) -> None:
  """The in-memory path's entry points refuse a streaming config (meta_dmoe_stream runs it,
  and is what the method name 'meta_dmoe' resolves to)."""
  if streaming(config):
    raise ValueError(
      "data.streaming=True is the streaming path: run it with moe_adapt.methods."
      "meta_dmoe_stream (make_setup, run), which the CLI's method 'meta_dmoe' uses; this "
      "module's make_setup and run hold the data in memory"
    )


def check_sizes(config, smallest_source: int, target_sizes: dict[str, int]) -> None:
  """An episode fits in the smallest source domain's training split (`smallest_source`
  examples) and the adaptation support in every target domain (`target_sizes`: domain ->
  its number of unlabeled examples)."""
  episode = config.meta.support_size + config.meta.query_size
  if episode > smallest_source:
    raise ValueError(
      f"meta.support_size + meta.query_size = {episode} exceeds the smallest source domain "
      f"({smallest_source} training examples); accepted: at most {smallest_source}"
    )
  for d, n in target_sizes.items():
    if config.adapt.support_size > n:
      raise ValueError(
        f"adapt.support_size={config.adapt.support_size} exceeds target domain {d!r} "
        f"({n} unlabeled examples); accepted: at most {n}"
      )
