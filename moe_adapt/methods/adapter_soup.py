"""AdapterSoup and the signed-weight-direction study of adapter mixtures: `adapter_soup`.

One adapter (+ head) is trained per domain, every one from the SAME initialisation (stages
`adapter_<domain>`; AdapterSoup found that averaging adapters from different seeds fails).
Their K trees are stacked (leading axis K) and mixed in weight space by a uniform average
(`core.merging.weighted_average`), merged into the frozen backbone and evaluated.

a) Novel domains (AdapterSoup, Chronopoulou et al., Findings of EACL 2023): for each target
   t of `data.target_domains`, the candidates are the adapters of the other domains, mixed
   as chosen by

   - `similarity`: mean cosine similarity between sampled sentence embeddings (the
     pretrained backbone without adapters) of t and of each candidate; top `selection.top_k`
     with score >= `selection.threshold` (at least the best one); `similarity_t<x>` the same
     at each threshold x of `selection.threshold_sweep` (evaluation only);
   - `clustering`: a Gaussian mixture (one component per candidate) fitted on the
     candidates' sampled embeddings; each component belongs to the domain most of its
     members come from; domains holding >= `selection.cluster_min_share` of t's samples
     are averaged (at most top_k, at least one);
   - `all`: every candidate (the uniform soup);
   - `best_single`: the candidate with the best accuracy on t's TEST split — an ORACLE;
   - `zero_shot`: the frozen backbone with a head trained on the candidates' pooled
     training splits (stage `zero_shot_head_<t>`), no adapter;

   and `single_<d>`: each candidate alone. A novel target has no head: its soups average
   the members' heads with their adapters. Each selector's scores carry `num_adapters`, and
   results.json `selections` what it chose.
b) In-domain study (Nguyen & Le, ACL 2024, "Generalizability of Mixture of Domain-Specific
   Adapters from the Lens of Signed Weight Directions ..."): for each study domain d, the
   mixtures holding d's own adapter (all 2^(K-1) of them, or a seeded sample stratified
   over sizes; only the sizes of `study.sizes`), their accuracy and macro-F1 on d's test
   split with d's OWN head (adapters only are averaged, as the paper's Eq. 1;
   `study.average_heads` averages the heads too, an ablation) and their fraction of sign
   difference (FSD: `core.merging.sign_disagreement`, adapter weights without the head by
   default); Pearson/Spearman between FSD and accuracy within each mixture size and pooled
   with the size as a covariate, with bootstrap intervals (`sign_study`); the pairwise FSD
   matrix.
c) Greedy adapter mixing (their Alg. 1): d's adapter plus the l-1 others of lowest row-mean
   FSD (`study.greedy_rank='row_mean'`, the paper's ranking and the default) or of lowest
   FSD to it (`'target'`), l = 1..K.
d) Pruning (their Alg. 2 and 4): magnitude pruning of each adapter (head dense) at each
   sparsity s before averaging — d's own adapter alone (`prune_own_<s>`) and the all-K
   mixture (`prune_<s>`); only each member's layers of highest mean FSD to the other
   adapters (`prune_fsd_<s>`); TIES merging of the all-K mixture at density 1-s on the
   deltas from the shared initialisation (`ties_<s>`) and its magnitude control, the
   uniform average rescaled to TIES' norm (`avg_like_ties_<s>`).
e) The merge family on all K adapters (`merge_<method>`: task arithmetic, TIES with
   per-tensor and whole-vector trim, DARE, DARE-TIES, Breadcrumbs), λ and density chosen
   on the study domains' validation splits (results.json `selection`), and
   `merge_avg_like_ties` (the uniform average at the chosen TIES' norm).

LoRA soups (`mixing.lora='product'`, the default) average the updates ΔW = B·A, evaluated
as one LoRA of rank K·r; `'factors'` averages A and B separately. Merges and pruning act
on the factors either way. Every score is accuracy and macro-F1.

Every score is cached in `<workdir>/mixture_evals.json`, so a resumed run evaluates
nothing twice for its scores; the per-example outcomes of the reported variants
(results.json `per_example`) persist in `<workdir>/mixture_outcomes.json` (a run resumed
from a workdir written before that file existed evaluates the reported variants once
more to recover them). The trained stages
are shared through `stage_cache` (`ADAPTER_FIELDS`, `ZERO_SHOT_FIELDS`): a run that only
evaluates differently trains nothing. Plots go to
`<workdir>/plots/`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moe_adapt.core import merging
from moe_adapt.methods import _checks, sign_study
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import artifacts
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import workdir as workdir_lib

PyTree = Any

ADAPTER_KINDS = ("pfeiffer", "houlsby", "lora")
COVARIANCE_TYPES = ("diag", "full", "spherical", "tied")
GREEDY_RANKS = ("target", "row_mean")
LORA_MIXING = ("product", "factors")
MERGE_METHODS = ("task_arithmetic", "ties", "ties_member", "dare", "dare_ties", "breadcrumbs")
# Merges that use data besides the weights (`merge.learned`, rows `merge_<method>`).
LEARNED_METHODS = ("fisher", "regmean", "adamerging")
ADAMERGING_GRANULARITY = ("task", "layer")
LEARNED_CACHE = "merge_learned.json"
ADAMERGING_NOTE = (
  "merge_adamerging is a TEST-TIME method: its coefficients are learned by entropy "
  "minimisation on each target domain's unlabelled test inputs (no test labels)"
)
# Model Breadcrumbs' share of largest-magnitude entries dropped (the paper's β = 1 %).
BREADCRUMBS_TOP = 0.01
NOVEL_VARIANTS = ("zero_shot", "similarity", "clustering", "all", "best_single")
CACHE_FILE = "mixture_evals.json"
OUTCOMES_FILE = "mixture_outcomes.json"
PLOTS_DIR = "plots"
PLOT_FILES = ("fsd_accuracy.png", "fsd_matrix.png", "sparsity.png", "greedy.png")
BEST_SINGLE_NOTE = (
  "best_single is an ORACLE: the candidate adapter with the best accuracy on the target's "
  "test split"
)


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


def soup_adapter_config(config) -> adapters_lib.AdapterConfig:
  """`AdapterConfig(**config.adapter)`, kind included (the harness takes it separately)."""
  return ft.adapter_config(config, config.adapter.kind)


def _check_domain_names(config, name: str) -> None:
  value = _checks.field(config, name)
  if isinstance(value, str) or not isinstance(value, Sequence):
    raise ValueError(f"{name}={value!r} is invalid; accepted: a tuple of domain names")
  if not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
    raise ValueError(f"{name}={tuple(value)!r} is invalid; accepted: distinct domain names")


def validate_config(config) -> None:
  """Checks every field of the `adapter_soup` method; raises ValueError naming the field."""
  _checks.choice(config, "adapter.kind", ADAPTER_KINDS)
  ft.validate_harness_config(config)
  for name in ("data.domains", "data.target_domains", "study.domains"):
    _check_domain_names(config, name)
  _checks.integer(config, "selection.num_samples", 2)
  _checks.integer(config, "selection.top_k", 1)
  _checks.number(config, "selection.threshold", low=-1.0, high=1.0, low_open=False)
  _checks.number(config, "selection.cluster_min_share", low=0.0, high=1.0, low_open=False)
  _checks.choice(config, "selection.covariance", COVARIANCE_TYPES)
  _checks.integer(config, "selection.pca_dim", 0)
  _checks.integer(config, "study.max_mixtures", 1)
  if not isinstance(config.study.fsd_include_head, bool):
    raise ValueError(
      f"study.fsd_include_head={config.study.fsd_include_head!r} is invalid; accepted: a bool"
    )
  _checks.choice(config, "study.greedy_rank", GREEDY_RANKS)
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
  _checks.integer(config, "eval.max_examples", 0)
  _checks.integer(config, "eval.max_val_examples", 0)
  _checks.choice(config, "mixing.lora", LORA_MIXING)
  if not isinstance(config.selection.zero_shot_head, bool):
    raise ValueError(
      f"selection.zero_shot_head={config.selection.zero_shot_head!r} is invalid; accepted: a bool"
    )
  if not isinstance(config.study.average_heads, bool):
    raise ValueError(
      f"study.average_heads={config.study.average_heads!r} is invalid; accepted: a bool"
    )
  number_tuple(config, "selection.threshold_sweep", "in [-1, 1]", lambda v: -1 <= v <= 1)
  number_tuple(config, "merge.sum_lambdas", "> 0", lambda v: v > 0, non_empty=True)
  number_tuple(config, "merge.ties_lambdas", "> 0", lambda v: v > 0, non_empty=True)
  number_tuple(config, "merge.densities", "in (0, 1]", lambda v: 0 < v <= 1, non_empty=True)
  _checks.names(config, "merge.methods", MERGE_METHODS, allow_empty=True)
  _checks.names(config, "merge.learned", LEARNED_METHODS, allow_empty=True)
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
  _checks.choice(config, "merge.adamerging_granularity", ADAMERGING_GRANULARITY)
  if "regmean" in config.merge.learned and config.adapter.kind == "lora":
    raise ValueError(
      "merge.learned has 'regmean' with adapter.kind='lora'; accepted: RegMean with adapters "
      "of linear kernels (pfeiffer, houlsby), or merge.learned without 'regmean'"
    )
  sizes = config.study.sizes
  ok = not isinstance(sizes, str) and isinstance(sizes, Sequence)
  ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in sizes)
  if not ok or len(set(sizes)) != len(sizes):
    raise ValueError(
      f"study.sizes={sizes!r} is invalid; accepted: a tuple of distinct integers >= 2 "
      "(mixture sizes, the own adapter counted; () = all)"
    )


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


def product_model(setup: ft.Setup, k: int):
  """The model of rank K·r that evaluates LoRA mixtures as averaged updates B·A
  (`lora_product_average`), or None: not LoRA, or `mixing.lora='factors'`."""
  config = setup.config
  if config.adapter.kind != "lora" or config.mixing.lora != "product":
    return None
  overrides = {
    "lora_rank": k * config.adapter.lora_rank,
    "lora_alpha": k * config.adapter.lora_alpha,
  }
  return ft.build_model(setup, ft.adapter_config(config, "lora", **overrides))


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


# ----------------------------------------------------------------------------
# Selection (pure functions on embeddings)
# ----------------------------------------------------------------------------


class Selection(NamedTuple):
  """Domains chosen for a mixture, best first, with every candidate's score."""

  selected: tuple[str, ...]
  scores: dict[str, float]


