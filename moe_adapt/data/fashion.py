"""Fashion-MNIST benchmarks: `fmnist_rot` and `fmnist_shift`, and the IDX reader.

Summary:

- `fmnist_rot`: 6 domains (rot0, rot15, …, rot75) × ~11,667 images (max_per_domain=2000 by
  default: 1,400 train / 200 val / 400 test), 10 classes, 28×28×1; default target rot75.
- `fmnist_shift`: 22 domains × ~3,182 images (max_per_domain=1500 by default: 1,050 / 150 /
  300), 10 classes, 28×28×1; 17 source domains and 5 default targets.

Source data: the 70,000 images of Fashion-MNIST (train and t10k pooled) read from IDX files,
by default Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), or the
folder named by `data_dir`. Protocol as DomainBed's Rotated-MNIST: the pooled images are
shuffled by the seed and dealt out disjointly among the domains; each domain transforms its
own images, which are then split train / val / test. Output pixels are rounded to 8-bit
levels (k/255, like the source), which lets the built arrays be cached compactly and read
back bit-identical.

`fmnist_shift` is a many-domain benchmark in the spirit of WILDS (many training domains,
test domains that are new but resemble training ones). Each domain is a fixed combination
`<geometry>+<appearance>` of one geometric and one appearance factor, applied per image
with per-image randomness (jittered parameters, noise samples, patch positions), so each
domain is a distribution rather than one fixed map:

  geometry   upright   no change
             rot30     rotation by U(25°, 35°) counter-clockwise
             shear     horizontal shear, factor U(0.3, 0.4)
             scale     zoom by U(0.7, 0.8) about the centre
             elastic   elastic distortion (alpha 20 px, sigma 3 px)    [unseen in training]
  appearance clean     no change
             noise     additive Gaussian noise, std U(0.15, 0.25), clipped to [0, 1]
             blur      Gaussian blur, sigma U(0.8, 1.2) px
             contrast  deviation from the image mean scaled by U(0.25, 0.4)
             occlude   a 10×10 mid-grey (0.5) square at a uniform position
             invert    negative image 1 - x                                [unseen in training]

Domains (geometry applied first, then appearance): the 4 × 5 grid of {upright, rot30,
shear, scale} × {clean, noise, blur, contrast, occlude}, plus elastic+clean and
upright+invert. Default targets: rot30+blur, shear+noise, scale+contrast (new combinations
of factors that all appear in other training domains: where experts and an aggregator can
help) and elastic+clean, upright+invert (an unseen factor: where they may not). The other
17 domains are the default sources.

Options (both benchmarks): `data_dir` (folder with the four IDX files, .gz or not; default:
the Debian folder, else wherever `dpkg -L dataset-fashion-mnist` puts them),
`max_per_domain` (int ≥ 10 or None for all; defaults 2000 / 1500 keep a Meta-DMoE run to
minutes on 2 CPU cores), `val_fraction` (0.1), `test_fraction` (0.2), `cache` (True: keep
the built arrays as .npz under $MOE_ADAPT_CACHE or ~/.cache/moe_adapt).
"""

from __future__ import annotations

import functools
import gzip
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moe_adapt.data import images, registry
from moe_adapt.data.registry import Benchmark, DomainSplits

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
NUM_IMAGES = 70_000

ROT_ANGLES = (0, 15, 30, 45, 60, 75)
ROT_DOMAINS = tuple(f"rot{a}" for a in ROT_ANGLES)


class MissingDataError(FileNotFoundError, ValueError):
  """The Fashion-MNIST IDX files are not where `data_dir` says (a ValueError and an OSError)."""


# ------------------------------------------------------------------------------ IDX files

