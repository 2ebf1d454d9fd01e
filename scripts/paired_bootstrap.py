r"""Paired differences between the variants of a sweep's runs, with a bootstrap interval.

Reads every `results.json` under `--sweep_dir` (one run per seed, as `launch.sweep` writes
them) and, for each variant against `--baseline`, prints the per-seed difference of the
mean accuracy over target domains and a 95 % paired bootstrap interval that resamples
seeds and, within each (seed, domain), test examples. Examples pair up because every
variant of a run predicts the same test examples in the same order (`per_example`). An
adapted variant's per-example outcome is its mean over the support draws
(`correct_draws`), so the statistic equals the reported accuracy. The interval is
`launch.significance.paired_bootstrap`'s, as `launch.collect` reports it.

  python scripts/paired_bootstrap.py --sweep_dir=runs/md/fmnist_shift --baseline=erm_continued
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from launch import significance


def outcomes(entry: dict) -> np.ndarray:
  """Per-example outcome [N] in [0, 1]: the mean over draws where there are several."""
  if "correct_draws" in entry:
    return np.mean(np.asarray(entry["correct_draws"], float), axis=0)
  return np.asarray(entry["correct"], float)


def load(sweep_dir: str, match: str) -> list[dict]:
  runs = []
  for path in sorted(pathlib.Path(sweep_dir).rglob("results.json")):
    results = json.loads(path.read_text())
    if "per_example" in results and match in str(path):
      runs.append(results)
  if not runs:
    raise SystemExit(f"no results.json with per_example under {sweep_dir!r} (match {match!r})")
  return runs


def paired(runs, variant, baseline, *, reps, seed):
  """(per-seed differences [S], mean difference, (low, high)) in accuracy points."""
  return _bootstrap(_diffs(runs, variant, baseline), reps=reps, seed=seed, key=(variant, baseline))


def _diffs(runs, variant, baseline):
  diffs = []  # [S][D] arrays of per-example differences
  for r in runs:
    pe = r["per_example"]
    diffs.append(
      [outcomes(pe[variant][d]) - outcomes(pe[baseline][d]) for d in r["target_domains"]]
    )
  return diffs


def _bootstrap(diffs, *, reps, seed, key):
  """`launch.significance.paired_bootstrap` (its two-stage interval), in accuracy points."""
  per_seed = np.array([np.mean([d.mean() for d in ds]) for ds in diffs])
  rng = significance.rng_for(*key, seed=seed)
  diff = significance.paired_bootstrap(diffs, num_samples=reps, rng=rng)
  return 100 * per_seed, 100 * diff.mean, (100 * diff.low, 100 * diff.high)


def compare_runs(pairs: list[tuple[str, str]], variant: str, *, reps: int, seed: int) -> str:
  """`variant` of run A minus the same variant of run B, over (A, B) pairs of the same seed.

  An ablation: A and B differ in one setting and share the seed (hence the test data and
  its order); the bootstrap resamples the pairs (seeds) and the examples within them.
  """
  diffs = []
  for path_a, path_b in pairs:
    a, b = (json.loads(pathlib.Path(p).read_text()) for p in (path_a, path_b))
    diffs.append(
      [
        outcomes(a["per_example"][variant][d]) - outcomes(b["per_example"][variant][d])
        for d in a["target_domains"]
      ]
    )
  per_seed, mean, (low, high) = _bootstrap(diffs, reps=reps, seed=seed, key=(variant, "runs"))
  seeds_txt = ", ".join(f"{x:+.1f}" for x in per_seed)
  return f"{variant}: per seed {seeds_txt}; mean {mean:+.1f} [{low:+.1f}, {high:+.1f}]"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sweep_dir", default="")
  parser.add_argument("--baseline", default="erm_continued")
  parser.add_argument("--variants", default="", help="comma-separated (default: all)")
  parser.add_argument("--match", default="", help="only results.json whose path contains this")
  parser.add_argument("--reps", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--compare_runs",
    default="",
    help="A,B[;A,B...]: results.json pairs of the same seed; --variants of A minus B",
  )
  args = parser.parse_args()
  if args.compare_runs:
    pairs = [tuple(pair.split(",")) for pair in args.compare_runs.split(";")]
    for v in (args.variants or "meta_dmoe").split(","):
      print(compare_runs(pairs, v, reps=args.reps, seed=args.seed))
    return
  runs = load(args.sweep_dir, args.match)
  seeds = [r["seed"] for r in runs]
  variants = args.variants.split(",") if args.variants else list(runs[0]["per_example"])
  print(f"{len(runs)} runs (seeds {seeds}); difference to {args.baseline}, accuracy points")
  print("| variant | mean acc | per-seed difference | mean difference | 95 % interval |")
  print("|---|---:|---|---:|---|")
  for v in variants:
    if v == args.baseline:
      continue
    acc = 100 * np.mean([r["metrics"][v]["mean"]["accuracy"] for r in runs])
    per_seed, mean, (low, high) = paired(runs, v, args.baseline, reps=args.reps, seed=args.seed)
    seeds_txt = ", ".join(f"{x:+.1f}" for x in per_seed)
    print(f"| {v} | {acc:.1f} | {seeds_txt} | {mean:+.1f} | [{low:+.1f}, {high:+.1f}] |")
  base = 100 * np.mean([r["metrics"][args.baseline]["mean"]["accuracy"] for r in runs])
  print(f"| {args.baseline} (baseline) | {base:.1f} | | | |")


if __name__ == "__main__":
  main()
