"""Registry of domain benchmarks and the pieces every image benchmark shares.

A `Benchmark` knows its domains, classes and input shape, and `load(seed=...)` gives every
domain's train/val/test splits, deterministic in the seed. Built-in benchmarks:

- `digits_rot`: scikit-learn digits, 6 rotation domains (rot0…rot75) × ~300 images, 16×16.
- `fmnist_rot`: Fashion-MNIST, 6 rotation domains × ~11,667 images (2,000 by default), 28×28.
- `fmnist_shift`: Fashion-MNIST, 22 transformation domains × ~3,182 images (1,500 by
  default), 28×28; 5 held-out target domains (3 new combinations of seen factors and 2
  with an unseen factor).
- `tfds`: a user-prepared TFDS dataset (array_record) with a domain feature.

Protocol shared by the built-ins (DomainBed's Rotated-MNIST): the source images are pooled,
shuffled by the seed and dealt out disjointly among the domains; each domain transforms its
own images and splits them into train/val/test.

`get_benchmark(name, **options)` validates the options; `register_benchmark` adds more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# Bump when a change in this package changes the arrays a benchmark builds: it is part of
# every cache key, so stale caches are never read.
CODE_VERSION = 1
CACHE_ENV_VAR = "MOE_ADAPT_CACHE"
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2

# Modules whose import registers the built-in benchmarks (imported lazily: they import this).
_BUILTIN_MODULES = (
  "moe_adapt.data.digits",
  "moe_adapt.data.fashion",
  "moe_adapt.data.tfds_builders",
  "moe_adapt.data.text",
  "moe_adapt.data.embedded",
  "moe_adapt.data.text_hidden",
)


class Split(NamedTuple):
  """One split of one domain.

  Attributes:
    x: [N, H, W, C] float32 images with values in [0, 1] (or [N, D] vectors, e.g. the
      `embedded` benchmark's sentence embeddings).
    y: [N] int32 class labels in [0, num_classes).
  """

  x: np.ndarray
  y: np.ndarray


class DomainSplits(NamedTuple):
  """The train, validation and test splits of one domain (disjoint images)."""

  train: Split
  val: Split
  test: Split


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A domain benchmark: metadata plus a seeded loader.

  Attributes:
    name: registry name, e.g. 'digits_rot'.
    domains: every domain's name, in a fixed order.
    num_classes: number of classes (shared by all domains).
    class_names: [num_classes] human-readable class names.
    input_shape: shape of one example: (H, W, C) of an image, (D,) of a vector.
    default_targets: held-out target domains used when a config names none.
    loader: `seed -> {domain: DomainSplits}`; call `load` instead, which validates.
    options: the resolved options the benchmark was built with (for provenance).
  """

  name: str
  domains: tuple[str, ...]
  num_classes: int
  class_names: tuple[str, ...]
  input_shape: tuple[int, ...]
  default_targets: tuple[str, ...]
  loader: Callable[[int], Mapping[str, DomainSplits]] = dataclasses.field(repr=False, compare=False)
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  @property
  def default_sources(self) -> tuple[str, ...]:
    """Every domain that is not a default target, in domain order."""
    return tuple(d for d in self.domains if d not in self.default_targets)

  def load(self, *, seed: int) -> dict[str, DomainSplits]:
    """Returns `{domain: DomainSplits}` for every domain, identical for equal seeds."""
    check_seed(seed)
    data = dict(self.loader(seed))
    if tuple(data) != self.domains:
      raise ValueError(
        f"benchmark {self.name!r} loaded domains {tuple(data)}; expected {self.domains}"
      )
    for domain, splits in data.items():
      for part, split in zip(DomainSplits._fields, splits):
        _check_split(split, self.input_shape, self.num_classes, f"{domain}.{part}")
    return data

  def check_domains(self, sources: Sequence[str], targets: Sequence[str]) -> None:
    """Validates a source/target domain choice; raises ValueError naming the bad field."""
    check_domain_choice(self.name, self.domains, sources, targets)


def check_domain_choice(
  benchmark: str, domains: Sequence[str], sources: Sequence[str], targets: Sequence[str]
) -> None:
  """Validates a source/target domain choice of benchmark `benchmark` (every benchmark's
  `check_domains`, image and text); raises ValueError naming the bad field."""
  for field, names in (("source_domains", sources), ("target_domains", targets)):
    if isinstance(names, str):
      raise ValueError(f"{field} must be a list of domain names, not the string {names!r}")
    if not names:
      raise ValueError(f"{field} is empty; accepted: {', '.join(domains)}")
    unknown = [d for d in names if d not in domains]
    if unknown:
      raise ValueError(
        f"{field} has unknown domain(s) {unknown} for benchmark {benchmark!r}; "
        f"accepted: {', '.join(domains)}"
      )
    if len(set(names)) != len(names):
      raise ValueError(f"{field} lists a domain twice: {list(names)}")
  both = [d for d in targets if d in sources]
  if both:
    raise ValueError(
      f"target_domains {both} are also in source_domains; a target domain must be held out"
    )


_REGISTRY: dict[str, Callable[..., Benchmark]] = {}
_builtins_loaded = False


def register_benchmark(name: str, factory: Callable[..., Benchmark]) -> None:
  """Registers `factory(**options) -> Benchmark` under `name` (replacing an old entry)."""
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"name must be a Python identifier such as 'my_bench'; got {name!r}")
  if not callable(factory):
    raise ValueError(f"factory for {name!r} must be callable; got {type(factory).__name__}")
  _REGISTRY[name] = factory


