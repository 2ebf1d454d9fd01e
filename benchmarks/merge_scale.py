r"""Compile time and peak host memory of merging a whole BERT-base-sized tree, K = 2, 4, 8.

The members are K task vectors shaped like BERT-base's parameters (word/position/type
embeddings, 12 layers of attention (4 × [768, 768]) and FFN ([768, 3072], [3072, 768]),
biases, layer norms, pooler: 109.5 M float32 parameters, 438 MB per member), N(0, 0.02²).
Each K runs in a fresh process under `/usr/bin/time -v`, which reports the process's peak
resident memory ("Maximum resident set size", reported here in MB = 1e6 bytes); the child
calls `ties_merge` (density 0.2) twice, eagerly, and reports the first call's extra time over
the second as its compile time (wall and CPU seconds).

Run (prints one JSON object on stdout, logs on stderr; ~3 min on 2 CPU cores):

  python benchmarks/merge_scale.py                      # K = 2, 4, 8
  python benchmarks/merge_scale.py --members=2 --op=weighted_average
  python benchmarks/merge_scale.py --lowered_only   # size of the lowered program, seconds
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

import common
import jax
import jax.numpy as jnp

from moe_adapt.core import merging

OPS = {
  "ties_merge": lambda s: merging.ties_merge(s, density=0.2),
  "weighted_average": lambda s: merging.weighted_average(s),
}


def bert_base_shapes(layers: int = 12, hidden: int = 768, ffn: int = 3072) -> dict:
  """{name: shape} of BERT-base's parameters (vocabulary 30522, 512 positions)."""
  shapes = {
    "embeddings/word": (30522, hidden),
    "embeddings/position": (512, hidden),
    "embeddings/token_type": (2, hidden),
    "embeddings/norm/scale": (hidden,),
    "embeddings/norm/bias": (hidden,),
    "pooler/kernel": (hidden, hidden),
    "pooler/bias": (hidden,),
  }
  for i in range(layers):
    for name in ("query", "key", "value", "out"):
      shapes[f"layer_{i}/attention/{name}/kernel"] = (hidden, hidden)
      shapes[f"layer_{i}/attention/{name}/bias"] = (hidden,)
    shapes[f"layer_{i}/ffn/in/kernel"] = (hidden, ffn)
    shapes[f"layer_{i}/ffn/in/bias"] = (ffn,)
    shapes[f"layer_{i}/ffn/out/kernel"] = (ffn, hidden)
    shapes[f"layer_{i}/ffn/out/bias"] = (hidden,)
    for norm in ("attention_norm", "ffn_norm"):
      shapes[f"layer_{i}/{norm}/scale"] = (hidden,)
      shapes[f"layer_{i}/{norm}/bias"] = (hidden,)
  return shapes


def child(k: int, op: str) -> dict:
  """Builds the K members, compiles and runs `op` once; the row of this K."""
  shapes = bert_base_shapes()
  key = jax.random.key(k)
  stacked = {}
  for i, (name, shape) in enumerate(shapes.items()):
    stacked[name] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), (k, *shape), jnp.float32)
  jax.block_until_ready(stacked)
  input_bytes = sum(x.nbytes for x in stacked.values())
  rss_inputs = common.peak_rss_mb()
  # Called eagerly, as a user would: the functions jit internally (ties_merge in buckets of
  # leaves); the first call's extra time over the second is the compilation.
  t0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(OPS[op](stacked))
  first_s, first_cpu = time.perf_counter() - t0, time.process_time() - c0
  rss_first = common.peak_rss_mb()
  t0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(OPS[op](stacked))
  run_s, run_cpu = time.perf_counter() - t0, time.process_time() - c0
  return {
    "k": k,
    "op": op,
    "member_params": sum(int(jnp.prod(jnp.array(s))) for s in shapes.values()),
    "input_mb": round(input_bytes / 1e6, 1),
    "first_call_s": round(first_s, 2),
    "run_s": round(run_s, 2),
    "compile_s": round(first_s - run_s, 2),
    # CPU seconds, which other processes on a shared machine inflate less than wall time.
    "compile_cpu_s": round(first_cpu - run_cpu, 2),
    "run_cpu_s": round(run_cpu, 2),
    "peak_rss_after_inputs_mb": rss_inputs,
    "peak_rss_after_first_call_mb": rss_first,
  }


def lowered_size_mb() -> float:
  """Size of the StableHLO text of `ties_merge` on 4 leaves [4, 768, 3072], lowered without
  data: a constant as large as the input would show here (it was 302 MB)."""
  tree = [jax.ShapeDtypeStruct((4, 768, 3072), jnp.float32) for _ in range(4)]
  text = jax.jit(OPS["ties_merge"]).lower(tree).as_text()
  return round(len(text) / 1e6, 3)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--members", type=common.int_list, default=[2, 4, 8], help="K values")
  parser.add_argument("--op", default="ties_merge", choices=sorted(OPS))
  parser.add_argument("--lowered_only", action="store_true", help="only `lowered_size_mb`")
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.op)), flush=True)
    return
  lowered = lowered_size_mb()
  if args.lowered_only:
    common.emit({"benchmark": "merge_scale", "lowered_stablehlo_mb": lowered})
    return
  rows = []
  t_start = time.perf_counter()
  for k in args.members:
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, f"--child={k}", f"--op={args.op}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      common.log(done.stderr[-2000:])
      rows.append({"k": k, "op": args.op, "error": f"exit status {done.returncode}"})
      continue
    row = json.loads(done.stdout.strip().splitlines()[-1])
    peak_kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    row["peak_rss_mb"] = round(int(peak_kib.group(1)) * 1024 / 1e6, 1) if peak_kib else None
    row["peak_over_input"] = round(row["peak_rss_mb"] / row["input_mb"], 2)
    rows.append(row)
    common.log(json.dumps(row))
  common.emit(
    {
      "benchmark": "merge_scale",
      "environment": common.environment(),
      "lowered_stablehlo_mb": lowered,
      "rows": rows,
      "wall_s": round(time.perf_counter() - t_start, 1),
    }
  )


if __name__ == "__main__":
  main()
