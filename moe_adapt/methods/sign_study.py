"""Statistics of the signed-weight-direction study (Nguyen & Le, ACL 2024), and its tables.

FSD and accuracy both move with the number of adapters mixed (FSD rises, accuracy falls),
so a correlation pooled over mixture sizes mostly measures size. Here every correlation is
either within one size (`within_size`; k = 2 is the paper's Fig. 5) or pooled with size as
a covariate (`partial_correlation`: both quantities centred within each stratum, i.e. the
partial correlation given stratum indicators, and the slope of the regression
y ~ x + stratum). Intervals are percentile bootstraps over mixtures, resampled within each
stratum so that every resample keeps the design.

`python -m moe_adapt.methods.sign_study --sweep_dir=DIR` reads the `results.json` of every
run under DIR (the seeds of one `adapter_soup` config) and prints, as Markdown: the
FSD–accuracy correlations within each size and pooled with size (and seed) as covariates,
over all seeds' mixtures; what each novel-domain selector chose per seed and target, with
its accuracy and macro-F1; the merge rows with the hyper-parameters chosen on validation.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denom) if denom > 1e-15 else None


def _ranks(x: np.ndarray) -> np.ndarray:
  from scipy import stats  # Deferred: scipy is slow to import.

  return stats.rankdata(x)


def _centred(x: np.ndarray, strata: np.ndarray) -> np.ndarray:
  out = np.array(x, np.float64)
  for s in np.unique(strata):
    out[strata == s] -= out[strata == s].mean()
  return out


def _stat(x: np.ndarray, y: np.ndarray, strata: np.ndarray, kind: str) -> float | None:
  if kind == "spearman":
    x, y = _ranks(x), _ranks(y)
  return _pearson(_centred(x, strata), _centred(y, strata))


def partial_correlation(
  x: Sequence[float],
  y: Sequence[float],
  strata: Sequence[Hashable] | None = None,
  *,
  samples: int = BOOTSTRAP_SAMPLES,
  seed: int = 0,
) -> dict[str, Any]:
  """Pearson and Spearman of x and y given stratum indicators, with 95 % bootstrap intervals.

  With one stratum (or `strata=None`) these are the plain coefficients. With several, x
  and y (their ranks for Spearman) are centred within each stratum first: the partial
  correlation given the strata, equal to the correlation of the residuals of x and of y
  regressed on stratum indicators. `slope` is the coefficient of x in y ~ x + stratum.

  Args:
    x, y: [N] paired values (e.g. FSD and accuracy − own accuracy of N mixtures).
    strata: [N] labels (e.g. mixture sizes); None = one stratum.
    samples: bootstrap resamples (pairs resampled with replacement within each stratum).
    seed: seed of the resampling.

  Returns:
    A dict with keys 'n', 'pearson', 'pearson_ci' ([lo, hi]), 'spearman', 'spearman_ci',
    'slope' and 'slope_ci'; a coefficient is None where undefined (constant values, N < 3
    or fewer than 2 pairs in every stratum), an interval None when fewer than half the
    resamples define it.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"x of shape {x.shape} and y of shape {y.shape}; accepted: two [N]")
  labels = np.zeros(len(x), np.int64) if strata is None else np.asarray(strata)
  if labels.shape != x.shape:
    raise ValueError(f"strata has shape {labels.shape}; accepted: [{len(x)}] like x")
  if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
    raise ValueError(f"samples={samples!r} is invalid; accepted: an integer >= 0")
  _, strata_idx = np.unique(labels, return_inverse=True)
  out: dict[str, Any] = {"n": len(x), **_all_stats(x, y, strata_idx)}
  rng = np.random.default_rng(seed)
  groups = [np.flatnonzero(strata_idx == s) for s in range(strata_idx.max() + 1 if len(x) else 0)]
  draws: dict[str, list[float]] = {k: [] for k in ("pearson", "spearman", "slope")}
  for _ in range(samples if len(x) >= 3 else 0):
    idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
    for k, v in _all_stats(x[idx], y[idx], strata_idx[idx]).items():
      if v is not None:
        draws[k].append(v)
  for k, vals in draws.items():
    ok = samples and len(vals) >= samples / 2 and out[k] is not None
    out[f"{k}_ci"] = [float(q) for q in np.percentile(vals, [2.5, 97.5])] if ok else None
  return out


