r"""The converged AdaMix table: every variant of a one-factor-at-a-time sweep, paired.

  python -m launch.adamix_table --sweep_dir=runs/adamix/vader_converged [--out=FILE.md]

Reads every finished run's results.json and config.json under `--sweep_dir` (runs of
`configs/adamix.py:<preset>,converged` and its `get_sweep`) and writes one Markdown table
(default `<sweep_dir>/adamix_table.md`, also printed). A row is a variant at its setting
(consistency weight w, bottleneck r): its accuracy (mean ± std over seeds) and paired
differences over the seeds' common test examples with a 95 % two-stage bootstrap interval
(`launch.significance`): against the single adapter of the same r and seed, and (AdaMix
rows) against AdaMix without consistency (w = 0) at the same r and seed. The columns after
them are the measurements that explain the differences: the selected epoch (dev), the
experts' relative spread (`methods.adamix.expert_spread`), and the consistency KL between
two routed passes, as logged over the first and the last quarter of training.
Random-routing and fixed-expert rows carry accuracies only (their random choices are
averaged: no per-example outcome).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from launch import significance

NO_CONSISTENCY = "adamix_no_consistency"
ROUTING_ROWS = ("adamix_random", "adamix_random_example", "adamix_fixed")


def _setting(config: Mapping[str, Any], variant: str) -> tuple[str, float, int]:
  """(kind, consistency weight, bottleneck) of `variant` in a run with `config`."""
  r = int(config["adapter"]["bottleneck"])
  if variant == "adapter":
    return "adapter", 0.0, r
  if variant == NO_CONSISTENCY:
    return "adamix", 0.0, r
  return variant, float(config["adamix"]["consistency_weight"]), r


def _label(setting: tuple[str, float, int]) -> str:
  kind, w, r = setting
  names = {
    "adapter": "single adapter",
    "adamix": "AdaMix, merged",
    "adamix_random": "AdaMix, random routing: one sub-model per test set",
    "adamix_random_example": "AdaMix, random routing: fresh expert per example",
    "adamix_fixed": "AdaMix, expert 0 everywhere",
  }
  weight = "" if kind == "adapter" else f", w = {w:g}"
  return f"{names.get(kind, kind)} (r = {r}{weight})"


def load_rows(sweep_dir: str | pathlib.Path) -> dict[tuple[str, float, int], dict[int, dict]]:
  """{setting: {seed: {'accuracy', 'outcomes' (or None), 'selection', 'spread', 'kl'}}}."""
  rows: dict[tuple[str, float, int], dict[int, dict]] = {}
  for path in sorted(pathlib.Path(sweep_dir).glob("*/results.json")):
    results = json.loads(path.read_text())
    if results.get("method") != "adamix":
      continue
    config = json.loads((path.parent / "config.json").read_text())
    seed = int(results["seed"])
    per_example = results.get("per_example", {})
    for variant, metrics in results["metrics"].items():
      base = variant if variant not in ROUTING_ROWS else "adamix"
      setting = _setting(config, variant)
      kl = results.get("consistency_kl", {}).get(base, [])
      quarter = max(len(kl) // 4, 1)
      rows.setdefault(setting, {})[seed] = {
        "accuracy": metrics["mean"]["accuracy"],
        "outcomes": per_example.get(variant),
        "selection": results.get("selection", {}).get(base, {}).get("epoch"),
        "spread": results.get("expert_spread", {}).get(base),
        "kl": (float(np.mean(kl[:quarter])), float(np.mean(kl[-quarter:]))) if kl else None,
      }
  return rows


def paired_diff(
  rows: Mapping[tuple, Mapping[int, dict]], variant: tuple, baseline: tuple, *, seed: int = 0
) -> significance.Diff | None:
  """variant − baseline over the seeds both have with per-example outcomes, or None."""
  if baseline not in rows or variant == baseline:
    return None
  diffs = []
  for s, entry in sorted(rows[variant].items()):
    other = rows[baseline].get(s)
    if entry["outcomes"] is None or other is None or other["outcomes"] is None:
      continue
    domains = sorted(entry["outcomes"])
    diffs.append(
      [
        np.asarray(entry["outcomes"][d]["correct"], float)
        - np.asarray(other["outcomes"][d]["correct"], float)
        for d in domains
      ]
    )
  if not diffs:
    return None
  rng = significance.rng_for(variant, baseline, seed=seed)
  return significance.paired_bootstrap(diffs, rng=rng)


def _fmt_diff(diff: significance.Diff | None) -> str:
  if diff is None:
    return ""
  mark = "*" if diff.low > 0 or diff.high < 0 else ""
  return f"{100 * diff.mean:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]{mark}"


def _fmt_values(values: Sequence[Any], fmt: str) -> str:
  values = [v for v in values if v is not None]
  return "/".join(format(v, fmt) for v in values)


def table(rows: Mapping[tuple, Mapping[int, dict]]) -> str:
  """The Markdown table of `load_rows`' rows (adapter rows first, by r; then AdaMix)."""
  order = {"adapter": 0, "adamix": 1, **{k: 2 + i for i, k in enumerate(ROUTING_ROWS)}}
  header = (
    "| variant | seeds | accuracy | Δ vs single adapter (same r) | Δ vs AdaMix w = 0 | "
    "selected epoch per seed | expert spread | consistency KL first → last quarter |\n"
    "|---|---:|---:|---:|---:|---|---:|---|\n"
  )
  lines = []
  for setting in sorted(rows, key=lambda s: (order.get(s[0], 9), s[2], s[1])):
    kind, _, r = setting
    seeds = rows[setting]
    acc = np.array([e["accuracy"] for e in seeds.values()]) * 100
    std = f" ± {acc.std(ddof=1):.1f}" if len(acc) > 1 else ""
    vs_adapter = paired_diff(rows, setting, ("adapter", 0.0, r))
    vs_w0 = paired_diff(rows, setting, ("adamix", 0.0, r)) if kind == "adamix" else None
    entries = [seeds[s] for s in sorted(seeds)]
    spread = [e["spread"] for e in entries if e["spread"] is not None]
    kl = [e["kl"] for e in entries if e["kl"] is not None]
    kl_text = ""
    if kl and kind == "adamix":
      first, last = np.mean([k[0] for k in kl]), np.mean([k[1] for k in kl])
      kl_text = f"{first:.4f} → {last:.4f}"
    lines.append(
      f"| {_label(setting)} | {len(acc)} | {acc.mean():.1f}{std} | {_fmt_diff(vs_adapter)} | "
      f"{_fmt_diff(vs_w0)} | {_fmt_values([e['selection'] for e in entries], 'd')} | "
      f"{(f'{np.mean(spread):.3f}' if spread and kind == 'adamix' else '')} | {kl_text} |"
    )
  return header + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.adamix_table")
  parser.add_argument("--sweep_dir", required=True)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = load_rows(args.sweep_dir)
  if not rows:
    print(
      f"launch.adamix_table: error: no finished adamix run under --sweep_dir={args.sweep_dir}",
      file=sys.stderr,
    )
    return 2
  text = table(rows)
  out = pathlib.Path(args.out or pathlib.Path(args.sweep_dir) / "adamix_table.md")
  out.write_text(text)
  print(text, end="")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