def _check_embeddings(target: np.ndarray, candidates: Mapping[str, np.ndarray]) -> None:
  target = np.asarray(target)
  if target.ndim != 2 or not len(target):
    raise ValueError(f"target embeddings have shape {target.shape}; accepted: [N >= 1, D]")
  if not candidates:
    raise ValueError("candidates is empty; accepted: at least one domain's embeddings")
  for name, emb in candidates.items():
    emb = np.asarray(emb)
    if emb.ndim != 2 or not len(emb) or emb.shape[1] != target.shape[1]:
      raise ValueError(
        f"candidate {name!r} embeddings have shape {emb.shape}; accepted: [M >= 1, "
        f"{target.shape[1]}] like the target's"
      )
  if not all(np.isfinite(e).all() for e in (target, *candidates.values())):
    raise ValueError("embeddings hold NaN or Inf; accepted: finite values")


def _rank(scores: Mapping[str, float], order: Sequence[str]) -> list[str]:
  """Domains by decreasing score; ties keep `order`."""
  return sorted(order, key=lambda d: (-scores[d], order.index(d)))


def _keep(ranked: Sequence[str], scores: Mapping[str, float], top_k: int, low: float):
  kept = tuple(d for d in ranked[:top_k] if scores[d] >= low)
  return kept or tuple(ranked[:1])


