"""The `adapter_soup` config's checks and the domains each part of a run uses.

Every check raises one ValueError naming the field and what it accepts (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from moe_adapt.methods import _checks, sign_mixing, soup_learned, soup_merges, soup_selection
from moe_adapt.methods import adapter_harness as ft

ADAPTER_KINDS = ("pfeiffer", "houlsby", "lora")
LORA_MIXING = ("product", "factors")


def _check_domain_names(config, name: str) -> None:
  value = _checks.field(config, name)
  if isinstance(value, str) or not isinstance(value, Sequence):
    raise ValueError(f"{name}={value!r} is invalid; accepted: a tuple of domain names")
  if not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
    raise ValueError(f"{name}={tuple(value)!r} is invalid; accepted: distinct domain names")


def _bool(config, name: str) -> None:
  value = _checks.field(config, name)
  if not isinstance(value, bool):
    raise ValueError(f"{name}={value!r} is invalid; accepted: a bool")


def _check_selection_and_study(config) -> None:
  """Fields `selection.*` and `study.*`."""
  _checks.integer(config, "selection.num_samples", 2)
  _checks.integer(config, "selection.top_k", 1)
  _checks.number(config, "selection.threshold", low=-1.0, high=1.0, low_open=False)
  _checks.number(config, "selection.cluster_min_share", low=0.0, high=1.0, low_open=False)
  _checks.choice(config, "selection.covariance", soup_selection.COVARIANCE_TYPES)
  _checks.integer(config, "selection.pca_dim", 0)
  _checks.integer(config, "study.max_mixtures", 1)
  _checks.integer(config, "study.bootstrap_samples", 0)
  _bool(config, "study.fsd_include_head")
  _checks.choice(config, "study.greedy_rank", sign_mixing.GREEDY_RANKS)
  _bool(config, "study.average_heads")
  sizes = config.study.sizes
  ok = not isinstance(sizes, str) and isinstance(sizes, Sequence)
  ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in sizes)
  if not ok or len(set(sizes)) != len(sizes):
    raise ValueError(
      f"study.sizes={sizes!r} is invalid; accepted: a tuple of distinct integers >= 2 "
      "(mixture sizes, the own adapter counted; () = all)"
    )
  _bool(config, "selection.zero_shot_head")
  number_tuple(config, "selection.threshold_sweep", "in [-1, 1]", lambda v: -1 <= v <= 1)


def _check_pruning(config) -> None:
  """Fields `pruning.*`."""
  sparsities = config.pruning.sparsities
  ok = not isinstance(sparsities, str) and isinstance(sparsities, Sequence)
  ok = ok and all(
    isinstance(s, int | float) and not isinstance(s, bool) and 0.0 < s < 1.0 for s in sparsities
  )
  if not ok or len(set(sparsities)) != len(sparsities):
    raise ValueError(
      f"pruning.sparsities={sparsities!r} is invalid; accepted: a tuple of distinct numbers "
      "in (0, 1)"
    )
  fraction = config.pruning.fsd_layer_fraction
  if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
    raise ValueError(
      f"pruning.fsd_layer_fraction={fraction!r} is invalid; accepted: a number in (0, 1]"
    )
  _checks.number(config, "pruning.ties_scale", low=0.0)


def _check_merges(config) -> None:
  """Fields `merge.*`."""
  number_tuple(config, "merge.sum_lambdas", "> 0", lambda v: v > 0, non_empty=True)
  number_tuple(config, "merge.ties_lambdas", "> 0", lambda v: v > 0, non_empty=True)
  number_tuple(config, "merge.densities", "in (0, 1]", lambda v: 0 < v <= 1, non_empty=True)
  _checks.names(config, "merge.methods", soup_merges.MERGE_METHODS, allow_empty=True)
  _checks.names(config, "merge.learned", soup_learned.LEARNED_METHODS, allow_empty=True)
  _checks.integer(config, "merge.fisher_examples", 1)
  number_tuple(config, "merge.fisher_epsilons", ">= 0", lambda v: v >= 0, non_empty=True)
  _checks.integer(config, "merge.regmean_examples", 1)
  number_tuple(config, "merge.regmean_alphas", "in [0, 1]", lambda v: 0 <= v <= 1, non_empty=True)
  _checks.integer(config, "merge.adamerging_steps", 1)
  _checks.integer(config, "merge.adamerging_batch_size", 1)
  _checks.number(config, "merge.adamerging_lr", low=0.0)
  _checks.number(
    config, "merge.adamerging_init", low=0.0, high=1.0, low_open=False, high_open=False
  )
  _checks.choice(config, "merge.adamerging_granularity", soup_learned.ADAMERGING_GRANULARITY)
  if "regmean" in config.merge.learned and config.adapter.kind == "lora":
    raise ValueError(
      "merge.learned has 'regmean' with adapter.kind='lora'; accepted: RegMean with adapters "
      "of linear kernels (pfeiffer, houlsby), or merge.learned without 'regmean'"
    )


def validate_config(config) -> None:
  """Checks every field of the `adapter_soup` method; raises ValueError naming the field."""
  _checks.choice(config, "adapter.kind", ADAPTER_KINDS)
  ft.validate_harness_config(config)
  for name in ("data.domains", "data.target_domains", "study.domains"):
    _check_domain_names(config, name)
  _check_selection_and_study(config)
  _check_pruning(config)
  _checks.integer(config, "eval.max_examples", 0)
  _checks.integer(config, "eval.max_val_examples", 0)
  _checks.choice(config, "mixing.lora", LORA_MIXING)
  _check_merges(config)


def number_tuple(config, name: str, what: str, test, *, non_empty: bool = False) -> None:
  """The field `name` is a tuple of distinct numbers passing `test` (described by `what`)."""
  value = _checks.field(config, name)
  ok = not isinstance(value, str) and isinstance(value, Sequence)
  ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and test(v) for v in value)
  if not ok or len(set(value)) != len(value) or (non_empty and not value):
    raise ValueError(
      f"{name}={value!r} is invalid; accepted: a {'non-empty ' if non_empty else ''}tuple of "
      f"distinct numbers {what}"
    )


class Domains(NamedTuple):
  """Which domain plays which part.

  Attributes:
    adapters: the K domains with an adapter (`data.domains`, () = all), benchmark order.
    targets: novel-domain targets (`data.target_domains`, () = the benchmark's defaults).
    study: domains of the in-domain study (`study.domains`, () = all of `adapters`).
  """

  adapters: tuple[str, ...]
  targets: tuple[str, ...]
  study: tuple[str, ...]


def resolve_domains(config, task: ft.Task) -> Domains:
  """The `Domains` of `config` on `task`; ValueError naming the field if one is invalid."""

  def check(name: str, names: Sequence[str], accepted: Sequence[str], what: str = "") -> None:
    bad = [d for d in names if d not in accepted]
    if bad:
      raise ValueError(f"{name} has unknown {bad}; accepted{what}: {', '.join(accepted)}")

  check("data.domains", config.data.domains, task.domains)
  chosen = set(config.data.domains or task.domains)
  adapters = tuple(d for d in task.domains if d in chosen)
  if len(adapters) < 2:
    raise ValueError(
      f"data.domains={tuple(config.data.domains)!r} gives {len(adapters)} adapter(s); "
      f"accepted: at least 2 of {', '.join(task.domains)}"
    )
  check("data.target_domains", config.data.target_domains, task.domains)
  # With >= 2 adapters every target has a candidate (an adapter of another domain).
  targets = tuple(config.data.target_domains) or tuple(task.default_targets)
  check("study.domains", config.study.domains, adapters, " (domains with an adapter)")
  study = tuple(config.study.domains) or adapters
  return Domains(adapters, targets, study)


def make_setup(config) -> ft.Setup:
  """The harness's setup (data, backbone); also checks the domain fields against the data."""
  setup = ft.make_setup(config)
  domains = resolve_domains(config, setup.task)
  if config.selection.top_k > len(domains.adapters):
    raise ValueError(
      f"selection.top_k={config.selection.top_k} exceeds the {len(domains.adapters)} adapters "
      f"({', '.join(domains.adapters)}); accepted: 1..{len(domains.adapters)}"
    )
  return setup
