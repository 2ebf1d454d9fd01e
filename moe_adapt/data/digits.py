"""`digits_rot`: scikit-learn's bundled handwritten digits as six rotation domains.

Summary: 6 domains (rot0, rot15, …, rot75) × ~300 images, 10 classes, 16×16×1 by default;
per domain ~210 train / 30 val / 60 test; default target rot75. Zero setup (the data ships
with scikit-learn).

Protocol (DomainBed's Rotated-MNIST): the 1,797 8×8 images are shuffled by the seed and
dealt out disjointly among the domains; each domain's images are upsampled bilinearly to
`image_size`×`image_size` (before rotating, so the rotation is not done on 8×8 pixels),
rotated counter-clockwise by exactly the domain's angle (zero fill), and split into
train / val / test. Pixel values are scaled from 0…16 to [0, 1].

Options: `image_size` (int ≥ 8, default 16), `val_fraction` (default 0.1),
`test_fraction` (default 0.2).
"""

from __future__ import annotations

import functools

import numpy as np

from moe_adapt.data import images, registry
from moe_adapt.data.registry import Benchmark, DomainSplits, Split

ANGLES = (0, 15, 30, 45, 60, 75)
DOMAINS = tuple(f"rot{a}" for a in ANGLES)
CLASS_NAMES = tuple(str(i) for i in range(10))


@functools.cache
def _source() -> tuple[np.ndarray, np.ndarray]:
  """The pooled source images [1797, 8, 8, 1] float32 in [0, 1] and labels [1797] int32."""
  from sklearn.datasets import load_digits  # Imported here: sklearn takes ~1 s to import.

  digits = load_digits()
  x = (digits.images.astype(np.float32) / np.float32(16.0))[..., None]
  x.flags.writeable = False
  y = digits.target.astype(np.int32)
  y.flags.writeable = False
  return x, y


def make_digits_rot(
  *,
  image_size: int = 16,
  val_fraction: float = registry.DEFAULT_VAL_FRACTION,
  test_fraction: float = registry.DEFAULT_TEST_FRACTION,
) -> Benchmark:
  """The `digits_rot` benchmark (see the module docstring)."""
  if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
    raise ValueError(f"image_size must be an int >= 8; got {image_size!r}")
  if image_size < 8:
    raise ValueError(f"image_size must be an int >= 8; got {image_size!r}")
  val_fraction, test_fraction = registry.check_fractions(val_fraction, test_fraction)
  options = {
    "image_size": int(image_size),
    "val_fraction": val_fraction,
    "test_fraction": test_fraction,
  }
  return Benchmark(
    name="digits_rot",
    domains=DOMAINS,
    num_classes=10,
    class_names=CLASS_NAMES,
    input_shape=(int(image_size), int(image_size), 1),
    default_targets=("rot75",),
    loader=functools.partial(_load, **options),
    options=options,
  )


def _load(
  seed: int, *, image_size: int, val_fraction: float, test_fraction: float
) -> dict[str, DomainSplits]:
  x, y = _source()
  plans = registry.plan_domains(
    len(x), DOMAINS, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
  )
  out = {}
  for domain, angle in zip(DOMAINS, ANGLES):
    splits = []
    for idx in plans[domain]:
      xs = images.resize(x[idx], (image_size, image_size))
      if angle:
        xs = images.rotate(xs, angle)
      splits.append(Split(np.clip(xs, 0.0, 1.0), y[idx].copy()))
    out[domain] = DomainSplits(*splits)
  return out


registry.register_benchmark("digits_rot", make_digits_rot)