def similarity_scores(target: np.ndarray, candidates: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Mean cosine similarity over all pairs (target example, candidate example), per domain.

  Args:
    target: [N, D] embeddings of the target's examples.
    candidates: domain -> [M_d, D] embeddings.

  Returns:
    domain -> mean_{i,j} cos(target_i, candidate_j) (= the dot product of the mean unit
    vectors); zero vectors count as cosine 0.
  """
  _check_embeddings(target, candidates)

  def mean_unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.mean(x / np.where(norms > 0, norms, 1.0), axis=0)

  t = mean_unit(target)
  return {d: float(mean_unit(e) @ t) for d, e in candidates.items()}


def select_by_similarity(
  target: np.ndarray,
  candidates: Mapping[str, np.ndarray],
  *,
  top_k: int,
  threshold: float,
) -> Selection:
  """AdapterSoup's sentence-similarity selection.

  Args:
    target: [N, D] embeddings of the novel domain's sampled examples.
    candidates: domain -> [M_d, D] embeddings of its sampled examples.
    top_k: at most this many domains.
    threshold: only domains whose score (`similarity_scores`) is >= threshold; if none
      is, the single most similar domain is kept.

  Returns:
    the chosen domains (most similar first) and every candidate's score.
  """
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"top_k={top_k!r} is invalid; accepted: an integer >= 1")
  scores = similarity_scores(target, candidates)
  ranked = _rank(scores, list(candidates))
  return Selection(_keep(ranked, scores, top_k, threshold), scores)


def cluster_shares(
  target: np.ndarray,
  candidates: Mapping[str, np.ndarray],
  *,
  covariance_type: str = "diag",
  pca_dim: int = 0,
  seed: int = 0,
) -> dict[str, float]:
  """Share of the target's examples falling in each candidate domain's GMM components.

  A Gaussian mixture with one component per candidate domain is fitted on the candidates'
  embeddings (after a PCA to `pca_dim` dimensions fitted on them, when 0 < pca_dim < D).
  Each component belongs to the domain most of its members (hard assignments) come from;
  ties and empty components go to the domain with the most responsibility mass. Each
  target example is assigned to its most likely component, hence to a domain.

  Args:
    target: [N, D] embeddings of the novel domain's sampled examples.
    candidates: domain -> [M_d, D] embeddings.
    covariance_type: GaussianMixture's covariance type, one of COVARIANCE_TYPES.
    pca_dim: PCA dimension (0 = no PCA).
    seed: random state of PCA and GaussianMixture.

  Returns:
    domain -> fraction of the target's examples in its components (sums to 1).
  """
  from sklearn.decomposition import PCA  # Deferred: sklearn is slow to import.
  from sklearn.mixture import GaussianMixture

  _check_embeddings(target, candidates)
  if covariance_type not in COVARIANCE_TYPES:
    raise ValueError(
      f"covariance_type={covariance_type!r} is unknown; accepted: {', '.join(COVARIANCE_TYPES)}"
    )
  names = list(candidates)
  x = np.concatenate([np.asarray(candidates[d], np.float64) for d in names])
  owner = np.concatenate([np.full(len(candidates[d]), i) for i, d in enumerate(names)])
  t = np.asarray(target, np.float64)
  dim = min(pca_dim, x.shape[0], x.shape[1])
  if pca_dim and dim < x.shape[1]:
    pca = PCA(dim, random_state=seed).fit(x)
    x, t = pca.transform(x), pca.transform(t)
  k = len(names)
  gmm = GaussianMixture(k, covariance_type=covariance_type, random_state=seed).fit(x)
  resp = gmm.predict_proba(x)  # [M, k]
  hard = np.argmax(resp, axis=1)
  counts = np.zeros((k, k))  # [component, domain]
  mass = np.zeros((k, k))
  for i in range(k):
    counts[:, i] = np.bincount(hard[owner == i], minlength=k)
    mass[:, i] = resp[owner == i].sum(axis=0)
  # Most hard members first, responsibility mass as the tie-breaker.
  domain_of = np.array([np.lexsort((mass[c], counts[c]))[-1] for c in range(k)])
  assigned = domain_of[gmm.predict(t)]
  return {d: float(np.mean(assigned == i)) for i, d in enumerate(names)}


def select_by_clustering(
  target: np.ndarray,
  candidates: Mapping[str, np.ndarray],
  *,
  top_k: int,
  min_share: float,
  covariance_type: str = "diag",
  pca_dim: int = 0,
  seed: int = 0,
) -> Selection:
  """AdapterSoup's clustering selection (after Aharoni & Goldberg, 2020).

  Domains holding >= `min_share` of the target's examples (`cluster_shares`), by
  decreasing share, at most `top_k`; if none reaches it, the domain with the largest share.

  Returns:
    the chosen domains and every candidate's share.
  """
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"top_k={top_k!r} is invalid; accepted: an integer >= 1")
  shares = cluster_shares(
    target, candidates, covariance_type=covariance_type, pca_dim=pca_dim, seed=seed
  )
  ranked = _rank(shares, list(candidates))
  # A share of 0 is never kept by the threshold, even with min_share = 0.
  kept = tuple(d for d in ranked[:top_k] if shares[d] >= min_share and shares[d] > 0)
  return Selection(kept or tuple(ranked[:1]), shares)


# ----------------------------------------------------------------------------
# Mixtures, FSD and greedy mixing
# ----------------------------------------------------------------------------


def enumerate_mixtures(
  own: str, others: Sequence[str], *, max_mixtures: int, seed: int
) -> list[tuple[str, ...]]:
  """Mixtures holding `own`: every subset of `others` added, or a stratified sample.

  When 2^len(others) <= max_mixtures, all of them, by size. Otherwise `max_mixtures`
  distinct ones: the budget is dealt one at a time, round-robin, over the sizes in the
  order 1 (own alone), len(others)+1 (all), 2, 3, ... (sizes with fewer mixtures than
  their share keep only those), and each size's share is drawn uniformly without
  replacement.

  Returns:
    tuples (own, then the members of `others` in their given order), size-1 (own alone) first.
  """
  others = list(others)
  if own in others or len(set(others)) != len(others):
    raise ValueError(f"others={others!r} is invalid; accepted: distinct domains other than {own!r}")
  if isinstance(max_mixtures, bool) or not isinstance(max_mixtures, int) or max_mixtures < 1:
    raise ValueError(f"max_mixtures={max_mixtures!r} is invalid; accepted: an integer >= 1")
  n = len(others)
  if 2**n <= max_mixtures:
    subsets = [c for size in range(n + 1) for c in itertools.combinations(range(n), size)]
  else:
    quota = [0] * (n + 1)
    total = 0
    while total < max_mixtures:  # Ends: 2^n > max_mixtures mixtures exist.
      for size in (0, n, *range(1, n)):
        if total < max_mixtures and quota[size] < math.comb(n, size):
          quota[size] += 1
          total += 1
    rng = np.random.default_rng(seed)
    subsets = []
    for size, q in enumerate(quota):
      if not q:
        continue
      if math.comb(n, size) <= max(4 * q, 10_000):
        pool = list(itertools.combinations(range(n), size))
        picks = rng.choice(len(pool), q, replace=False)
        subsets += sorted(pool[i] for i in picks)
      else:  # Too many to list: draw until q distinct.
        seen: set[tuple[int, ...]] = set()
        while len(seen) < q:
          seen.add(tuple(sorted(int(i) for i in rng.choice(n, size, replace=False))))
        subsets += sorted(seen)
  return [(own, *(others[i] for i in subset)) for subset in subsets]


def greedy_order(fsd: np.ndarray, own: int, *, rank: str = "target") -> list[int]:
  """The other adapters in the order greedy mixing adds them (lowest FSD first).

  Args:
    fsd: [K, K] pairwise FSD matrix.
    own: index of the target's own adapter.
    rank: 'target': by FSD to the own adapter; 'row_mean': by each adapter's mean FSD to
      all adapters (row mean, diagonal included), Alg. 1 of Nguyen & Le (ACL 2024).

  Returns:
    the K-1 other indices; greedy mixture l is [own] + order[:l-1]. Ties keep index order.
  """
  fsd = np.asarray(fsd, np.float64)
  if fsd.ndim != 2 or fsd.shape[0] != fsd.shape[1]:
    raise ValueError(f"fsd has shape {fsd.shape}; accepted: a square [K, K] matrix")
  k = fsd.shape[0]
  if isinstance(own, bool) or not isinstance(own, int | np.integer) or not 0 <= own < k:
    raise ValueError(f"own={own!r} is invalid; accepted: an index in [0, {k})")
  if rank not in GREEDY_RANKS:
    raise ValueError(f"rank={rank!r} is unknown; accepted: {', '.join(GREEDY_RANKS)}")
  score = fsd[own] if rank == "target" else fsd.mean(axis=1)
  return sorted((j for j in range(k) if j != own), key=lambda j: (score[j], j))


def stack_trees(trees: Sequence[PyTree]) -> PyTree:
  """K >= 1 trees of one structure and leaf shapes -> one tree of [K, ...] leaves.

  Raises:
    ValueError: naming the first tree and leaf path that differ from `trees[0]`.
  """
  if not trees:
    raise ValueError("trees is empty; accepted: K >= 1 trees of one structure")
  first = dict(jax.tree_util.tree_flatten_with_path(trees[0])[0])
  for i, tree in enumerate(trees[1:], 1):
    leaves = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    if leaves.keys() != first.keys():
      extra = ", ".join(sorted(map(jax.tree_util.keystr, leaves.keys() - first.keys())))
      missing = ", ".join(sorted(map(jax.tree_util.keystr, first.keys() - leaves.keys())))
      raise ValueError(
        f"trees[{i}] has another structure than trees[0] (extra leaves: {extra or 'none'}; "
        f"missing leaves: {missing or 'none'}); accepted: trees of one structure (e.g. the "
        "adapters of one AdapterConfig)"
      )
    for path, leaf in leaves.items():
      if jnp.shape(leaf) != jnp.shape(first[path]):
        raise ValueError(
          f"trees[{i}]{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; accepted: "
          f"{jnp.shape(first[path])}, the shape in trees[0]"
        )
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def lora_product_average(stacked: PyTree, weights: jax.Array) -> PyTree:
  """The weighted average of K LoRA adapters' updates ΔW_k = A_k·B_k, as one LoRA of rank K·r.

  Averaging the factors (`weighted_average`) gives mean(A)·mean(B), whose cross terms
  A_j·B_k (j ≠ k) belong to no adapter. Here the factors are concatenated along the rank:
  A = [A_1 … A_K] ([in, K·r]) and B = [c_1·B_1; …; c_K·B_K] ([K·r, out]), c_k = w_k / Σw,
  so A·B = Σ_k c_k·A_k·B_k exactly. Evaluate it with `lora_rank` K·r and `lora_alpha`
  K·α, which keeps the update's scale α / r. Other leaves (heads, biases) are averaged.

  Args:
    stacked: [K, ...] adapter trees whose LoRA leaves are `lora_a` [K, in, r] and `lora_b`
      [K, r, out].
    weights: [K] non-negative weights, not all zero.

  Returns:
    a tree like one member, its `lora_a` [in, K·r] and `lora_b` [K·r, out].
  """
  w = jnp.asarray(weights, jnp.float32)
  c = w / jnp.sum(w)
  averaged = merging.weighted_average(stacked, w)

  def leaf(path, x, avg):
    name = getattr(path[-1], "key", None)
    if name == "lora_a":
      k, n_in, r = x.shape
      return jnp.moveaxis(x, 0, -2).reshape(n_in, k * r)
    if name == "lora_b":
      k, r, n_out = x.shape
      return (x * c[:, None, None].astype(x.dtype)).reshape(k * r, n_out)
    return avg

  return jax.tree_util.tree_map_with_path(leaf, stacked, averaged)


def without_head(tree: Mapping[str, Any]) -> dict[str, Any]:
  """`tree` without its top-level 'head' subtree (adapter weights only)."""
  return {k: v for k, v in tree.items() if k != adapters_lib.HEAD_KEY}


def layer_names(tree: PyTree) -> list[str]:
  """Per leaf of `tree` (flattening order), its layer: the first two keys of its path.

  For adapter trees ({'backbone'|'encoder': {'block_i'|'layer_i': ...}}) this is one
  layer per transformer block, e.g. "['backbone']['block_0']".
  """
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return [jax.tree_util.keystr(tuple(p[:2])) for p in paths]


def layer_fsd(stacked: PyTree) -> tuple[list[str], np.ndarray]:
  """(layer names, [L, K, K] pairwise FSD per layer) of stacked adapter weights."""
  leaves = jax.tree.leaves(stacked)
  per_leaf = layer_names(stacked)
  names = list(dict.fromkeys(per_leaf))
  mats = [
    np.asarray(
      merging.pairwise_sign_disagreement([x for x, n in zip(leaves, per_leaf) if n == name])
    )
    for name in names
  ]
  return names, np.stack(mats)


def high_fsd_layers(per_layer: np.ndarray, member: int, *, fraction: float) -> list[int]:
  """Indices of `member`'s ceil(fraction·L) layers of highest mean FSD to the others.

  Args:
    per_layer: [L, K, K] per-layer pairwise FSD (`layer_fsd`).
    member: the adapter's index k.
    fraction: share of the L layers to return (at least one).
  """
  num_layers, k = per_layer.shape[0], per_layer.shape[1]
  others = [j for j in range(k) if j != member]
  score = per_layer[:, member, others].mean(axis=1)
  count = max(1, math.ceil(fraction * num_layers - 1e-9))
  return sorted(int(i) for i in np.argsort(-score, kind="stable")[:count])


def prune_layers(tree: PyTree, density: float, layers: Sequence[str] | None = None) -> PyTree:
  """`magnitude_prune(tree, density)` applied only to the leaves in `layers` (None = all)."""
  pruned = merging.magnitude_prune(tree, density)
  if layers is None:
    return pruned
  names = layer_names(tree)
  dense_leaves, treedef = jax.tree.flatten(tree)
  pruned_leaves = jax.tree.leaves(pruned)
  chosen = set(layers)
  return jax.tree.unflatten(
    treedef,
    [p if n in chosen else d for n, d, p in zip(names, dense_leaves, pruned_leaves)],
  )


def macro_f1(pred: Sequence[int], label: Sequence[int]) -> float:
  """Macro-averaged F1 over the classes present in `label` or `pred` (sklearn's default).

  Per class c: F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c); the unweighted mean over classes.
  A majority-class predictor scores 1/C_present·F1 of that class, so unlike accuracy it
  does not reward matching the label prior.
  """
  pred, label = np.asarray(pred, np.int64), np.asarray(label, np.int64)
  if pred.shape != label.shape or pred.ndim != 1 or not len(pred):
    raise ValueError(
      f"pred of shape {pred.shape} and label of shape {label.shape}; accepted: two [N >= 1]"
    )
  f1 = []
  for c in np.union1d(pred, label):
    tp = np.sum((pred == c) & (label == c))
    wrong = np.sum(pred != label, where=(pred == c) | (label == c))
    f1.append(2 * tp / (2 * tp + wrong))
  return float(np.mean(f1))


def scores(outcomes: Mapping[str, Sequence[int]]) -> dict[str, float]:
  """{'accuracy', 'macro_f1'} of a per-example entry (`results_lib.outcomes`)."""
  return {
    "accuracy": results_lib.accuracy(outcomes),
    "macro_f1": macro_f1(outcomes["pred"], outcomes["label"]),
  }


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float | int | None]:
  """Pearson and Spearman correlations (and p-values) of x and y; None where undefined."""
  from scipy import stats

  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  out: dict[str, float | int | None] = {"n": len(x)}
  defined = len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
  for name, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
    if defined:
      r = fn(x, y)
      out[name], out[f"{name}_p"] = float(r.statistic), float(r.pvalue)
    else:
      out[name], out[f"{name}_p"] = None, None
  return out


def sparsity_name(sparsity: float) -> str:
  """Variant suffix of a sparsity: 0.8 -> '80' (percent)."""
  return format(100 * sparsity, "g")


# ----------------------------------------------------------------------------
# Evaluation with a cache in the workdir
# ----------------------------------------------------------------------------


class EvalCache(artifacts.JsonCache):
  """Scores ({'accuracy', 'macro_f1'}) by key ('<domain>|<what>'), persisted to
  `<workdir>/mixture_evals.json` (`artifacts.JsonCache`: a resumed run evaluates nothing
  twice; a remote object is rewritten at most every `remote_flush_s` seconds).
  """

  def __init__(
    self, workdir: str | os.PathLike, *, remote_flush_s: float = metrics_lib.REMOTE_FLUSH_S
  ):
    super().__init__(workdir, CACHE_FILE, remote_flush_s=remote_flush_s)
    # Entries of an older format (a bare accuracy) are evaluated again.
    self.values = {k: v for k, v in self.values.items() if isinstance(v, dict)}

  def get(
    self, domain: str, what: str, compute: Callable[[], Mapping[str, float]]
  ) -> dict[str, float]:
    """The scores of `what` on `domain`, computed (and stored) the first time."""
    return super().get(f"{domain}|{what}", lambda: {k: float(v) for k, v in compute().items()})


def eval_subsets(setup: ft.Setup, domains: Sequence[str]) -> dict[str, ft.Examples]:
  """Test examples of each domain (already cut to `eval.max_examples` by the harness, with
  a subset fixed by `data.benchmark_seed`: every seed of a sweep sees the same examples)."""
  return {d: setup.task.test[d] for d in domains}


def val_subsets(setup: ft.Setup, domains: Sequence[str]) -> dict[str, ft.Examples]:
  """Validation examples of each domain, at most `eval.max_val_examples` (0 = all): a
  subset fixed by `data.benchmark_seed`, the same for every seed."""
  cap = setup.config.eval.max_val_examples
  rng = np.random.default_rng(setup.config.data.benchmark_seed)
  out = {}
  for d in domains:
    ex = setup.task.val[d]
    out[d] = ex.take(np.sort(rng.permutation(len(ex))[:cap])) if 0 < cap < len(ex) else ex
  return out


def evaluate_outcomes(setup: ft.Setup, model, params: PyTree, examples: ft.Examples) -> dict:
  """Per-example outcomes (`results_lib.outcomes`) of `model` with `params` on `examples`."""
  logits = ft.predict_logits(model, params, examples, batch_size=setup.config.eval_batch_size)
  return results_lib.outcomes(logits, examples.labels)


def selection_sample(setup: ft.Setup, domain: str) -> ft.Examples:
  """`selection.num_samples` training examples of `domain`, seeded by the run's seed."""
  ex = setup.task.train[domain]
  n = min(setup.config.selection.num_samples, len(ex))
  rng = np.random.default_rng([setup.config.seed, zlib.crc32(domain.encode())])
  return ex.take(np.sort(rng.choice(len(ex), n, replace=False)))


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------


def _pyplot():
  import matplotlib  # Deferred: only plotting needs it.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: str | os.PathLike) -> None:
  """Writes `fig` as a PNG to `path` (local or remote, e.g. `gs://`), replaced in one step."""
  plt = _pyplot()
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")  # legends outside the axes too
  plt.close(fig)
  workdir_lib.write_bytes_atomic(path, buffer.getvalue())


def plot_fsd_accuracy(
  path: str | os.PathLike,
  mixtures: Sequence[Mapping],
  correlations: Mapping[str, Mapping],
  *,
  seed: int | None = None,
) -> None:
  """Scatter of FSD vs accuracy − own accuracy, mixtures of size >= 2, one colour per domain.

  Marker area grows with the mixture's size (number of adapters), shown in a second legend;
  the title names the seed of the run and the correlation within the smallest size (k = 2,
  the paper's) with its bootstrap interval, or pooled given the size when several sizes.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.2, 4.5))

  def area(size: int) -> float:
    return 12 + 6 * size

  domains = list(dict.fromkeys(m["domain"] for m in mixtures))
  for d in domains:
    pts = [m for m in mixtures if m["domain"] == d and m["size"] >= 2]
    ax.scatter(
      [100 * m["fsd"] for m in pts],
      [100 * m["accuracy_delta"] for m in pts],
      s=[area(m["size"]) for m in pts],
      alpha=0.7,
      label=d,
    )
  ax.axhline(0.0, color="gray", lw=0.8)
  ax.set_xlabel("FSD of the mixture (%)")
  ax.set_ylabel("accuracy − own adapter's (points)")

  def fmt(v):
    return "n/a" if v is None else f"{v:.2f}"

  def ci(v):
    return "" if v is None else f" [{v[0]:.2f}, {v[1]:.2f}]"

  run = "" if seed is None else f"seed {seed}: "
  parts = []
  sizes = sorted(int(name[5:]) for name in correlations if name.startswith("size_"))
  for name in ([f"size_{sizes[0]}"] if sizes else []) + ["pooled_given_size"]:
    c = correlations.get(name)
    if c:
      label = name.replace("_", " ").replace("size ", "k = ")
      parts.append(f"{label}: Spearman {fmt(c.get('spearman'))}{ci(c.get('spearman_ci'))}")
  ax.set_title(run + "; ".join(parts), fontsize=9)
  if domains:
    # Two legends outside the axes: colour = domain, marker size = adapters in the mixture.
    colours = ax.legend(
      title="domain", fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0
    )
    ax.add_artist(colours)
    sizes = sorted({m["size"] for m in mixtures if m["size"] >= 2})
    handles = [ax.scatter([], [], s=area(k), color="gray", alpha=0.7, label=str(k)) for k in sizes]
    ax.legend(
      handles=handles,
      title="adapters mixed",
      fontsize=7,
      loc="lower left",
      bbox_to_anchor=(1.02, 0.0),
      borderaxespad=0,
    )
  _save(fig, path)


def plot_fsd_matrix(path: str | os.PathLike, matrix: np.ndarray, names: Sequence[str]) -> None:
  """The [K, K] pairwise FSD matrix as an annotated heat map (percent)."""
  plt = _pyplot()
  k = len(names)
  fig, ax = plt.subplots(figsize=(1.6 + 0.8 * k, 1.2 + 0.7 * k))
  image = ax.imshow(100 * matrix, cmap="magma", vmin=0.0, vmax=50.0)
  ax.set_xticks(range(k), names, rotation=45, ha="right")
  ax.set_yticks(range(k), names)
  if k <= 20:
    for i in range(k):
      for j in range(k):
        ax.text(j, i, f"{100 * matrix[i, j]:.1f}", ha="center", va="center", fontsize=7,
                color="black" if matrix[i, j] > 0.3 else "white")  # fmt: skip
  ax.set_title("pairwise FSD of the adapters (%)")
  fig.colorbar(image, ax=ax, label="FSD (%)")
  _save(fig, path)


def plot_lines(
  path: str | os.PathLike,
  x_label: str,
  curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  *,
  title: str,
) -> None:
  """Accuracy lines: curve name -> (x values, accuracies)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 4.2))
  for name, (xs, ys) in curves.items():
    ax.plot(xs, [100 * y for y in ys], marker="o", label=name)
  ax.set_xlabel(x_label)
  ax.set_ylabel("accuracy (%)")
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save(fig, path)


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def _with_mean(per_domain: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
  """{domain: scores, 'mean': the mean of each score over the given domains}."""
  out = {d: {k: float(v) for k, v in sc.items()} for d, sc in per_domain.items()}
  keys = list(next(iter(per_domain.values())))
  out["mean"] = {k: float(np.mean([sc[k] for sc in per_domain.values()])) for k in keys}
  return out


@jax.jit
def _take(stacked: PyTree, idx: jax.Array) -> PyTree:
  # One compiled gather per tree and index shape (eager indexing compiles one per leaf).
  return jax.tree.map(lambda x: x[idx], stacked)


def _member(stacked: PyTree, i: int) -> PyTree:
  """Member i of a stacked tree."""
  return _take(stacked, jnp.int32(i))


@dataclasses.dataclass(frozen=True)
class Soup:
  """The K trained adapters of one run and cached evaluations of their mixtures.

  Attributes:
    setup: the harness setup.
    names: the K adapter domains (stack order).
    model: the classifier with adapters; `model_plain` the one without.
    base: backbone params without adapters and head (shared by every mixture).
    stacked: [K, ...] adapter + head trees.
    init_adapters: the shared initial adapter weights (no head).
    tests: domain -> test examples evaluated (`eval_subsets`).
    vals: domain -> validation examples (`val_subsets`), where merge hyper-parameters are
      chosen.
    cache: the scores computed so far.
    model_product: for LoRA adapters with `mixing.lora='product'`, the model of rank K·r
      that evaluates mixtures as the average of the updates B·A (`lora_product_average`);
      None: mixtures average the factors A and B.
    outcomes: '<domain>|<what>' -> per-example outcomes evaluated in this process.
    per_example: variant -> domain -> per-example outcomes of what the results report.
    outcome_cache: where the per-example outcomes of reported variants persist
      (`<workdir>/mixture_outcomes.json`, keys as `cache`), so that a resumed run need
      not evaluate them again; None: in memory only.
  """

  setup: ft.Setup
  names: tuple[str, ...]
  model: Any
  model_plain: Any
  base: PyTree
  stacked: PyTree
  init_adapters: PyTree
  tests: Mapping[str, ft.Examples]
  vals: Mapping[str, ft.Examples]
  cache: EvalCache
  model_product: Any = None
  outcomes: dict[str, dict] = dataclasses.field(default_factory=dict)
  per_example: dict[str, dict] = dataclasses.field(default_factory=dict)
  outcome_cache: artifacts.JsonCache | None = None

  def index(self, members: Sequence[str]) -> np.ndarray:
    """Stack indices of `members`, ascending."""
    return np.asarray(sorted(self.names.index(d) for d in members))

  def ordered(self, members: Sequence[str]) -> list[str]:
    """`members` in stack order."""
    return [self.names[i] for i in self.index(members)]

  def key(self, members: Sequence[str]) -> str:
    """Canonical name of a mixture: its members in stack order, joined by '+'."""
    return "+".join(self.ordered(members))

  def weights(self, members: Sequence[str]) -> jax.Array:
    """[K] weights: 1 for members, 0 otherwise."""
    w = np.zeros(len(self.names), np.float32)
    w[self.index(members)] = 1.0
    return jnp.asarray(w)

  def subset(self, tree: PyTree, members: Sequence[str]) -> PyTree:
    """The [k, ...] slices of `members` of a stacked tree."""
    return _take(tree, jnp.asarray(self.index(members), jnp.int32))

  def params(self, adapter_tree: PyTree) -> PyTree:
    """Full params: the backbone plus an adapters + head tree."""
    return adapters_lib.merge_params(self.base, adapter_tree)

  def head_of(self, domain: str) -> PyTree:
    """{'head': domain's trained head} ([...] leaves)."""
    heads = {adapters_lib.HEAD_KEY: self.stacked[adapters_lib.HEAD_KEY]}
    return _member(heads, self.names.index(domain))

  def head_tree(self, head: str | None) -> PyTree:
    """{'head': `head`'s trained head}, or (None) the uniform average of all K heads."""
    if head is None:
      return merging.weighted_average({adapters_lib.HEAD_KEY: self.stacked[adapters_lib.HEAD_KEY]})
    return self.head_of(head)

  def with_head(self, adapters: PyTree, head: str | None) -> PyTree:
    """Full params: `adapters` (no head) with `head_tree(head)`."""
    return self.params({**adapters, **self.head_tree(head)})

  def mixture(self, members: Sequence[str], *, head: str | None = None) -> PyTree:
    """Full params of the uniform average of `members`' adapters.

    Args:
      members: the mixed domains.
      head: None: the members' heads are averaged with their adapters (novel domains,
        which have no head of their own, and the `study.average_heads` ablation); a
        domain: its own trained head, unaveraged (Nguyen & Le: adapters only).
    """
    # Zero weights on the full stack: one compiled average for every subset, and exactly
    # the subset's uniform average (0·x only adds exact zeros).
    if self.model_product is not None:
      averaged = lora_product_average(self.stacked, self.weights(members))
    else:
      averaged = merging.weighted_average(self.stacked, self.weights(members))
    if head is None:
      return self.params(averaged)
    return self.params({**without_head(averaged), **self.head_of(head)})

  def score(
    self,
    domain: str,
    what: str,
    params_fn: Callable[[], PyTree],
    *,
    plain: bool = False,
    variant: str | None = None,
    split: str = "test",
    model: Any = None,
  ) -> dict[str, float]:
    """Cached {'accuracy', 'macro_f1'} on `domain`'s `split` examples of `params_fn()`.

    With `variant` (test split only), its per-example outcomes go into
    `per_example[variant][domain]` (evaluated again when the scores came from an earlier
    process's cache).
    """
    model = model or (self.model_plain if plain else self.model)
    examples = self.tests[domain] if split == "test" else self.vals[domain]
    what = what if split == "test" else f"{split}:{what}"
    key = f"{domain}|{what}"

    def outcomes() -> dict:
      self.outcomes[key] = evaluate_outcomes(self.setup, model, params_fn(), examples)
      return self.outcomes[key]

    value = self.cache.get(domain, what, lambda: scores(outcomes()))
    if variant is not None:
      entry = self.outcomes.get(key)
      if self.outcome_cache is not None:
        entry = self.outcome_cache.get(key, lambda: entry or outcomes())
      self.per_example.setdefault(variant, {})[domain] = entry or outcomes()
    return value

  def single_score(
    self, domain: str, adapter: str, *, variant: str | None = None
  ) -> dict[str, float]:
    """Scores on `domain` of `adapter`'s trained params as they are (no averaging)."""
    i = self.names.index(adapter)
    return self.score(
      domain,
      f"adapter:{adapter}",
      lambda: self.params(_member(self.stacked, i)),
      variant=variant,
    )

  def mix_score(
    self,
    domain: str,
    members: Sequence[str],
    *,
    own_head: bool = False,
    variant: str | None = None,
  ) -> dict[str, float]:
    """Scores on `domain` of the uniform mixture of `members`: with `own_head`, adapters
    only and `domain`'s own head; else adapters and heads averaged (`mixture`)."""
    if len(members) == 1 and (members[0] == domain or not own_head):
      # One member's average is its own adapter and head: the same params exactly.
      return self.single_score(domain, members[0], variant=variant)
    what = f"{'mixown' if own_head else 'mix'}:{self.key(members)}"
    if self.model_product is not None:
      what = f"product{what}"
    head = domain if own_head else None
    return self.score(
      domain,
      what,
      lambda: self.mixture(members, head=head),
      variant=variant,
      model=self.model_product,
    )


# The config fields each trained stage depends on (train/stage_cache.py): runs that differ
# only in what they evaluate reuse the trained adapters and heads through `stage_cache`.
_TRAIN_FIELDS = (
  "seed",
  "data.benchmark",
  "data.benchmark_seed",
  "data.options",
  "model",
  "pretrain",
  "train",
  "num_devices",
)
ADAPTER_FIELDS = (*_TRAIN_FIELDS, "adapter")
# A target's zero-shot head trains on the other adapter domains' pooled data.
ZERO_SHOT_FIELDS = (*_TRAIN_FIELDS, "data.domains")


def train_adapters(
  setup: ft.Setup, workdir: str, writer, backbone: PyTree, domains: Sequence[str]
) -> tuple[Any, PyTree, list[PyTree], dict[str, float]]:
  """One adapter (+ head) per domain, all from the same initialisation (same key).

  Returns:
    (model, initial full params, per domain its adapters + head tree, stage -> s/step).
  """
  config = setup.config
  model = ft.build_model(setup, soup_adapter_config(config))
  init = ft.init_params(setup, model, setup.key("adapter_init"), backbone)
  trees, step_time = [], {}
  for d in domains:
    stage = f"adapter_{d}"
    result = ft.train(
      setup,
      workdir,
      writer,
      stage=stage,
      model=model,
      params=init,
      train_mode="adapters",
      examples=setup.task.train[d],
      steps=config.train.steps,
      lr=config.train.lr,
      batch_size=config.train.batch_size,
      stage_fields={stage: ADAPTER_FIELDS},
    )
    # Keep only the adapters + head: the frozen backbone is the same for every domain.
    trees.append(adapters_lib.split_params(result.params, include_head=True)[1])
    step_time[stage] = result.step_time_s
  return model, init, trees, step_time


def train_zero_shot_head(
  setup: ft.Setup,
  workdir: str,
  writer,
  model_plain,
  plain_params: PyTree,
  target: str,
  candidates: Sequence[str],
) -> ft.Trained:
  """Stage `zero_shot_head_<target>`: the frozen backbone, a head on the candidates' data."""
  stage = f"zero_shot_head_{target}"
  cfg = setup.config
  return ft.train(
    setup,
    workdir,
    writer,
    stage=stage,
    model=model_plain,
    params=plain_params,
    train_mode="head",
    examples=setup.task.pooled("train", candidates),
    steps=cfg.train.steps,
    lr=cfg.train.lr,
    batch_size=cfg.train.batch_size,
    stage_fields={stage: ZERO_SHOT_FIELDS},
  )


def threshold_name(threshold: float) -> str:
  """Variant suffix of a similarity threshold: 0.05 -> '0.05', -0.1 -> 'm0.1'."""
  return format(threshold, "g").replace("-", "m")


def novel_domains(soup: Soup, targets: Sequence[str], backbone: PyTree, workdir, writer) -> dict:
  """Part (a): each selection method on each novel target.

  Novel targets have no head of their own: a soup averages its members' adapters and heads.

  Returns:
    {'metrics': variant -> per-target scores (selectors also `num_adapters`),
     'selections': target -> what each selector chose, 'step_time_s': zero-shot head
     stage -> seconds per step}.
  """
  setup = soup.setup
  cfg = setup.config
  # The plain model: its features are the selection embeddings, and its (random) head is
  # where every target's zero-shot head starts.
  plain_params = ft.init_params(setup, soup.model_plain, setup.key("zero_shot_init"), backbone)
  embeddings = {
    d: ft.embed(setup, soup.model_plain, plain_params, selection_sample(setup, d))
    for d in dict.fromkeys((*targets, *soup.names))
  }
  per_target: dict[str, dict[str, dict]] = {}
  singles_by_adapter: dict[str, dict[str, dict]] = {}
  selections, step_time = {}, {}
  sweep = [float(x) for x in cfg.selection.threshold_sweep]
  for t in targets:
    candidates = [d for d in soup.names if d != t]
    singles = {d: soup.single_score(t, d, variant=f"single_{d}") for d in candidates}
    for d, sc in singles.items():
      singles_by_adapter.setdefault(d, {})[t] = sc
    cand_emb = {d: embeddings[d] for d in candidates}
    sim = select_by_similarity(
      embeddings[t], cand_emb, top_k=cfg.selection.top_k, threshold=cfg.selection.threshold
    )
    clu = select_by_clustering(
      embeddings[t],
      cand_emb,
      top_k=cfg.selection.top_k,
      min_share=cfg.selection.cluster_min_share,
      covariance_type=cfg.selection.covariance,
      pca_dim=cfg.selection.pca_dim,
      seed=cfg.seed,
    )
    # The oracle ranks by accuracy on the target's test split.
    best = max(candidates, key=lambda d: (singles[d]["accuracy"], -candidates.index(d)))
    chosen = {"similarity": sim.selected, "clustering": clu.selected, "all": tuple(candidates)}
    # The threshold's sensitivity: the same scores, other thresholds (evaluation only).
    for thr in sweep:
      chosen[f"similarity_t{threshold_name(thr)}"] = _keep(
        _rank(sim.scores, candidates), sim.scores, cfg.selection.top_k, thr
      )
    for name, members in chosen.items():
      sc = soup.mix_score(t, members, variant=name)
      per_target.setdefault(name, {})[t] = {**sc, "num_adapters": len(members)}
    per_target.setdefault("best_single", {})[t] = {
      **soup.single_score(t, best, variant="best_single"),
      "num_adapters": 1,
    }
    if cfg.selection.zero_shot_head:
      head = train_zero_shot_head(
        setup, workdir, writer, soup.model_plain, plain_params, t, candidates
      )
      step_time[f"zero_shot_head_{t}"] = head.step_time_s
      per_target.setdefault("zero_shot", {})[t] = soup.score(
        t, "zero_shot", lambda head=head: head.params, plain=True, variant="zero_shot"
      )
    selections[t] = {
      "candidates": candidates,
      "similarity": {"selected": list(sim.selected), "scores": sim.scores},
      "clustering": {"selected": list(clu.selected), "shares": clu.scores},
      "all": {"selected": candidates},
      "best_single": {"selected": [best], "note": BEST_SINGLE_NOTE},
      **{
        f"similarity_t{threshold_name(thr)}": {
          "selected": list(chosen[f"similarity_t{threshold_name(thr)}"]),
          "threshold": thr,
        }
        for thr in sweep
      },
    }
  metrics = {v: _with_mean(per_target[v]) for v in NOVEL_VARIANTS if v in per_target}
  metrics.update({v: _with_mean(m) for v, m in per_target.items() if v not in metrics})
  metrics.update({f"single_{d}": _with_mean(m) for d, m in singles_by_adapter.items()})
  return {"metrics": metrics, "selections": selections, "step_time_s": step_time}


def in_domain_study(soup: Soup, study: Sequence[str], fsd_stacked: PyTree) -> dict:
  """Parts (b) and (c): mixtures holding the own adapter, FSD, correlations, greedy.

  Each mixture averages its members' adapters and keeps the evaluated domain's own head
  (Nguyen & Le); `study.average_heads` averages the heads too (an ablation).

  Args:
    soup: the run's adapters.
    study: the study domains.
    fsd_stacked: [K, ...] the weights FSD is computed on (adapters, with or without head).

  Returns:
    {'metrics', 'fsd_matrix' [K, K], 'mixtures' (one record per evaluated mixture),
     'summary' (per domain and size: mean/best/min/n of accuracy), 'greedy',
     'correlations'}.
  """
  cfg = soup.setup.config
  own_head = not cfg.study.average_heads
  k = len(soup.names)
  sizes = set(cfg.study.sizes) or set(range(2, k + 1))
  pair = np.asarray(merging.pairwise_sign_disagreement(fsd_stacked))
  records, own, greedy, mix_all = [], {}, {}, {}
  for d in study:
    i = soup.names.index(d)
    own[d] = soup.single_score(d, d, variant="own")
    mix_all[d] = soup.mix_score(d, soup.names, own_head=own_head, variant="mix_all")
    own_tree = _member(fsd_stacked, i)
    others = [x for x in soup.names if x != d]
    mixtures = enumerate_mixtures(
      d, others, max_mixtures=cfg.study.max_mixtures, seed=cfg.seed * 1009 + i
    )
    for members in [m for m in mixtures if len(m) == 1 or len(m) in sizes]:
      sc = soup.mix_score(d, members, own_head=own_head)
      averaged = merging.weighted_average(fsd_stacked, soup.weights(members))
      flip = merging.pairwise_sign_disagreement(stack_trees([own_tree, averaged]))[0, 1]
      records.append(
        {
          "domain": d,
          "members": soup.ordered(members),
          "size": len(members),
          **sc,
          "accuracy_delta": sc["accuracy"] - own[d]["accuracy"],
          "macro_f1_delta": sc["macro_f1"] - own[d]["macro_f1"],
          # The set FSD of the members (the sign paper's quantity) and the share of the own
          # adapter's weights whose sign the averaging flips (what their k > 2 bars seem
          # to show); zeros count as agreement in both.
          "fsd": float(merging.sign_disagreement(soup.subset(fsd_stacked, members))),
          "own_sign_flip": float(flip),
        }
      )
    order = greedy_order(pair, i, rank=cfg.study.greedy_rank)
    chosen = [[d, *(soup.names[j] for j in order[: size - 1])] for size in range(1, k + 1)]
    greedy[d] = {
      "order": [soup.names[j] for j in order],
      "scores": [
        soup.mix_score(d, m, own_head=own_head, variant=f"greedy_{size}")
        for size, m in enumerate(chosen, 1)
      ],
      "fsd": [float(merging.sign_disagreement(soup.subset(fsd_stacked, m))) for m in chosen],
    }

  metrics = {"own": _with_mean(own), "mix_all": _with_mean(mix_all)}
  summary = {d: {"own": own[d]["accuracy"], "sizes": {}} for d in study}
  for size in sorted(s for s in sizes if s >= 2):
    mean, best = {}, {}
    for d in study:
      rs = [r for r in records if r["domain"] == d and r["size"] == size]
      if rs:
        accs = [r["accuracy"] for r in rs]
        summary[d]["sizes"][str(size)] = {
          "mean": float(np.mean(accs)),
          "best": float(np.max(accs)),
          "min": float(np.min(accs)),
          "n": len(accs),
        }
        mean[d] = {m: float(np.mean([r[m] for r in rs])) for m in ("accuracy", "macro_f1")}
        best[d] = {m: float(np.max([r[m] for r in rs])) for m in ("accuracy", "macro_f1")}
    if mean:
      metrics[f"mix_size_{size}_mean"] = _with_mean(mean)
      metrics[f"mix_size_{size}_best"] = _with_mean(best)
  for size in range(1, k + 1):
    metrics[f"greedy_{size}"] = _with_mean({d: g["scores"][size - 1] for d, g in greedy.items()})

  mixed = [r for r in records if r["size"] >= 2]
  correlations = {}
  for quantity in ("fsd", "own_sign_flip"):
    per = {
      d: sign_study.partial_correlation(
        [r[quantity] for r in mixed if r["domain"] == d],
        [r["accuracy"] for r in mixed if r["domain"] == d],
        [r["size"] for r in mixed if r["domain"] == d],
        seed=cfg.seed,
      )
      for d in study
    }
    # Over domains: accuracy relative to each domain's own adapter; within each size, and
    # pooled with the size as a covariate (FSD and accuracy both move with the size).
    per.update(sign_study.within_size(mixed, quantity, seed=cfg.seed))
    correlations[quantity] = per
  return {
    "metrics": metrics,
    "fsd_matrix": pair,
    "mixtures": records,
    "summary": summary,
    "greedy": greedy,
    "correlations": correlations,
  }


def rescaled_like(tree: PyTree, reference: PyTree) -> PyTree:
  """`tree` times ‖reference‖₂ / ‖tree‖₂ (norms over all leaves): `tree`'s direction at
  `reference`'s magnitude (`tree` unchanged when its norm is 0)."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
  ref = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(reference)))
  factor = jnp.where(norm > 0, ref / jnp.where(norm > 0, norm, 1.0), 1.0)
  return jax.tree.map(lambda x: (x * factor).astype(x.dtype), tree)


def pruning_study(soup: Soup, study: Sequence[str]) -> dict:
  """Part (d): magnitude pruning, highest-FSD-layer pruning and TIES at each sparsity.

  Pruning acts on adapter weights only; each domain is evaluated with its own head (the
  heads averaged with `study.average_heads`). FSD statistics are on adapter weights only.
  `avg_like_ties_<s>` is TIES' magnitude control: the uniform average of the deltas
  rescaled to the norm of TIES' merged delta at the same density (TIES' disjoint mean
  divides by the agreeing members, not K, which scales the deltas up).

  Returns:
    {'metrics': variant -> per-domain scores, 'info': FSD before/after, layers pruned,
     'curves': name -> (sparsities, mean accuracy) for the plot}.
  """
  cfg = soup.setup.config
  own_head = not cfg.study.average_heads
  suffix = "" if own_head else ":avghead"
  k = len(soup.names)
  adapters = without_head(soup.stacked)
  members = [_member(adapters, i) for i in range(k)]
  layers, per_layer = layer_fsd(adapters)
  chosen_layers = {
    soup.names[i]: [
      layers[j] for j in high_fsd_layers(per_layer, i, fraction=cfg.pruning.fsd_layer_fraction)
    ]
    for i in range(k)
  }
  everyone = soup.key(soup.names)
  off_diagonal = ~np.eye(k, dtype=bool)
  deltas = jax.tree.map(lambda x, x0: x - x0[None], adapters, soup.init_adapters)

  def fsd_of(stacked: PyTree) -> dict[str, float]:
    pair = np.asarray(merging.pairwise_sign_disagreement(stacked))
    return {
      "fsd": float(merging.sign_disagreement(stacked)),
      "mean_pairwise_fsd": float(pair[off_diagonal].mean()),
    }

  def on_init(delta: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, soup.init_adapters, delta)

  per: dict[str, dict[str, dict]] = {}
  fsd_stats = {"dense": fsd_of(adapters)}
  for s in cfg.pruning.sparsities:
    density, tag = 1.0 - s, sparsity_name(s)
    pruned = stack_trees([prune_layers(m, density) for m in members])
    layered = stack_trees(
      [prune_layers(m, density, chosen_layers[soup.names[i]]) for i, m in enumerate(members)]
    )
    ties = functools.cache(
      lambda density=density: merging.ties_merge(
        deltas, density=density, scale=cfg.pruning.ties_scale
      )
    )
    # Each params function runs at once (or never, when cached): binding by default
    # arguments only silences the late-binding lint.
    builds = {
      "prune": lambda pruned=pruned: merging.weighted_average(pruned),
      "prune_fsd": lambda layered=layered: merging.weighted_average(layered),
      "ties": lambda ties=ties: on_init(ties()),
      "avg_like_ties": lambda ties=ties: on_init(
        rescaled_like(merging.weighted_average(deltas), ties())
      ),
    }
    for d in study:
      i = soup.names.index(d)
      head = d if own_head else None
      per.setdefault(f"prune_own_{tag}", {})[d] = soup.score(
        d,
        f"prune{tag}:{d}",
        lambda i=i, d=d, pruned=pruned: soup.with_head(_member(pruned, i), d),
        variant=f"prune_own_{tag}",
      )
      for name, build in builds.items():
        what = f"{name.replace('_', '')}{tag}:{everyone}{suffix}"
        per.setdefault(f"{name}_{tag}", {})[d] = soup.score(
          d,
          what,
          lambda build=build, head=head: soup.with_head(build(), head),
          variant=f"{name}_{tag}",
        )
    fsd_stats[tag] = {
      "magnitude": fsd_of(pruned),
      "highest_fsd_layers": fsd_of(layered),
    }

  def mean_of(values: Mapping[str, Mapping[str, float]]) -> float:
    return float(np.mean([v["accuracy"] for v in values.values()]))

  sparsities = [float(s) for s in cfg.pruning.sparsities]
  tags = [sparsity_name(s) for s in sparsities]
  own_dense = mean_of({d: soup.single_score(d, d) for d in study})
  all_dense = mean_of({d: soup.mix_score(d, soup.names, own_head=own_head) for d in study})
  curves = {}
  if sparsities:
    xs = [0.0, *sparsities]
    curves = {
      "own adapter, magnitude": (xs, [own_dense, *(mean_of(per[f"prune_own_{t}"]) for t in tags)]),
      f"all {k}, magnitude": (xs, [all_dense, *(mean_of(per[f"prune_{t}"]) for t in tags)]),
      f"all {k}, highest-FSD layers": (
        xs,
        [all_dense, *(mean_of(per[f"prune_fsd_{t}"]) for t in tags)],
      ),
      f"all {k}, TIES": (sparsities, [mean_of(per[f"ties_{t}"]) for t in tags]),
      f"all {k}, average at TIES' norm": (
        sparsities,
        [mean_of(per[f"avg_like_ties_{t}"]) for t in tags],
      ),
    }
  others = [[j for j in range(k) if j != i] for i in range(k)]
  info = {
    "fsd": fsd_stats,
    "layers": layers,
    # Per adapter and layer: mean FSD of the layer to the same layer of the other adapters.
    "layer_fsd": {
      soup.names[i]: [float(per_layer[j, i, others[i]].mean()) for j in range(len(layers))]
      for i in range(k)
    },
    "pruned_layers": chosen_layers,
    "ties": "TIES (per-tensor trim, λ = pruning.ties_scale) on the deltas from the shared "
    "initialisation; avg_like_ties: the uniform average of the deltas at TIES' norm",
    "heads": "own head of each domain" if own_head else "heads averaged",
  }
  return {"metrics": {v: _with_mean(m) for v, m in per.items()}, "info": info, "curves": curves}


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


def _hp_name(hp: Mapping[str, float]) -> str:
  return ",".join(f"{k}={v:g}" for k, v in hp.items())


# ----------------------------------------------------------------------------
# Merges that use data: Fisher merging, RegMean, AdaMerging (rows merge_<method>)
# ----------------------------------------------------------------------------

# Examples per vmapped batch of per-example Fisher gradients (memory only; the estimate is
# the mean over all examples whatever the batching).
FISHER_BATCH_SIZE = 16


def domain_sample(setup: ft.Setup, domain: str, n: int, purpose: str) -> ft.Examples:
  """n training examples of `domain` (all when fewer): a subset seeded by the run's seed,
  the domain and `purpose` (e.g. 'fisher'), in the split's order."""
  ex = setup.task.train[domain]
  seed = [setup.config.seed, zlib.crc32(domain.encode()), zlib.crc32(purpose.encode())]
  return ex.take(np.sort(np.random.default_rng(seed).permutation(len(ex))[:n]))


