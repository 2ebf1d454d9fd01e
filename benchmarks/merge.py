r"""Bandwidth of `core.merging` on K stacked adapters, against a plain memory copy.

The members are adapter sets of realistic sizes, built as the library stores them (one pytree,
every leaf [K, ...]): per layer a Pfeiffer bottleneck adapter {down: {kernel [H, r], bias
[r]}, up: {kernel [r, H], bias [H]}} with r = 64 on

- `minilm`: MiniLM's 6 layers × hidden 384 (297,600 params per member, 1.19 MB in float32),
- `bert_base`: BERT-base's 12 layers × hidden 768 (1,189,632 params, 4.76 MB).

For each size and K (default 2, 4, 8, 16, 32), each op is jitted, AOT-compiled (timed apart)
and called `--repeats` times after a warm-up:

- `weighted_average` (uniform weights given), `sign_disagreement`,
  `pairwise_sign_disagreement`, `ties_merge` (density 0.2, the TIES paper's top-20 %),
  each on two layouts of the same K members (`--layouts`): `tree`, the pytree of [K, ...]
  leaves, and `flat`, the one [K, P] buffer of `merging.ravel_stacked` (raveled once,
  outside the timing). On `flat`, `ties_merge` trims each member's whole vector, as the
  TIES reference code does, instead of each leaf;
- `copy_jax`: a jitted `x * s` (s a traced 1.0, so XLA cannot elide it) of one float32
  buffer of K × member bytes, its input donated so that the output reuses the buffer (no
  fresh allocation per call); `copy_numpy`: `np.copyto` into a preallocated buffer.

Bandwidth = bytes read (K × member bytes) / median time, in GB/s (1e9 bytes). A copy also
writes as many bytes as it reads, a merge only one member (or a scalar): the ratios
`vs_copy` = op GB/s / copy_jax GB/s (the issue's yardstick: target ≥ 0.5) and
`vs_numpy_copy` = op GB/s / copy_numpy GB/s.

Run (prints one JSON object on stdout, logs on stderr):

  python benchmarks/merge.py                                   # full: ~5 min on 2 CPU cores
  python benchmarks/merge.py --sizes=minilm --members=2,8,32 --repeats=5   # quick
"""

from __future__ import annotations

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.core import merging

# name -> (layers, hidden, bottleneck)
SIZES = {"minilm": (6, 384, 64), "bert_base": (12, 768, 64)}
OPS = ("weighted_average", "sign_disagreement", "pairwise_sign_disagreement", "ties_merge")
LAYOUTS = ("tree", "flat")
TIES_DENSITY = 0.2


def adapter_set(key: jax.Array, k: int, layers: int, hidden: int, bottleneck: int) -> dict:
  """K stacked adapter sets: {'layer_i': {'down': {kernel, bias}, 'up': {...}}}, [K, ...]."""
  shapes = {"down": ((hidden, bottleneck), (bottleneck,)), "up": ((bottleneck, hidden), (hidden,))}
  tree = {}
  for i in range(layers):
    layer = {}
    for name, (kernel, bias) in shapes.items():
      key, k1, k2 = jax.random.split(key, 3)
      layer[name] = {
        "kernel": 0.02 * jax.random.normal(k1, (k, *kernel), jnp.float32),
        "bias": 0.02 * jax.random.normal(k2, (k, *bias), jnp.float32),
      }
    tree[f"layer_{i}"] = layer
  return tree


def op_fns() -> dict:
  """The jitted functions timed, each `fn(stacked, weights) -> output`."""
  return {
    "weighted_average": jax.jit(lambda s, w: merging.weighted_average(s, w)),
    "sign_disagreement": jax.jit(lambda s, w: merging.sign_disagreement(s)),
    "pairwise_sign_disagreement": jax.jit(lambda s, w: merging.pairwise_sign_disagreement(s)),
    "ties_merge": jax.jit(lambda s, w: merging.ties_merge(s, density=TIES_DENSITY)),
  }


def gbps(num_bytes: int, seconds_ms: float) -> float:
  return round(num_bytes / (seconds_ms * 1e-3) / 1e9, 3)


