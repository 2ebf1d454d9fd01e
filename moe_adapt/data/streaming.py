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

Modules: this one builds the batches (grain pipelines) and re-exports the rest of the
interface: `streaming_sources` opens the splits (`open_split`, `open_domain_splits`),
`streaming_transforms` holds the per-example transforms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np

from moe_adapt.data.streaming_sources import (
  ConcatData,
  DomainSources,
  Source,
  open_domain_splits,
  open_split,
)
from moe_adapt.data.streaming_transforms import (
  AUGMENTATIONS,
  CENTER_CROP_FRACTION,
  IMAGENET_MEAN,
  IMAGENET_STD,
  NORMALIZATIONS,
  Example,
  Transform,
  center_crop_box,
  check_augment,
  crop_and_resize,
  image_transform,
  random_resized_crop_box,
  text_transform,
  tokenizer_hook,
)

__all__ = [
  "AUGMENTATIONS",
  "CENTER_CROP_FRACTION",
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "NORMALIZATIONS",
  "ConcatData",
  "DomainSources",
  "Example",
  "Source",
  "StepBatches",
  "Transform",
  "center_crop_box",
  "check_augment",
  "crop_and_resize",
  "eval_batches",
  "image_transform",
  "open_domain_splits",
  "open_split",
  "random_resized_crop_box",
  "text_transform",
  "tokenizer_hook",
  "train_batches",
]


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