def indexed_logits(
  model, base: PyTree, head: PyTree, inputs: Sequence[np.ndarray]
) -> Callable[[PyTree, jax.Array], jax.Array]:
  """`fn(adapters, idx) -> [B, C]` eval-mode logits of `model` with the backbone `base`,
  `adapters` (no head) and `head` ({'head': ...}) on the examples `idx` [B] of `inputs`
  (arrays [N, ...]). Indices stand in for the inputs so that the core's data-driven merges
  (`diagonal_fisher`, `adamerging`), which take one input array, serve any modality."""
  arrays = tuple(jnp.asarray(a) for a in inputs)

  def fn(adapters: PyTree, idx: jax.Array) -> jax.Array:
    params = adapters_lib.merge_params(base, {**adapters, **head})
    return model.apply({"params": params}, *(a[idx] for a in arrays), train=False)

  return fn


def member_fishers(soup: Soup, *, examples: int) -> PyTree:
  """[K, ...] diagonal Fishers of the K adapters (no head), each on `examples` training
  examples of its own domain (`domain_sample`) with its own head, labels drawn from the
  model's predictive distribution (`core.merging.diagonal_fisher`, Matena & Raffel)."""
  adapters = without_head(soup.stacked)
  out = []
  for i, d in enumerate(soup.names):
    sample = domain_sample(soup.setup, d, examples, "fisher")
    fn = indexed_logits(soup.model, soup.base, soup.head_of(d), sample.inputs)
    n = len(sample)
    batches = [
      jnp.arange(s, min(s + FISHER_BATCH_SIZE, n), dtype=jnp.int32)
      for s in range(0, n, FISHER_BATCH_SIZE)
    ]
    key = soup.setup.key("merge_fisher", i)
    out.append(merging.diagonal_fisher(fn, _member(adapters, i), batches, key=key))
  return stack_trees(out)


