"""The in-domain study of the signed-weight-direction paper: mixtures, FSD, greedy mixing.

Nguyen & Le, ACL 2024, "Generalizability of Mixture of Domain-Specific Adapters from the
Lens of Signed Weight Directions ...": for each study domain d, the mixtures holding d's own
adapter (all 2^(K-1) of them, or a seeded sample stratified over sizes; only the sizes of
`study.sizes`), their accuracy and macro-F1 on d's test split with d's OWN head (adapters
only are averaged, as the paper's Eq. 1; `study.average_heads` averages the heads too, an
ablation) and their fraction of sign difference (FSD: `core.merging.sign_disagreement`);
Pearson/Spearman between FSD and accuracy within each mixture size and pooled with the size
as a covariate, with bootstrap intervals (`sign_study`); the pairwise FSD matrix; greedy
adapter mixing (their Alg. 1): d's adapter plus the l-1 others of lowest row-mean FSD
(`study.greedy_rank='row_mean'`) or of lowest FSD to it (`'target'`), l = 1..K.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_adapt.core import merging
from moe_adapt.methods import sign_study, soup_core

PyTree = Any

GREEDY_RANKS = ("target", "row_mean")


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


def _mixture_record(
  soup: soup_core.Soup,
  d: str,
  members: Sequence[str],
  own: dict[str, float],
  fsd_stacked: PyTree,
  *,
  own_head: bool,
) -> dict:
  """The record of one mixture holding `d`'s adapter: its scores on `d`, their change from
  the own adapter's `own`, its FSD and the share of the own adapter's signs it flips."""
  sc = soup.mix_score(d, members, own_head=own_head)
  own_tree = soup_core.member(fsd_stacked, soup.names.index(d))
  averaged = merging.weighted_average(fsd_stacked, soup.weights(members))
  flip = merging.pairwise_sign_disagreement(soup_core.stack_trees([own_tree, averaged]))[0, 1]
  return {
    "domain": d,
    "members": soup.ordered(members),
    "size": len(members),
    **sc,
    "accuracy_delta": sc["accuracy"] - own["accuracy"],
    "macro_f1_delta": sc["macro_f1"] - own["macro_f1"],
    # The set FSD of the members (the sign paper's quantity) and the share of the own
    # adapter's weights whose sign the averaging flips (what their k > 2 bars seem
    # to show); zeros count as agreement in both.
    "fsd": float(merging.sign_disagreement(soup.subset(fsd_stacked, members))),
    "own_sign_flip": float(flip),
  }


def _greedy_mixing(
  soup: soup_core.Soup, d: str, pair: np.ndarray, fsd_stacked: PyTree, *, own_head: bool
) -> dict:
  """Greedy mixing on `d` (Alg. 1): {'order' of the others, 'scores' and 'fsd' of the
  mixtures of size l = 1..K}."""
  k = len(soup.names)
  order = greedy_order(pair, soup.names.index(d), rank=soup.setup.config.study.greedy_rank)
  chosen = [[d, *(soup.names[j] for j in order[: size - 1])] for size in range(1, k + 1)]
  return {
    "order": [soup.names[j] for j in order],
    "scores": [
      soup.mix_score(d, m, own_head=own_head, variant=f"greedy_{size}")
      for size, m in enumerate(chosen, 1)
    ],
    "fsd": [float(merging.sign_disagreement(soup.subset(fsd_stacked, m))) for m in chosen],
  }


def _size_rows(records: Sequence[dict], study: Sequence[str], sizes: set[int], summary: dict):
  """Variants `mix_size_<s>_mean|best` (over the mixtures of size s of each domain); fills
  `summary[d]['sizes']` with the accuracy's mean/best/min/n per size."""
  metrics = {}
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
      metrics[f"mix_size_{size}_mean"] = soup_core.with_mean(mean)
      metrics[f"mix_size_{size}_best"] = soup_core.with_mean(best)
  return metrics


def _correlations(
  records: Sequence[dict], study: Sequence[str], *, seed: int, samples: int
) -> dict:
  """Per quantity (FSD, own-sign flips): its correlation with accuracy per domain (size as
  a covariate), and over domains within each size and pooled given the size."""
  mixed = [r for r in records if r["size"] >= 2]
  correlations = {}
  for quantity in ("fsd", "own_sign_flip"):
    per = {
      d: sign_study.partial_correlation(
        [r[quantity] for r in mixed if r["domain"] == d],
        [r["accuracy"] for r in mixed if r["domain"] == d],
        [r["size"] for r in mixed if r["domain"] == d],
        samples=samples,
        seed=seed,
      )
      for d in study
    }
    # Over domains: accuracy relative to each domain's own adapter; within each size, and
    # pooled with the size as a covariate (FSD and accuracy both move with the size).
    per.update(sign_study.within_size(mixed, quantity, samples=samples, seed=seed))
    correlations[quantity] = per
  return correlations


def in_domain_study(soup: soup_core.Soup, study: Sequence[str], fsd_stacked: PyTree) -> dict:
  """Mixtures holding the own adapter, FSD, correlations, greedy mixing.

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
    others = [x for x in soup.names if x != d]
    mixtures = enumerate_mixtures(
      d, others, max_mixtures=cfg.study.max_mixtures, seed=cfg.seed * 1009 + i
    )
    for members in [m for m in mixtures if len(m) == 1 or len(m) in sizes]:
      records.append(_mixture_record(soup, d, members, own[d], fsd_stacked, own_head=own_head))
    greedy[d] = _greedy_mixing(soup, d, pair, fsd_stacked, own_head=own_head)

  metrics = {"own": soup_core.with_mean(own), "mix_all": soup_core.with_mean(mix_all)}
  summary = {d: {"own": own[d]["accuracy"], "sizes": {}} for d in study}
  metrics.update(_size_rows(records, study, sizes, summary))
  for size in range(1, k + 1):
    per_domain = {d: g["scores"][size - 1] for d, g in greedy.items()}
    metrics[f"greedy_{size}"] = soup_core.with_mean(per_domain)
  return {
    "metrics": metrics,
    "fsd_matrix": pair,
    "mixtures": records,
    "summary": summary,
    "greedy": greedy,
    "correlations": _correlations(
      records, study, seed=cfg.seed, samples=cfg.study.bootstrap_samples
    ),
  }