def _load_builtins() -> None:
  global _builtins_loaded
  if not _builtins_loaded:
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
      importlib.import_module(module)


def list_benchmarks() -> tuple[str, ...]:
  """Names of all registered benchmarks, sorted."""
  _load_builtins()
  return tuple(sorted(_REGISTRY))


def get_benchmark(name: str, **options: Any) -> Benchmark:
  """Builds the benchmark `name` with `options` (validated by its factory)."""
  _load_builtins()
  if name not in _REGISTRY:
    raise ValueError(f"benchmark={name!r} is unknown; accepted: {', '.join(list_benchmarks())}")
  factory = _REGISTRY[name]
  params = inspect.signature(factory).parameters
  if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    unknown = sorted(set(options) - set(params))
    if unknown:
      raise ValueError(
        f"benchmark {name!r} got unknown option(s) {unknown}; accepted: {', '.join(params)}"
      )
  return factory(**options)


# ----------------------------------------------------------------------------- validation


def check_seed(seed: Any) -> int:
  if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
    raise ValueError(f"seed must be a non-negative int; got {seed!r}")
  return int(seed)


def check_fractions(val_fraction: Any, test_fraction: Any) -> tuple[float, float]:
  """Validates the per-domain val/test fractions: each in (0, 1), together below 1."""
  for field, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
      raise ValueError(f"{field} must be a number in (0, 1); got {value!r}")
  if val_fraction + test_fraction >= 1:
    raise ValueError(
      f"val_fraction + test_fraction must be < 1 to leave training images; got "
      f"{val_fraction} + {test_fraction}"
    )
  return float(val_fraction), float(test_fraction)


def check_max_per_domain(value: Any, *, minimum: int = 10) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
    raise ValueError(f"max_per_domain must be None or an int >= {minimum}; got {value!r}")
  return int(value)


def _check_split(split: Split, input_shape: tuple[int, ...], num_classes: int, where: str):
  if not isinstance(split, Split):
    raise ValueError(f"{where} must be a Split; got {type(split).__name__}")
  if split.x.dtype != np.float32 or split.x.shape[1:] != tuple(input_shape):
    raise ValueError(
      f"{where}.x must be float32 [N, {', '.join(map(str, input_shape))}]; got "
      f"{split.x.dtype} {split.x.shape}"
    )
  if split.y.dtype != np.int32 or split.y.shape != split.x.shape[:1]:
    raise ValueError(
      f"{where}.y must be int32 [{split.x.shape[0]}]; got {split.y.dtype} {split.y.shape}"
    )
  if split.y.size and (split.y.min() < 0 or split.y.max() >= num_classes):
    raise ValueError(f"{where}.y has labels outside [0, {num_classes})")


# -------------------------------------------------------------------- the shared protocol


class DomainPlan(NamedTuple):
  """Indices into the pooled source images for one domain's three splits."""

  train: np.ndarray
  val: np.ndarray
  test: np.ndarray


