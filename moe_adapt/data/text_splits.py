"""Text benchmarks' data classes and their seeded, class-stratified splits.

A `TextBenchmark` holds a benchmark's metadata and a loader `seed -> {domain:
TextDomainSplits}`; `make_loader` builds that loader over a tokenized corpus. Splits are
stratified by class within each domain and deterministic in the seed.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from moe_adapt.data.registry import check_domain_choice
from moe_adapt.data.text_tokens import tokenized_corpus

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2


class TextSplit(NamedTuple):
  """One split of one domain.

  Attributes:
    token_ids: [N, T] int32 token ids, padded with the tokenizer's pad id.
    attention_mask: [N, T] int32, 1 on real tokens and 0 on padding.
    labels: [N] int32 class labels in [0, num_classes).
  """

  token_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray


class TextDomainSplits(NamedTuple):
  """The train, validation and test splits of one domain (disjoint texts)."""

  train: TextSplit
  val: TextSplit
  test: TextSplit


@dataclasses.dataclass(frozen=True)
class TextBenchmark:
  """A text domain benchmark: metadata plus a seeded loader.

  Attributes:
    name: e.g. 'vader_sentiment'.
    domains: every domain's name, in a fixed order.
    num_classes: number of classes (one label space for all domains).
    class_names: [num_classes] class names.
    max_len: T, the padded token length.
    default_targets: held-out target domains used when a config names none (may be empty).
    domain_classes: domain → the class ids it contains (all of them unless label sets
      differ between domains, as in `newsgroups` by top-level group).
    loader: `seed -> {domain: TextDomainSplits}`; call `load`, which validates.
    options: the resolved options the benchmark was built with (for provenance).
  """

  name: str
  domains: tuple[str, ...]
  num_classes: int
  class_names: tuple[str, ...]
  max_len: int
  default_targets: tuple[str, ...]
  domain_classes: Mapping[str, tuple[int, ...]] = dataclasses.field(compare=False)
  loader: Callable[[int], Mapping[str, TextDomainSplits]] = dataclasses.field(
    repr=False, compare=False
  )
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  @property
  def default_sources(self) -> tuple[str, ...]:
    """Every domain that is not a default target, in domain order."""
    return tuple(d for d in self.domains if d not in self.default_targets)

  def load(self, *, seed: int) -> dict[str, TextDomainSplits]:
    """Returns `{domain: TextDomainSplits}` for every domain, identical for equal seeds."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
      raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    data = dict(self.loader(int(seed)))
    if tuple(data) != self.domains:
      raise ValueError(f"benchmark {self.name!r} loaded {tuple(data)}; expected {self.domains}")
    for domain, splits in data.items():
      for part, split in zip(TextDomainSplits._fields, splits):
        _check_split(split, self.max_len, self.num_classes, f"{domain}.{part}")
    return data

  def check_domains(self, sources: Sequence[str], targets: Sequence[str]) -> None:
    """Validates a source/target domain choice; raises ValueError naming the bad field."""
    check_domain_choice(self.name, self.domains, sources, targets)


def _check_split(split: TextSplit, max_len: int, num_classes: int, where: str) -> None:
  n = split.labels.shape[0]
  for field in ("token_ids", "attention_mask"):
    arr = getattr(split, field)
    if arr.dtype != np.int32 or arr.shape != (n, max_len):
      raise ValueError(
        f"{where}.{field} must be int32 [{n}, {max_len}]; got {arr.dtype} {arr.shape}"
      )
  if split.labels.dtype != np.int32 or split.labels.ndim != 1:
    raise ValueError(f"{where}.labels must be int32 [N]; got {split.labels.dtype}")
  if n and (split.labels.min() < 0 or split.labels.max() >= num_classes):
    raise ValueError(f"{where}.labels has labels outside [0, {num_classes})")


def check_fractions(val_fraction: Any, test_fraction: Any | None) -> None:
  fields = [("val_fraction", val_fraction)]
  if test_fraction is not None:
    fields.append(("test_fraction", test_fraction))
  for field, value in fields:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
      raise ValueError(f"{field} must be a number in (0, 1); got {value!r}")
  if test_fraction is not None and val_fraction + test_fraction >= 1:
    raise ValueError(
      f"val_fraction + test_fraction must be < 1; got {val_fraction} + {test_fraction}"
    )


def check_max_per_domain(value: Any) -> None:
  if value is not None and (
    isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 10
  ):
    raise ValueError(f"max_per_domain must be None or an int >= 10; got {value!r}")


def domain_rng(seed: int, domain: str) -> np.random.Generator:
  # Keyed by the domain's name, so a domain's split does not depend on which others exist.
  return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(domain.encode())]))


