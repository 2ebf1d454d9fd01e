"""Benchmarks as TFDS datasets (array_record, no TensorFlow), and TFDS datasets as benchmarks.

Summary: `prepare_tfds('digits_rot', data_dir, seed=0)` writes any registered benchmark as
the TFDS dataset `moe_adapt_benchmark/<benchmark>-seed<seed>[-<options hash>]` with splits
train / val / test (every domain's examples, domain by domain, in `Benchmark.load` order) and
features `image` (Tensor float32 [H, W, C]), `label` (ClassLabel of the class names) and
`domain` (ClassLabel of the domain names). It can be read back without this package's code::

  tfds.data_source("moe_adapt_benchmark/digits_rot-seed0", data_dir=data_dir)["train"][0]

and, as a benchmark again, by `get_benchmark('tfds', tfds_name=..., data_dir=...,
split_names=('train', 'val', 'test'))`.

`get_benchmark('tfds', ...)` (a `TFDSBenchmark`) turns a prepared TFDS dataset with a
domain feature (e.g. DomainNet, PACS or a WILDS dataset the user prepared as array_record)
into a benchmark held in memory. Options::

  tfds_name (required)   name[/config][:version] of the prepared dataset
  data_dir               where it was prepared (default: TFDS's default data dir)
  domain_key, image_key, label_key   feature names (default 'domain', 'image', 'label');
                         the label must be a ClassLabel, the domain a ClassLabel, an integer
                         or a string feature; domain_key=None makes the whole dataset one
                         domain named after it (a dataset without domains, e.g.
                         caltech_birds2011: domain 'caltech_birds2011')
  split_names            (train, val, test) TFDS splits taken as every domain's splits as
                         they are (the seed then changes nothing); or, when None (default),
  splits                 the TFDS splits pooled (default: all), whose examples are grouped by
                         domain and cut per domain into train / val / test by a seeded
                         permutation (val_fraction 0.1, test_fraction 0.2, after keeping at
                         most max_per_domain examples), as the built-in benchmarks do
  image_size             resize every image to image_size × image_size (needed when image
                         shapes vary); uint8 images are scaled to [0, 1]
  default_targets        target domains used by default (default: the last domain)

The reader lives in `tfds_source` and the mocks in `tfds_mocks`; their public names are
importable from here as well.

`prepare_mock(fmt, data_dir)` writes a tiny dataset in the TFDS format of DomainNet (with a
domain feature), CUB-200-2011 or GLUE SST-2, for tests of the streaming pipeline
(`moe_adapt.data.streaming`) and of code written against the real datasets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from moe_adapt.data import registry
from moe_adapt.data.registry import Benchmark, DomainSplits
from moe_adapt.data.tfds_mocks import MOCK_FORMATS, MockConfig, prepare_mock
from moe_adapt.data.tfds_source import TFDSBenchmark, prepared_builder

# The reader and the mocks live in their own modules; their names stay importable here.
__all__ = [
  "BUILDER_NAME",
  "MOCK_FORMATS",
  "BenchmarkConfig",
  "MockConfig",
  "MoeAdaptBenchmark",
  "TFDSBenchmark",
  "prepare_mock",
  "prepare_tfds",
  "prepared_builder",
]

BUILDER_NAME = "moe_adapt_benchmark"
PARTS = DomainSplits._fields  # ('train', 'val', 'test')


@dataclasses.dataclass(eq=False)
class BenchmarkConfig(tfds.core.BuilderConfig):
  """Which benchmark, seed and resolved options a prepared dataset holds."""

  benchmark: str = ""
  seed: int = 0
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _config_name(benchmark: Benchmark, seed: int) -> str:
  """'<benchmark>-seed<seed>', plus a hash of the options when they are not the defaults."""
  name = f"{benchmark.name}-seed{seed}"
  try:
    defaults = dict(registry.get_benchmark(benchmark.name).options)
  except ValueError:  # A benchmark without usable defaults (e.g. 'tfds').
    defaults = None
  if dict(benchmark.options) != defaults:
    payload = json.dumps(dict(benchmark.options), sort_keys=True, default=str)
    name += "-" + hashlib.sha256(payload.encode()).hexdigest()[:8]
  return name


class MoeAdaptBenchmark(tfds.core.GeneratorBasedBuilder):
  """A registered moe_adapt benchmark for one seed, as a TFDS dataset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012 (TFDS's class attribute)
  BUILDER_CONFIGS = []  # noqa: RUF012 (every config is made by prepare_tfds)

  # No checksums or metadata files live beside this code. Saying so also keeps TFDS 4.9.10
  # from importing the optional `importlib_resources` to locate them (not installed here).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def _benchmark(self) -> Benchmark:
    config = self.builder_config
    return registry.get_benchmark(config.benchmark, **config.options)

  def _info(self) -> tfds.core.DatasetInfo:
    benchmark = self._benchmark()
    config = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"moe_adapt benchmark {benchmark.name!r}, seed {config.seed}.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=benchmark.input_shape, dtype=np.float32),
          "label": tfds.features.ClassLabel(names=list(benchmark.class_names)),
          "domain": tfds.features.ClassLabel(names=list(benchmark.domains)),
        }
      ),
      supervised_keys=("image", "label"),
      # Keeps examples in generation order, so reading back gives Benchmark.load's order.
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(
        benchmark=benchmark.name,
        seed=config.seed,
        options=json.loads(json.dumps(dict(benchmark.options), default=str)),
        default_targets=list(benchmark.default_targets),
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the benchmark builds its own arrays.
    data = self._benchmark().load(seed=self.builder_config.seed)
    return {part: self._generate_examples(data, part) for part in PARTS}

  def _generate_examples(self, data: dict[str, DomainSplits], part: str):
    key = 0
    for domain_id, splits in enumerate(data.values()):
      split = getattr(splits, part)
      for x, y in zip(split.x, split.y):
        yield key, {"image": x, "label": int(y), "domain": domain_id}
        key += 1


def prepare_tfds(
  name: str, data_dir: str | Path, *, seed: int = 0, **options: Any
) -> tfds.core.DatasetBuilder:
  """Writes benchmark `name` (with `options`, for `seed`) as array_record under `data_dir`.

  Returns the prepared builder; `builder.as_data_source()` reads it, and so does
  `tfds.data_source(f"{builder.name}/{builder.builder_config.name}", data_dir=data_dir)`.
  Preparing an already prepared dataset does nothing.
  """
  seed = registry.check_seed(seed)
  if not isinstance(data_dir, str | Path) or not str(data_dir):
    raise ValueError(f"data_dir must be a folder path; got {data_dir!r}")
  benchmark = registry.get_benchmark(name, **options)
  config = BenchmarkConfig(
    name=_config_name(benchmark, seed),
    description=f"{name}, seed {seed}, options {dict(benchmark.options)}",
    benchmark=name,
    seed=seed,
    options=dict(options),
  )
  builder = MoeAdaptBenchmark(data_dir=str(data_dir), config=config)
  builder.download_and_prepare(file_format="array_record")
  return builder
