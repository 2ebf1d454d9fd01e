"""Paired differences between variants, with bootstrap intervals over test examples and seeds.

Every run's results.json stores, per variant and target domain, the 0/1 correctness of
each test example in the test split's fixed order (`per_example`, see
`moe_adapt.train.results`). Two variants of one run were evaluated on the same examples,
so their outcomes pair up: d_i = correct_variant_i − correct_baseline_i ∈ {−1, 0, 1}.

The statistic of one seed is the mean of d over a domain's examples (the accuracy
difference), averaged over the domains of a table column. The reported difference is its
mean over seeds. Its 95 % interval comes from a two-stage (hierarchical) paired bootstrap:

1. resample the S seeds with replacement;
2. for each drawn seed (each draw independently, also when a seed is drawn twice),
   resample each domain's n examples with replacement, keeping the pairs (an example's
   variant and baseline outcomes move together, i.e. resample the d_i);
3. the replicate is the mean over the drawn seeds of their domain-averaged mean d.

The interval is the 2.5 and 97.5 percentiles of `num_samples` replicates. Stage 2 is
drawn exactly, without materialising indices: resampling n values from a set holding
the distinct values u with counts c is a multinomial draw of counts over u with
probabilities c / n. With one seed, stage 1 does nothing and the interval is the plain
paired bootstrap over examples. A difference whose interval excludes 0 is marked
significant; one inside it is reported as no difference.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

DEFAULT_SAMPLES = 2000
LEVEL = 0.95


class Diff(NamedTuple):
  """A variant's difference to the baseline: mean over seeds, interval bounds, seeds used."""

  mean: float
  low: float
  high: float
  n: int

  @property
  def significant(self) -> bool:
    """Whether the interval excludes 0."""
    return self.low > 0 or self.high < 0


def _resampled_means(
  values: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
  """Means of `shape` independent resamples (with replacement, size n) of the [n] `values`."""
  distinct, counts = np.unique(values, return_counts=True)
  drawn = rng.multinomial(len(values), counts / len(values), size=shape)  # [*shape, U]
  return drawn @ distinct / len(values)


def paired_bootstrap(
  diffs: Sequence[Sequence[Any]],
  *,
  num_samples: int = DEFAULT_SAMPLES,
  level: float = LEVEL,
  rng: np.random.Generator,
) -> Diff:
  """The mean paired difference over seeds and its two-stage bootstrap interval.

  Args:
    diffs: one entry per seed; each a sequence of per-domain arrays [n_d] of paired
      per-example differences (variant − baseline). Every seed has the same domains.
    num_samples: bootstrap replicates.
    level: coverage of the central percentile interval.
    rng: the random generator (fixes the interval).

  Returns:
    Diff(mean over seeds of the domain-averaged mean difference, interval, seeds).

  Raises:
    ValueError: no seed, seeds with different numbers of domains, or an empty domain.
  """
  if not diffs:
    raise ValueError("paired_bootstrap needs at least one seed")
  seeds = [[np.asarray(d, np.float64) for d in seed] for seed in diffs]
  num_domains = {len(seed) for seed in seeds}
  if len(num_domains) != 1 or 0 in num_domains:
    raise ValueError(f"every seed needs the same, non-zero number of domains; got {num_domains}")
  if any(d.ndim != 1 or d.size == 0 for seed in seeds for d in seed):
    raise ValueError("every domain needs a non-empty [n] array of per-example differences")
  num_seeds = len(seeds)
  point = float(np.mean([np.mean([d.mean() for d in seed]) for seed in seeds]))
  shape = (num_samples, num_seeds)
  # [S, B, S]: seed s's resampled statistic for every replicate b and draw slot j.
  per_seed = np.stack(
    [np.mean([_resampled_means(d, shape, rng) for d in seed], axis=0) for seed in seeds]
  )
  drawn = rng.integers(0, num_seeds, size=shape)  # [B, S] seeds drawn with replacement
  slots = np.arange(num_seeds)
  replicates = per_seed[drawn, np.arange(num_samples)[:, None], slots[None, :]].mean(axis=1)
  alpha = (1.0 - level) / 2
  low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
  return Diff(point, float(low), float(high), num_seeds)


def rng_for(*key: Any, seed: int = 0) -> np.random.Generator:
  """A generator fixed by `seed` and a stable hash of `key` (e.g. a table row and column).

  Each cell gets its own stream, so an interval does not depend on which other cells a
  table holds or in which order they are computed.
  """
  return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])
