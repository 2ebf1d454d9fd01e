"""The merge family on all K adapters of a soup (rows `merge_<method>`).

Task arithmetic, TIES with per-tensor (`ties`) and per-member whole-vector (`ties_member`)
trim, DARE, DARE-TIES and Model Breadcrumbs on the task vectors (adapters minus their shared
initialisation), each with its λ and density chosen on the study domains' validation
splits (results.json `selection`); `merge_avg_like_ties`, the uniform average at the chosen
TIES' norm (its magnitude control); and the merges that use data (`soup_learned`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.core import merging
from moe_adapt.methods import sign_pruning, soup_core, soup_learned

PyTree = Any

MERGE_METHODS = ("task_arithmetic", "ties", "ties_member", "dare", "dare_ties", "breadcrumbs")
# Model Breadcrumbs' share of largest-magnitude entries dropped (the paper's β = 1 %).
BREADCRUMBS_TOP = 0.01


def merge_candidates(config) -> dict[str, list[dict[str, float]]]:
  """Per merge method of `merge.methods`, its grid of hyper-parameters (chosen on validation).

  Methods that sum the K deltas (task arithmetic, DARE, Breadcrumbs) take λ from
  `merge.sum_lambdas` (λ = 1/K is the uniform average); TIES-style disjoint means take it
  from `merge.ties_lambdas`; sparsifying methods take the density from `merge.densities`.
  """
  m = config.merge
  grids = {
    "task_arithmetic": [{"lambda": lam} for lam in m.sum_lambdas],
    "ties": [{"density": d, "lambda": lam} for d in m.densities for lam in m.ties_lambdas],
    "ties_member": [{"density": d, "lambda": lam} for d in m.densities for lam in m.ties_lambdas],
    "dare": [{"density": d, "lambda": lam} for d in m.densities for lam in m.sum_lambdas],
    "dare_ties": [{"density": d, "lambda": lam} for d in m.densities for lam in m.ties_lambdas],
    "breadcrumbs": [{"density": d, "lambda": lam} for d in m.densities for lam in m.sum_lambdas],
  }
  return {name: grids[name] for name in m.methods}


def merged_delta(name: str, deltas: PyTree, hp: Mapping[str, float], key: jax.Array) -> PyTree:
  """The merged task vector of method `name` (of MERGE_METHODS) with hyper-parameters `hp`.

  Args:
    name: the merge method.
    deltas: [K, ...] task vectors (adapters minus their shared initialisation).
    hp: {'lambda'[, 'density']}.
    key: PRNG key of DARE's drops.
  """
  lam = hp["lambda"]
  if name == "task_arithmetic":
    return merging.task_arithmetic(deltas, scale=lam)
  if name in ("ties", "ties_member"):
    trim = "leaf" if name == "ties" else "member"
    return merging.ties_merge(deltas, density=hp["density"], scale=lam, trim=trim)
  if name == "dare":
    return merging.dare(key, deltas, density=hp["density"], scale=lam)
  if name == "dare_ties":
    return merging.dare_ties(key, deltas, density=hp["density"], scale=lam)
  if name == "breadcrumbs":
    return merging.breadcrumbs(
      deltas, density=hp["density"], top_fraction=BREADCRUMBS_TOP, scale=lam
    )
  raise ValueError(f"merge method {name!r} is unknown; accepted: {', '.join(MERGE_METHODS)}")


def _params_fn(soup: soup_core.Soup, delta_fn: Callable[[], PyTree], d: str):
  """`fn() -> full params`: the shared initialisation plus `delta_fn()`, with `d`'s own
  head (the average head with `study.average_heads`)."""
  head = None if soup.setup.config.study.average_heads else d
  return lambda: soup.with_head(jax.tree.map(jnp.add, soup.init_adapters, delta_fn()), head)


def _builders(soup: soup_core.Soup, deltas: PyTree) -> dict[str, Callable[[Mapping], PyTree]]:
  """Method -> `fn(hp) -> merged task vector` for the grid-chosen merges (Fishers and Gram
  matrices computed at most once, and only when a score is not cached)."""
  cfg = soup.setup.config
  key = soup.setup.key("merge_dare")
  fishers = functools.cache(
    lambda: soup_learned.member_fishers(soup, examples=cfg.merge.fisher_examples)
  )
  grams = functools.cache(
    lambda: soup_learned.member_grams(soup, examples=cfg.merge.regmean_examples)
  )
  builders: dict[str, Callable[[Mapping], PyTree]] = {
    name: lambda hp, name=name: merged_delta(name, deltas, hp, key) for name in MERGE_METHODS
  }
  builders["fisher"] = lambda hp: soup_learned.fisher_delta(deltas, fishers(), hp["epsilon"])
  builders["regmean"] = lambda hp: merging.regmean_merge(deltas, grams(), alpha=hp["alpha"])
  return builders


def _chosen_on_validation(
  soup: soup_core.Soup,
  study: Sequence[str],
  name: str,
  grid: Sequence[Mapping[str, float]],
  build: Callable[[Mapping], PyTree],
) -> tuple[dict[str, float], Mapping[str, float]]:
  """(setting name -> mean validation accuracy over `study`, the best setting; ties go to
  the first in `grid`)."""
  suffix = ":avghead" if soup.setup.config.study.average_heads else ""
  val = {}
  for hp in grid:
    delta = functools.cache(lambda hp=hp: build(hp))
    what = f"{name}[{soup_core.hp_name(hp)}]:{soup.key(soup.names)}{suffix}"
    accs = [soup.score(d, what, _params_fn(soup, delta, d), split="val")["accuracy"] for d in study]
    val[soup_core.hp_name(hp)] = float(np.mean(accs))
  best = max(range(len(grid)), key=lambda j: (val[soup_core.hp_name(grid[j])], -j))
  return val, grid[best]


def merge_study(soup: soup_core.Soup, study: Sequence[str]) -> dict:
  """The merge family on the K adapters, each domain with its own head.

  For each method of `merge.methods` and each setting of its grid (`merge_candidates`),
  the merged task vector is added to the shared initialisation and scored on every study
  domain's VALIDATION split (`eval.max_val_examples`); the setting of best mean validation
  accuracy is then scored on the test splits (variant `merge_<method>`). No test label
  takes part in any choice. `merge_avg_like_ties` is the uniform average of the deltas at
  the norm of the chosen TIES merge (its magnitude control). The merges of `merge.learned`
  (`soup_learned`): Fisher's ε and RegMean's α are chosen on validation like the grids
  above; AdaMerging learns its coefficients on each test domain's unlabelled inputs.

  Returns:
    {'metrics': variant -> per-domain scores, 'selection': variant -> chosen
     hyper-parameters and their mean validation accuracy, 'validation': variant ->
     setting -> mean validation accuracy, 'adamerging': settings and learned coefficients
     per domain (or None)}.
  """
  cfg = soup.setup.config
  suffix = ":avghead" if cfg.study.average_heads else ""
  adapters = soup_core.without_head(soup.stacked)
  deltas = jax.tree.map(lambda x, x0: x - x0[None], adapters, soup.init_adapters)
  everyone = soup.key(soup.names)
  builders = _builders(soup, deltas)
  metrics, selection, validation, chosen_delta = {}, {}, {}, {}
  for name, grid in {**merge_candidates(cfg), **soup_learned.learned_candidates(cfg)}.items():
    val, hp = _chosen_on_validation(soup, study, name, grid, builders[name])
    variant = f"merge_{name}"
    selection[variant] = {**hp, "val_accuracy": val[soup_core.hp_name(hp)]}
    validation[variant] = val
    delta = functools.cache(lambda hp=hp, name=name: builders[name](hp))
    chosen_delta[name] = delta
    what = f"{name}[{soup_core.hp_name(hp)}]:{everyone}{suffix}"
    metrics[variant] = soup_core.with_mean(
      {d: soup.score(d, what, _params_fn(soup, delta, d), variant=variant) for d in study}
    )
  adamerging = None
  if "adamerging" in cfg.merge.learned:
    metrics["merge_adamerging"], adamerging = soup_learned.adamerging_rows(soup, study, deltas)
  if "ties" in chosen_delta:
    ties = chosen_delta["ties"]
    what = f"avglike[ties,{soup_core.hp_name(selection['merge_ties'])}]:{everyone}{suffix}"

    def avg_like_ties() -> PyTree:
      return sign_pruning.rescaled_like(merging.weighted_average(deltas), ties())

    metrics["merge_avg_like_ties"] = soup_core.with_mean(
      {
        d: soup.score(d, what, _params_fn(soup, avg_like_ties, d), variant="merge_avg_like_ties")
        for d in study
      }
    )
  return {
    "metrics": metrics,
    "selection": selection,
    "validation": validation,
    "adamerging": adamerging,
  }