def fisher_delta(deltas: PyTree, fishers: PyTree, epsilon: float) -> PyTree:
  """Fisher merging of the [K, ...] task vectors, ε = `epsilon` × the mean Fisher entry
  (over all members and leaves: a scale-free ε; large ε tends to the uniform average).

  Fisher merging of the adapters θ_k = θ_0 + τ_k is θ_0 + the Fisher merge of the τ_k: the
  per-entry weights are normalised, so the shared θ_0 passes through."""
  leaves = jax.tree.leaves(fishers)
  mean = float(sum(jnp.sum(f) for f in leaves) / sum(f.size for f in leaves))
  return merging.fisher_merge(deltas, fishers, epsilon=epsilon * mean)


@functools.partial(jax.jit, static_argnums=0)
def _adapter_input_grams(model, params: PyTree, weights: jax.Array, *inputs) -> dict:
  """'/'-joined module path -> Σ w·x xᵀ [d_in, d_in] over the inputs x [B, ..., d_in] of
  every adapter linear layer (`adapters_lib.Dense` under an adapter key) in one forward;
  `weights` [B] or [B, T] (0/1: padding examples, padding tokens) broadcast over x."""
  grams: dict[str, jax.Array] = {}

  def capture(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name == "__call__"
      and isinstance(module, adapters_lib.Dense)
      and any(adapters_lib.is_adapter_key(k) for k in module.path)
    ):
      x = args[0]
      if x.shape[: weights.ndim] != weights.shape:
        raise ValueError(
          f"adapter layer {'/'.join(module.path)} has input shape {x.shape}; accepted: "
          f"leading axes {weights.shape} (batch, tokens)"
        )
      w = weights.reshape(weights.shape + (1,) * (x.ndim - weights.ndim)).astype(jnp.float32)
      name = "/".join(module.path)
      g = merging.input_gram(x.astype(jnp.float32) * w)  # w² = w for 0/1 weights
      grams[name] = grams[name] + g if name in grams else g
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    model.apply({"params": params}, *inputs, train=False)
  return grams


