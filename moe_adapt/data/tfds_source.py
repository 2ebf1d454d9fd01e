"""TFDS datasets as benchmarks: `TFDSBenchmark`, made by `get_benchmark('tfds', ...)`.

It turns a prepared TFDS dataset with a domain feature (e.g. DomainNet, PACS or a WILDS
dataset the user prepared as array_record) into a benchmark held in memory; its options are
in the docstring of `moe_adapt.data.tfds_builders`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from moe_adapt.data import images, registry
from moe_adapt.data.registry import Benchmark, DomainSplits, Split


class TFDSBenchmark(Benchmark):
  """A `Benchmark` read from a prepared TFDS dataset; make one with `from_tfds` (or
  `get_benchmark('tfds', ...)`; options in the module docstring)."""

  @classmethod
  def from_tfds(
    cls,
    *,
    tfds_name: str | None = None,
    data_dir: str | Path | None = None,
    domain_key: str | None = "domain",
    image_key: str = "image",
    label_key: str = "label",
    split_names: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    val_fraction: float = registry.DEFAULT_VAL_FRACTION,
    test_fraction: float = registry.DEFAULT_TEST_FRACTION,
    max_per_domain: int | None = None,
    image_size: int | None = None,
    default_targets: Sequence[str] | None = None,
  ) -> TFDSBenchmark:
    _check_tfds_name(tfds_name)
    builder = prepared_builder(tfds_name, data_dir)
    features = builder.info.features
    _check_features(features, tfds_name, domain_key, image_key, label_key)
    split_names, pooled, val_fraction, test_fraction, max_per_domain = _resolve_splits(
      tuple(builder.info.splits), split_names, splits, val_fraction, test_fraction, max_per_domain
    )
    _check_image_size(image_size)
    single_domain = tfds_name.split("/")[0].split(":")[0]  # The domain when domain_key is None.
    reader = _Reader(builder, domain_key, image_key, label_key, image_size, single_domain)
    domains = reader.domain_names(pooled)
    input_shape = reader.input_shape()
    default_targets = _default_targets(default_targets, domains)
    options = {
      "tfds_name": tfds_name,
      "data_dir": None if data_dir is None else str(data_dir),
      "domain_key": domain_key,
      "image_key": image_key,
      "label_key": label_key,
      "split_names": None if split_names is None else list(split_names),
      "splits": list(pooled) if split_names is None else None,
      "val_fraction": val_fraction,
      "test_fraction": test_fraction,
      "max_per_domain": max_per_domain,
      "image_size": image_size,
    }
    return cls(
      name="tfds",
      domains=domains,
      num_classes=features[label_key].num_classes,
      class_names=tuple(features[label_key].names),
      input_shape=input_shape,
      default_targets=tuple(default_targets),
      loader=functools.partial(
        reader.read,
        split_names,
        pooled,
        domains,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_per_domain=max_per_domain,
      ),
      options=options,
    )


def _check_tfds_name(tfds_name: Any) -> None:
  if not isinstance(tfds_name, str) or not tfds_name:
    raise ValueError(
      "tfds_name is required for benchmark 'tfds': the name of a prepared TFDS dataset, "
      f"e.g. tfds_name='domainnet/real' (got {tfds_name!r})"
    )


def _check_image_size(image_size: Any) -> None:
  if image_size is not None and (
    isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
  ):
    raise ValueError(f"image_size must be None or a positive int; got {image_size!r}")


def _check_features(
  features: Any, tfds_name: str, domain_key: str | None, image_key: str, label_key: str
) -> None:
  """Each key names a feature (domain_key may be None) and the label is a ClassLabel."""
  for field, key in (
    ("domain_key", domain_key),
    ("image_key", image_key),
    ("label_key", label_key),
  ):
    if key not in features and not (field == "domain_key" and key is None):
      raise ValueError(
        f"{field}={key!r} is not a feature of {tfds_name!r}; accepted: "
        f"{', '.join(sorted(features.keys()))}"
      )
  if not isinstance(features[label_key], tfds.features.ClassLabel):
    raise ValueError(
      f"label_key={label_key!r} must name a ClassLabel feature; it is "
      f"{type(features[label_key]).__name__}"
    )


def _resolve_splits(
  available: tuple[str, ...],
  split_names: Sequence[str] | None,
  splits: Sequence[str] | None,
  val_fraction: float,
  test_fraction: float,
  max_per_domain: int | None,
) -> tuple[tuple[str, ...] | None, tuple[str, ...], float, float, int | None]:
  """(split_names, the splits read, val_fraction, test_fraction, max_per_domain), checked.

  The fractions and the cap are checked only when the splits are pooled and cut by them.
  """
  if split_names is not None:
    split_names = _check_split_list(split_names, available, "split_names")
    if len(split_names) != 3:
      raise ValueError(
        f"split_names must give 3 TFDS splits (train, val, test); got {list(split_names)}"
      )
    pooled = split_names
  else:
    pooled = _check_split_list(available if splits is None else splits, available, "splits")
    val_fraction, test_fraction = registry.check_fractions(val_fraction, test_fraction)
    max_per_domain = registry.check_max_per_domain(max_per_domain, minimum=3)
  return split_names, pooled, val_fraction, test_fraction, max_per_domain


def _default_targets(default_targets: Sequence[str] | None, domains: tuple[str, ...]) -> tuple:
  """The given target domains, checked; the last domain when None."""
  if default_targets is None:
    return (domains[-1],)
  if isinstance(default_targets, str) or not all(d in domains for d in default_targets):
    raise ValueError(
      f"default_targets={default_targets!r} must be a list of domains; accepted: "
      f"{', '.join(domains)}"
    )
  return tuple(default_targets)


def prepared_builder(tfds_name: str, data_dir: str | Path | None) -> tfds.core.DatasetBuilder:
  """The builder of a dataset prepared under `data_dir` (ValueError naming `tfds_name`)."""
  where = "TFDS's default data dir" if data_dir is None else f"data_dir='{data_dir}'"
  try:
    builder = tfds.builder(tfds_name, data_dir=None if data_dir is None else str(data_dir))
  except Exception as e:  # TFDS raises several types for a name it cannot resolve.
    raise ValueError(
      f"tfds_name={tfds_name!r} is not a prepared TFDS dataset under {where} ({e})"
    ) from e
  if not builder.is_prepared():
    raise ValueError(
      f"tfds_name={tfds_name!r} is not prepared under {where}; prepare it first with "
      "file_format='array_record' (e.g. `tfds build --file_format=array_record`, or "
      "moe_adapt.data.prepare_tfds for a registered benchmark)"
    )
  return builder


def _check_split_list(names: Any, available: Sequence[str], field: str) -> tuple[str, ...]:
  if isinstance(names, str) or not names:
    raise ValueError(f"{field} must be a non-empty list of splits; accepted: {list(available)}")
  unknown = [s for s in names if s not in available]
  if unknown:
    raise ValueError(f"{field} has unknown split(s) {unknown}; accepted: {list(available)}")
  return tuple(names)


class _Reader:
  """Reads examples of a prepared builder into NumPy, grouped by domain."""

  def __init__(self, builder, domain_key, image_key, label_key, image_size, single_domain):
    self.builder = builder
    self.single_domain = single_domain  # The one domain's name when domain_key is None.
    self.domain_key, self.image_key, self.label_key = domain_key, image_key, label_key
    self.image_size = image_size
    self._cache: dict[str, dict[str, np.ndarray]] = {}

  def _columns(self, split: str) -> dict[str, Any]:
    if split not in self._cache:
      source = self.builder.as_data_source(split=split)
      examples = source.__getitems__(range(len(source))) if len(source) else []
      self._cache[split] = {
        "domain": np.zeros(len(examples), np.int64)
        if self.domain_key is None
        else np.array([self._domain_value(e[self.domain_key]) for e in examples]),
        "label": np.array([e[self.label_key] for e in examples], np.int32),
        "image": [e[self.image_key] for e in examples],
      }
    return self._cache[split]

  @staticmethod
  def _domain_value(value: Any) -> Any:
    value = np.asarray(value)
    if value.dtype.kind in "SO":
      return value.item().decode() if isinstance(value.item(), bytes) else str(value.item())
    return value.item()

  def domain_names(self, splits: Sequence[str]) -> tuple[str, ...]:
    if self.domain_key is None:
      return (self.single_domain,)
    feature = self.builder.info.features[self.domain_key]
    if isinstance(feature, tfds.features.ClassLabel):
      return tuple(feature.names)
    values = sorted({v for s in splits for v in self._columns(s)["domain"].tolist()})
    return tuple(str(v) for v in values)

  def input_shape(self) -> tuple[int, int, int]:
    shape = tuple(self.builder.info.features[self.image_key].shape)
    if len(shape) == 2:
      shape = (*shape, 1)
    if len(shape) != 3:
      raise ValueError(f"image_key={self.image_key!r} must be [H, W] or [H, W, C]; got {shape}")
    if self.image_size is not None:
      return (self.image_size, self.image_size, shape[2])
    if None in shape:
      raise ValueError(
        f"image_key={self.image_key!r} has variable shape {shape}; set image_size to resize"
      )
    return shape

  def _domain_ids(self, split: str, domains: tuple[str, ...]) -> np.ndarray:
    values = self._columns(split)["domain"]
    if self.domain_key is None:
      return values
    feature = self.builder.info.features[self.domain_key]
    if isinstance(feature, tfds.features.ClassLabel):
      return values.astype(np.int64)
    lookup = {name: i for i, name in enumerate(domains)}
    return np.array([lookup[str(v)] for v in values.tolist()], np.int64)

  def _split(self, split: str, rows: np.ndarray) -> Split:
    columns = self._columns(split)
    shape = self.input_shape()
    x = np.zeros((len(rows), *shape), np.float32)
    for i, row in enumerate(rows):
      x[i] = self._image(columns["image"][row], shape)
    return Split(x, columns["label"][rows])

  def _image(self, image: Any, shape: tuple[int, int, int]) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    if image.dtype == np.uint8:
      image = image.astype(np.float32) / np.float32(255.0)
    elif image.dtype.kind == "f":
      image = image.astype(np.float32)
      if image.size and (image.min() < 0 or image.max() > 1):
        raise ValueError(f"image_key={self.image_key!r} float images must lie in [0, 1]")
    else:
      raise ValueError(
        f"image_key={self.image_key!r} must hold uint8 or float images; got {image.dtype}"
      )
    if image.shape[:2] != shape[:2]:
      image = images.resize(image[None], shape[:2])[0]
    return image

  def read(
    self, split_names, pooled, domains, seed, *, val_fraction, test_fraction, max_per_domain
  ) -> dict[str, DomainSplits]:
    """The benchmark's loader: `split_names` as they are, else `pooled` cut by `seed`."""
    if split_names is not None:
      return self.read_presplit(split_names, domains)
    return self.read_pooled(
      pooled,
      domains,
      seed=seed,
      val_fraction=val_fraction,
      test_fraction=test_fraction,
      max_per_domain=max_per_domain,
    )

  def read_presplit(self, split_names, domains) -> dict[str, DomainSplits]:
    out = {d: [] for d in domains}
    for split in split_names:
      ids = self._domain_ids(split, domains)
      for d, domain in enumerate(domains):
        out[domain].append(self._split(split, np.flatnonzero(ids == d)))
    return {d: DomainSplits(*parts) for d, parts in out.items()}

  def read_pooled(
    self, splits, domains, *, seed, val_fraction, test_fraction, max_per_domain
  ) -> dict[str, DomainSplits]:
    ids = [self._domain_ids(s, domains) for s in splits]
    out = {}
    for d, domain in enumerate(domains):
      # (split number, row) of every example of this domain, in a seeded random order.
      members = np.concatenate(
        [
          np.stack([np.full(len(r), k), r], 1)
          for k, r in ((k, np.flatnonzero(i == d)) for k, i in enumerate(ids))
        ]
      )
      order = np.random.default_rng(np.random.SeedSequence([seed, 2, d])).permutation(len(members))
      members = members[order[:max_per_domain]]
      n_train, n_val, _ = registry.split_sizes(
        len(members), val_fraction, test_fraction, domain=domain
      )
      bounds = (0, n_train, n_train + n_val, len(members))
      parts = []
      for lo, hi in itertools.pairwise(bounds):
        part = members[lo:hi]
        pieces = [self._split(splits[k], part[part[:, 0] == k, 1]) for k in range(len(splits))]
        parts.append(
          Split(np.concatenate([p.x for p in pieces]), np.concatenate([p.y for p in pieces]))
        )
      out[domain] = DomainSplits(*parts)
    return out


registry.register_benchmark("tfds", TFDSBenchmark.from_tfds)
