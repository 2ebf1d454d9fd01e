"""A benchmark's splits as in-memory labelled arrays, for the fine-tuning harness.

`load_task(config)` loads `config.data.benchmark` and gives every domain's train, val and
test split as `Examples` (the model's positional inputs and the labels), with the fixed
subsets the configs ask for (test examples per domain, a subsampled training set and its
dev set), the same for every seed and method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from moe_adapt.data import registry


class Examples(NamedTuple):
  """Labeled examples of one modality.

  Attributes:
    inputs: the model's positional inputs: text (token_ids [N, T] int32, attention_mask
      [N, T] int32); images (x [N, H, W, C] float32,).
    labels: [N] int32.
  """

  inputs: tuple[np.ndarray, ...]
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def take(self, idx: np.ndarray) -> Examples:
    return Examples(tuple(a[idx] for a in self.inputs), self.labels[idx])


def concat_examples(parts: Sequence[Examples]) -> Examples:
  """The examples of `parts` one after the other."""
  if not parts:
    raise ValueError("concat_examples needs at least one part")
  inputs = tuple(np.concatenate(arrays) for arrays in zip(*(p.inputs for p in parts)))
  return Examples(inputs, np.concatenate([p.labels for p in parts]))


@dataclasses.dataclass(frozen=True)
class Task:
  """A benchmark's domains as `Examples` per split.

  Attributes:
    benchmark: the benchmark's name.
    modality: 'text' or 'image'.
    domains: every domain, in the benchmark's order.
    class_names: [C] class names.
    default_targets: the benchmark's default held-out domains.
    train: domain -> Examples of the training split.
    val: domain -> Examples of the validation split.
    test: domain -> Examples of the test split.
  """

  benchmark: str
  modality: str
  domains: tuple[str, ...]
  class_names: tuple[str, ...]
  default_targets: tuple[str, ...]
  train: Mapping[str, Examples]
  val: Mapping[str, Examples]
  test: Mapping[str, Examples]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def pooled(self, split: str, domains: Sequence[str]) -> Examples:
    """The examples of `split` of `domains`, concatenated in the given order."""
    return concat_examples([getattr(self, split)[d] for d in domains])


def _capped(parts: dict[str, Examples], cap: int, seed: int) -> dict[str, Examples]:
  """At most `cap` examples per domain, a subset fixed by `seed` in split order (0 = all)."""
  if not cap:
    return parts
  rng = np.random.default_rng(seed)
  return {
    d: ex.take(np.sort(rng.permutation(len(ex))[:cap])) if len(ex) > cap else ex
    for d, ex in parts.items()
  }


def load_task(config: Any) -> Task:
  """Loads `config.data.benchmark` (with `data.options`, '' = default) as a `Task`.

  Reads `data.{benchmark, options, benchmark_seed}`, `eval.max_examples` (test examples
  per domain) and, when present, `train.subsample` / `train.dev_examples` (training and
  validation examples per domain; 0 = all).
  """
  cfg = config.data
  options = {k: v for k, v in cfg.options.to_dict().items() if v != ""}
  bench = registry.get_benchmark(cfg.benchmark, **options)
  loaded = bench.load(seed=cfg.benchmark_seed)
  text = hasattr(bench, "max_len")

  def examples(split) -> Examples:
    if text:
      return Examples((split.token_ids, split.attention_mask), split.labels.astype(np.int32))
    return Examples((split.x.astype(np.float32),), split.y.astype(np.int32))

  caps = {
    "test": config.eval.max_examples,
    "train": config.train.get("subsample", 0),
    "val": config.train.get("dev_examples", 0),
  }
  parts = {
    name: _capped(
      {d: examples(getattr(s, name)) for d, s in loaded.items()}, cap, cfg.benchmark_seed
    )
    for name, cap in caps.items()
  }
  return Task(
    benchmark=bench.name,
    modality="text" if text else "image",
    domains=tuple(bench.domains),
    class_names=tuple(bench.class_names),
    default_targets=tuple(bench.default_targets),
    train=parts["train"],
    val=parts["val"],
    test=parts["test"],
  )
