r"""Load time and peak memory of a BERT-base-sized safetensors checkpoint, streamed into Flax.

A BERT-base checkpoint (vocab 30522, hidden 768, 12 layers, 12 heads, FFN 3072, 512
positions, pooler: 109,482,240 float32 parameters, 438 MB) with random weights is written
tensor by tensor into a temporary directory (deleted at the end), in transformers' naming
with its `config.json`. Each loader then runs in a fresh Python process (so that peak RSS
is its own), `--repeats` times:

- `stream`: `models.checkpoints.load_checkpoint` — header check, then one tensor at a time
  (`safetensors.safe_open`), converted and placed into the params tree;
- `load_file`: the whole-file way, `safetensors.numpy.load_file` then
  `bert.load_hf_weights`, which holds the NumPy copy and the converted one at once.

Reported per loader (medians over repeats): `load_s` (wall time of the load, every leaf
ready), `rss_before_mb` (peak RSS after importing jax and moe_adapt, before loading),
`peak_rss_mb` (peak RSS at the end: `ru_maxrss`), `added_mb` = peak − before, and
`added_per_model` = added_mb / checkpoint MB (≈ 1: one copy; ≈ 2: two copies).

Run (one JSON object on stdout, logs on stderr; ~1–2 min on 2 CPU cores, 0.9 GB of disk in
the temp dir):

  nice -n 5 python benchmarks/load_checkpoint.py
  python benchmarks/load_checkpoint.py --repeats=1 --tmp=/some/disk   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

BERT_BASE = {
  "model_type": "bert",
  "architectures": ["BertModel"],
  "vocab_size": 30522,
  "hidden_size": 768,
  "num_hidden_layers": 12,
  "num_attention_heads": 12,
  "intermediate_size": 3072,
  "max_position_embeddings": 512,
  "type_vocab_size": 2,
  "layer_norm_eps": 1e-12,
  "hidden_act": "gelu",
  "pad_token_id": 0,
}
LOADERS = ("stream", "load_file")


def log(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def shapes(config: dict) -> dict[str, tuple[int, ...]]:
  """transformers BertModel tensor names and shapes for `config`."""
  d, inner = config["hidden_size"], config["intermediate_size"]
  out = {
    "embeddings.word_embeddings.weight": (config["vocab_size"], d),
    "embeddings.position_embeddings.weight": (config["max_position_embeddings"], d),
    "embeddings.token_type_embeddings.weight": (config["type_vocab_size"], d),
    "embeddings.LayerNorm.weight": (d,),
    "embeddings.LayerNorm.bias": (d,),
    "pooler.dense.weight": (d, d),
    "pooler.dense.bias": (d,),
  }
  for n in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{n}"
    for name, (rows, cols) in {
      "attention.self.query": (d, d),
      "attention.self.key": (d, d),
      "attention.self.value": (d, d),
      "attention.output.dense": (d, d),
      "intermediate.dense": (inner, d),
      "output.dense": (d, inner),
    }.items():
      out[f"{p}.{name}.weight"] = (rows, cols)
      out[f"{p}.{name}.bias"] = (rows,)
    for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
      out[f"{p}.{norm}.weight"] = (d,)
      out[f"{p}.{norm}.bias"] = (d,)
  return out


def write_checkpoint(directory: pathlib.Path, config: dict, seed: int = 0) -> int:
  """Writes config.json and model.safetensors tensor by tensor; returns the data bytes.

  The safetensors layout (8-byte little-endian header size, JSON header with dtype, shape
  and data offsets per tensor, then the raw little-endian data) is written directly, so no
  more than one random tensor is ever in memory.
  """
  tensors = shapes(config)
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape in tensors.items():
    size = 4 * int(np.prod(shape))
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  rng = np.random.default_rng(seed)
  with open(directory / "model.safetensors", "wb") as f:
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for shape in tensors.values():
      f.write((0.02 * rng.standard_normal(shape, dtype=np.float32)).astype("<f4").tobytes())
  (directory / "config.json").write_text(json.dumps(config, indent=2))
  return offset


def child(loader: str, directory: str) -> None:
  """Loads once in this fresh process and prints one JSON line."""
  import jax
  import safetensors.numpy

  from moe_adapt.models import bert, checkpoints

  def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

  before = peak_mb()
  start = time.perf_counter()
  if loader == "stream":
    params = checkpoints.load_checkpoint(directory).params
  else:
    config = bert.BertConfig.from_json(pathlib.Path(directory) / "config.json")
    state = safetensors.numpy.load_file(str(pathlib.Path(directory) / "model.safetensors"))
    params = bert.load_hf_weights(config, state)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  count = sum(x.size for x in jax.tree.leaves(params))
  print(
    json.dumps(
      {"load_s": seconds, "rss_before_mb": before, "peak_rss_mb": peak_mb(), "params": count}
    )
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--loaders", default=",".join(LOADERS))
  parser.add_argument("--tmp", default=None, help="where the temporary checkpoint is written")
  parser.add_argument("--child", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(*args.child)
    return
  loaders = [name for name in args.loaders.split(",") if name]
  unknown = sorted(set(loaders) - set(LOADERS))
  if unknown:
    raise SystemExit(f"--loaders: unknown {unknown}; accepted: {', '.join(LOADERS)}")

  repo = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu"}
  result = {"benchmark": "load_checkpoint", "config": BERT_BASE, "loaders": {}}
  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    start = time.perf_counter()
    data_bytes = write_checkpoint(pathlib.Path(tmp), BERT_BASE)
    log(f"wrote {data_bytes / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s to {tmp}")
    model_mb = data_bytes / 2**20
    result["checkpoint_mb"] = round(model_mb, 1)
    for loader in loaders:
      runs = []
      for r in range(args.repeats):
        out = subprocess.run(
          [sys.executable, __file__, "--child", loader, tmp],
          env=env,
          capture_output=True,
          text=True,
          check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        log(f"{loader} run {r}: {runs[-1]}")
      median = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
      added = median["peak_rss_mb"] - median["rss_before_mb"]
      result["loaders"][loader] = {
        "load_s": round(median["load_s"], 3),
        "rss_before_mb": round(median["rss_before_mb"], 1),
        "peak_rss_mb": round(median["peak_rss_mb"], 1),
        "added_mb": round(added, 1),
        "added_per_model": round(added / model_mb, 2),
        "params": int(median["params"]),
        "runs": runs,
      }
  result["load_average_1m"] = round(os.getloadavg()[0], 2)
  result["cpu_count"] = os.cpu_count()
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
