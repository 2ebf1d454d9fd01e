"""`moe-adapt-merge`: merge PEFT LoRA adapters of one base model and analyse their signs.

  F=tests/models/fixtures
  moe-adapt-merge --base=$F/hf/bert --adapters=$F/peft/lora_a,$F/peft/lora_b,$F/peft/lora_c \\
    --method=ties --density=0.2 --out=runs/merged

reads the base checkpoint (safetensors + config.json, `models.checkpoints`) and the
adapters (`models.peft_lora`), prints the pairwise FSD matrix of their ΔW = s·B·A, merges
them with `core.merging` ('average', 'ties', or 'factor_average' of A and B), and writes into
OUT: `adapter/` (a PEFT LoRA adapter, loadable by `peft.PeftModel.from_pretrained`),
optionally `model/` (the merged full model in the base's naming, `--merged_model`), and
`merge.json` (the options, the FSD matrix, the written rank and its truncation error).
Seconds on the fixtures; see docs/byom.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from moe_adapt.models import peft_lora


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="moe-adapt-merge",
    description="Merge PEFT LoRA adapters of one base model; print their pairwise FSD.",
  )
  parser.add_argument("--base", required=True, help="base checkpoint directory (config.json)")
  parser.add_argument("--adapters", required=True, help="comma-separated PEFT adapter dirs")
  parser.add_argument("--method", default="ties", choices=peft_lora.METHODS)
  parser.add_argument("--density", type=float, default=0.2, help="TIES trim density in [0, 1]")
  parser.add_argument("--scale", type=float, default=1.0, help="TIES λ")
  parser.add_argument("--weights", default=None, help="comma-separated weights (average)")
  parser.add_argument(
    "--rank", type=int, default=None, help="rank r' of the written adapter (default: Σ ranks)"
  )
  parser.add_argument("--out", default=None, help="output directory (must be new or empty)")
  parser.add_argument(
    "--merged_model", action="store_true", help="also write base + ΔW as a full model"
  )
  return parser


def _split(value: str, what: str) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  if not items:
    raise ValueError(f"--{what}={value!r} is empty; accepted: a comma-separated list")
  return items


def format_matrix(names: Sequence[str], matrix: np.ndarray) -> str:
  """The K × K matrix as an aligned text table with row and column names."""
  width = max(6, *(len(n) for n in names))
  lines = [" " * width + "".join(f" {n:>{width}}" for n in names)]
  for name, row in zip(names, matrix):
    lines.append(f"{name:<{width}}" + "".join(f" {v:>{width}.4f}" for v in row))
  return "\n".join(lines)


def run(argv: Sequence[str]) -> dict:
  """Parses `argv`, merges, writes, prints; returns the record written to merge.json."""
  args = _parser().parse_args(argv)
  adapter_dirs = _split(args.adapters, "adapters")
  weights = None if args.weights is None else [float(w) for w in _split(args.weights, "weights")]
  out = None if args.out is None else pathlib.Path(args.out)
  if out is not None and out.exists() and any(out.iterdir()):
    raise ValueError(f"--out={out} is not empty; give a new directory (nothing is overwritten)")
  if args.method == "ties" and not 0 <= args.density <= 1:
    raise ValueError(f"--density={args.density} must be in [0, 1]")

  layers = peft_lora.linear_layers(args.base)
  adapters = [peft_lora.read_adapter(d) for d in adapter_dirs]
  names = [a.name for a in adapters]
  if len(set(names)) != len(names):
    names = [f"{i}:{n}" for i, n in enumerate(names)]
  fsd, pairwise = peft_lora.sign_analysis(adapters, layers)
  print(f"pairwise FSD (share of ΔW entries with opposite signs) of {len(adapters)} adapters:")
  print(format_matrix(names, pairwise))
  print(f"FSD of all {len(adapters)}: {fsd:.4f}")
  record = {
    "base": str(args.base),
    "adapters": adapter_dirs,
    "method": args.method,
    "density": args.density if args.method == "ties" else None,
    "scale": args.scale if args.method == "ties" else None,
    "weights": weights,
    "fsd": fsd,
    "pairwise_fsd": pairwise.tolist(),
  }
  if out is None:
    return record
  merged = peft_lora.merge(
    adapters, layers, method=args.method, weights=weights, density=args.density, scale=args.scale
  )
  written = peft_lora.write_adapter(
    merged,
    out / "adapter",
    rank=args.rank,
    default_rank=sum(a.rank for a in adapters),
    base_model_name_or_path=str(args.base),
  )
  record |= {"rank": written["rank"], "relative_error": written["relative_error"]}
  print(
    f"wrote {out / 'adapter'}: PEFT LoRA, r={written['rank']}, relative Frobenius error of "
    f"the factorisation {written['relative_error']:.2e}"
  )
  if args.merged_model:
    peft_lora.write_merged_model(args.base, merged.deltas, out / "model")
    print(f"wrote {out / 'model'}: the merged full model (base + ΔW)")
  (out / "merge.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
  return record


def entry_point() -> None:
  """Console script: errors are printed as one line, exit status 2."""
  try:
    run(sys.argv[1:])
  except (ValueError, FileNotFoundError) as e:
    print(f"moe-adapt-merge: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  entry_point()
