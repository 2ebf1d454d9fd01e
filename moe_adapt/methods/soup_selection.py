"""AdapterSoup's selection of the adapters to average for a novel domain (pure functions).

Chronopoulou et al., Findings of EACL 2023: the candidates are ranked by the mean cosine
similarity of sampled sentence embeddings (`select_by_similarity`) or by the share of the
novel domain's samples that a Gaussian mixture fitted on the candidates' embeddings puts
into each candidate's components (`select_by_clustering`, after Aharoni & Goldberg, 2020).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

COVARIANCE_TYPES = ("diag", "full", "spherical", "tied")


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


def select_at_threshold(
  scores: Mapping[str, float], order: Sequence[str], *, top_k: int, threshold: float
) -> tuple[str, ...]:
  """The domains of `order` by decreasing score (ties keep `order`), at most `top_k`, only
  those scoring >= `threshold`, and at least the best one."""
  return _keep(_rank(scores, order), scores, top_k, threshold)


def threshold_name(threshold: float) -> str:
  """Variant suffix of a similarity threshold: 0.05 -> '0.05', -0.1 -> 'm0.1'."""
  return format(threshold, "g").replace("-", "m")
