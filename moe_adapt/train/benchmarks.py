"""A config's benchmark: `data.get_benchmark` with what the methods all pass it.

`benchmark(config.data)` reads `data.benchmark` and `data.options` ('' = the benchmark's
default) and, for the text benchmarks that run an encoder (`embedded`, `text_hidden`), passes
the encoder backend (`models.encoders`): they live in data/, which does not import models/.
"""

from __future__ import annotations

from typing import Any

from moe_adapt import data
from moe_adapt.models import encoders


def options(data_config: Any) -> dict[str, Any]:
  """`data.options` as `get_benchmark` keyword arguments ('' values dropped: defaults)."""
  out = {k: v for k, v in data_config.options.to_dict().items() if v != ""}
  if data_config.benchmark in ("embedded", "text_hidden"):
    out["encoder_backend"] = encoders
  return out


def benchmark(data_config: Any) -> data.Benchmark:
  """The benchmark `data_config.benchmark` built with `data_config.options`."""
  return data.get_benchmark(data_config.benchmark, **options(data_config))
