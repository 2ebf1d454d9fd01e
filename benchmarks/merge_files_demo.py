r"""Out-of-core merge of checkpoints whose total size exceeds the process's memory limit.

Writes K member files of `--tensors` float32 tensors [2048, 2048] (16.8 MB each) into a
scratch folder, then, in a child process whose address space is capped with
`setrlimit(RLIMIT_AS)` (what `ulimit -v` sets: it bounds all mapped memory, not only the
resident part), runs

1. `models.merge_files.merge_safetensors(..., method='ties', density=0.2)`, tensor by tensor
   from disk to disk: it must succeed, and reports its peak resident memory;
2. the control: reading all members into memory at once, as an in-memory merge must: it
   must fail under the same cap.

Defaults: K = 8 × 40 tensors = 5.4 GB of input under a 3 GB cap (~5 min on 2 CPU cores;
JAX needs ~3 GB of address space to run at all, 1.5 GB is too little).
The scratch files are deleted at the end. Prints one JSON object.

  python benchmarks/merge_files_demo.py
  python benchmarks/merge_files_demo.py --members=4 --tensors=8 --limit_gb=3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import common
import numpy as np

from moe_adapt.models import merge_files

SHAPE = (2048, 2048)


def write_members(folder: str, k: int, tensors: int) -> list[str]:
  rng = np.random.default_rng(0)
  paths = []
  for i in range(k):
    tree = {
      f"layer_{j}.kernel": 0.02 * rng.standard_normal(SHAPE, dtype=np.float32)
      for j in range(tensors)
    }
    path = os.path.join(folder, f"member_{i}.safetensors")
    merge_files.write_safetensors(path, tree)
    paths.append(path)
  return paths


def child(mode: str, paths: list[str], out_dir: str) -> dict:
  if mode == "stream":
    return merge_files.merge_safetensors(paths, out_dir, method="ties", density=0.2)
  try:  # the control: every member in memory at once
    held = []
    for path in paths:
      header, start = merge_files.read_header(path)
      with open(path, "rb") as f:
        held.append({n: merge_files.read_tensor(f, e, start) for n, e in header.items()})
    return {"loaded_all": True}
  except MemoryError:
    return {"loaded_all": False, "error": "MemoryError"}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--members", type=int, default=8)
  parser.add_argument("--tensors", type=int, default=40, help="tensors per member")
  parser.add_argument("--limit_gb", type=float, default=3.0, help="RLIMIT_AS of the child")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--paths", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out_dir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.paths.split(","), args.out_dir)), flush=True)
    return
  common.check_positive(parser, args, ("members", "tensors", "limit_gb"))
  folder = tempfile.mkdtemp(prefix="merge_files_demo_")
  t0 = time.perf_counter()
  try:
    paths = write_members(folder, args.members, args.tensors)
    input_bytes = sum(os.path.getsize(p) for p in paths)
    limit = int(args.limit_gb * 1e9)
    common.log(f"wrote {input_bytes / 1e9:.2f} GB; merging under RLIMIT_AS = {limit / 1e9} GB")

    def capped():
      resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    rows = {}
    for mode in ("stream", "load_all"):
      cmd = [sys.executable, __file__, f"--child={mode}", f"--paths={','.join(paths)}"]
      cmd.append(f"--out_dir={os.path.join(folder, 'merged')}")
      done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=capped, check=False)
      last = done.stdout.strip().splitlines()[-1:] or [""]
      rows[mode] = json.loads(last[0]) if last[0].startswith("{") else {}
      rows[mode]["exit_status"] = done.returncode
      if done.returncode:
        rows[mode]["stderr_tail"] = done.stderr[-300:]
      common.log(f"{mode}: {json.dumps(rows[mode])[:300]}")
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  common.emit(
    {
      "benchmark": "merge_files_demo",
      "environment": common.environment(),
      "members": args.members,
      "tensor_shape": list(SHAPE),
      "tensors": args.tensors,
      "input_gb": round(input_bytes / 1e9, 3),
      "rlimit_as_gb": args.limit_gb,
      "stream": rows["stream"],
      "load_all_control": rows["load_all"],
      "wall_s": round(time.perf_counter() - t0, 1),
    }
  )


if __name__ == "__main__":
  main()
