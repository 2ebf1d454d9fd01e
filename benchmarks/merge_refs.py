r"""`core.merging` next to PEFT and mergekit: time, compile time and peak memory, same tensors.

Two member sets, written once to safetensors (8 members each; the first K are used):

- `lora`: LoRA rank 8 on BERT-base's query and value projections, 12 layers (A [8, 768],
  B [768, 8]): 294,912 parameters per member;
- `bert_base`: every BERT-base parameter (`merge_scale.bert_base_shapes`): 109.5 M.

Entries N(0, 0.02²) float32, treated as task vectors. For each set and K in `--members`
(PEFT and mergekit: `--ref_members`; on `bert_base` `--big_ref_members`, default K = 2, 4,
as mergekit needs minutes per BERT-base TIES here), one fresh process per tool loads the
first K members and times three ops tensor by tensor: TIES (density 0.2), the uniform
average, DARE + task arithmetic (density 0.5):

- `moe_adapt`: `ties_merge(density=0.2, keep_rule='floor', zero_sign='positive')` (PEFT's
  settings), `weighted_average`, `dare`, each called eagerly on the whole tree (they jit
  internally); compile = first call − median call; JAX on the CPU's 2 cores;
- `peft` and `mergekit`: `benchmarks/merge_refs_torch.py` in `--ref_python`'s virtualenv
  (torch at 2 threads).

Each row reports seconds per op (median of `--repeats` after a warm-up; on `bert_base` one
call, torch's without warm-up) in wall and CPU time, the compile time (ours only; torch
compiles nothing), the process's peak resident memory (`ru_maxrss`, which includes the K
members it loaded) and the memory after loading. On `lora`, K = 4, the TIES outputs are also
compared: ours with PEFT's settings against PEFT, and with mergekit's
(keep_rule='floor_min1') against mergekit (max |difference|).

  python benchmarks/merge_refs.py --ref_python=VENV/bin/python --data_dir=/tmp/merge_refs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import common
import jax
import numpy as np
from merge_scale import bert_base_shapes

from moe_adapt.core import merging
from moe_adapt.models import merge_files

MAX_K = 8
OPS = ("ties", "average", "dare")


def lora_shapes(layers: int = 12, hidden: int = 768, rank: int = 8) -> dict:
  shapes = {}
  for i in range(layers):
    for proj in ("query", "value"):
      shapes[f"layer_{i}/{proj}/lora_A"] = (rank, hidden)
      shapes[f"layer_{i}/{proj}/lora_B"] = (hidden, rank)
  return shapes


SIZES = {"lora": lora_shapes, "bert_base": bert_base_shapes}


def write_set(path: str, shapes: dict) -> None:
  """MAX_K members `m{i}/{name}` into one safetensors file, a tensor at a time."""
  names = [f"m{i}/{n}" for i in range(MAX_K) for n in shapes]
  header, offset = {}, 0
  for name in names:
    shape = shapes[name.split("/", 1)[1]]
    size = int(np.prod(shape)) * 4
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  rng = np.random.default_rng(0)
  with open(path + ".part", "wb") as f:
    merge_files._write_header(f, names, header)
    for name in names:
      x = 0.02 * rng.standard_normal(header[name]["shape"], dtype=np.float32)
      f.write(x.reshape(-1).view(np.uint8).data)
  os.replace(path + ".part", path)


def load_members(path: str, k: int) -> dict:
  header, start = merge_files.read_header(path)
  names = sorted({n.split("/", 1)[1] for n in header})
  with open(path, "rb") as f:
    return {
      n: jax.numpy.asarray(
        np.stack([merge_files.read_tensor(f, header[f"m{i}/{n}"], start) for i in range(k)])
      )
      for n in names
    }


def ours(path: str, k: int, repeats: int, compare: str) -> dict:
  t0 = time.perf_counter()
  stacked = load_members(path, k)
  load_s = time.perf_counter() - t0
  rss_loaded = common.peak_rss_mb()
  key = jax.random.key(0)
  ops = {
    "ties": lambda s: merging.ties_merge(s, density=0.2, keep_rule="floor", zero_sign="positive"),
    "average": merging.weighted_average,
    "dare": lambda s: merging.dare(key, s, density=0.5),
  }
  rows = {}
  for op, fn in ops.items():
    times, cpu = [], []
    for _ in range(repeats + 1):
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(stacked))
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
    median = statistics.median(times[1:])
    rows[op] = {
      "median_s": round(median, 4),
      "cpu_s": round(statistics.median(cpu[1:]), 4),
      "first_s": round(times[0], 4),
      "compile_s": round(times[0] - median, 3),
      "compile_cpu_s": round(cpu[0] - statistics.median(cpu[1:]), 3),
    }
  out = {
    "tool": "moe_adapt",
    "k": k,
    "load_s": round(load_s, 2),
    "rss_after_load_mb": rss_loaded,
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1),
    "ops": rows,
  }
  for tool, rule in (("peft", "floor"), ("mergekit", "floor_min1")) if compare else ():
    ref_path = f"{compare}.{tool}"
    ref_header, ref_start = merge_files.read_header(ref_path)
    mine = merging.ties_merge(stacked, density=0.2, keep_rule=rule, zero_sign="positive")
    with open(ref_path, "rb") as f:
      diff = max(
        float(np.max(np.abs(np.asarray(mine[n]) - merge_files.read_tensor(f, e, ref_start))))
        for n, e in ref_header.items()
      )
    out[f"ties_max_abs_diff_vs_{tool}"] = diff
  return out


def run_child(cmd: list[str], timeout: int) -> dict:
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    return {"error": f"exit status {done.returncode}: {done.stderr[-500:]}"}
  return json.loads(lines[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ref_python", default="", help="python of the torch/peft/mergekit venv")
  parser.add_argument("--data_dir", default="", help="where the member sets are written")
  parser.add_argument("--sizes", default="lora,bert_base")
  parser.add_argument("--members", type=common.int_list, default=[2, 4, 8])
  parser.add_argument("--tools", default="moe_adapt,peft,mergekit")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--ref_members", type=common.int_list, default=[2, 4, 8], help="K values for PEFT/mergekit"
  )
  parser.add_argument(
    "--big_ref_members", type=common.int_list, default=[2, 4], help="the same on bert_base"
  )
  parser.add_argument("--timeout_s", type=int, default=900, help="per child process")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--compare", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(ours(args.child, args.k, args.repeats, args.compare)), flush=True)
    return
  tools = args.tools.split(",")
  if not args.data_dir:
    parser.error("--data_dir is required")
  if {"peft", "mergekit"} & set(tools) and not args.ref_python:
    parser.error("--ref_python is required for the peft and mergekit rows")
  os.makedirs(args.data_dir, exist_ok=True)
  t_start = time.perf_counter()
  rows = []
  for size in args.sizes.split(","):
    path = os.path.join(args.data_dir, f"{size}.safetensors")
    if not os.path.exists(path):
      write_set(path, SIZES[size]())
    repeats = args.repeats if size == "lora" else 1
    for k in args.members:
      compare = os.path.join(args.data_dir, "ties_out") if size == "lora" and k == 4 else ""
      ref_ks = args.ref_members if size == "lora" else args.big_ref_members
      refs = [t for t in ("peft", "mergekit") if t in tools and k in ref_ks]
      for tool in refs + (["moe_adapt"] if "moe_adapt" in tools else []):
        if tool == "moe_adapt":
          cmd = [sys.executable, __file__, f"--child={path}", f"--k={k}"]
          cmd += [f"--repeats={repeats}", f"--compare={compare}"]
        else:
          script = os.path.join(os.path.dirname(__file__), "merge_refs_torch.py")
          cmd = [args.ref_python, script, f"--tool={tool}", f"--data={path}", f"--k={k}"]
          # bert_base: one timed call, no warm-up (torch compiles nothing; it saves minutes).
          cmd += [f"--repeats={repeats}", f"--warmup={1 if size == 'lora' else 0}"]
          if compare:
            cmd.append(f"--save_ties={compare}.{tool}")
        row = {"size": size, **run_child(cmd, args.timeout_s)}
        row.update(tool=tool, k=k)
        rows.append(row)
        common.log(json.dumps(row))
  common.emit(
    {
      "benchmark": "merge_refs",
      "environment": common.environment(),
      "rows": rows,
      "wall_s": round(time.perf_counter() - t_start, 1),
    }
  )


if __name__ == "__main__":
  main()
