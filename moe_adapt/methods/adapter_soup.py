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
     with score >= `selection.threshold` (at least the best one);
   - `clustering`: a Gaussian mixture (one component per candidate) fitted on the
     candidates' sampled embeddings; each component belongs to the domain most of its
     members come from; domains holding >= `selection.cluster_min_share` of t's samples
     are averaged (at most top_k, at least one);
   - `all`: every candidate (the uniform soup);
   - `best_single`: the candidate with the best accuracy on t's TEST split — an ORACLE;
   - `zero_shot`: the frozen backbone with a head trained on the candidates' pooled
     training splits (stage `zero_shot_head_<t>`), no adapter;

   and `single_<d>`: each candidate alone.
b) In-domain study (Nguyen & Le, ACL 2024, "Generalizability of Mixture of Domain-Specific
   Adapters from the Lens of Signed Weight Directions ..."): for each study domain d, the
   mixtures holding d's own adapter (all 2^(K-1) of them, or a seeded sample stratified
   over sizes), their accuracy on d's test split and their fraction of sign difference
   (FSD: `core.merging.sign_disagreement`, adapter weights without the head by default);
   Pearson/Spearman between FSD and accuracy; the pairwise FSD matrix.
c) Greedy adapter mixing (their Alg. 1): d's adapter plus the l-1 others of lowest FSD to
   it (`study.greedy_rank='target'`) or of lowest row-mean FSD (`'row_mean'`, the paper's
   ranking), l = 1..K.
d) Pruning (their Alg. 2 and 4): magnitude pruning of each adapter (head dense) at each
   sparsity s before averaging — d's own adapter alone (`prune_own_<s>`) and the all-K
   mixture (`prune_<s>`); only each member's layers of highest mean FSD to the other
   adapters (`prune_fsd_<s>`); TIES merging of the all-K mixture at density 1-s on the
   deltas from the shared initialisation (`ties_<s>`).

Every accuracy is cached in `<workdir>/mixture_evals.json`, so a resumed run evaluates
nothing twice for its accuracies; the per-example outcomes of the reported variants
(results.json `per_example`) are kept in memory, so a resumed run evaluates the reported
variants whose accuracy it read from the cache once more to recover them. Plots go to
`<workdir>/plots/`.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import os
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moe_adapt.core import merging
from moe_adapt.methods import _checks
from moe_adapt.methods import finetune as ft
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import workdir as workdir_lib

PyTree = Any

ADAPTER_KINDS = ("pfeiffer", "houlsby", "lora")
COVARIANCE_TYPES = ("diag", "full", "spherical", "tied")
GREEDY_RANKS = ("target", "row_mean")
NOVEL_VARIANTS = ("zero_shot", "similarity", "clustering", "all", "best_single")
CACHE_FILE = "mixture_evals.json"
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


class EvalCache:
  """Accuracies by key ('<domain>|<what>'), persisted to `<workdir>/mixture_evals.json`.

  `get(domain, what, compute)` returns the stored value, or calls `compute()` and stores
  its result, so a resumed run evaluates nothing twice. A local file is rewritten
  atomically at once; a remote object (`gs://`) at most every `remote_flush_s` seconds
  (object stores limit how often one object may be rewritten) and on `flush()`. The
  workdir belongs to one config (`prepare_workdir`), so keys need not name the config.
  """

  def __init__(
    self, workdir: str | os.PathLike, *, remote_flush_s: float = metrics_lib.REMOTE_FLUSH_S
  ):
    if isinstance(remote_flush_s, bool) or not (
      isinstance(remote_flush_s, int | float) and remote_flush_s >= 0
    ):
      raise ValueError(f"remote_flush_s={remote_flush_s!r} is invalid; accepted: a number >= 0")
    self.path = workdir_lib.as_path(workdir) / CACHE_FILE
    self.values: dict[str, float] = {}
    if self.path.is_file():
      self.values = {k: float(v) for k, v in workdir_lib.read_json(self.path).items()}
    self.computed = 0
    self._wait_s = remote_flush_s if not workdir_lib.is_local(self.path) else 0.0
    self._unwritten = False
    self._last_flush = time.monotonic()

  def get(self, domain: str, what: str, compute: Callable[[], float]) -> float:
    key = f"{domain}|{what}"
    if key not in self.values:
      self.values[key] = float(compute())
      self.computed += 1
      self._unwritten = True
      if time.monotonic() - self._last_flush >= self._wait_s:
        self.flush()
    return self.values[key]

  def flush(self) -> None:
    """Writes the values not yet in the file (JAX process 0 only)."""
    if self._unwritten and jax.process_index() == 0:
      workdir_lib.write_json_atomic(self.path, self.values)
    self._unwritten = False
    self._last_flush = time.monotonic()


