"""Opening TFDS array_record splits for streaming (`data.streaming`'s sources).

A `Source` is random access to a prepared split's examples plus the positions of the
selected ones (filtered by domain); `open_domain_splits` cuts every domain into the same
train / val / test examples as the in-memory `tfds` benchmark, reading no image.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from moe_adapt.data import registry
from moe_adapt.data.tfds_builders import prepared_builder


class Source(NamedTuple):
  """A split opened for streaming: random access to its examples and which ones to use."""

  data: Any  # Random-access data source: len() and [i] -> example dict.
  indices: np.ndarray  # [N] int64 positions of the selected examples, in split order.
  features: Any  # tfds.features.FeaturesDict of the dataset.
  domains: tuple[str, ...]  # The selected domains (empty without domain_key).


def open_split(
  tfds_name: str,
  *,
  split: str,
  data_dir: str | None = None,
  domain_key: str | None = None,
  domains: Sequence[str] | None = None,
  required_keys: Sequence[tuple[str, str]] = (),
) -> Source:
  """Opens split `split` of a prepared TFDS dataset for streaming.

  Args:
    tfds_name: name[/config][:version] of a dataset prepared as array_record.
    split: a split of it, e.g. 'train'.
    data_dir: where it was prepared (default: TFDS's default data dir).
    domain_key: the dataset's domain feature (a ClassLabel, an integer or a string).
    domains: domain names to keep (default: all); needs `domain_key`.
    required_keys: `(field, key)` pairs of features the caller will read, e.g.
      `[('image_key', 'image')]`, checked here so that a wrong key fails before streaming.

  Raises:
    ValueError: naming the field: an unknown split, a missing feature (`domain_key`,
      `image_key`, ...), unknown domains, or no example left.
  """
  builder = prepared_builder(tfds_name, data_dir)
  splits = tuple(builder.info.splits)
  if split not in splits:
    raise ValueError(f"split={split!r} is not a split of {tfds_name!r}; accepted: {list(splits)}")
  features = builder.info.features
  keys = list(required_keys) + ([("domain_key", domain_key)] if domain_key is not None else [])
  for field, key in keys:
    if key not in features:
      raise ValueError(
        f"{field}={key!r} is not a feature of {tfds_name!r}; accepted: "
        f"{', '.join(sorted(features.keys()))}"
      )
  data = builder.as_data_source(split=split)
  if not len(data):
    raise ValueError(f"split={split!r} of {tfds_name!r} has no examples")
  if domain_key is None:
    if domains is not None:
      raise ValueError(f"domains={domains!r} needs domain_key, the dataset's domain feature")
    return Source(data, np.arange(len(data), dtype=np.int64), features, ())
  # The domain pass decodes the domain feature only: images stay compressed.
  skip = {k: tfds.decode.SkipDecoding() for k in features.keys() if k != domain_key}
  domain_data = builder.as_data_source(split=split, decoders=skip)
  names, values = _domain_values(domain_data, features[domain_key], domain_key)
  if domains is None:
    domains = names
  if isinstance(domains, str) or not domains or any(d not in names for d in domains):
    raise ValueError(
      f"domains={domains!r} is invalid for {tfds_name!r}; accepted: a list of {', '.join(names)}"
    )
  keep = np.isin(values, [names.index(d) for d in domains])
  indices = np.flatnonzero(keep).astype(np.int64)
  if not len(indices):
    raise ValueError(f"domains={list(domains)} have no examples in split {split!r}")
  return Source(data, indices, features, tuple(domains))


def _domain_values(data: Any, feature: Any, key: str) -> tuple[tuple[str, ...], np.ndarray]:
  """(domain names, [N] domain number of every example), reading the split once."""
  raw = []
  for start in range(0, len(data), 1024):
    rows = data.__getitems__(range(start, min(start + 1024, len(data))))
    raw.extend(np.asarray(row[key]).item() for row in rows)
  if isinstance(feature, tfds.features.ClassLabel):
    return tuple(feature.names), np.asarray(raw, np.int64)
  text = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
  names = tuple(sorted(set(text)))
  lookup = {name: i for i, name in enumerate(names)}
  if not names:
    raise ValueError(f"domain_key={key!r}: the split has no examples")
  return names, np.array([lookup[t] for t in text], np.int64)


class ConcatData:
  """Random access over several data sources one after another (pooled TFDS splits):
  example `i` of the second source is `len(first) + i` here."""

  def __init__(self, parts: Sequence[Any]):
    self._parts = tuple(parts)
    self._offsets = np.cumsum([0, *(len(p) for p in self._parts)])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index: int) -> Any:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} is out of range for {len(self)} examples")
    part = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return self._parts[part][index - int(self._offsets[part])]


class DomainSources(NamedTuple):
  """One domain's train / val / test examples as streaming sources (`open_domain_splits`)."""

  train: Source
  val: Source
  test: Source

  def whole(self) -> Source:
    """All of the domain's examples: train, val, then test (the in-memory `whole_domain`)."""
    indices = np.concatenate([self.train.indices, self.val.indices, self.test.indices])
    return self.train._replace(indices=indices)


def open_domain_splits(
  tfds_name: str,
  *,
  data_dir: str | None,
  domain_key: str,
  domains: Sequence[str],
  seed: int,
  split_names: Sequence[str] | None = None,
  splits: Sequence[str] | None = None,
  val_fraction: float = registry.DEFAULT_VAL_FRACTION,
  test_fraction: float = registry.DEFAULT_TEST_FRACTION,
  max_per_domain: int | None = None,
  required_keys: Sequence[tuple[str, str]] = (),
) -> dict[str, DomainSources]:
  """Every domain's train / val / test split as streaming sources (indices, no images read).

  The same examples, in the same order, as the in-memory `tfds` benchmark
  (`get_benchmark('tfds', ...).load(seed)`) with the same options: `split_names` (train,
  val, test TFDS splits, each filtered by domain) or the pooled `splits` (default: all)
  cut per domain by a seeded permutation into `val_fraction` / `test_fraction` parts,
  capped at `max_per_domain`. Only the domain feature is decoded.

  Args:
    tfds_name, data_dir, domain_key, required_keys: as `open_split`.
    domains: the benchmark's domain names, in its order (ClassLabel names, or the sorted
      string values).
    seed: the benchmark's split seed.

  Raises:
    ValueError: naming the field, as `open_split`, and `split_sizes`' message for a domain
      too small to split.
  """
  builder = prepared_builder(tfds_name, data_dir)
  available = tuple(builder.info.splits)
  names = tuple(split_names) if split_names is not None else tuple(splits or available)
  keys = [*required_keys, ("domain_key", domain_key)]
  opened = [open_split(tfds_name, split=s, data_dir=data_dir, required_keys=keys) for s in names]
  features = opened[0].features
  ids = [_domain_ids(builder, s, domain_key, domains) for s in names]
  # One data source over all the splits read, so that any union of the parts (a domain's
  # whole data, pooled domains) is one Source.
  pooled = ConcatData([o.data for o in opened])
  if split_names is not None:
    offsets = np.cumsum([0, *(len(i) for i in ids)])
    parts = [
      [offsets[k] + np.flatnonzero(i == d) for k, i in enumerate(ids)] for d in range(len(domains))
    ]
  else:
    parts = _seeded_parts(
      ids, domains, seed=seed, fractions=(val_fraction, test_fraction), cap=max_per_domain
    )
  return {
    domain: DomainSources(*(Source(pooled, p.astype(np.int64), features, (domain,)) for p in ps))
    for domain, ps in zip(domains, parts)
  }


def _seeded_parts(
  ids: Sequence[np.ndarray],
  domains: Sequence[str],
  *,
  seed: int,
  fractions: tuple[float, float],
  cap: int | None,
) -> list[list[np.ndarray]]:
  """Per domain, [train, val, test] positions in the pooled splits, as the in-memory reader
  cuts them: the domain's examples in (split, row) order, a seeded permutation, the cap,
  then train / val / test by `fractions` (val, test), each part grouped by split.

  Args:
    ids: per split read, [N_k] each example's position in `domains` (`_domain_ids`).
  """
  split_of = np.concatenate([np.full(len(i), k) for k, i in enumerate(ids)])
  all_ids = np.concatenate(ids)
  out = []
  for d, domain in enumerate(domains):
    members = np.flatnonzero(all_ids == d)
    order = np.random.default_rng(np.random.SeedSequence([seed, 2, d])).permutation(len(members))
    members = members[order[:cap]]
    n_train, n_val, _ = registry.split_sizes(len(members), *fractions, domain=domain)
    bounds = (0, n_train, n_train + n_val, len(members))
    parts = [members[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    out.append([p[np.argsort(split_of[p], kind="stable")] for p in parts])
  return out


def _domain_ids(builder: Any, split: str, key: str, domains: Sequence[str]) -> np.ndarray:
  """[N] the position in `domains` of every example's domain (-1: not among them)."""
  features = builder.info.features
  skip = {k: tfds.decode.SkipDecoding() for k in features.keys() if k != key}
  names, values = _domain_values(
    builder.as_data_source(split=split, decoders=skip), features[key], key
  )
  lookup = np.array([domains.index(n) if n in domains else -1 for n in names], np.int64)
  return lookup[values]