def plan_domains(
  num_examples: int,
  domains: Sequence[str],
  *,
  seed: int,
  val_fraction: float,
  test_fraction: float,
  max_per_domain: int | None = None,
) -> dict[str, DomainPlan]:
  """Deals `num_examples` pooled images out disjointly among `domains`, then splits each.

  A seeded permutation of all images is cut into len(domains) near-equal chunks (DomainBed's
  protocol); `max_per_domain` keeps a prefix of each chunk, so smaller settings use subsets
  of larger ones. Each chunk is cut into train / val / test in that order (it is already
  shuffled). Returns `{domain: DomainPlan}` of int64 index arrays.
  """
  perm = np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(num_examples)
  chunks = np.array_split(perm, len(domains))
  plans = {}
  for domain, chunk in zip(domains, chunks):
    if max_per_domain is not None:
      chunk = chunk[:max_per_domain]
    n_train, n_val, _ = split_sizes(len(chunk), val_fraction, test_fraction, domain=domain)
    plans[domain] = DomainPlan(
      chunk[:n_train], chunk[n_train : n_train + n_val], chunk[n_train + n_val :]
    )
  return plans


def split_sizes(
  n: int, val_fraction: float, test_fraction: float, *, domain: str
) -> tuple[int, int, int]:
  """(train, val, test) sizes of a domain of `n` images; each must be at least 1."""
  n_val = round(n * val_fraction)
  n_test = round(n * test_fraction)
  n_train = n - n_val - n_test
  if min(n_train, n_val, n_test) < 1:
    raise ValueError(
      f"domain {domain!r} has {n} images, too few for val_fraction={val_fraction} and "
      f"test_fraction={test_fraction} (each split needs at least one); raise max_per_domain"
    )
  return n_train, n_val, n_test


def domain_rng(seed: int, domain_index: int) -> np.random.Generator:
  """The generator for one domain's per-image transform randomness (independent streams)."""
  return np.random.default_rng(np.random.SeedSequence([seed, 1, domain_index]))


def to_unit_float(images_u8: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, C] → float32 in [0, 1] (exactly k/255)."""
  return images_u8.astype(np.float32) / np.float32(255.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [N, H, W, C] in [0, 1] → nearest uint8 level."""
  return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------- caching


def user_cache_dir() -> Path:
  """This user's `$XDG_CACHE_HOME/moe_adapt`, or `~/.cache/moe_adapt` without XDG_CACHE_HOME.

  The default home of fetched archives and built benchmark arrays: per user, never shared.
  """
  return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "moe_adapt"


def cache_dir() -> Path:
  """$MOE_ADAPT_CACHE, or `user_cache_dir()`."""
  value = os.environ.get(CACHE_ENV_VAR)
  return Path(value).expanduser() if value else user_cache_dir()


def cache_key(name: str, options: Mapping[str, Any], seed: int) -> str:
  payload = json.dumps(
    {"name": name, "options": dict(options), "seed": seed, "code_version": CODE_VERSION},
    sort_keys=True,
    default=str,
  )
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_uint8_build(
  name: str,
  options: Mapping[str, Any],
  seed: int,
  domains: Sequence[str],
  build: Callable[[], Mapping[str, tuple[np.ndarray, np.ndarray]]],
  *,
  use_cache: bool = True,
) -> dict[str, DomainSplits]:
  """Runs `build` (or reads its cached result) and converts it to float `DomainSplits`.

  `build()` returns `{f"{domain}/{part}": (x uint8 [N, H, W, C], y [N])}` for every domain
  and part in train/val/test. The result is stored as a compressed .npz named by a hash of
  (name, options, seed, CODE_VERSION) under `cache_dir()`, written atomically (temporary
  file + os.replace), so concurrent builders never see a partial file.
  """
  path = cache_dir() / f"{name}-{cache_key(name, options, seed)}.npz"
  expected = [f"{d}/{part}/{a}" for d in domains for part in DomainSplits._fields for a in "xy"]
  arrays = _read_npz(path, expected) if use_cache else None
  if arrays is None:
    arrays = {}
    for key, (x, y) in build().items():
      arrays[f"{key}/x"] = np.asarray(x, np.uint8)
      arrays[f"{key}/y"] = np.asarray(y, np.int32)
    if use_cache:
      _write_npz_atomic(path, arrays)
  out = {}
  for domain in domains:
    parts = [
      Split(to_unit_float(arrays[f"{domain}/{part}/x"]), arrays[f"{domain}/{part}/y"])
      for part in DomainSplits._fields
    ]
    out[domain] = DomainSplits(*parts)
  return out


def _read_npz(path: Path, expected: Sequence[str]) -> dict[str, np.ndarray] | None:
  """The arrays stored at `path`, or None when it is missing, damaged or incomplete."""
  if not path.exists():
    return None
  try:
    with np.load(path) as stored:
      if not set(expected) <= set(stored.files):
        return None
      return {k: stored[k] for k in expected}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError):
    return None  # Rebuilt and replaced by the caller.


def _write_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache is ordinary data.
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