def _slope(x: np.ndarray, y: np.ndarray, strata: np.ndarray) -> float | None:
  """The coefficient of x in y ~ x + stratum (None when x is constant within strata)."""
  cx = _centred(x, strata)
  var = np.sum(cx * cx)
  return float(np.sum(cx * _centred(y, strata)) / var) if var > 1e-15 else None


def _all_stats(x: np.ndarray, y: np.ndarray, strata: np.ndarray) -> dict[str, float | None]:
  """Pearson, Spearman and slope given the strata; None each with fewer than 3 pairs."""
  if len(x) < 3:
    return {"pearson": None, "spearman": None, "slope": None}
  return {
    "pearson": _stat(x, y, strata, "pearson"),
    "spearman": _stat(x, y, strata, "spearman"),
    "slope": _slope(x, y, strata),
  }


def within_size(records: Sequence[Mapping[str, Any]], quantity: str = "fsd", **kwargs) -> dict:
  """Correlations of `quantity` with accuracy − own accuracy, per mixture size and pooled.

  Args:
    records: mixtures ({'domain', 'size', 'accuracy_delta', quantity, optional 'seed'}).
    quantity: the record field correlated with 'accuracy_delta'.
    **kwargs: `samples`, `seed` of `partial_correlation`.

  Returns:
    {'size_<k>': correlations over the mixtures of size k (k >= 2; pooled over domains
     and seeds: accuracy is relative to each domain's own adapter of the same seed),
     'pooled_given_size': pooled over sizes with the size (and seed) as strata}.
  """
  mixed = [r for r in records if r["size"] >= 2]
  out = {}
  for size in sorted({r["size"] for r in mixed}):
    rs = [r for r in mixed if r["size"] == size]
    out[f"size_{size}"] = partial_correlation(
      [r[quantity] for r in rs],
      [r["accuracy_delta"] for r in rs],
      [r.get("seed", 0) for r in rs],
      **kwargs,
    )
  if len({r["size"] for r in mixed}) > 1:
    out["pooled_given_size"] = partial_correlation(
      [r[quantity] for r in mixed],
      [r["accuracy_delta"] for r in mixed],
      [f"{r.get('seed', 0)}/{r['size']}" for r in mixed],
      **kwargs,
    )
  return out


# ----------------------------------------------------------------------------
# Tables over the seeds of a sweep
# ----------------------------------------------------------------------------


def load_runs(sweep_dir: str) -> list[dict]:
  """The `adapter_soup` results.json files under `sweep_dir`, by seed."""
  runs = []
  for path in sorted(pathlib.Path(sweep_dir).rglob("results.json")):
    r = json.loads(path.read_text())
    if r.get("method") == "adapter_soup":
      runs.append(r)
  if not runs:
    raise ValueError(f"sweep_dir={sweep_dir!r} holds no adapter_soup results.json")
  return sorted(runs, key=lambda r: r["seed"])