def bench_copies(num_bytes: int, repeats: int) -> dict:
  """Median times of copying a float32 buffer of `num_bytes` with XLA and with NumPy.

  Both read and write `num_bytes` into memory that is already mapped: NumPy copies into a
  preallocated buffer; the XLA program donates its input, so its output reuses that buffer
  (a fresh output buffer per call would add the page faults of a new allocation, which made
  the copy 3–10× slower than NumPy's here and no merge pays them: merges write one member).
  """
  n = num_bytes // 4
  buf = jnp.arange(n, dtype=jnp.float32)
  scale = jnp.float32(1.0)
  jitted = jax.jit(lambda a, s: a * s, donate_argnums=0)
  compiled, timing = common.lower_and_compile(jitted, buf, scale)
  buf = jax.block_until_ready(compiled(buf, scale))  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    buf = jax.block_until_ready(compiled(buf, scale))
    times.append(time.perf_counter() - t0)
  jax_row = {**common.summarize(times), **timing}
  src = np.arange(n, dtype=np.float32)
  dst = np.empty_like(src)
  np_times, _ = common.time_calls(lambda: np.copyto(dst, src), repeats=repeats)
  return {"copy_jax": jax_row, "copy_numpy": common.summarize(np_times)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=",".join(SIZES), help=f"subset of {', '.join(SIZES)}")
  parser.add_argument(
    "--members", type=common.int_list, default=[2, 4, 8, 16, 32], help="K values, e.g. 2,8,32"
  )
  parser.add_argument("--ops", default=",".join(OPS), help=f"subset of {', '.join(OPS)}")
  parser.add_argument(
    "--layouts", default=",".join(LAYOUTS), help="tree (pytree of [K, ...] leaves), flat ([K, P])"
  )
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per row")
  parser.add_argument(
    "--row_budget_s", type=float, default=20.0, help="stop a row's timing after this (>= 3 calls)"
  )
  args = parser.parse_args()
  common.check_positive(parser, args, ("members", "repeats"))
  sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
  ops = [o.strip() for o in args.ops.split(",") if o.strip()]
  layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
  if not sizes or set(sizes) - set(SIZES):
    parser.error(f"--sizes={args.sizes} is invalid; accepted: {', '.join(SIZES)}")
  if not ops or set(ops) - set(OPS):
    parser.error(f"--ops={args.ops} is invalid; accepted: {', '.join(OPS)}")
  if not layouts or set(layouts) - set(LAYOUTS):
    parser.error(f"--layouts={args.layouts} is invalid; accepted: {', '.join(LAYOUTS)}")

  t_start = time.perf_counter()
  fns = op_fns()
  rows, copies = [], []
  for size in sizes:
    layers, hidden, bottleneck = SIZES[size]
    for k in args.members:
      stacked = adapter_set(jax.random.key(k), k, layers, hidden, bottleneck)
      inputs = {"tree": stacked, "flat": merging.ravel_stacked(stacked)[0]}
      leaves = jax.tree.leaves(stacked)
      member_params = sum(leaf[0].size for leaf in leaves)
      num_bytes = sum(leaf.nbytes for leaf in leaves)  # K × member bytes
      weights = jnp.full((k,), 1.0 / k, jnp.float32)
      copy = bench_copies(num_bytes, args.repeats)
      copy_gbps = gbps(num_bytes, copy["copy_jax"]["median_ms"])
      copies.append(
        {
          "size": size,
          "k": k,
          "bytes": num_bytes,
          "copy_jax_ms": copy["copy_jax"]["median_ms"],
          "copy_jax_gbps": copy_gbps,
          "copy_numpy_ms": copy["copy_numpy"]["median_ms"],
          "copy_numpy_gbps": gbps(num_bytes, copy["copy_numpy"]["median_ms"]),
        }
      )
      common.log(f"{size} K={k}: copy {copy_gbps} GB/s ({num_bytes / 1e6:.1f} MB)")
      for op, layout in [(op, layout) for op in ops for layout in layouts]:
        compiled, timing = common.lower_and_compile(fns[op], inputs[layout], weights)
        times, _ = common.time_calls(
          compiled, inputs[layout], weights, repeats=args.repeats, budget_s=args.row_budget_s
        )
        row = {
          "size": size,
          "k": k,
          "op": op,
          "layout": layout,
          "member_params": member_params,
          "bytes_read": num_bytes,
          **common.summarize(times),
          **timing,
          "temp_mb": (common.memory_analysis(compiled) or {}).get("temp_mb"),
        }
        row["gbps"] = gbps(num_bytes, row["median_ms"])
        row["copy_gbps"] = copy_gbps
        row["vs_copy"] = round(row["gbps"] / copy_gbps, 3)
        row["vs_numpy_copy"] = round(row["gbps"] / copies[-1]["copy_numpy_gbps"], 3)
        rows.append(row)
        common.log(f"{size} K={k} {op} {layout}: {row['median_ms']} ms, {row['gbps']} GB/s")

  common.emit(
    {
      "benchmark": "merge",
      "environment": common.environment(),
      "config": {
        "sizes": {s: dict(zip(("layers", "hidden", "bottleneck"), SIZES[s])) for s in sizes},
        "members": args.members,
        "ops": ops,
        "layouts": layouts,
        "ties_density": TIES_DENSITY,
        "repeats": args.repeats,
      },
      "copies": copies,
      "rows": rows,
      "peak_rss_mb": common.peak_rss_mb(),
      "device_memory": common.device_memory(),
      "wall_s": round(time.perf_counter() - t_start, 1),
    }
  )


if __name__ == "__main__":
  main()
