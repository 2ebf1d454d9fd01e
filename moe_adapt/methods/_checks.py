"""Config-field checks shared by the methods' `validate_config` (one clear ValueError each)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

# `model.dtype`: the models' computation dtype. Parameters, optimiser state and losses stay
# float32 either way (mixed precision); bfloat16 is for accelerators.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def field(config: Any, name: str) -> Any:
  """`config.a.b` for name 'a.b'."""
  node = config
  for part in name.split("."):
    node = node[part]
  return node


def integer(config: Any, name: str, minimum: int) -> None:
  """The field `name` is an int >= minimum (bools rejected)."""
  value = field(config, name)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}={value!r} is invalid; accepted: an integer >= {minimum}")


def number(
  config: Any,
  name: str,
  *,
  low: float,
  high: float = np.inf,
  low_open: bool = True,
  high_open: bool = True,
) -> None:
  """The field `name` is a finite number in (low, high); `*_open=False` closes an end."""
  value = field(config, name)
  ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
  ok = ok and (value > low if low_open else value >= low)
  ok = ok and (value < high if high_open else value <= high)
  if not ok:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    interval = f"{lo}{low:g}, {high:g}{hi}" if np.isfinite(high) else f"{lo}{low:g}, ∞)"
    raise ValueError(f"{name}={value!r} is invalid; accepted: a number in {interval}")


def choice(config: Any, name: str, accepted: Sequence[str]) -> None:
  """The field `name` is one of `accepted`."""
  value = field(config, name)
  if value not in accepted:
    raise ValueError(f"{name}={value!r} is unknown; accepted: {', '.join(accepted)}")


def names(config: Any, name: str, accepted: Sequence[str], *, allow_empty: bool = False) -> None:
  """The field `name` is a tuple of distinct entries of `accepted` (non-empty unless allowed)."""
  value = field(config, name)
  if isinstance(value, str) or not isinstance(value, Sequence) or (not value and not allow_empty):
    raise ValueError(
      f"{name}={value!r} is invalid; accepted: a {'' if allow_empty else 'non-empty '}tuple of "
      f"{', '.join(accepted)}"
    )
  for v in value:
    if v not in accepted:
      raise ValueError(f"{name} has unknown {v!r}; accepted: {', '.join(accepted)}")
  if len(set(value)) != len(value):
    raise ValueError(f"{name}={tuple(value)!r} lists an entry twice")


def compute_dtype(config: Any, name: str = "model.dtype") -> Any:
  """The validated computation dtype of field `name` (absent: float32) as a jnp dtype."""
  value = field(config, name.rsplit(".", 1)[0]).get(name.rsplit(".", 1)[1], "float32")
  if not isinstance(value, str) or value not in COMPUTE_DTYPES:
    raise ValueError(f"{name}={value!r} is unknown; accepted: {', '.join(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[value]


def runs_baseline(config: Any, name: str, baseline: str) -> None:
  """The variant list in field `name` runs `baseline` whenever it compares variants.

  `baseline` is the variant the paired differences of a run's table are measured against
  (`launch.collect.BASELINES`); a list of one variant compares nothing and needs none.
  """
  value = tuple(field(config, name))
  if len(value) > 1 and baseline not in value:
    raise ValueError(
      f"{name}={value!r} compares {len(value)} variants without {baseline!r}, the baseline "
      f"their paired differences are measured against; accepted: a list that includes "
      f"{baseline!r}, or a single variant"
    )