def _fmt(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
  return "n/a" if v is None else f"{scale * v:.{digits}f}"


def _ci(v: Sequence[float] | None, scale: float = 1.0, digits: int = 2) -> str:
  return "n/a" if v is None else f"[{scale * v[0]:.{digits}f}, {scale * v[1]:.{digits}f}]"


def correlation_table(runs: Sequence[Mapping]) -> str:
  """Markdown: FSD (and own-sign-flip) vs accuracy, within sizes and pooled given size."""
  records = [{**m, "seed": r["seed"]} for r in runs for m in r["mixtures"]]
  lines = [
    "| quantity | mixtures | n | Pearson [95 % CI] | Spearman [95 % CI] | slope (points per "
    "FSD point) [95 % CI] |",
    "|---|---|---:|---|---|---|",
  ]
  for quantity in ("fsd", "own_sign_flip"):
    for name, c in within_size(records, quantity).items():
      lines.append(
        f"| {quantity} | {name.replace('_', ' ')} | {c['n']} | {_fmt(c['pearson'])} "
        f"{_ci(c['pearson_ci'])} | {_fmt(c['spearman'])} {_ci(c['spearman_ci'])} | "
        f"{_fmt(c['slope'])} {_ci(c['slope_ci'])} |"
      )
  return "\n".join(lines)


def _mean_std(values: Sequence[float], scale: float = 100.0) -> str:
  v = scale * np.asarray(values, np.float64)
  return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def _seeds(runs: Sequence[Mapping]) -> str:
  return ",".join(str(r["seed"]) for r in runs)


def selection_table(runs: Sequence[Mapping]) -> str:
  """Markdown: per novel target and selector, accuracy, macro-F1 (mean ± std over the seeds
  that report it) and what it chose, per seed."""
  targets = runs[0]["target_domains"]
  variants = list(
    dict.fromkeys(v for r in runs for v in r["selections"][targets[0]] if v in r["metrics"])
  )
  lines = [
    "| target | selector | seeds | accuracy | macro-F1 | chosen (per seed) |",
    "|---|---|---|---:|---:|---|",
  ]
  for t in [*targets, "mean"]:
    for v in ["zero_shot", *variants]:
      have = [r for r in runs if v in r["metrics"]]
      if not have:
        continue
      acc = [r["metrics"][v][t]["accuracy"] for r in have]
      f1 = [r["metrics"][v][t]["macro_f1"] for r in have]
      chosen = ""
      if t != "mean":
        sel = [r["selections"][t].get(v, {}).get("selected") for r in have]
        chosen = "; ".join("+".join(x) if x else "—" for x in sel)
      lines.append(
        f"| {t} | {v} | {_seeds(have)} | {_mean_std(acc)} | {_mean_std(f1)} | {chosen} |"
      )
  return "\n".join(lines)


def merge_table(runs: Sequence[Mapping]) -> str:
  """Markdown: in-domain rows of the all-K mixture and its merges (mean over the study
  domains; mean ± std over the seeds that report each), with the validation choices."""
  fixed = ["own", "mix_all"]
  for r in runs:
    fixed += [v for v in r["metrics"] if v.startswith(("ties_", "avg_like_ties_", "prune"))]
  chosen_rows = [v for r in runs for v in r.get("selection", {})]
  names = list(dict.fromkeys([*fixed, *chosen_rows, "merge_avg_like_ties"]))
  lines = [
    "| row | seeds | accuracy | macro-F1 | chosen on validation (per seed) |",
    "|---|---|---:|---:|---|",
  ]
  for v in names:
    have = [r for r in runs if v in r["metrics"]]
    if not have:
      continue
    acc = [r["metrics"][v]["mean"]["accuracy"] for r in have]
    f1 = [r["metrics"][v]["mean"]["macro_f1"] for r in have]
    chosen = "; ".join(
      ", ".join(f"{k}={x:.3g}" for k, x in r.get("selection", {}).get(v, {}).items()) or "—"
      for r in have
    )
    lines.append(f"| {v} | {_seeds(have)} | {_mean_std(acc)} | {_mean_std(f1)} | {chosen} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sweep_dir", required=True)
  args = parser.parse_args(argv)
  runs = load_runs(args.sweep_dir)
  print(f"{len(runs)} runs, seeds {[r['seed'] for r in runs]}\n")
  print("FSD against accuracy − own adapter's accuracy (all seeds' mixtures):\n")
  print(correlation_table(runs), "\n")
  print("Novel domains (mean ± std over seeds, %):\n")
  print(selection_table(runs), "\n")
  print("In-domain merges of all adapters (mean over domains, mean ± std over seeds, %):\n")
  print(merge_table(runs))
  return 0


if __name__ == "__main__":
  sys.exit(main())