def eval_subsets(setup: ft.Setup, domains: Sequence[str]) -> dict[str, ft.Examples]:
  """Test examples of each domain (already cut to `eval.max_examples` by the harness, with
  a subset fixed by `data.benchmark_seed`: every seed of a sweep sees the same examples)."""
  return {d: setup.task.test[d] for d in domains}


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
  path: str | os.PathLike, mixtures: Sequence[Mapping], pooled: Mapping, *, seed: int | None = None
) -> None:
  """Scatter of FSD vs accuracy − own accuracy, mixtures of size >= 2, one colour per domain.

  Marker area grows with the mixture's size (number of adapters), shown in a second legend;
  the title names the seed of the run.
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

  run = "" if seed is None else f"seed {seed}: "
  ax.set_title(
    f"{run}pooled Pearson {fmt(pooled.get('pearson'))}, Spearman {fmt(pooled.get('spearman'))}",
    fontsize=10,
  )
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


def _with_mean(per_domain: Mapping[str, float]) -> dict[str, dict[str, float]]:
  """{domain: {'accuracy'}, 'mean': {'accuracy'}} (mean over the given domains)."""
  out = {d: {"accuracy": float(a)} for d, a in per_domain.items()}
  out["mean"] = {"accuracy": float(np.mean(list(per_domain.values())))}
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
    cache: the accuracies computed so far.
    outcomes: '<domain>|<what>' -> per-example outcomes evaluated in this process.
    per_example: variant -> domain -> per-example outcomes of what the results report.
  """

  setup: ft.Setup
  names: tuple[str, ...]
  model: Any
  model_plain: Any
  base: PyTree
  stacked: PyTree
  init_adapters: PyTree
  tests: Mapping[str, ft.Examples]
  cache: EvalCache
  outcomes: dict[str, dict] = dataclasses.field(default_factory=dict)
  per_example: dict[str, dict] = dataclasses.field(default_factory=dict)

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

  def mixture(self, members: Sequence[str]) -> PyTree:
    """Full params of the uniform average of `members`' adapters and heads."""
    # Zero weights on the full stack: one compiled average for every subset, and exactly
    # the subset's uniform average (0·x only adds exact zeros).
    return self.params(merging.weighted_average(self.stacked, self.weights(members)))

  def accuracy(
    self,
    domain: str,
    what: str,
    params_fn: Callable[[], PyTree],
    *,
    plain: bool = False,
    variant: str | None = None,
  ) -> float:
    """Cached accuracy on `domain`'s test examples of the params `params_fn()` builds.

    With `variant`, its per-example outcomes go into `per_example[variant][domain]`
    (evaluated again when the accuracy came from an earlier process's cache).
    """
    model = self.model_plain if plain else self.model
    key = f"{domain}|{what}"

    def outcomes() -> dict:
      self.outcomes[key] = evaluate_outcomes(self.setup, model, params_fn(), self.tests[domain])
      return self.outcomes[key]

    value = self.cache.get(domain, what, lambda: results_lib.accuracy(outcomes()))
    if variant is not None:
      self.per_example.setdefault(variant, {})[domain] = self.outcomes.get(key) or outcomes()
    return value

  def single_accuracy(self, domain: str, adapter: str, *, variant: str | None = None) -> float:
    """Accuracy on `domain` of `adapter`'s trained params as they are (no averaging)."""
    i = self.names.index(adapter)
    return self.accuracy(
      domain,
      f"adapter:{adapter}",
      lambda: self.params(_member(self.stacked, i)),
      variant=variant,
    )

  def mix_accuracy(
    self, domain: str, members: Sequence[str], *, variant: str | None = None
  ) -> float:
    """Accuracy on `domain` of the uniform mixture of `members`."""
    return self.accuracy(
      domain, f"mix:{self.key(members)}", lambda: self.mixture(members), variant=variant
    )


