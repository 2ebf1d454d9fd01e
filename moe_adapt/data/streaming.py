r"""Streaming input with grain over TFDS array_record: datasets that do not fit in memory.

The in-memory benchmarks (`get_benchmark`) hold every image as float32 on the host and the
device. This module instead reads examples from disk as they are needed
(`tfds.data_source`, random access into array_record files, no TensorFlow), decodes and
augments them on the fly, and batches them with grain::

  source = streaming.open_split("mock_domainnet/...", split="train", data_dir=root,
                                domain_key="domain", domains=("clipart", "painting"))
  transform = streaming.image_transform(image_size=224)          # crop, flip, ImageNet stats
  batches = streaming.train_batches(source, transform, batch_size=256, seed=0)
  iterator = iter(batches)
  batch = next(iterator)          # {'image': [B, 224, 224, 3] f32, 'label': [B], 'index': [B]}
  state = iterator.get_state()    # JSON-able: checkpoint it with the model ...
  iterator.set_state(state)       # ... and resume on the very next batch

- Per-host sharding: host `jax.process_index()` of `jax.process_count()` reads every
  `count`-th example (of the domain-filtered list) and makes batches of `batch_size`
  examples, the per-host batch.
- Seeded shuffling: a new permutation every epoch; augmentation draws from a generator
  seeded by (seed, position in the stream), so the batches depend on the seed only, not on
  the number of worker processes or threads, and a restored iterator state gives exactly
  the batches the interrupted run would have seen.
- Prefetch: `read_threads` threads read and transform ahead (grain `ReadOptions`);
  `worker_count` > 0 adds that many worker processes (`mp_prefetch`).
- Evaluation (`eval_batches`) covers a whole split once, in order: the last batch is
  padded, and `mask` ([B] bool) marks the real examples; every host yields the same
  number of batches.
- Domains: `domain_key` names the dataset's domain feature and `domains` the domains to
  keep; finding them reads the split once when the stream is opened (decoding only the
  domain feature).
- Images (`image_transform`): uint8 [H, W, C] of any size (or float in [0, 1]), through
  `augment`, a sequence of 'random_resized_crop' (Inception crop: area 8-100 %, aspect
  3/4-4/3, then resize; as torchvision's RandomResizedCrop), 'flip' (horizontal, p = 0.5),
  'center_crop' (the central 87.5 % of the shorter side, resized: Resize(256) +
  CenterCrop(224)), 'resize' (the whole image); then `normalize` 'imagenet' (mean / std
  of ImageNet, grey images repeated to RGB) or 'unit' ([0, 1]). Text (`text_transform`):
  a `tokenize(text) -> {name: array}` hook, e.g. `tokenizer_hook` of a `tokenizers`
  tokenizer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from moe_adapt.data import images, registry
from moe_adapt.data import text as text_lib
from moe_adapt.data.tfds_builders import prepared_builder

AUGMENTATIONS = ("random_resized_crop", "flip", "center_crop", "resize")
NORMALIZATIONS = ("imagenet", "unit")
_SIZING = ("random_resized_crop", "center_crop", "resize")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CENTER_CROP_FRACTION = 0.875  # 224 / 256
_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3 / 4, 4 / 3)

Example = Mapping[str, Any]
Transform = Callable[[Example, np.random.Generator], dict[str, np.ndarray]]


class Source(NamedTuple):
  """A split opened for streaming: random access to its examples and which ones to use."""

  data: Any  # Random-access data source: len() and [i] -> example dict.
  indices: np.ndarray  # [N] int64 positions of the selected examples, in split order.
  features: Any  # tfds.features.FeaturesDict of the dataset.
  domains: tuple[str, ...]  # The selected domains (empty without domain_key).


# ----------------------------------------------------------------------------
# Opening a split
# ----------------------------------------------------------------------------


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
  offsets = np.cumsum([0, *(len(i) for i in ids)])
  split_of = np.concatenate([np.full(len(i), k) for k, i in enumerate(ids)])
  all_ids = np.concatenate(ids)
  out = {}
  for d, domain in enumerate(domains):
    if split_names is not None:
      parts = [offsets[k] + np.flatnonzero(i == d) for k, i in enumerate(ids)]
    else:
      # As the in-memory reader: the domain's examples in (split, row) order, a seeded
      # permutation, the cap, then train / val / test, each part grouped by split.
      members = np.flatnonzero(all_ids == d)
      order = np.random.default_rng(np.random.SeedSequence([seed, 2, d])).permutation(len(members))
      members = members[order[:max_per_domain]]
      n_train, n_val, _ = registry.split_sizes(
        len(members), val_fraction, test_fraction, domain=domain
      )
      bounds = (0, n_train, n_train + n_val, len(members))
      parts = [members[lo:hi] for lo, hi in itertools.pairwise(bounds)]
      parts = [p[np.argsort(split_of[p], kind="stable")] for p in parts]
    out[domain] = DomainSources(
      *(Source(pooled, p.astype(np.int64), features, (domain,)) for p in parts)
    )
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


# ----------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------


def check_augment(augment: Sequence[str], *, field: str = "augment") -> tuple[str, ...]:
  """Validates an augmentation list (one clear message naming `field`, e.g. a config
  field such as 'data.augment')."""
  if isinstance(augment, str) or not isinstance(augment, Sequence):
    raise ValueError(
      f"{field}={augment!r} is invalid; accepted: a list of {', '.join(AUGMENTATIONS)}"
    )
  unknown = [a for a in augment if a not in AUGMENTATIONS]
  if unknown:
    raise ValueError(f"{field} has unknown name(s) {unknown}; accepted: {', '.join(AUGMENTATIONS)}")
  sizing = [a for a in augment if a in _SIZING]
  if len(sizing) > 1:
    raise ValueError(
      f"{field}={list(augment)} sizes the image twice ({', '.join(sizing)}); accepted: at "
      f"most one of {', '.join(_SIZING)}"
    )
  return tuple(augment)


def random_resized_crop_box(
  height: int, width: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
  """(top, left, h, w) of an Inception-style crop (torchvision's RandomResizedCrop)."""
  area = height * width
  log_ratio = np.log(_RRC_RATIO)
  for _ in range(10):
    target = area * rng.uniform(*_RRC_SCALE)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest central crop with the aspect ratio clamped to the range.
  ratio = width / height
  if ratio < _RRC_RATIO[0]:
    w, h = width, round(width / _RRC_RATIO[0])
  elif ratio > _RRC_RATIO[1]:
    h, w = height, round(height * _RRC_RATIO[1])
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
  """(top, left, h, w): a centred square of 87.5 % of the shorter side."""
  side = max(1, round(min(height, width) * CENTER_CROP_FRACTION))
  return (height - side) // 2, (width - side) // 2, side, side


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """`image[top:top+h, left:left+w]` resized to [size, size, C] (bilinear).

  uint8 images go through PIL (antialiased bilinear, as torchvision's PIL transforms),
  float images through `images.resize`.
  """
  top, left, h, w = box
  if image.dtype == np.uint8:
    channels = image.shape[2]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = pil.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return np.asarray(out).reshape(size, size, channels)
  crop = image[top : top + h, left : left + w]
  return images.resize(crop[None].astype(np.float32), (size, size))[0]


def image_transform(
  *,
  image_size: int,
  augment: Sequence[str] = ("random_resized_crop", "flip"),
  normalize: str = "imagenet",
  image_key: str = "image",
  label_key: str = "label",
  domain_key: str | None = None,
) -> Transform:
  """`(example, rng) -> {'image': [S, S, 3 or C] float32, 'label': int32[, 'domain']}`.

  Args:
    image_size: side S of the output images.
    augment: operations in order (module docstring); use ('center_crop',) to evaluate.
    normalize: 'imagenet' or 'unit'.
    image_key, label_key, domain_key: feature names (domain copied when given).

  Raises:
    ValueError: naming `augment`, `normalize` or `image_size`.
  """
  augment = check_augment(augment)
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize={normalize!r} is unknown; accepted: {', '.join(NORMALIZATIONS)}")
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size={image_size!r} is invalid; accepted: an int >= 1")

  def transform(example: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = np.asarray(example[image_key])
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or (image.dtype != np.uint8 and image.dtype.kind != "f"):
      raise ValueError(
        f"image_key={image_key!r} must hold uint8 or float [H, W(, C)] images; got "
        f"{image.dtype} {image.shape}"
      )
    height, width = image.shape[:2]
    for op in augment:
      if op == "random_resized_crop":
        image = crop_and_resize(image, random_resized_crop_box(height, width, rng), image_size)
      elif op == "center_crop":
        image = crop_and_resize(image, center_crop_box(height, width), image_size)
      elif op == "resize":
        image = crop_and_resize(image, (0, 0, height, width), image_size)
      elif op == "flip" and rng.uniform() < 0.5:
        image = image[:, ::-1]
    if image.shape[:2] != (image_size, image_size):
      raise ValueError(
        f"an image of {image.shape[:2]} is not {image_size}x{image_size}; add one of "
        f"{', '.join(_SIZING)} to augment"
      )
    x = image.astype(np.float32)
    if image.dtype == np.uint8:
      x /= np.float32(255.0)
    if normalize == "imagenet":
      if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
      x = (x - IMAGENET_MEAN) / IMAGENET_STD
    out = {"image": np.ascontiguousarray(x), "label": np.int32(example[label_key])}
    if domain_key is not None:
      out["domain"] = np.int32(_as_int(example[domain_key]))
    return out

  return transform


def _as_int(value: Any) -> int:
  value = np.asarray(value)
  return int(value) if value.dtype.kind in "iub" else -1


def text_transform(
  *,
  tokenize: Callable[[str], Mapping[str, np.ndarray]],
  text_key: str = "sentence",
  label_key: str = "label",
) -> Transform:
  """`(example, rng) -> {**tokenize(text), 'label': int32}`; `tokenize` must return arrays
  of a fixed shape (e.g. `tokenizer_hook` of a padded tokenizer)."""
  if not callable(tokenize):
    raise ValueError(f"tokenize={tokenize!r} is invalid; accepted: a callable text -> dict")

  def transform(example: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
    del rng
    value = example[text_key]
    text = value.decode() if isinstance(value, bytes) else str(value)
    out = {k: np.asarray(v) for k, v in tokenize(text).items()}
    out["label"] = np.int32(example[label_key])
    return out

  return transform


def tokenizer_hook(tokenizer: Any) -> Callable[[str], dict[str, np.ndarray]]:
  """`text -> {'input_ids': int32 [T], 'attention_mask': int32 [T]}` of a fixed-length
  `tokenizers.Tokenizer` (`data.text.load_tokenizer`)."""

  def tokenize(text: str) -> dict[str, np.ndarray]:
    ids, mask = text_lib.tokenize([text], tokenizer)
    return {"input_ids": ids[0], "attention_mask": mask[0]}

  return tokenize


# ----------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------


def _shard(shard: tuple[int, int] | None) -> tuple[int, int]:
  index, count = (jax.process_index(), jax.process_count()) if shard is None else shard
  if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
    raise ValueError(f"shard={shard!r} is invalid; accepted: (index, count), 0 <= index < count")
  return index, count


def _positive(value: Any, field: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{field}={value!r} is invalid; accepted: an int >= 1")


def _loader(source: Source, transform: Transform) -> Callable:
  def load(index: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    index = int(index)
    out = transform(source.data[index], rng)
    out["index"] = np.int64(index)
    return out

  return load


def _read_options(read_threads: int, prefetch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)


def train_batches(
  source: Source,
  transform: Transform,
  *,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  shard: tuple[int, int] | None = None,
  read_threads: int = 4,
  prefetch: int = 64,
  worker_count: int = 0,
) -> grain.IterDataset:
  """Training batches of this host: `{key: [batch_size, ...]}` plus `index` [B] int64.

  Args:
    source: from `open_split`.
    transform: `(example, rng) -> dict` (`image_transform`, `text_transform`).
    batch_size: examples per batch on this host (the last partial batch is dropped).
    seed: seeds the shuffle (a new permutation every epoch) and the augmentation.
    shuffle: False keeps the split order (still augmented).
    num_epochs: passes over the data (None: forever).
    shard: (index, count) of this host (default: jax.process_index(), process_count()).
    read_threads, prefetch: grain's reading threads and their buffer (elements).
    worker_count: worker processes (0: read in this process).

  Returns:
    A grain IterDataset; `iter()` it, and `get_state()` / `set_state()` the iterator to
    checkpoint and resume.
  """
  if num_epochs is not None:
    _positive(num_epochs, "num_epochs")
  ds = _batch_map(
    source,
    transform,
    batch_size=batch_size,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard=shard,
  )
  out = ds.to_iter_dataset(_read_options(read_threads, prefetch))
  if worker_count:
    _positive(worker_count, "worker_count")
    _allow_grain_workers()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return out


def _batch_map(
  source: Source,
  transform: Transform,
  *,
  batch_size: int,
  seed: int,
  shuffle: bool,
  num_epochs: int | None,
  shard: tuple[int, int] | None,
) -> grain.MapDataset:
  """The batches of `train_batches` as a random-access grain MapDataset."""
  _positive(batch_size, "batch_size")
  index, count = _shard(shard)
  ds = grain.MapDataset.source(source.indices)[index::count]
  if len(ds) < batch_size:
    raise ValueError(
      f"batch_size={batch_size} exceeds the {len(ds)} examples of this host (shard "
      f"{index} of {count}); accepted: at most {len(ds)}"
    )
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.random_map(_loader(source, transform), seed=seed)
  return ds.batch(batch_size, drop_remainder=True)


class StepBatches:
  """`train_batches`' stream addressed by training step: `batches(step)` is batch `step`.

  For a training loop that numbers its steps and restores the step from its checkpoint
  (`train.loop.train_loop`): the step is the whole iterator state, so a resumed stage gets
  exactly the batches the interrupted one would have seen, with nothing else to store.
  Consecutive steps read from one prefetching iterator; any other step (a resume, a
  repeated step) restarts it there (random access, no replay of earlier batches).
  Arguments as `train_batches` (the stream repeats forever).
  """

  def __init__(
    self,
    source: Source,
    transform: Transform,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    shard: tuple[int, int] | None = None,
    read_threads: int = 4,
    prefetch: int = 64,
  ):
    self._ds = _batch_map(
      source,
      transform,
      batch_size=batch_size,
      seed=seed,
      shuffle=shuffle,
      num_epochs=None,
      shard=shard,
    )
    self._options = _read_options(read_threads, prefetch)
    self._iterator, self._next = None, -1

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    if step < 0:
      raise ValueError(f"step={step} is invalid; accepted: an int >= 0")
    if self._iterator is None or step != self._next:
      self._iterator = iter(self._ds[step:].to_iter_dataset(self._options))
    self._next = step + 1
    return next(self._iterator)


def eval_batches(
  source: Source,
  transform: Transform,
  *,
  batch_size: int,
  shard: tuple[int, int] | None = None,
  seed: int = 0,
  read_threads: int = 4,
  prefetch: int = 64,
) -> grain.IterDataset:
  """Every selected example of the split once, in order, as padded batches.

  Host `index` of `count` gets examples `index, index + count, ...`; every host yields
  `ceil(ceil(N / count) / batch_size)` batches, the last ones padded with zeros.
  Batches carry `mask` [B] bool (False on padding) and `index` [B] int64 (-1 on padding).
  """
  _positive(batch_size, "batch_size")
  index, count = _shard(shard)
  per_host = -(-len(source.indices) // count)
  total = -(-per_host // batch_size) * batch_size
  mine = source.indices[index::count]
  padded = np.full(total, -1, np.int64)
  padded[: len(mine)] = mine
  load = _loader(source, transform)
  template = load(source.indices[0], np.random.default_rng(0))

  def load_or_pad(i: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if int(i) < 0:
      out = {k: np.zeros_like(v) for k, v in template.items()}
      out["index"] = np.int64(-1)
      out["mask"] = np.bool_(False)
      return out
    out = load(i, rng)
    out["mask"] = np.bool_(True)
    return out

  ds = grain.MapDataset.source(padded).random_map(load_or_pad, seed=seed)
  return ds.batch(batch_size).to_iter_dataset(_read_options(read_threads, prefetch))


def _allow_grain_workers() -> None:
  """grain 0.2.18's worker processes read an absl flag; outside `absl.app.run` the flags
  are unparsed and the workers fail (google/grain#1355): mark them parsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
