r"""PEFT's and mergekit's merges on the tensors of `benchmarks/merge_refs.py` (reference side).

Runs in a separate virtualenv with torch, peft and mergekit (the project does not depend on
them); one process per (tool, size, K), as `merge_refs.py` starts it:

  REF_PYTHON -m pip install torch==2.13.0 && REF_PYTHON -m pip install peft mergekit
  REF_PYTHON benchmarks/merge_refs_torch.py --tool=peft --data=DIR/lora.safetensors --k=4

Each op merges tensor by tensor, as both libraries do: PEFT's `merge_utils.ties`,
`task_arithmetic` (weights 1/K: the average) and `dare_linear`; mergekit's
`GeneralizedTaskArithmeticMerge.merge_group` for `ties`, `task_arithmetic` (weights 1/K)
and `dare_linear`, with a zero base (the members are task vectors). Density 0.2 for TIES,
0.5 for DARE; torch at 2 threads. Prints one JSON object: seconds per op (median of
`--repeats` after `--warmup` calls; torch has no compile step) in wall and CPU time,
resident memory after loading and at the end (peak, `ru_maxrss`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from safetensors import safe_open


def rss_mb() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1)


def peft_ops(k: int) -> dict:
  from peft.utils import merge_utils

  ones, mean = torch.ones(k), torch.full((k,), 1.0 / k)
  return {
    "ties": lambda ts: merge_utils.ties(ts, ones, density=0.2),
    "average": lambda ts: merge_utils.task_arithmetic(ts, mean),
    "dare": lambda ts: merge_utils.dare_linear(ts, ones, density=0.5),
  }


def mergekit_ops(k: int) -> dict:
  from mergekit.merge_methods import registry
  from mergekit.merge_methods.base import TensorGroup

  def run(name: str, weight: float, density: float):
    method = registry.get(name)

    def merge(ts):
      group = TensorGroup.from_tensors([torch.zeros_like(ts[0]), *ts], base_index=0)
      params = {
        "weight": {i + 1: weight for i in range(k)},
        "density": {i + 1: density for i in range(k)},
        "int8_mask": False,
        "lambda": 1.0,
        "normalize": name == "ties",
        "rescale": name == "dare_linear",
      }
      return method.merge_group(group, **params)

    return merge

  return {
    "ties": run("ties", 1.0, 0.2),
    "average": run("task_arithmetic", 1.0 / k, 1.0),
    "dare": run("dare_linear", 1.0, 0.5),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tool", choices=("peft", "mergekit"), required=True)
  parser.add_argument("--data", required=True, help="safetensors file of members m{i}/{name}")
  parser.add_argument("--k", type=int, required=True)
  parser.add_argument("--ops", default="ties,average,dare")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
  parser.add_argument("--save_ties", default="", help="write the TIES merge here (safetensors)")
  args = parser.parse_args()
  torch.set_num_threads(2)
  t0 = time.perf_counter()
  with safe_open(args.data, framework="pt") as f:
    names = sorted({n.split("/", 1)[1] for n in f.keys()})
    members = {n: [f.get_tensor(f"m{i}/{n}") for i in range(args.k)] for n in names}
  load_s = time.perf_counter() - t0
  rss_loaded = rss_mb()
  ops = (peft_ops if args.tool == "peft" else mergekit_ops)(args.k)
  rows = {}
  for op in args.ops.split(","):
    times, cpu = [], []
    for _ in range(args.warmup + args.repeats):
      t, c = time.perf_counter(), time.process_time()
      merged = {n: ops[op](ts) for n, ts in members.items()}
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
      del merged
    rows[op] = {
      "median_s": round(statistics.median(times[args.warmup :]), 4),
      "cpu_s": round(statistics.median(cpu[args.warmup :]), 4),
      "first_s": round(times[0], 4),
    }
  if args.save_ties:
    from safetensors.torch import save_file

    save_file({n: ops["ties"](ts).contiguous() for n, ts in members.items()}, args.save_ties)
  print(
    json.dumps(
      {
        "tool": args.tool,
        "k": args.k,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": rss_mb(),
        "ops": rows,
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  main()