def novel_domains(soup: Soup, targets: Sequence[str], backbone: PyTree, workdir, writer) -> dict:
  """Part (a): each selection method on each novel target.

  Returns:
    {'metrics': variant -> per-target results, 'selections': target -> what each chose,
     'step_time_s': zero-shot head stage -> seconds per step}.
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
  per_target: dict[str, dict[str, float]] = {v: {} for v in NOVEL_VARIANTS}
  singles_by_adapter: dict[str, dict[str, float]] = {}
  selections, step_time = {}, {}
  for t in targets:
    candidates = [d for d in soup.names if d != t]
    singles = {d: soup.single_accuracy(t, d, variant=f"single_{d}") for d in candidates}
    for d, acc in singles.items():
      singles_by_adapter.setdefault(d, {})[t] = acc
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
    best = max(candidates, key=lambda d: (singles[d], -candidates.index(d)))
    for name, members in (
      ("similarity", sim.selected),
      ("clustering", clu.selected),
      ("all", candidates),
    ):
      per_target[name][t] = soup.mix_accuracy(t, members, variant=name)
    per_target["best_single"][t] = soup.single_accuracy(t, best, variant="best_single")
    # The zero-shot backbone head: the frozen backbone, a head on the candidates' data.
    stage = f"zero_shot_head_{t}"
    head = ft.train(
      setup,
      workdir,
      writer,
      stage=stage,
      model=soup.model_plain,
      params=plain_params,
      train_mode="head",
      examples=setup.task.pooled("train", candidates),
      steps=cfg.train.steps,
      lr=cfg.train.lr,
      batch_size=cfg.train.batch_size,
    )
    step_time[stage] = head.step_time_s
    per_target["zero_shot"][t] = soup.accuracy(
      t, "zero_shot", lambda head=head: head.params, plain=True, variant="zero_shot"
    )
    selections[t] = {
      "candidates": candidates,
      "similarity": {"selected": list(sim.selected), "scores": sim.scores},
      "clustering": {"selected": list(clu.selected), "shares": clu.scores},
      "all": {"selected": candidates},
      "best_single": {"selected": [best], "note": BEST_SINGLE_NOTE},
    }
  metrics = {v: _with_mean(per_target[v]) for v in NOVEL_VARIANTS if per_target[v]}
  metrics.update({f"single_{d}": _with_mean(m) for d, m in singles_by_adapter.items()})
  return {"metrics": metrics, "selections": selections, "step_time_s": step_time}


def in_domain_study(soup: Soup, study: Sequence[str], fsd_stacked: PyTree) -> dict:
  """Parts (b) and (c): mixtures holding the own adapter, FSD, correlations, greedy.

  Args:
    soup: the run's adapters.
    study: the study domains.
    fsd_stacked: [K, ...] the weights FSD is computed on (adapters, with or without head).

  Returns:
    {'metrics', 'fsd_matrix' [K, K], 'mixtures' (one record per evaluated mixture),
     'summary' (per domain and size: mean/best/min/n), 'greedy', 'correlations'}.
  """
  cfg = soup.setup.config
  k = len(soup.names)
  pair = np.asarray(merging.pairwise_sign_disagreement(fsd_stacked))
  records, own_acc, greedy = [], {}, {}
  for d in study:
    own = soup.names.index(d)
    own_acc[d] = soup.single_accuracy(d, d, variant="own")
    own_tree = _member(fsd_stacked, own)
    others = [x for x in soup.names if x != d]
    for members in enumerate_mixtures(
      d, others, max_mixtures=cfg.study.max_mixtures, seed=cfg.seed * 1009 + own
    ):
      acc = soup.mix_accuracy(d, members)
      averaged = merging.weighted_average(fsd_stacked, soup.weights(members))
      flip = merging.pairwise_sign_disagreement(stack_trees([own_tree, averaged]))[0, 1]
      records.append(
        {
          "domain": d,
          "members": soup.ordered(members),
          "size": len(members),
          "accuracy": acc,
          "accuracy_delta": acc - own_acc[d],
          # The set FSD of the members (the sign paper's quantity) and the share of the own
          # adapter's weights whose sign the averaging flips (what their k > 2 bars seem
          # to show); zeros count as agreement in both.
          "fsd": float(merging.sign_disagreement(soup.subset(fsd_stacked, members))),
          "own_sign_flip": float(flip),
        }
      )
    order = greedy_order(pair, own, rank=cfg.study.greedy_rank)
    chosen = [[d, *(soup.names[j] for j in order[: size - 1])] for size in range(1, k + 1)]
    greedy[d] = {
      "order": [soup.names[j] for j in order],
      "accuracy": [
        soup.mix_accuracy(d, m, variant=f"greedy_{size}") for size, m in enumerate(chosen, 1)
      ],
      "fsd": [float(merging.sign_disagreement(soup.subset(fsd_stacked, m))) for m in chosen],
    }

  metrics = {"own": _with_mean(own_acc)}
  summary = {d: {"own": own_acc[d], "sizes": {}} for d in study}
  for size in range(2, k + 1):
    by_domain = {}
    for d in study:
      accs = [r["accuracy"] for r in records if r["domain"] == d and r["size"] == size]
      if accs:
        by_domain[d] = accs
        summary[d]["sizes"][str(size)] = {
          "mean": float(np.mean(accs)),
          "best": float(np.max(accs)),
          "min": float(np.min(accs)),
          "n": len(accs),
        }
    if by_domain:
      metrics[f"mix_size_{size}_mean"] = _with_mean({d: np.mean(a) for d, a in by_domain.items()})
      metrics[f"mix_size_{size}_best"] = _with_mean({d: np.max(a) for d, a in by_domain.items()})
  for size in range(1, k + 1):
    metrics[f"greedy_{size}"] = _with_mean({d: g["accuracy"][size - 1] for d, g in greedy.items()})

  mixed = [r for r in records if r["size"] >= 2]
  correlations = {}
  for quantity in ("fsd", "own_sign_flip"):
    per = {
      d: correlation(
        [r[quantity] for r in mixed if r["domain"] == d],
        [r["accuracy"] for r in mixed if r["domain"] == d],
      )
      for d in study
    }
    # Pooled over domains: accuracy relative to each domain's own adapter.
    per["pooled"] = correlation([r[quantity] for r in mixed], [r["accuracy_delta"] for r in mixed])
    correlations[quantity] = per
  return {
    "metrics": metrics,
    "fsd_matrix": pair,
    "mixtures": records,
    "summary": summary,
    "greedy": greedy,
    "correlations": correlations,
  }


def pruning_study(soup: Soup, study: Sequence[str]) -> dict:
  """Part (d): magnitude pruning, highest-FSD-layer pruning and TIES at each sparsity.

  Pruning acts on adapter weights only (heads stay dense); FSD statistics are on adapter
  weights only.

  Returns:
    {'metrics': variant -> per-domain results, 'info': FSD before/after, layers pruned,
     'curves': name -> (sparsities, mean accuracy) for the plot}.
  """
  cfg = soup.setup.config
  k = len(soup.names)
  adapters = without_head(soup.stacked)
  heads = {adapters_lib.HEAD_KEY: soup.stacked[adapters_lib.HEAD_KEY]}
  mean_head = merging.weighted_average(heads)
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

  def fsd_of(stacked: PyTree) -> dict[str, float]:
    pair = np.asarray(merging.pairwise_sign_disagreement(stacked))
    return {
      "fsd": float(merging.sign_disagreement(stacked)),
      "mean_pairwise_fsd": float(pair[off_diagonal].mean()),
    }

  def average(stacked: PyTree) -> PyTree:
    return soup.params({**merging.weighted_average(stacked), **mean_head})

  per: dict[str, dict[str, float]] = {}
  fsd_stats = {"dense": fsd_of(adapters)}
  for s in cfg.pruning.sparsities:
    density, tag = 1.0 - s, sparsity_name(s)
    pruned = stack_trees([prune_layers(m, density) for m in members])
    layered = stack_trees(
      [prune_layers(m, density, chosen_layers[soup.names[i]]) for i, m in enumerate(members)]
    )

    def ties(density=density) -> PyTree:
      # TIES merges task vectors: the deltas from the shared initialisation.
      deltas = jax.tree.map(lambda x, x0: x - x0[None], adapters, soup.init_adapters)
      merged = merging.ties_merge(deltas, density=density, scale=cfg.pruning.ties_scale)
      return soup.params({**jax.tree.map(jnp.add, soup.init_adapters, merged), **mean_head})

    for d in study:
      i = soup.names.index(d)
      # Each params function runs at once (or never, when cached): binding by default
      # arguments only silences the late-binding lint.
      per.setdefault(f"prune_own_{tag}", {})[d] = soup.accuracy(
        d,
        f"prune{tag}:{d}",
        lambda i=i, pruned=pruned: soup.params({**_member(pruned, i), **_member(heads, i)}),
        variant=f"prune_own_{tag}",
      )
      per.setdefault(f"prune_{tag}", {})[d] = soup.accuracy(
        d, f"prune{tag}:{everyone}", lambda pruned=pruned: average(pruned), variant=f"prune_{tag}"
      )
      per.setdefault(f"prune_fsd_{tag}", {})[d] = soup.accuracy(
        d,
        f"prunefsd{tag}:{everyone}",
        lambda layered=layered: average(layered),
        variant=f"prune_fsd_{tag}",
      )
      per.setdefault(f"ties_{tag}", {})[d] = soup.accuracy(
        d, f"ties{tag}:{everyone}", ties, variant=f"ties_{tag}"
      )
    fsd_stats[tag] = {
      "magnitude": fsd_of(pruned),
      "highest_fsd_layers": fsd_of(layered),
    }

  def mean_of(values: Mapping[str, float]) -> float:
    return float(np.mean(list(values.values())))

  sparsities = [float(s) for s in cfg.pruning.sparsities]
  tags = [sparsity_name(s) for s in sparsities]
  own_dense = mean_of({d: soup.single_accuracy(d, d) for d in study})
  all_dense = mean_of({d: soup.mix_accuracy(d, soup.names) for d in study})
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
    "ties": "TIES on the deltas from the shared initialisation; heads averaged densely",
  }
  return {"metrics": {v: _with_mean(m) for v, m in per.items()}, "info": info, "curves": curves}


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

  # One adapter (+ head) per domain, all from the same initialisation (same key).
  model = ft.build_model(setup, soup_adapter_config(config))
  init = ft.init_params(setup, model, setup.key("adapter_init"), backbone)
  base, init_tree = adapters_lib.split_params(init, include_head=True)
  trees, step_time = [], {}
  for d in domains.adapters:
    result = ft.train(
      setup,
      workdir,
      writer,
      stage=f"adapter_{d}",
      model=model,
      params=init,
      train_mode="adapters",
      examples=setup.task.train[d],
      steps=config.train.steps,
      lr=config.train.lr,
      batch_size=config.train.batch_size,
    )
    # Keep only the adapters + head: the frozen backbone is `base` for every domain.
    trees.append(adapters_lib.split_params(result.params, include_head=True)[1])
    step_time[f"adapter_{d}"] = result.step_time_s

  soup = Soup(
    setup=setup,
    names=domains.adapters,
    model=model,
    model_plain=ft.build_model(setup, adapters_lib.AdapterConfig()),
    base=base,
    stacked=stack_trees(trees),
    init_adapters=without_head(init_tree),
    tests=eval_subsets(setup, list(dict.fromkeys((*domains.adapters, *domains.targets)))),
    cache=EvalCache(workdir),
  )
  novel = novel_domains(soup, domains.targets, backbone, workdir, writer)
  step_time.update(novel["step_time_s"])
  writer.close()
  fsd_stacked = soup.stacked if config.study.fsd_include_head else without_head(soup.stacked)
  study = in_domain_study(soup, domains.study, fsd_stacked)
  pruning = pruning_study(soup, domains.study)
  soup.cache.flush()
  logging.info("adapter_soup: %d evaluations in this run", soup.cache.computed)

  plots = workdir_lib.as_path(workdir) / PLOTS_DIR
  if jax.process_index() == 0:
    plots.mkdir(parents=True, exist_ok=True)
    plot_fsd_accuracy(
      plots / "fsd_accuracy.png",
      study["mixtures"],
      study["correlations"]["fsd"]["pooled"],
      seed=config.seed,
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
    "notes": {"best_single": BEST_SINGLE_NOTE},
    "metrics": {**novel["metrics"], **study["metrics"], **pruning["metrics"]},
    # Aggregates over several mixtures (mix_size_*) have no per-example outcomes.
    results_lib.PER_EXAMPLE: soup.per_example,
    "selections": novel["selections"],
    "fsd_matrix": {"domains": list(domains.adapters), "values": study["fsd_matrix"].tolist()},
    "in_domain": study["summary"],
    "greedy": study["greedy"],
    "correlations": study["correlations"],
    "mixtures": study["mixtures"],
    "pruning": pruning["info"],
    "plots": sorted(f"{PLOTS_DIR}/{p.name}" for p in plots.glob("*.png")),
  }
