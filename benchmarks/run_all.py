r"""Runs every benchmark script and writes their results as Markdown tables.

Each script runs as a subprocess (`sys.executable benchmarks/<script>.py ...`; its log goes to
this process's stderr, its one JSON object is parsed from its stdout). The Markdown file
(`--out`, default `benchmarks/RESULTS.md`) has a header naming the machine (platform, CPU
model, CPU count, load average at the start, the JAX backend and device kind the scripts
reported) and one table per benchmark; the raw JSON objects go beside it
(`<out without .md>.json`). A script that fails or times out gets a line saying so, the
others still run, and the exit status is 1. Prints the path of the Markdown file.

With `--quick`, fewer repeats, sizes and variants (the whole run takes ≤ 10 min on a quiet
2-core CPU); without it the scripts' full settings (about an hour there). Nothing here
assumes a CPU: on a GPU the same commands run and the header names the device.

  python benchmarks/run_all.py --quick
  python benchmarks/run_all.py --out=/tmp/RESULTS.md --only=merge,mc_dropout
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Only for the data directory; importing it starts no JAX backend (the scripts own the device).
from moe_adapt.data import fetch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
META_PRESETS = ("digits_rot", "fmnist_rot", "fmnist_shift")


def _meta_step_runs(quick: bool) -> list[tuple[str, list[str]]]:
  if quick:
    variants = "--variants=cached_features/second_order,cached_features/remat"
    return [
      (
        f"meta_step/{b}",
        [f"--benchmark={b}", "--sizes=config", variants, "--skip_stacked", "--repeats=3"],
      )
      for b in META_PRESETS
    ]
  runs = [("meta_step/peer_sizes", ["--repeats=20"])]
  runs += [
    (f"meta_step/{b}", [f"--benchmark={b}", "--sizes=config", "--repeats=20"]) for b in META_PRESETS
  ]
  return runs


def _adapter_preset() -> str:
  """MiniLM's VADER preset when MiniLM and VADER are fetched, else the ViT on digits.

  (Every text preset, `tiny` ones too, reads VADER and MiniLM's tokenizer; `digits` needs
  no download.)
  """
  try:
    for name in ("minilm", "vader_sentiment"):
      fetch.archive_path(name, verify=False)
  except fetch.ArchiveError:
    return "digits"
  return "vader"


def plan(quick: bool) -> list[tuple[str, str, list[str]]]:
  """[(name, script, args)] in running order."""
  runs = [(name, "meta_step.py", args) for name, args in _meta_step_runs(quick)]
  preset = f"--preset={_adapter_preset()}"
  if quick:
    runs += [
      ("meta_grad", "meta_grad.py", ["--repeats=3"]),
      (
        "stacked_experts",
        "stacked_experts.py",
        ["--experts=2,5,10", "--ops=forward", "--repeats=3", "--row_budget_s=5"],
      ),
      ("merge", "merge.py", ["--members=2,8,32", "--repeats=15", "--row_budget_s=5"]),
      (
        "adapter_step",
        "adapter_step.py",
        [preset, "--variants=adapter,adamix", "--repeats=3", "--inference_batch=64"],
      ),
      ("mc_dropout", "mc_dropout.py", ["--samples=1,10,20", "--repeats=3"]),
    ]
  else:
    runs += [
      ("meta_grad", "meta_grad.py", ["--repeats=20"]),
      ("stacked_experts", "stacked_experts.py", ["--experts=2,5,10", "--repeats=10"]),
      ("merge", "merge.py", ["--repeats=10"]),
      ("adapter_step", "adapter_step.py", [preset, "--repeats=8"]),
      ("mc_dropout", "mc_dropout.py", ["--repeats=10"]),
    ]
  return runs


def run_script(script: str, args: list[str], timeout_s: float) -> tuple[dict | None, str | None]:
  """(parsed JSON, None) or (None, error) of one script run."""
  cmd = [sys.executable, str(HERE / script), *args]
  print(f"[run_all] {' '.join(cmd)}", file=sys.stderr, flush=True)
  try:
    proc = subprocess.run(
      cmd,
      stdout=subprocess.PIPE,
      stderr=None,
      text=True,
      timeout=timeout_s,
      cwd=REPO,
      check=False,
    )
  except subprocess.TimeoutExpired:
    return None, f"timed out after {timeout_s:.0f} s"
  if proc.returncode:
    return None, f"exit status {proc.returncode}"
  lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
  try:
    return json.loads(lines[-1]), None
  except (IndexError, json.JSONDecodeError) as e:
    return None, f"no JSON object on stdout ({e})"


# ---------------------------------------------------------------------------- formatting


def _fmt(value, digits: int = 1) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:,.{digits}f}"
  if isinstance(value, int):
    return f"{value:,}"
  return str(value)


def _table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += [
    "| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows
  ]
  return "\n".join(lines)


def _temp(entry: dict | None) -> float | None:
  return ((entry or {}).get("memory") or {}).get("temp_mb")


def fmt_meta_step(r: dict) -> str:
  c = r["config"]
  rows = []
  for name, v in r["meta_step"].items():
    rows.append([f"meta-step {name}", v["median_ms"], v["min_ms"], v["compile_s"], _temp(v)])
  for name in ("adapt", "adapt_with_expert_features"):
    v = r[name]
    rows.append([name, v["median_ms"], v["min_ms"], v["compile_s"], _temp(v)])
  text = (
    f"{c['benchmark']}, {c['sizes']} sizes: {c['experts']} experts ({c['stack_map_resolved']}), "
    f"support {c['support']} + query {c['query']}, model {c['model']}, aggregator "
    f"{c['aggregator']}, {c['inner_steps']} inner step(s), {c['repeats']} repeats.\n\n"
  )
  text += _table(["", "median ms", "min ms", "compile s", "XLA temp MB"], rows)
  if r.get("stacked_forward"):
    modes = r["stacked_forward"]
    text += "\n\nStacked forward (median ms): " + ", ".join(
      f"{m} {v['median_ms']:.1f}" for m, v in modes.items()
    )
  return text


def fmt_meta_grad(r: dict) -> str:
  rows = [
    [name, r[name]["median_ms"], r[name]["min_ms"], r[name]["compile_s"], r[name]["temp_mb"]]
    for name in ("custom_vjp", "nested_grad", "custom_vjp_remat")
  ]
  return (
    _table(["", "median ms", "min ms", "compile s", "XLA temp MB"], rows)
    + f"\n\nSpeed-up of the custom VJP over grad-of-grad: {r['speedup_median']}×; max relative "
    f"gradient difference {r['max_rel_diff_grads']:.1e}."
  )


def fmt_stacked_experts(r: dict) -> str:
  modes = []
  for row in r["rows"]:
    if row["mode"] not in modes:
      modes.append(row["mode"])
  by_key: dict = {}
  for row in r["rows"]:
    by_key.setdefault((row["n"], row["op"]), {})[row["mode"]] = row
  rows = []
  for (n, op), cells in by_key.items():
    diff = max(c["max_abs_diff_vs_loop"] for c in cells.values())
    rows.append(
      [n, op, *[cells[m]["median_ms"] if m in cells else None for m in modes], f"{diff:.1e}"]
    )
  return "Median ms.\n\n" + _table(["N", "op", *modes, "max abs diff vs loop"], rows)


def fmt_merge(r: dict) -> str:
  ops = r["config"]["ops"]
  layouts = r["config"].get("layouts", ["tree"])
  copies = {(c["size"], c["k"]): c for c in r["copies"]}
  cells = {(row["size"], row["k"], row["op"], row.get("layout", "tree")): row for row in r["rows"]}
  rows = []
  for (size, k), c in copies.items():
    line = [size, k, round(c["bytes"] / 1e6, 1), c["copy_jax_gbps"], c["copy_numpy_gbps"]]
    for op in ops:
      parts = []
      for layout in layouts:
        row = cells.get((size, k, op, layout))
        parts.append(f"{row['gbps']:.2f} ({row['vs_copy']:.2f}×)" if row else "–")
      line.append(" / ".join(parts))
    rows.append(line)
  per = " / ".join(layouts)
  header = ["size", "K", "MB read", "copy XLA GB/s", "copy NumPy GB/s"]
  header += [f"{o} GB/s ({per})" for o in ops]
  return (
    "GB/s = bytes read (K × member) / median time; (×) = ratio to the XLA copy (target ≥ 0.5);"
    f" layouts {per}: the pytree of [K, ...] leaves / the one [K, P] buffer of"
    " `merging.ravel_stacked` (on which `ties_merge` trims each member's whole vector).\n\n"
    + _table(header, rows)
  )


def fmt_adapter_step(r: dict) -> str:
  rows = [
    [
      row["variant"],
      row["median_ms"],
      row["vs_adapter"],
      row["compile_s"],
      (row.get("memory") or {}).get("temp_mb"),
      row["trainable_params"],
    ]
    for row in r["rows"]
  ]
  text = f"Preset `{r['preset']}`, training step, batch {r['batch_size']}.\n\n" + _table(
    ["variant", "ms / step", "× adapter", "compile s", "XLA temp MB", "trainable params"], rows
  )
  if r.get("inference"):
    rows = [
      [row["variant"], row["median_ms"], row["vs_adapter"], row["compile_s"], row["params"]]
      for row in r["inference"]
    ]
    text += f"\n\nInference, one batch of {r['inference'][0]['batch']}.\n\n" + _table(
      ["model", "ms / batch", "× adapter", "compile s", "params"], rows
    )
  return text


def fmt_mc_dropout(r: dict) -> str:
  by_s: dict = {}
  for row in r["rows"]:
    by_s.setdefault(row["samples"], {})[row["mode"]] = row
  modes = ("vmapped", "loop", "full_vmapped", "full_loop")
  rows = []
  for s, cells in by_s.items():
    line = [s, *[cells[m]["median_ms"] if m in cells else None for m in modes]]
    line += [cells.get(m, {}).get("speedup_vs_loop") for m in ("vmapped", "full_vmapped")]
    rows.append(line)
  c = r["config"]
  return (
    f"Teacher {c['backbone']} {c['model']}, dropout {c['dropout']}, {c['classes']} classes, "
    f"batch {c['batch']}; median ms per batch.\n\n"
    + _table(["S", *modes, "vmapped / loop speed-up", "full: vmapped / loop speed-up"], rows)
  )


FORMATTERS: dict[str, Callable[[dict], str]] = {
  "meta_step": fmt_meta_step,
  "meta_grad": fmt_meta_grad,
  "stacked_experts": fmt_stacked_experts,
  "merge": fmt_merge,
  "adapter_step": fmt_adapter_step,
  "mc_dropout": fmt_mc_dropout,
}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def header(results: dict, *, quick: bool, load: float, started: str, wall_s: float) -> str:
  env = next((r["environment"] for r in results.values() if r and "environment" in r), {})
  return "\n".join(
    [
      "# Benchmark results",
      "",
      f"- date: {started} (wall time {wall_s / 60:.1f} min, {'--quick' if quick else 'full'})",
      f"- platform: {platform.platform()}, Python {platform.python_version()}",
      f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores",
      f"- load average (1 min) at start: {load:.2f}",
      f"- JAX {env.get('jax', importlib.metadata.version('jax'))}, backend "
      f"{env.get('backend', '?')}, device {env.get('device', '?')} × {env.get('num_devices', '?')}",
      "",
      "Times are medians of calls after a warm-up; compile time is measured apart. Numbers "
      "taken on a loaded machine are inflated: compare within one table.",
    ]
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats/sizes (≤ 10 min)")
  parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="Markdown file to write")
  parser.add_argument(
    "--only", default="", help=f"comma-separated subset of {', '.join(FORMATTERS)}"
  )
  parser.add_argument("--timeout_s", type=float, default=3600.0, help="per script run")
  args = parser.parse_args(argv)
  only = [o.strip() for o in args.only.split(",") if o.strip()]
  unknown = sorted(set(only) - set(FORMATTERS))
  if unknown:
    parser.error(f"--only has unknown {unknown}; accepted: {', '.join(FORMATTERS)}")
  if args.timeout_s <= 0:
    parser.error(f"--timeout_s={args.timeout_s} is invalid; accepted: a number > 0")
  out = Path(args.out)
  if out.suffix != ".md":
    parser.error(f"--out={args.out} is invalid; accepted: a path ending in .md")

  load = os.getloadavg()[0]
  started = datetime.datetime.now().isoformat(timespec="seconds")
  t0 = time.perf_counter()
  results, errors, sections = {}, {}, []
  for name, script, script_args in plan(args.quick):
    kind = name.split("/")[0]
    if only and kind not in only:
      continue
    t = time.perf_counter()
    results[name], errors[name] = run_script(script, script_args, args.timeout_s)
    cmd = f"python benchmarks/{script} {' '.join(script_args)}"
    title = f"## `{name}`\n\n`{cmd}` ({time.perf_counter() - t:.0f} s)\n\n"
    if not errors[name]:
      try:
        sections.append(title + FORMATTERS[kind](results[name]))
      except (KeyError, TypeError, ValueError) as e:  # keep the other tables
        errors[name] = f"its JSON could not be tabulated ({type(e).__name__}: {e})"
    if errors[name]:
      sections.append(title + f"**Failed: {errors[name]}** (its log is on stderr).")
    # Rewritten after every script, so a run cut short keeps the tables it finished.
    wall = time.perf_counter() - t0
    text = header(results, quick=args.quick, load=load, started=started, wall_s=wall)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n\n" + "\n\n".join(sections) + "\n")
    raw = {"results": results, "errors": errors}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
  print(out)
  return 1 if any(errors.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