def member_grams(soup: Soup, *, examples: int) -> PyTree:
  """RegMean's input Gram matrices: a tree like the adapters (no head) whose kernel leaves
  are [K, d_in, d_in] and other leaves None, member k's on `examples` training examples
  of its own domain (`domain_sample`) run through its own adapter.

  The inputs are captured with Flax's `nn.intercept_methods` around every adapter
  `Dense.__call__` (the models are not changed); text padding tokens are left out.
  """
  cfg = soup.setup.config
  text = soup.setup.task.modality == "text"
  bs = cfg.eval_batch_size
  per_member = []
  for i, d in enumerate(soup.names):
    sample = domain_sample(soup.setup, d, examples, "regmean")
    params = soup.params(_member(soup.stacked, i))
    total: dict[str, jax.Array] = {}
    for start in range(0, len(sample), bs):
      chunk = [a[start : start + bs] for a in sample.inputs]
      valid = np.ones(len(chunk[0]), np.float32)
      pad = bs - len(valid)
      if pad:  # fixed shapes: one compile
        chunk = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in chunk]
        valid = np.concatenate([valid, np.zeros(pad, np.float32)])
      # Text inputs are (token_ids, attention_mask): padding tokens get weight 0.
      weights = valid[:, None] * chunk[1] if text else valid
      grams = _adapter_input_grams(soup.model, params, jnp.asarray(weights), *chunk)
      total = {k: total[k] + g if k in total else g for k, g in grams.items()}
    per_member.append(total)

  def leaf(path, x):
    keys = tuple(getattr(p, "key", str(p)) for p in path)
    if keys[-1] != "kernel":
      return None
    name = "/".join(keys[:-1])
    if name not in per_member[0]:
      raise ValueError(
        f"no input was captured for the adapter kernel {name}; accepted: adapters whose "
        "linear layers are adapters_lib.Dense (pfeiffer, houlsby)"
      )
    return jnp.stack([g[name] for g in per_member])

  return jax.tree_util.tree_map_with_path(leaf, without_head(soup.stacked))


