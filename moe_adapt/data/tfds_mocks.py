"""Tiny datasets in the TFDS formats of real ones (DomainNet, CUB-200-2011, GLUE SST-2).

`prepare_mock(fmt, data_dir)` writes one as array_record, for tests of the streaming
pipeline (`moe_adapt.data.streaming`) and of code written against the real datasets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

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
  cls, sizes, num_classes = _check_mock_options(fmt, num_classes, per_class, domains, image_sides)
  low, high = image_sides
  name = _mock_name(fmt, num_classes, sizes, domains, image_sides)
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


def _check_mock_options(
  fmt: str,
  num_classes: int,
  per_class: dict[str, int] | None,
  domains: Sequence[str],
  image_sides: tuple[int, int],
) -> tuple[type[_Mock], dict[str, int], int]:
  """(builder class, examples per class by split, number of classes) of a valid mock."""
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
  return cls, sizes, num_classes


def _mock_name(
  fmt: str,
  num_classes: int,
  sizes: dict[str, int],
  domains: Sequence[str],
  image_sides: tuple[int, int],
) -> str:
  """The config name without the seed: the sizes, and domains and sides where they apply."""
  low, high = image_sides
  name = f"c{num_classes}-" + "-".join(f"{k}{v}" for k, v in sorted(sizes.items()))
  if fmt == "domainnet":
    name += "-" + "-".join(domains)
  if fmt != "glue_sst2" and (low, high) != (24, 48):
    name += f"-px{low}-{high}"
  return name
