"""Shared helpers of the benchmark scripts: compile timing, wall timing, memory, output.

Every script prints ONE JSON object to stdout (`emit`) and logs to stderr (`log`). Times are
wall-clock times of compiled calls after warm-up, each call ended by
`jax.block_until_ready`; compile time is the time of `jitted.lower(*args).compile()`
(tracing, lowering and XLA compilation), measured separately so that it never leaks into
the step times.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moe_adapt.methods import meta_dmoe

PyTree = Any

# How stacked experts can be run: the pipeline's choices (`meta_dmoe._stack_map`) and a
# Python loop over expert slices inside the same jit.
STACK_MODES = ("vmap", "map", "unrolled", "loop")


def log(message: str) -> None:
  """Writes one line to stderr (stdout is reserved for the JSON result)."""
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(result: dict) -> None:
  """Prints the result as one JSON object on stdout."""
  print(json.dumps(result), flush=True)


def environment() -> dict:
  """The machine and software the numbers were taken on."""
  device = jax.devices()[0]
  return {
    "backend": jax.default_backend(),
    "device": device.device_kind,
    "num_devices": jax.device_count(),
    "jax": jax.__version__,
    "python": platform.python_version(),
    "machine": platform.machine(),
    "cpu_count": os.cpu_count(),
    "load_average_1m": round(os.getloadavg()[0], 2),
  }


def lower_and_compile(jitted: Callable, *args, **kwargs) -> tuple[Any, dict]:
  """AOT-compiles `jitted` for `args`: (compiled, {'lower_s', 'compile_s'}).

  `compile_s` covers tracing + lowering + XLA compilation (what the first call of a
  jitted function costs on top of a normal call); `lower_s` is its tracing + lowering part.
  """
  if not hasattr(jitted, "lower"):
    raise ValueError(f"jitted={jitted!r} is invalid; accepted: a jax.jit-wrapped function")
  t0 = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, {"lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t0, 3)}


def memory_analysis(compiled) -> dict | None:
  """XLA's buffer sizes of a compiled program in MB (temp = peak scratch), or None."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return None
  if stats is None:
    return None
  mb = lambda n: round(n / 1e6, 2)
  return {
    "temp_mb": mb(stats.temp_size_in_bytes),
    "argument_mb": mb(stats.argument_size_in_bytes),
    "output_mb": mb(stats.output_size_in_bytes),
    "alias_mb": mb(stats.alias_size_in_bytes),
  }


def time_calls(
  fn: Callable, *args, repeats: int, warmup: int = 1, budget_s: float | None = None
) -> tuple[list[float], Any]:
  """Seconds of `repeats` calls `fn(*args)` after `warmup` untimed calls; (times, last out).

  With `budget_s`, stops early once the timed calls took that long in total (but after at
  least 3 calls), so that a very slow variant cannot stall a whole table.
  """
  out = None
  for _ in range(warmup):
    out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    if budget_s is not None and len(times) >= 3 and sum(times) > budget_s:
      break
  return times, out


def time_stateful(
  step: Callable, state: PyTree, *, repeats: int, warmup: int = 1, start: int = 0
) -> tuple[list[float], PyTree]:
  """Times `state, aux = step(state, jnp.int32(i))`, feeding the state back.

  Needed for steps that donate their state (the input buffers are invalid after the call).
  Returns (seconds of the `repeats` timed steps, final state).
  """
  i = start
  for _ in range(warmup):
    state, _ = jax.block_until_ready(step(state, jnp.int32(i)))
    i += 1
  times = []
  for _ in range(repeats):
    index = jnp.int32(i)
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(step(state, index))
    times.append(time.perf_counter() - t0)
    i += 1
  return times, state


def summarize(times: Sequence[float]) -> dict:
  """{'median_ms', 'min_ms', 'repeats'} of times in seconds."""
  if not times:
    raise ValueError("times is empty; accepted: at least one measured time")
  return {
    "median_ms": round(1e3 * statistics.median(times), 3),
    "min_ms": round(1e3 * min(times), 3),
    "repeats": len(times),
  }


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far (MB; Linux reports ru_maxrss in KiB)."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def device_memory() -> dict | None:
  """The first device's allocator stats (MB) where the backend has them (GPU/TPU), else None."""
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
  return {k.replace("bytes", "mb"): round(stats[k] / 1e6, 1) for k in keys if k in stats}


def check_positive(parser, args, names: Sequence[str]) -> None:
  """`parser.error` (exit 2) naming the flag unless every `args.<name>` is an int >= 1."""
  for name in names:
    value = getattr(args, name)
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or any(v < 1 for v in values):
      parser.error(f"--{name}={value} is invalid; accepted: integers >= 1")


def int_list(text: str) -> list[int]:
  """argparse type: '2,5,10' -> [2, 5, 10]."""
  try:
    return [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"{text!r} is invalid; accepted: comma-separated integers") from None


def stack_map(mode: str) -> Callable:
  """`fn, xs -> stacked outputs` over the leading (expert) axis of `xs`.

  'vmap', 'map' (rolled `lax.map`) and 'unrolled' (unrolled scan) are the pipeline's own
  implementations (`moe_adapt.methods.meta_dmoe._stack_map`); 'loop' is a Python loop
  over the expert slices, stacked (one jit, N copies of the body).
  """
  if mode not in STACK_MODES:
    raise ValueError(f"mode={mode!r} is unknown; accepted: {', '.join(STACK_MODES)}")
  if mode == "loop":
    return _loop_map
  # _stack_map only reads setup.config.experts.stack_map.
  fake_setup = types.SimpleNamespace(
    config=types.SimpleNamespace(experts=types.SimpleNamespace(stack_map=mode))
  )
  return meta_dmoe._stack_map(fake_setup)


def _loop_map(fn: Callable, xs: PyTree) -> PyTree:
  n = jax.tree.leaves(xs)[0].shape[0]
  outs = [fn(jax.tree.map(lambda a, i=i: a[i], xs)) for i in range(n)]
  return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)
