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

`prepare_mock(fmt, data_dir)` writes a tiny dataset in the TFDS format of DomainNet (with a
domain feature), CUB-200-2011 or GLUE SST-2, for tests of the streaming pipeline
(`moe_adapt.data.streaming`) and of code written against the real datasets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from moe_adapt.data import images, registry
from moe_adapt.data.registry import Benchmark, DomainSplits, Split

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


# ------------------------------------------------------------------------- TFDSBenchmark


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
    if not isinstance(tfds_name, str) or not tfds_name:
      raise ValueError(
        "tfds_name is required for benchmark 'tfds': the name of a prepared TFDS dataset, "
        f"e.g. tfds_name='domainnet/real' (got {tfds_name!r})"
      )
    builder = prepared_builder(tfds_name, data_dir)
    features = builder.info.features
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
    available = tuple(builder.info.splits)
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
    if image_size is not None and (
      isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
      raise ValueError(f"image_size must be None or a positive int; got {image_size!r}")

    single_domain = tfds_name.split("/")[0].split(":")[0]
    reader = _Reader(builder, domain_key, image_key, label_key, image_size, single_domain)
    domains = reader.domain_names(pooled)
    input_shape = reader.input_shape()
    if default_targets is None:
      default_targets = (domains[-1],)
    elif isinstance(default_targets, str) or not all(d in domains for d in default_targets):
      raise ValueError(
        f"default_targets={default_targets!r} must be a list of domains; accepted: "
        f"{', '.join(domains)}"
      )
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

    def load(seed: int) -> dict[str, DomainSplits]:
      if split_names is not None:
        return reader.read_presplit(split_names, domains)
      return reader.read_pooled(
        pooled,
        domains,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_per_domain=max_per_domain,
      )

    label_feature = features[label_key]
    return cls(
      name="tfds",
      domains=domains,
      num_classes=label_feature.num_classes,
      class_names=tuple(label_feature.names),
      input_shape=input_shape,
      default_targets=tuple(default_targets),
      loader=load,
      options=options,
    )


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


# ------------------------------------------------------------------------- tiny real-format mocks

# The first class names of the real datasets (DomainNet's 345, CUB-200-2011's 200).
_DOMAINNET_CLASSES = (
  "aircraft_carrier", "airplane", "alarm_clock", "ambulance", "angel", "animal_migration",
  "ant", "anvil", "apple", "arm",
)  # fmt: skip
_DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
_CUB_CLASSES = (
  "001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
  "004.Groove_billed_Ani", "005.Crested_Auklet", "006.Least_Auklet", "007.Parakeet_Auklet",
  "008.Rhinoceros_Auklet", "009.Brewer_Blackbird", "010.Red_winged_Blackbird",
)  # fmt: skip
_SST2_WORDS = {
  0: ("dull", "boring", "awful", "tedious", "bad", "flat"),
  1: ("moving", "funny", "great", "charming", "good", "sharp"),
}
_FILLER = ("the", "film", "is", "a", "story", "and", "cast", "plot", "with", "its")


@dataclasses.dataclass(eq=False)
class MockConfig(tfds.core.BuilderConfig):
  """Sizes of a mock: classes, examples per class and split (and domain), image sides."""

  num_classes: int = 3
  per_class: dict[str, int] = dataclasses.field(default_factory=dict)
  domains: tuple[str, ...] = ()
  min_side: int = 24
  max_side: int = 48
  seed: int = 0


class _Mock(tfds.core.GeneratorBasedBuilder):
  """Shared parts of the mock builders: no files beside the code, examples in order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012 (TFDS's class attribute)
  BUILDER_CONFIGS = []  # noqa: RUF012 (made by prepare_mock)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.builder_config.per_class}

  def _rng(self, split: str) -> np.random.Generator:
    config = self.builder_config
    return np.random.default_rng([config.seed, sorted(config.per_class).index(split)])

  def _image(self, rng: np.random.Generator, label: int, *, gray: bool = False) -> np.ndarray:
    """[H, W, 3] uint8 of a random size: a class-coloured disc on noise (learnable)."""
    config = self.builder_config
    h, w = rng.integers(config.min_side, config.max_side + 1, size=2)
    colour = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 31 + 160) % 256])
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 3) ** 2
    image = rng.integers(0, 256, size=(h, w, 3)) // 2
    image[disc] = colour
    if gray:
      image[:] = image.mean(-1, keepdims=True)
    return image.astype(np.uint8)


def _image_feature() -> tfds.features.Tensor:
  # Real datasets hold images of varying sizes; zlib-encoded Tensors store them without
  # TensorFlow (an `Image` feature needs TF to encode).
  return tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib")


class MockDomainnet(_Mock):
  """DomainNet's format with every domain in one dataset: image, label, domain."""

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description="Tiny mock of DomainNet (all domains, with a domain feature).",
      features=tfds.features.FeaturesDict(
        {
          "image": _image_feature(),
          "label": tfds.features.ClassLabel(names=_DOMAINNET_CLASSES[: config.num_classes]),
          "domain": tfds.features.ClassLabel(names=config.domains),
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
    )

  def _generate_examples(self, split: str):
    config, rng = self.builder_config, self._rng(split)
    key = 0
    for d, domain in enumerate(config.domains):
      for label in range(config.num_classes):
        for _ in range(config.per_class[split]):
          image = self._image(rng, label, gray=domain in ("quickdraw", "sketch"))
          yield key, {"image": image, "label": label, "domain": d}
          key += 1


class MockCub200(_Mock):
  """CUB-200-2011's format (as TFDS's caltech_birds2011): image, label, bbox, file name,
  segmentation mask."""

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description="Tiny mock of CUB-200-2011 (caltech_birds2011's features).",
      features=tfds.features.FeaturesDict(
        {
          "image": _image_feature(),
          "image/filename": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=_CUB_CLASSES[: config.num_classes]),
          "bbox": tfds.features.BBoxFeature(),
          "segmentation_mask": tfds.features.Tensor(
            shape=(None, None, 1), dtype=np.uint8, encoding="zlib"
          ),
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
    )

  def _generate_examples(self, split: str):
    config, rng = self.builder_config, self._rng(split)
    key = 0
    for label in range(config.num_classes):
      for i in range(config.per_class[split]):
        image = self._image(rng, label)
        h, w = image.shape[:2]
        ymin, xmin = rng.uniform(0, 0.3, size=2)
        ymax, xmax = rng.uniform(0.7, 1.0, size=2)
        mask = np.zeros((h, w, 1), np.uint8)
        mask[int(ymin * h) : int(ymax * h), int(xmin * w) : int(xmax * w)] = 1
        yield (
          key,
          {
            "image": image,
            "image/filename": f"{_CUB_CLASSES[label]}/{split}_{i:04d}.jpg",
            "label": label,
            "bbox": tfds.features.BBox(ymin=ymin, xmin=xmin, ymax=ymax, xmax=xmax),
            "segmentation_mask": mask,
          },
        )
        key += 1


class MockGlue(_Mock):
  """GLUE SST-2's format: sentence, label (test labels are -1), idx."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Tiny mock of GLUE SST-2 (glue/sst2's features).",
      features=tfds.features.FeaturesDict(
        {
          "sentence": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=("negative", "positive")),
          "idx": tfds.features.Tensor(shape=(), dtype=np.int32),
        }
      ),
      supervised_keys=None,
      disable_shuffling=True,
    )

  def _generate_examples(self, split: str):
    config, rng = self.builder_config, self._rng(split)
    idx = 0
    for label in (0, 1):
      for _ in range(config.per_class[split]):
        words = list(rng.choice(_FILLER, size=rng.integers(3, 8)))
        words.insert(int(rng.integers(0, len(words) + 1)), rng.choice(_SST2_WORDS[label]))
        yield (
          idx,
          {
            "sentence": " ".join(words),
            "label": -1 if split == "test" else label,
            "idx": idx,
          },
        )
        idx += 1


MOCK_FORMATS = {
  "domainnet": (MockDomainnet, {"train": 4, "test": 2}),
  "cub200": (MockCub200, {"train": 4, "test": 2}),
  "glue_sst2": (MockGlue, {"train": 8, "validation": 4, "test": 4}),
}


def prepare_mock(
  fmt: str,
  data_dir: str | Path,
  *,
  num_classes: int = 3,
  per_class: dict[str, int] | None = None,
  domains: Sequence[str] = _DOMAINNET_DOMAINS[:3],
  image_sides: tuple[int, int] = (24, 48),
  seed: int = 0,
) -> tfds.core.DatasetBuilder:
  """Writes a tiny dataset in a real dataset's TFDS format (array_record, no TensorFlow).

  Formats: 'domainnet' (`mock_domainnet`: image uint8 [H, W, 3] of varying size, label,
  domain ClassLabels; splits train / test, `per_class` examples per class in every domain),
  'cub200' (`mock_cub200`: caltech_birds2011's image, image/filename, label, bbox,
  segmentation_mask; splits train / test) and 'glue_sst2' (`mock_glue`: sentence, label,
  idx; splits train / validation / test, `per_class` sentences per class, test labels -1).
  Images are class-coloured discs on noise with sides drawn from `image_sides` (min, max),
  sentences hold one sentiment word, so a model can learn them. Takes well under a second
  at the default sizes; preparing again does nothing.

  Returns:
    The prepared builder; read it with `builder.as_data_source(split)` or
    `tfds.data_source(f"{builder.name}/{builder.builder_config.name}", data_dir=data_dir)`.
  """
  if fmt not in MOCK_FORMATS:
    raise ValueError(f"fmt={fmt!r} is unknown; accepted: {', '.join(MOCK_FORMATS)}")
  cls, default_sizes = MOCK_FORMATS[fmt]
  sizes = dict(default_sizes if per_class is None else per_class)
  if not sizes or any(not isinstance(n, int) or n < 1 for n in sizes.values()):
    raise ValueError(f"per_class={per_class!r} is invalid; accepted: {{split: int >= 1}}")
  limit = 2 if fmt == "glue_sst2" else len(_CUB_CLASSES)
  if fmt == "glue_sst2":
    num_classes = 2
  if not isinstance(num_classes, int) or not 1 <= num_classes <= limit:
    raise ValueError(f"num_classes={num_classes!r} is invalid; accepted: 1..{limit}")
  unknown = [d for d in domains if d not in _DOMAINNET_DOMAINS]
  if fmt == "domainnet" and (isinstance(domains, str) or not domains or unknown):
    raise ValueError(f"domains={domains!r} is invalid; accepted: some of {_DOMAINNET_DOMAINS}")
  low, high = image_sides
  if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
    raise ValueError(
      f"image_sides={image_sides!r} is invalid; accepted: (min, max), 1 <= min <= max"
    )
  name = f"c{num_classes}-" + "-".join(f"{k}{v}" for k, v in sorted(sizes.items()))
  if fmt == "domainnet":
    name += "-" + "-".join(domains)
  if fmt != "glue_sst2" and (low, high) != (24, 48):
    name += f"-px{low}-{high}"
  config = MockConfig(
    name=f"{name}-seed{seed}",
    num_classes=num_classes,
    per_class=sizes,
    domains=tuple(domains),
    min_side=low,
    max_side=high,
    seed=seed,
  )
  builder = cls(data_dir=str(data_dir), config=config)
  builder.download_and_prepare(file_format="array_record")
  return builder