def learned_candidates(config) -> dict[str, list[dict[str, float]]]:
  """Per method of `merge.learned` but AdaMerging (test-time, no grid), its grid chosen on
  validation: Fisher's relative ε (`merge.fisher_epsilons`), RegMean's α
  (`merge.regmean_alphas`); each setting also names its declared example count."""
  m = config.merge
  grids = {
    "fisher": [{"examples": m.fisher_examples, "epsilon": e} for e in m.fisher_epsilons],
    "regmean": [{"examples": m.regmean_examples, "alpha": a} for a in m.regmean_alphas],
  }
  return {name: grids[name] for name in m.learned if name in grids}


def adamerging_settings(config) -> dict[str, Any]:
  """The declared AdaMerging settings (`merge.adamerging_*`), as recorded in results.json."""
  m = config.merge
  return {
    "granularity": m.adamerging_granularity,
    "init": float(m.adamerging_init),
    "steps": int(m.adamerging_steps),
    "learning_rate": float(m.adamerging_lr),
    "batch_size": int(m.adamerging_batch_size),
  }


def adamerging_batches(config, domain: str, n: int) -> list[jax.Array]:
  """`merge.adamerging_steps` index batches [b] into `domain`'s n test examples: seeded
  epochs of shuffled indices, b = min(`merge.adamerging_batch_size`, n)."""
  b = min(config.merge.adamerging_batch_size, n)
  rng = np.random.default_rng([config.seed, zlib.crc32(domain.encode()), zlib.crc32(b"adamerging")])
  batches, pool = [], np.zeros(0, np.int64)
  while len(batches) < config.merge.adamerging_steps:
    if len(pool) < b:
      pool = np.concatenate([pool, rng.permutation(n)])
    batches.append(jnp.asarray(pool[:b], jnp.int32))
    pool = pool[b:]
  return batches


def adamerging_on(
  soup: Soup, domain: str, deltas: PyTree, head: PyTree
) -> merging.AdaMergingResult:
  """AdaMerging of the K task vectors on `domain`'s UNLABELLED test inputs (its labels are
  never read), with `head` ({'head': ...}); merged adapters in `.params` (no head)."""
  cfg = soup.setup.config
  settings = adamerging_settings(cfg)
  inputs = soup.tests[domain].inputs
  return merging.adamerging(
    indexed_logits(soup.model, soup.base, head, inputs),
    soup.init_adapters,
    deltas,
    adamerging_batches(cfg, domain, len(soup.tests[domain])),
    granularity=settings["granularity"],
    init=settings["init"],
    steps=settings["steps"],
    learning_rate=settings["learning_rate"],
  )


def coefficient_summary(result: merging.AdaMergingResult, names: Sequence[str]) -> dict:
  """Per member its mean learned coefficient (over leaves when layer-wise), with the min
  and max over leaves, and the mean prediction entropy before the first and last steps."""
  per_leaf = np.stack([np.asarray(c) for c in jax.tree.leaves(result.coefficients)])  # [L, K]
  entropy = np.asarray(result.entropy)
  return {
    **{f"mean_{d}": float(per_leaf[:, i].mean()) for i, d in enumerate(names)},
    **{f"min_{d}": float(per_leaf[:, i].min()) for i, d in enumerate(names)},
    **{f"max_{d}": float(per_leaf[:, i].max()) for i, d in enumerate(names)},
    "entropy_first": float(entropy[0]),
    "entropy_last": float(entropy[-1]),
  }