# IDX type codes (third magic byte) -> big-endian NumPy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
  """Reads an IDX file (gzipped when the name ends in .gz) into a native-endian array."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(f"{path} holds {len(data)} bytes; its header {shape} implies {expected}")
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _debian_dirs() -> list[Path]:
  """Folders holding the package's IDX files according to `dpkg -L` (empty if unavailable)."""
  if shutil.which("dpkg") is None:
    return []
  try:
    listing = subprocess.run(
      ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10, check=False
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return sorted({Path(line).parent for line in listing.splitlines() if "idx3-ubyte" in line})


def _file_in(folder: Path, stem: str) -> Path | None:
  for name in (stem + ".gz", stem):
    if (folder / name).is_file():
      return folder / name
  return None


def find_data_dir(data_dir: str | Path | None = None) -> Path:
  """The folder holding the four Fashion-MNIST IDX files, or MissingDataError saying how."""
  if data_dir is not None and not isinstance(data_dir, str | Path):
    raise ValueError(f"data_dir must be a path or None; got {data_dir!r}")
  if data_dir is None:
    candidates = [Path(DEFAULT_DATA_DIR), *_debian_dirs()]
  else:
    candidates = [Path(data_dir).expanduser()]
  for folder in candidates:
    if all(_file_in(folder, stem) for stem in FILES.values()):
      return folder.resolve()
  where = candidates[0]
  missing = [stem for stem in FILES.values() if not _file_in(where, stem)]
  raise MissingDataError(
    f"data_dir='{where}' does not hold the Fashion-MNIST IDX files (missing: "
    f"{', '.join(s + '[.gz]' for s in missing)}). Install them with "
    f"`sudo apt-get install {DEBIAN_PACKAGE}` (Debian/Ubuntu; they go to {DEFAULT_DATA_DIR}), "
    "or download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
    "https://github.com/zalandoresearch/fashion-mnist and set data_dir to their folder."
  )


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """Pooled Fashion-MNIST: images [70000, 28, 28, 1] uint8 and labels [70000] int32.

  The 60,000 training images come first, then the 10,000 test images. Read-only arrays.
  """
  folder = find_data_dir(data_dir)
  parts = {key: read_idx(_file_in(folder, stem)) for key, stem in FILES.items()}
  x = np.concatenate([parts["train_images"], parts["test_images"]])
  y = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(np.int32)
  if x.shape != (NUM_IMAGES, 28, 28) or y.shape != (NUM_IMAGES,) or y.max() > 9:
    raise ValueError(
      f"data_dir='{folder}' holds images {x.shape} and labels {y.shape}; Fashion-MNIST has "
      f"{NUM_IMAGES} 28×28 images with labels 0..9"
    )
  x = x[..., None].astype(np.uint8)
  x.flags.writeable = False
  y.flags.writeable = False
  return x, y


# -------------------------------------------------------------------------- fmnist_shift

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _uniform(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
  return rng.uniform(low, high, size=n).astype(np.float32)


GEOMETRY: dict[str, Transform | None] = {
  "upright": None,
  "rot30": lambda x, rng: images.rotate(x, _uniform(rng, len(x), 25.0, 35.0)),
  "shear": lambda x, rng: images.shear(x, _uniform(rng, len(x), 0.3, 0.4)),
  "scale": lambda x, rng: images.scale(x, _uniform(rng, len(x), 0.7, 0.8)),
  "elastic": lambda x, rng: images.elastic(x, rng, alpha=20.0, sigma=3.0),
}
APPEARANCE: dict[str, Transform | None] = {
  "clean": None,
  "noise": lambda x, rng: images.gaussian_noise(x, rng, std=_uniform(rng, len(x), 0.15, 0.25)),
  "blur": lambda x, rng: images.gaussian_blur(x, _uniform(rng, len(x), 0.8, 1.2)),
  "contrast": lambda x, rng: images.contrast(x, _uniform(rng, len(x), 0.25, 0.4)),
  "occlude": lambda x, rng: images.occlude(x, rng, size=10, value=0.5),
  "invert": lambda x, rng: images.invert(x),
}
SEEN_GEOMETRY = ("upright", "rot30", "shear", "scale")
SEEN_APPEARANCE = ("clean", "noise", "blur", "contrast", "occlude")
SHIFT_DOMAINS = (
  *(f"{g}+{a}" for g in SEEN_GEOMETRY for a in SEEN_APPEARANCE),
  "elastic+clean",
  "upright+invert",
)
SHIFT_TARGETS = ("rot30+blur", "shear+noise", "scale+contrast", "elastic+clean", "upright+invert")


def shift_transform(domain: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Applies `domain`'s geometry then appearance factor to [N, H, W, C] floats in [0, 1]."""
  geometry, appearance = domain.split("+")
  for factor in (GEOMETRY[geometry], APPEARANCE[appearance]):
    if factor is not None:
      x = factor(x, rng)
  return x


# ------------------------------------------------------------------------------ factories


def _fashion_options(
  data_dir, max_per_domain, val_fraction, test_fraction, cache
) -> tuple[dict, bool]:
  folder = find_data_dir(data_dir)
  max_per_domain = registry.check_max_per_domain(max_per_domain)
  val_fraction, test_fraction = registry.check_fractions(val_fraction, test_fraction)
  if not isinstance(cache, bool):
    raise ValueError(f"cache must be True or False; got {cache!r}")
  options = {
    "data_dir": str(folder),
    "max_per_domain": max_per_domain,
    "val_fraction": val_fraction,
    "test_fraction": test_fraction,
  }
  return options, cache


def _make(
  name: str,
  domains: Sequence[str],
  targets: Sequence[str],
  transform: Callable[[str, int, np.ndarray, np.random.Generator], np.ndarray],
  options: dict,
  cache: bool,
) -> Benchmark:
  def build(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = load_fashion_mnist(options["data_dir"])
    plans = registry.plan_domains(
      NUM_IMAGES,
      domains,
      seed=seed,
      val_fraction=options["val_fraction"],
      test_fraction=options["test_fraction"],
      max_per_domain=options["max_per_domain"],
    )
    out = {}
    for i, domain in enumerate(domains):
      plan = plans[domain]
      idx = np.concatenate(plan)  # One pass per domain: its randomness in one stream.
      xs = registry.to_uint8(
        transform(domain, i, registry.to_unit_float(x[idx]), registry.domain_rng(seed, i))
      )
      start = 0
      for part, part_idx in zip(DomainSplits._fields, plan):
        out[f"{domain}/{part}"] = (xs[start : start + len(part_idx)], y[part_idx])
        start += len(part_idx)
    return out

  def load(seed: int) -> dict[str, DomainSplits]:
    return registry.cached_uint8_build(
      name, options, seed, domains, functools.partial(build, seed), use_cache=cache
    )

  return Benchmark(
    name=name,
    domains=tuple(domains),
    num_classes=10,
    class_names=CLASS_NAMES,
    input_shape=(28, 28, 1),
    default_targets=tuple(targets),
    loader=load,
    options=options,
  )


def make_fmnist_rot(
  *,
  data_dir: str | Path | None = None,
  max_per_domain: int | None = 2000,
  val_fraction: float = registry.DEFAULT_VAL_FRACTION,
  test_fraction: float = registry.DEFAULT_TEST_FRACTION,
  cache: bool = True,
) -> Benchmark:
  """The `fmnist_rot` benchmark (see the module docstring)."""
  options, cache = _fashion_options(data_dir, max_per_domain, val_fraction, test_fraction, cache)

  def transform(domain, i, x, rng):
    del domain, rng  # Exact angles, as in DomainBed.
    return images.rotate(x, ROT_ANGLES[i]) if ROT_ANGLES[i] else x

  return _make("fmnist_rot", ROT_DOMAINS, ("rot75",), transform, options, cache)


def make_fmnist_shift(
  *,
  data_dir: str | Path | None = None,
  max_per_domain: int | None = 1500,
  val_fraction: float = registry.DEFAULT_VAL_FRACTION,
  test_fraction: float = registry.DEFAULT_TEST_FRACTION,
  cache: bool = True,
) -> Benchmark:
  """The `fmnist_shift` benchmark (see the module docstring)."""
  options, cache = _fashion_options(data_dir, max_per_domain, val_fraction, test_fraction, cache)

  def transform(domain, i, x, rng):
    del i
    return shift_transform(domain, x, rng)

  return _make("fmnist_shift", SHIFT_DOMAINS, SHIFT_TARGETS, transform, options, cache)


registry.register_benchmark("fmnist_rot", make_fmnist_rot)
registry.register_benchmark("fmnist_shift", make_fmnist_shift)