def _stratified_cut(
  indices: np.ndarray, labels: np.ndarray, fractions: Sequence[float]
) -> list[np.ndarray]:
  """Cuts shuffled `indices` into len(fractions) + 1 parts, each class in proportion.

  Part k gets round(n_c · fractions[k]) examples of each class c; the last part gets the
  rest. Parts keep the order of `indices`.
  """
  part_of = np.full(len(indices), len(fractions), np.int64)
  for c in np.unique(labels[indices]):
    members = np.flatnonzero(labels[indices] == c)
    start = 0
    for k, fraction in enumerate(fractions):
      n = round(len(members) * fraction)
      part_of[members[start : start + n]] = k
      start += n
  return [indices[part_of == k] for k in range(len(fractions) + 1)]


def split_domain(
  indices: np.ndarray,
  labels: np.ndarray,
  is_test: np.ndarray,
  *,
  rng: np.random.Generator,
  val_fraction: float,
  test_fraction: float | None,
  max_per_domain: int | None,
  domain: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(train, val, test) indices of one domain, stratified by class.

  With `test_fraction` None the source's own test rows are the test split and val comes
  from its train rows; `max_per_domain` then caps the train + val pool only.
  """
  pool = rng.permutation(indices[~is_test[indices]] if test_fraction is None else indices)
  if max_per_domain is not None:
    pool = pool[:max_per_domain]
  if test_fraction is None:
    val, train = _stratified_cut(pool, labels, [val_fraction])
    test = rng.permutation(indices[is_test[indices]])
  else:
    val, test, train = _stratified_cut(pool, labels, [val_fraction, test_fraction])
  if min(len(train), len(val), len(test)) < 1:
    raise ValueError(
      f"domain {domain!r} has {len(indices)} texts, too few for val_fraction={val_fraction} "
      f"and test_fraction={test_fraction} (each split needs one); raise max_per_domain"
    )
  return train, val, test


def make_loader(
  name: str,
  *,
  domains: Mapping[str, Callable[[Mapping[str, np.ndarray]], np.ndarray]],
  label_map: np.ndarray,
  max_len: int,
  data_dir: str | os.PathLike[str] | None,
  tokenizer: str | os.PathLike[str] | None,
  val_fraction: float,
  test_fraction: float | None,
  max_per_domain: int | None,
) -> Callable[[int], dict[str, TextDomainSplits]]:
  """A loader over the tokenized corpus `name`.

  `domains` maps each benchmark domain to a function giving its boolean row filter over the
  tokenized corpus; `label_map` maps corpus labels to benchmark labels.
  """

  def load(seed: int) -> dict[str, TextDomainSplits]:
    data = tokenized_corpus(name, max_len=max_len, data_dir=data_dir, tokenizer=tokenizer)
    labels = label_map[data["labels"]]
    out = {}
    for domain, select in domains.items():
      rows = np.flatnonzero(select(data))
      parts = split_domain(
        rows,
        labels,
        data["is_test"],
        rng=domain_rng(seed, domain),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_per_domain=max_per_domain,
        domain=domain,
      )
      out[domain] = TextDomainSplits(
        *(TextSplit(data["token_ids"][p], data["attention_mask"][p], labels[p]) for p in parts)
      )
    return out

  return load


def make_benchmark(
  name: str,
  domains: Mapping[str, Callable[[Mapping[str, np.ndarray]], np.ndarray]],
  class_names: tuple[str, ...],
  label_map: np.ndarray,
  default_targets: Sequence[str],
  data_dir: str | os.PathLike[str] | None,
  tokenizer: str | os.PathLike[str] | None,
  options: dict[str, Any],
  *,
  domain_classes: Mapping[str, tuple[int, ...]] | None = None,
  test_fraction: float | None = DEFAULT_TEST_FRACTION,
) -> TextBenchmark:
  """A `TextBenchmark` over the tokenized corpus `name` (see `make_loader` for `domains`).

  `options` holds the resolved options (max_len, val_fraction, max_per_domain, and
  test_fraction where the benchmark cuts its own test split); without one there,
  `test_fraction` applies (None: the corpus's own test split is the test split).
  """
  if isinstance(default_targets, str):
    raise ValueError(f"default_targets must be a list of domains, not {default_targets!r}")
  unknown = [d for d in default_targets if d not in domains]
  if unknown:
    raise ValueError(
      f"default_targets has unknown domain(s) {unknown}; accepted: {', '.join(domains)}"
    )
  test_fraction = options.get("test_fraction", test_fraction)
  loader = make_loader(
    name,
    domains=domains,
    label_map=np.asarray(label_map, np.int32),
    max_len=options["max_len"],
    data_dir=data_dir,
    tokenizer=tokenizer,
    val_fraction=options["val_fraction"],
    test_fraction=test_fraction,
    max_per_domain=options["max_per_domain"],
  )
  all_classes = tuple(range(len(class_names)))
  return TextBenchmark(
    name=name,
    domains=tuple(domains),
    num_classes=len(class_names),
    class_names=tuple(class_names),
    max_len=options["max_len"],
    default_targets=tuple(default_targets),
    domain_classes=dict(domain_classes or {d: all_classes for d in domains}),
    loader=loader,
    options=options,
  )