def merge_study(soup: Soup, study: Sequence[str]) -> dict:
  """Part (e): the merge family on the K adapters, each domain with its own head.

  For each method of `merge.methods` and each setting of its grid (`merge_candidates`),
  the merged task vector is added to the shared initialisation and scored on every study
  domain's VALIDATION split (`eval.max_val_examples`); the setting of best mean validation
  accuracy is then scored on the test splits (variant `merge_<method>`). No test label
  takes part in any choice. `merge_avg_like_ties` is the uniform average of the deltas at
  the norm of the chosen TIES merge (its magnitude control).

  The merges of `merge.learned` use data besides the weights: `merge_fisher` (diagonal
  Fishers on each adapter's own training data, ε chosen on validation like the grids
  above), `merge_regmean` (input Gram matrices of the adapters' linear layers on each
  domain's training data, α chosen on validation) and `merge_adamerging` (coefficients
  learned on each test domain's unlabelled test inputs: a test-time method, one merge per
  domain). Fishers, Grams and AdaMerging run only when a score is not cached.

  Returns:
    {'metrics': variant -> per-domain scores, 'selection': variant -> chosen
     hyper-parameters and their mean validation accuracy, 'validation': variant ->
     setting -> mean validation accuracy, 'adamerging': settings and learned coefficients
     per domain (or None)}.
  """
  cfg = soup.setup.config
  own_head = not cfg.study.average_heads
  suffix = "" if own_head else ":avghead"
  adapters = without_head(soup.stacked)
  deltas = jax.tree.map(lambda x, x0: x - x0[None], adapters, soup.init_adapters)
  key = soup.setup.key("merge_dare")
  everyone = soup.key(soup.names)

  def params_fn(delta_fn: Callable[[], PyTree], d: str) -> Callable[[], PyTree]:
    return lambda: soup.with_head(
      jax.tree.map(jnp.add, soup.init_adapters, delta_fn()), d if own_head else None
    )

  fishers = functools.cache(lambda: member_fishers(soup, examples=cfg.merge.fisher_examples))
  grams = functools.cache(lambda: member_grams(soup, examples=cfg.merge.regmean_examples))
  builders: dict[str, Callable[[Mapping[str, float]], PyTree]] = {
    name: lambda hp, name=name: merged_delta(name, deltas, hp, key) for name in MERGE_METHODS
  }
  builders["fisher"] = lambda hp: fisher_delta(deltas, fishers(), hp["epsilon"])
  builders["regmean"] = lambda hp: merging.regmean_merge(deltas, grams(), alpha=hp["alpha"])

  metrics, selection, validation, chosen_delta = {}, {}, {}, {}
  for name, grid in {**merge_candidates(cfg), **learned_candidates(cfg)}.items():
    val = {}
    for hp in grid:
      delta = functools.cache(lambda hp=hp, name=name: builders[name](hp))
      what = f"{name}[{_hp_name(hp)}]:{everyone}{suffix}"
      val[_hp_name(hp)] = float(
        np.mean([soup.score(d, what, params_fn(delta, d), split="val")["accuracy"] for d in study])
      )
    best = max(range(len(grid)), key=lambda j: (val[_hp_name(grid[j])], -j))
    hp = grid[best]
    variant = f"merge_{name}"
    selection[variant] = {**hp, "val_accuracy": val[_hp_name(hp)]}
    validation[variant] = val
    delta = functools.cache(lambda hp=hp, name=name: builders[name](hp))
    chosen_delta[name] = delta
    what = f"{name}[{_hp_name(hp)}]:{everyone}{suffix}"
    metrics[variant] = _with_mean(
      {d: soup.score(d, what, params_fn(delta, d), variant=variant) for d in study}
    )
  adamerging = None
  if "adamerging" in cfg.merge.learned:
    settings = adamerging_settings(cfg)
    what = f"adamerging[{_hp_name({k: v for k, v in settings.items() if k != 'granularity'})},"
    what += f"{settings['granularity']}]:{everyone}{suffix}"
    info_cache = artifacts.JsonCache(soup.cache.path.parent, LEARNED_CACHE)
    per, coefficients = {}, {}
    for d in study:
      head = soup.head_tree(d if own_head else None)
      result = functools.cache(lambda d=d, head=head: adamerging_on(soup, d, deltas, head))
      per[d] = soup.score(
        d, what, lambda result=result, head=head: soup.params({**result().params, **head}),
        variant="merge_adamerging",
      )  # fmt: skip
      coefficients[d] = info_cache.get(
        f"{d}|{what}", lambda result=result: coefficient_summary(result(), soup.names)
      )
    info_cache.flush()
    metrics["merge_adamerging"] = _with_mean(per)
    adamerging = {"settings": settings, "note": ADAMERGING_NOTE, "coefficients": coefficients}
  if "ties" in chosen_delta:
    ties = chosen_delta["ties"]
    hp = _hp_name(selection["merge_ties"])
    metrics["merge_avg_like_ties"] = _with_mean(
      {
        d: soup.score(
          d,
          f"avglike[ties,{hp}]:{everyone}{suffix}",
          params_fn(lambda: rescaled_like(merging.weighted_average(deltas), ties()), d),
          variant="merge_avg_like_ties",
        )
        for d in study
      }
    )
  return {
    "metrics": metrics,
    "selection": selection,
    "validation": validation,
    "adamerging": adamerging,
  }


def _greedy_curves(config, study: dict, study_domains, k: int) -> dict:
  """Greedy mixing against the empirical best/mean/min per size, averaged over domains."""
  sizes = list(range(1, k + 1))
  own = float(np.mean([study["summary"][d]["own"] for d in study_domains]))
  curves = {
    f"greedy ({config.study.greedy_rank})": (
      sizes,
      [study["metrics"][f"greedy_{size}"]["mean"]["accuracy"] for size in sizes],
    )
  }
  for stat in ("best", "mean", "min"):
    ys = [own]
    for size in sizes[1:]:
      vals = [
        study["summary"][d]["sizes"][str(size)][stat]
        for d in study_domains
        if str(size) in study["summary"][d]["sizes"]
      ]
      ys.append(float(np.mean(vals)) if vals else float("nan"))
    curves[f"empirical {stat}"] = (sizes, ys)
  return curves


def run(config, workdir: str, *, setup: ft.Setup | None = None) -> dict:
  """Runs (or resumes) every stage and evaluation; returns the results dict of DESIGN.md."""
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  domains = resolve_domains(config, setup.task)
  logging.info(
    "adapter_soup: adapters %s; novel targets %s; study %s",
    domains.adapters,
    domains.targets,
    domains.study,
  )
  writer = metrics_lib.MetricWriter(workdir)
  backbone = ft.pretrained_backbone(setup, workdir, writer)

  model, init, trees, step_time = train_adapters(setup, workdir, writer, backbone, domains.adapters)
  base, init_tree = adapters_lib.split_params(init, include_head=True)

  soup = Soup(
    setup=setup,
    names=domains.adapters,
    model=model,
    model_plain=ft.build_model(setup, adapters_lib.AdapterConfig()),
    base=base,
    stacked=stack_trees(trees),
    init_adapters=without_head(init_tree),
    tests=eval_subsets(setup, list(dict.fromkeys((*domains.adapters, *domains.targets)))),
    vals=val_subsets(setup, domains.study),
    cache=EvalCache(workdir),
    outcome_cache=artifacts.JsonCache(workdir, OUTCOMES_FILE),
    model_product=product_model(setup, len(domains.adapters)),
  )
  novel = novel_domains(soup, domains.targets, backbone, workdir, writer)
  step_time.update(novel["step_time_s"])
  writer.close()
  fsd_stacked = soup.stacked if config.study.fsd_include_head else without_head(soup.stacked)
  study = in_domain_study(soup, domains.study, fsd_stacked)
  pruning = pruning_study(soup, domains.study)
  merges = merge_study(soup, domains.study)
  soup.cache.flush()
  soup.outcome_cache.flush()
  logging.info("adapter_soup: %d evaluations in this run", soup.cache.computed)

  plots = workdir_lib.as_path(workdir) / PLOTS_DIR
  if jax.process_index() == 0:
    plots.mkdir(parents=True, exist_ok=True)
    plot_fsd_accuracy(
      plots / "fsd_accuracy.png", study["mixtures"], study["correlations"]["fsd"], seed=config.seed
    )
    plot_fsd_matrix(plots / "fsd_matrix.png", study["fsd_matrix"], domains.adapters)
    if pruning["curves"]:
      plot_lines(
        plots / "sparsity.png", "sparsity", pruning["curves"], title="pruning before averaging"
      )
    plot_lines(
      plots / "greedy.png",
      "mixture size l",
      _greedy_curves(config, study, domains.study, len(domains.adapters)),
      title="greedy adapter mixing (in-domain)",
    )
  return {
    "method": "adapter_soup",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "adapter_kind": config.adapter.kind,
    "adapter_domains": list(domains.adapters),
    "target_domains": list(domains.targets),
    "study_domains": list(domains.study),
    "num_examples": {"test_eval": {d: len(ex) for d, ex in soup.tests.items()}},
    "step_time_s": step_time,
    "notes": {"best_single": BEST_SINGLE_NOTE, "merge_adamerging": ADAMERGING_NOTE},
    "metrics": {
      **novel["metrics"],
      **study["metrics"],
      **pruning["metrics"],
      **merges["metrics"],
    },
    # Aggregates over several mixtures (mix_size_*) have no per-example outcomes.
    results_lib.PER_EXAMPLE: soup.per_example,
    "selections": novel["selections"],
    # Hyper-parameters chosen on the study domains' validation splits (DESIGN.md).
    "selection": merges["selection"],
    "merge_validation": merges["validation"],
    # AdaMerging's declared settings and learned coefficients (test-time, target inputs).
    "adamerging": merges["adamerging"],
    "heads": "averaged (ablation)" if config.study.average_heads else "own head per domain",
    "fsd_matrix": {"domains": list(domains.adapters), "values": study["fsd_matrix"].tolist()},
    "in_domain": study["summary"],
    "greedy": study["greedy"],
    "correlations": study["correlations"],
    "mixtures": study["mixtures"],
    "pruning": pruning["info"],
    "plots": sorted(f"{PLOTS_DIR}/{p.name}" for p in plots.glob("*.png")),
  }
