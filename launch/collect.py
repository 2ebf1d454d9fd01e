r"""Result tables of a sweep: mean ± std over seeds per setting, variant and target domain.

  python -m launch.collect --sweep_dir=runs/mdmoe_ablations [--out=DIR] [--metric=accuracy] \
      [--select_over=meta.inner_lr --selection=train_domain_val|oracle] [--variants=erm,meta_dmoe] \
      [--baseline=erm|none] [--bootstrap_samples=2000] [--bootstrap_seed=0]

reads every run's spec.json, config.json and results.json (see `launch.sweep`)
and writes `results.md`, `results.csv`, `results.tex` and one `plot_<key>.png`
per numeric swept key into `--out` (default: the sweep folder).

Rows are the settings of the swept keys (the overrides that differ between runs,
except the seed and the target domains) × the variants each run reports
(e.g. `erm`, `meta_dmoe`). Columns are the target domains and `mean`. A cell is
the mean ± sample std over seeds; for `mean`, each seed's metric is first
averaged over all target domains, so only seeds with every domain count. Runs
with one target each (leave-one-domain-out) and runs with several targets mix.

Significance: each variant is compared with the method's main baseline (`BASELINES`,
or `--baseline`; `--baseline=none` turns it off) on the runs' per-example outcomes
(results.json `per_example`, accuracy only): the difference of the variant's and the
baseline's accuracy, paired within each run (same seed, same test examples), averaged
over seeds, with a 95 % interval from a two-stage paired bootstrap — seeds resampled,
then test examples within each seed (`launch.significance` states the scheme). The
Markdown and LaTeX tables mark a cell whose interval excludes 0 with `*` and list the
differences and intervals in a second table. A baseline that no run reports is an error.

Model selection (`--select_over=k1,k2`): per setting of the other keys and
variant, only the best setting of k1, k2 is kept, chosen by
- `train_domain_val`: the source-domain validation metric the runs report
  (`metrics[<variant>]["source_val"][<metric>]`); if some runs do not report it,
  no selection is made and the tables say so;
- `oracle`: the mean target metric itself (optimistic: an upper bound).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from launch import significance
from launch.significance import Diff

SPEC_FILE = "spec.json"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
SEED_KEY = "seed"
TARGETS_KEY = "data.target_domains"
MEAN = "mean"
SOURCE_VAL = "source_val"
DEFAULT = "(default)"  # A swept key a run neither overrides nor records in config.json.
SELECTIONS = ("train_domain_val", "oracle")
MISSING = "–"
PER_EXAMPLE = "per_example"  # results.json key (moe_adapt.train.results.PER_EXAMPLE)
NO_BASELINE = "none"
SIGNIFICANT = "*"
# The main baseline of each method: what its variants' differences are measured against.
# Runs made before a baseline existed fall back to the one in FALLBACK_BASELINES.
BASELINES = {
  "meta_dmoe": "erm_continued",  # the step- and lr-matched control (docs/meta_dmoe.md)
  "co_tuning": "fine_tune",
  "muka": "vanilla_kd",
  "adamix": "adapter",
  "finetune": "full",
  "adapter_soup": "all",
  "adapter_experts": "erm",
  "cotuned_teachers": "vanilla_kd_from_fine_tune",
}
FALLBACK_BASELINES = {"meta_dmoe": "erm"}  # Meta-DMoE runs before the erm_continued control


class Record(NamedTuple):
  """A run folder: overrides, flat resolved config ({} if absent), results (None if unfinished)."""

  name: str
  overrides: dict
  config: dict
  results: dict | None


class Cell(NamedTuple):
  """Statistics over seeds: mean, sample std (nan when n == 1), number of seeds."""

  mean: float
  std: float
  n: int


class Row(NamedTuple):
  """One table row: a setting of the swept keys and a variant, with a cell per column."""

  setting: tuple[tuple[str, Any], ...]
  variant: str
  cells: dict[str, Cell]
  val: Cell | None = None  # Source-domain validation metric, when the runs report one.
  selected: tuple[tuple[str, Any], ...] = ()  # The chosen values of `--select_over` keys.
  diffs: Mapping[str, Diff] | None = None  # Column -> paired difference to the baseline.


class Table(NamedTuple):
  """What every output format shows."""

  metric: str
  keys: tuple[str, ...]
  columns: tuple[str, ...]
  rows: tuple[Row, ...]
  selected_keys: tuple[str, ...] = ()
  notes: tuple[str, ...] = ()
  baseline: str | None = None  # The variant the rows' `diffs` are measured against.


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    if isinstance(value, Mapping) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from e


def load_records(sweep_dir: str | os.PathLike) -> list[Record]:
  """Every run folder (a folder holding spec.json) of `sweep_dir`, sorted by name.

  Raises:
    ValueError: `sweep_dir` is not a directory, holds no run folder, or a file
      is not valid JSON.
  """
  root = pathlib.Path(sweep_dir)
  if not root.is_dir():
    raise ValueError(f"--sweep_dir={os.fspath(sweep_dir)!r} is not a directory")
  records = []
  for spec_path in sorted(root.glob(f"*/{SPEC_FILE}")):
    run = spec_path.parent
    spec = _read_json(spec_path)
    config_path, results_path = run / CONFIG_FILE, run / RESULTS_FILE
    config = _flatten(_read_json(config_path)) if config_path.is_file() else {}
    results = _read_json(results_path) if results_path.is_file() else None
    records.append(Record(run.name, dict(spec.get("overrides", {})), config, results))
  if not records:
    raise ValueError(f"--sweep_dir={os.fspath(sweep_dir)!r} holds no run folder (*/{SPEC_FILE})")
  return records


# ----------------------------------------------------------------------------
# Grouping and statistics (pure functions)
# ----------------------------------------------------------------------------


def _hashable(value: Any) -> Any:
  if isinstance(value, list | tuple):
    return tuple(_hashable(v) for v in value)
  return value


def setting_value(record: Record, key: str) -> Any:
  """The run's value of dotted `key`: its override, else its config.json, else DEFAULT."""
  if key in record.overrides:
    return _hashable(record.overrides[key])
  if key in record.config:
    return _hashable(record.config[key])
  return DEFAULT


def swept_keys(records: Sequence[Record]) -> tuple[str, ...]:
  """Overridden keys whose values differ between runs, except seed and targets; sorted."""
  keys = {k for r in records for k in r.overrides} - {SEED_KEY, TARGETS_KEY}
  return tuple(sorted(k for k in keys if len({setting_value(r, k) for r in records}) > 1))


def fixed_overrides(records: Sequence[Record]) -> dict[str, Any]:
  """Overrides every run sets to the same value (the seed excepted)."""
  if not records:
    return {}
  common = set.intersection(*(set(r.overrides) for r in records)) - {SEED_KEY}
  values = {k: {setting_value(r, k) for r in records} for k in sorted(common)}
  return {k: next(iter(v)) for k, v in values.items() if len(v) == 1}


def _cell(values: Sequence[float]) -> Cell:
  values = np.asarray(values, np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
  return Cell(float(np.mean(values)), std, len(values))


def _natural(text: str) -> list:
  """Sort key with digit runs compared as numbers: rot0 < rot15 < rot75."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def _value_order(value: Any) -> tuple:
  if value == DEFAULT:
    return (0, 0.0, "")
  if isinstance(value, int | float):
    return (1, float(value), "")
  return (2, 0.0, show(value))


def _number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def resolve_baseline(records: Sequence[Record], requested: str = "") -> str | None:
  """The variant differences are measured against, or None for no comparison.

  Args:
    records: from `load_records`.
    requested: `--baseline`: a variant, 'none', or '' for the method's entry in BASELINES
      (None when the runs' method has none, or the runs mix methods).

  Raises:
    ValueError: the baseline (requested, or the method's) is run by no finished run.
  """
  if requested == NO_BASELINE:
    return None
  done = [r.results for r in records if r.results is not None]
  found = sorted({v for res in done for v in res.get("metrics", {})})
  if requested:
    baseline, where = requested, f"--baseline={requested!r}"
  else:
    methods = {res.get("method") for res in done}
    if len(methods) != 1 or next(iter(methods)) not in BASELINES:
      return None
    method = next(iter(methods))
    baseline = BASELINES[method]
    if done and baseline not in found and FALLBACK_BASELINES.get(method) in found:
      baseline = FALLBACK_BASELINES[method]
    where = (
      f"--baseline (default: {baseline!r}, the main baseline of method {method!r} in "
      "launch.collect.BASELINES)"
    )
  if done and baseline not in found:
    raise ValueError(
      f"{where} names a variant that no run reports; accepted: {', '.join(found)}, or "
      f"{NO_BASELINE!r} for no comparison"
    )
  return baseline


def _paired_diffs(record: Record, variant: str, baseline: str) -> dict[str, np.ndarray]:
  """Domain -> [n] per-example differences variant − baseline of one run ({} if not stored)."""
  stored = record.results.get(PER_EXAMPLE) or {}
  ours, theirs = stored.get(variant) or {}, stored.get(baseline) or {}
  out = {}
  for domain in sorted(set(ours) & set(theirs)):
    a, b = _outcomes(ours[domain]), _outcomes(theirs[domain])
    if a is None or b is None:
      continue
    if len(a) != len(b) or not len(a):
      raise ValueError(
        f"run {record.name}: per_example of {variant!r} and {baseline!r} on {domain!r} do not "
        f"pair up ({len(a)} vs {len(b)} examples)"
      )
    out[domain] = a - b
  return out


def _outcomes(entry: Mapping) -> np.ndarray | None:
  """[n] per-example outcomes in [0, 1]; None if not stored.

  A variant evaluated over several draws (e.g. Meta-DMoE's adaptation on several unlabeled
  support sets) stores `correct_draws` [draws, n]: its outcome is the mean over draws, so
  the paired difference equals the difference of the reported accuracies.
  """
  if "correct_draws" in entry:
    return np.mean(np.asarray(entry["correct_draws"], np.float64), axis=0)
  if "correct" in entry:
    return np.asarray(entry["correct"], np.float64)
  return None


def _row_diffs(
  seeds: Mapping[Any, Mapping[str, np.ndarray]],
  domains: Sequence[str],
  *,
  key: tuple,
  num_samples: int,
  seed: int,
) -> dict[str, Diff]:
  """Column -> Diff over the seeds that have the column's domains (all of them for 'mean')."""
  out = {}
  for column, needed in [*((d, (d,)) for d in domains), (MEAN, tuple(domains))]:
    per_seed = [[ds[d] for d in needed] for ds in seeds.values() if all(d in ds for d in needed)]
    if per_seed:
      rng = significance.rng_for(*key, column, seed=seed)
      out[column] = significance.paired_bootstrap(per_seed, num_samples=num_samples, rng=rng)
  return out


def aggregate(
  records: Sequence[Record],
  *,
  metric: str = "accuracy",
  keys: Sequence[str] | None = None,
  variants: Sequence[str] | None = None,
  baseline: str | None = None,
  bootstrap_samples: int = significance.DEFAULT_SAMPLES,
  bootstrap_seed: int = 0,
) -> Table:
  """Groups finished runs by `keys` and computes mean ± std over seeds.

  Args:
    records: from `load_records`; runs without results are counted, not used.
    metric: the per-domain metric, e.g. 'accuracy'.
    keys: the keys that make a row (default `swept_keys(records)`).
    variants: variants to report, in this order (default: all, sorted).
    baseline: the variant to compare every other one with (see `resolve_baseline`), or
      None; differences need per-example outcomes and `metric='accuracy'`.
    bootstrap_samples: replicates of the paired bootstrap.
    bootstrap_seed: fixes the bootstrap draws.

  Returns:
    A Table with a row per (setting, variant), sorted by setting then variant;
    columns are the target domains (natural order) and 'mean'; rows carry their
    paired differences to `baseline` where the runs store per-example outcomes.

  Raises:
    ValueError: no run has results, `metric` or a variant appears in none, or the
      per-example outcomes of a variant and the baseline do not pair up.
  """
  keys = tuple(swept_keys(records) if keys is None else keys)
  done = [r for r in records if r.results is not None]
  if not done:
    raise ValueError(f"no run has {RESULTS_FILE} yet ({len(records)} runs)")
  found = {v for r in done for v in r.results.get("metrics", {})}
  if variants is None:
    variants = sorted(found)
  unknown = [v for v in variants if v not in found]
  if unknown:
    raise ValueError(f"variants {unknown} appear in no run; accepted: {', '.join(sorted(found))}")

  if baseline is not None and baseline not in found:
    raise ValueError(f"baseline={baseline!r} appears in no run; accepted: {', '.join(found)}")
  compare = baseline is not None and metric == "accuracy"

  # (setting, variant) -> seed -> domain -> values, and seed -> source-val values.
  per_seed: dict[tuple, dict[Any, dict[str, list[float]]]] = {}
  per_seed_val: dict[tuple, dict[Any, list[float]]] = {}
  # (setting, variant) -> seed -> domain -> [n] paired differences to the baseline.
  per_seed_diff: dict[tuple, dict[Any, dict[str, np.ndarray]]] = {}
  metrics_seen = set()
  for r in done:
    setting = tuple((k, setting_value(r, k)) for k in keys)
    seed = r.results.get("seed", r.overrides.get(SEED_KEY))
    for variant in variants:
      if compare and variant != baseline:
        diffs = _paired_diffs(r, variant, baseline)
        if diffs:
          per_seed_diff.setdefault((setting, variant), {}).setdefault(seed, {}).update(diffs)
      for domain, values in r.results.get("metrics", {}).get(variant, {}).items():
        if domain == MEAN or not isinstance(values, Mapping):
          continue
        metrics_seen.update(values)
        if not _number(values.get(metric)):
          continue
        if domain == SOURCE_VAL:
          per_seed_val.setdefault((setting, variant), {}).setdefault(seed, [])
          per_seed_val[(setting, variant)][seed].append(float(values[metric]))
        else:
          domains = per_seed.setdefault((setting, variant), {}).setdefault(seed, {})
          domains.setdefault(domain, []).append(float(values[metric]))
  if not per_seed:
    raise ValueError(
      f"metric={metric!r} appears in no run's results; accepted: {', '.join(sorted(metrics_seen))}"
    )

  domains = sorted(
    {d for seeds in per_seed.values() for ds in seeds.values() for d in ds}, key=_natural
  )
  order = {v: i for i, v in enumerate(variants)}
  rows = []
  for (setting, variant), seeds in per_seed.items():
    # A run listed twice for one seed and domain cannot happen in a sweep; average if it does.
    by_seed = {s: {d: float(np.mean(v)) for d, v in ds.items()} for s, ds in seeds.items()}
    cells = {}
    for d in domains:
      values = [ds[d] for ds in by_seed.values() if d in ds]
      if values:
        cells[d] = _cell(values)
    complete = [ds for ds in by_seed.values() if all(d in ds for d in domains)]
    if complete:
      cells[MEAN] = _cell([np.mean([ds[d] for d in domains]) for ds in complete])
    val = per_seed_val.get((setting, variant))
    val_cell = _cell([float(np.mean(v)) for v in val.values()]) if val else None
    diffs = _row_diffs(
      per_seed_diff.get((setting, variant), {}),
      domains,
      key=(setting, variant),
      num_samples=bootstrap_samples,
      seed=bootstrap_seed,
    )
    rows.append(Row(setting, variant, cells, val_cell, (), diffs))
  rows.sort(key=lambda row: ([_value_order(v) for _, v in row.setting], order[row.variant]))

  notes = [f"{len(records)} runs: {len(done)} with results, {len(records) - len(done)} without."]
  fixed = fixed_overrides(records)
  if fixed:
    notes.append("Fixed overrides: " + ", ".join(f"{k}={show(v)}" for k, v in fixed.items()) + ".")
  if baseline is not None and not compare:
    notes.append(f"No differences to {baseline}: paired intervals are for metric=accuracy only.")
  elif compare and not per_seed_diff:
    notes.append(
      f"No differences to {baseline}: no run stores per-example outcomes of it and another "
      f"variant (results.json '{PER_EXAMPLE}')."
    )
  return Table(
    metric, keys, (*domains, MEAN), tuple(rows), (), tuple(notes), baseline if compare else None
  )


def select_models(
  table: Table, *, over: Sequence[str], selection: str, higher_is_better: bool = True
) -> Table:
  """Keeps, per setting of the other keys and variant, the best setting of `over`.

  Args:
    table: from `aggregate`, whose keys include `over`.
    over: the hyper-parameters to select (empty: `table` is returned unchanged).
    selection: 'train_domain_val' (by the rows' source-domain validation metric)
      or 'oracle' (by the mean target metric).
    higher_is_better: False for metrics such as a loss or an error.

  Returns:
    The table with `over` moved from `keys` to `selected_keys` and one row per
    group; or, for 'train_domain_val' when some row has no validation metric,
    the unchanged table with a note saying so.

  Raises:
    ValueError: unknown `selection`, or a key of `over` that is not swept.
  """
  if selection not in SELECTIONS:
    raise ValueError(f"selection={selection!r} is unknown; accepted: {', '.join(SELECTIONS)}")
  over = tuple(over)
  unknown = [k for k in over if k not in table.keys]
  if unknown:
    swept = ", ".join(table.keys) or "none"
    raise ValueError(f"select_over keys {unknown} are not swept; swept keys: {swept}")
  if not over:
    return table
  if selection == "train_domain_val" and any(row.val is None for row in table.rows):
    note = (
      f"Model selection train_domain_val over {', '.join(over)}: not every run reports a "
      f"source-domain validation metric (metrics[<variant>]['{SOURCE_VAL}']['{table.metric}']), "
      "so no selection was made and every setting is shown."
    )
    return table._replace(notes=(*table.notes, note))
  keys = tuple(k for k in table.keys if k not in over)
  sign = 1.0 if higher_is_better else -1.0
  best: dict[tuple, tuple[float, Row]] = {}
  for row in table.rows:
    values = dict(row.setting)
    group = (tuple((k, values[k]) for k in keys), row.variant)
    source = row.val if selection == "train_domain_val" else row.cells.get(MEAN)
    score = sign * source.mean if source is not None else -math.inf
    if group not in best or score > best[group][0]:  # Ties keep the first setting.
      chosen = row._replace(setting=group[0], selected=tuple((k, values[k]) for k in over))
      best[group] = (score, chosen)
  by = "source-domain validation" if selection == "train_domain_val" else "mean target (oracle)"
  note = f"Model selection {selection} over {', '.join(over)}: the best {by} {table.metric}."
  order = {}
  for row in table.rows:
    order.setdefault(row.variant, len(order))
  rows = sorted(
    (row for _, row in best.values()),
    key=lambda row: ([_value_order(v) for _, v in row.setting], order[row.variant]),
  )
  return table._replace(
    keys=keys,
    rows=tuple(rows),
    selected_keys=over,
    notes=(*table.notes, note),
  )


# ----------------------------------------------------------------------------
# Output formats
# ----------------------------------------------------------------------------


def show(value: Any) -> str:
  """A setting value as text: tuples joined by ',', floats by repr."""
  if isinstance(value, tuple):
    return ",".join(show(v) for v in value)
  return str(value)


def _row_n(row: Row) -> int:
  return max(cell.n for cell in row.cells.values())


def format_cell(
  cell: Cell | None,
  *,
  row_n: int,
  scale: float,
  digits: int,
  pm: str = "±",
  mark: str = "",
) -> str:
  """`'82.0 ± 2.0'`; no ± for one seed; `' (n=2)'` when fewer seeds than the row has.

  `mark` (e.g. the significance mark) is appended when given.
  """
  if cell is None:
    return MISSING
  text = f"{cell.mean * scale:.{digits}f}"
  if cell.n > 1:
    text += f" {pm} {cell.std * scale:.{digits}f}"
  if cell.n != row_n:
    text += f" (n={cell.n})"
  return f"{text} {mark}" if mark else text


def format_diff(diff: Diff | None, *, scale: float, digits: int, mark: str = SIGNIFICANT) -> str:
  """`'+3.0 [+1.2, +4.9] *'`: mean difference, interval, `mark` when it excludes 0."""
  if diff is None:
    return MISSING
  f = lambda v: f"{v * scale:+.{digits}f}"
  text = f"{f(diff.mean)} [{f(diff.low)}, {f(diff.high)}]"
  return f"{text} {mark}" if diff.significant else text


def _mark(row: Row, column: str, mark: str) -> str:
  diff = (row.diffs or {}).get(column)
  return mark if diff is not None and diff.significant else ""


def _compared(table: Table) -> list[Row]:
  """The rows that carry differences to the baseline."""
  return [row for row in table.rows if row.diffs]


def _significance_caption(table: Table, scale: float) -> str:
  times = f" (×{scale:g})" if scale != 1 else ""
  seeds = max(d.n for row in _compared(table) for d in row.diffs.values())
  return (
    f"Difference to {table.baseline}{times}: mean over seeds of the paired accuracy "
    f"difference [95 % interval: paired bootstrap over test examples and {seeds} seeds]; "
    f"{SIGNIFICANT} = the interval excludes 0 (also marked in the table above)."
  )


def _header(table: Table) -> list[str]:
  return [
    *table.keys,
    *(f"{k} (selected)" for k in table.selected_keys),
    "variant",
    *table.columns,
    "n",
  ]


def _text_cells(row: Row) -> list[str]:
  return [*(show(v) for _, v in row.setting), *(show(v) for _, v in row.selected), row.variant]


def _caption(table: Table, scale: float) -> str:
  times = f" (×{scale:g})" if scale != 1 else ""
  return f"Metric {table.metric}{times}: mean ± std over seeds; n = number of seeds."


def to_markdown(table: Table, *, scale: float = 100.0, digits: int = 1) -> str:
  """The table in GitHub Markdown, preceded by its caption and notes.

  With differences to a baseline, cells whose interval excludes 0 carry `*`, and a second
  table lists the differences and their intervals.
  """
  esc = lambda s: s.replace("|", r"\|")
  header = _header(table)
  n_text = len(header) - len(table.columns) - 1
  rule = "|" + "|".join([" --- "] * n_text + [" ---: "] * (len(table.columns) + 1)) + "|"
  lines = [_caption(table, scale), *table.notes, ""]
  lines.append("| " + " | ".join(esc(h) for h in header) + " |")
  lines.append(rule)
  for row in table.rows:
    n = _row_n(row)
    cells = [
      format_cell(
        row.cells.get(c), row_n=n, scale=scale, digits=digits, mark=_mark(row, c, SIGNIFICANT)
      )
      for c in table.columns
    ]
    lines.append("| " + " | ".join(esc(c) for c in [*_text_cells(row), *cells, str(n)]) + " |")
  compared = _compared(table)
  if compared:
    lines += ["", _significance_caption(table, scale), ""]
    lines.append("| " + " | ".join(esc(h) for h in header) + " |")
    lines.append(rule)
    for row in compared:
      n = max(d.n for d in row.diffs.values())
      cells = [format_diff(row.diffs.get(c), scale=scale, digits=digits) for c in table.columns]
      lines.append("| " + " | ".join(esc(c) for c in [*_text_cells(row), *cells, str(n)]) + " |")
  return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
  """Long format, unscaled and at full precision: one line per row and column."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  header = [*table.keys, *table.selected_keys, "variant", "column", "mean", "std", "n"]
  diff_fields = ("diff", "diff_low", "diff_high", "diff_n", "significant")
  writer.writerow([*header, *diff_fields] if table.baseline else header)
  for row in table.rows:
    for column in table.columns:
      cell = row.cells.get(column)
      if cell is None:
        continue
      line = [*_text_cells(row), column, repr(cell.mean), repr(cell.std), cell.n]
      if table.baseline:
        d = (row.diffs or {}).get(column)
        line += (
          [repr(d.mean), repr(d.low), repr(d.high), d.n, int(d.significant)] if d else [""] * 5
        )
      writer.writerow(line)
  return buf.getvalue()


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"}
_LATEX_SPECIAL.update(
  {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}
)


def _latex_escape(text: str) -> str:
  return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def to_latex(table: Table, *, scale: float = 100.0, digits: int = 1) -> str:
  """A booktabs `tabular` (needs `\\usepackage{booktabs}`), caption and notes as comments."""
  header = _header(table)
  n_text = len(header) - len(table.columns) - 1
  lines = [f"% {line}" for line in (_caption(table, scale), *table.notes)]
  lines.append(r"\begin{tabular}{" + "l" * n_text + "r" * (len(table.columns) + 1) + "}")
  lines.append(r"\toprule")
  lines.append(" & ".join(_latex_escape(h) for h in header) + r" \\")
  lines.append(r"\midrule")
  mark = f"$^{{{SIGNIFICANT}}}$"
  for row in table.rows:
    n = _row_n(row)
    cells = [
      format_cell(
        row.cells.get(c), row_n=n, scale=scale, digits=digits, pm=r"$\pm$", mark=_mark(row, c, mark)
      )
      for c in table.columns
    ]
    texts = [_latex_escape(t) for t in _text_cells(row)]
    lines.append(" & ".join([*texts, *(c.replace(MISSING, "--") for c in cells), str(n)]) + r" \\")
  lines.append(r"\bottomrule")
  lines.append(r"\end{tabular}")
  compared = _compared(table)
  if compared:
    lines += ["", f"% {_significance_caption(table, scale)}"]
    lines.append(r"\begin{tabular}{" + "l" * n_text + "r" * (len(table.columns) + 1) + "}")
    lines += [r"\toprule", " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for row in compared:
      n = max(d.n for d in row.diffs.values())
      cells = [
        format_diff(row.diffs.get(c), scale=scale, digits=digits, mark=mark).replace(MISSING, "--")
        for c in table.columns
      ]
      texts = [_latex_escape(t) for t in _text_cells(row)]
      lines.append(" & ".join([*texts, *cells, str(n)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
  return "\n".join(lines) + "\n"


def plot_lines(table: Table, key: str) -> dict[str, list[tuple[float, Cell]]]:
  """Label -> [(value of `key`, mean cell)] for every line with at least two points.

  A line is a variant at one setting of the other keys; its points are the rows
  whose `key` is a number and whose 'mean' cell exists.
  """
  others = [k for k in table.keys if k != key]
  points: dict[tuple, list[tuple[float, Cell]]] = {}
  for row in table.rows:
    values = dict(row.setting)
    if not _number(values.get(key)) or MEAN not in row.cells:
      continue
    rest = tuple((k, values[k]) for k in others) + row.selected
    points.setdefault((rest, row.variant), []).append((float(values[key]), row.cells[MEAN]))
  lines = {k: sorted(v, key=lambda p: p[0]) for k, v in points.items() if len(v) > 1}
  several = len({rest for rest, _ in lines}) > 1
  label = lambda rest, variant: (
    f"{variant} ({', '.join(f'{k}={show(v)}' for k, v in rest)})" if several else variant
  )
  return {label(*k): v for k, v in lines.items()}


def plot_key(table: Table, key: str, path: str | os.PathLike, *, scale: float = 100.0) -> bool:
  """Writes a PNG of the mean metric against `key`; False (nothing written) if no line."""
  lines = plot_lines(table, key)
  if not lines:
    return False
  import matplotlib  # Deferred: only plotting needs it.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  try:
    for label, points in lines.items():
      x = [p[0] for p in points]
      y = [p[1].mean * scale for p in points]
      err = [0.0 if math.isnan(p[1].std) else p[1].std * scale for p in points]
      ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    xs = [p[0] for points in lines.values() for p in points]
    if min(xs) > 0 and max(xs) / min(xs) >= 100:  # Learning rates and the like.
      ax.set_xscale("log")
    times = f" (×{scale:g})" if scale != 1 else ""
    ax.set_xlabel(key)
    ax.set_ylabel(f"{table.metric}{times}, mean over targets")
    ax.set_title(f"{table.metric} against {key} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)
  return True


def cost_table(records: Sequence[Record]) -> str:
  """Markdown table of per-variant costs, for runs that report `params` and `step_time_s`.

  Columns: trainable and inference parameters (the first run's; they do not depend on the
  seed) and the seconds per training step (mean over runs). Empty when no run reports them.
  """
  done = [r.results for r in records if r.results and isinstance(r.results.get("params"), dict)]
  if not done:
    return ""
  variants: list[str] = []
  for res in done:
    variants += [v for v in res["params"] if v not in variants]
  lines = [
    "| variant | trainable params | inference params | s / step |",
    "|---|---:|---:|---:|",
  ]
  for v in variants:
    counts = next(res["params"][v] for res in done if v in res["params"])
    times = [res.get("step_time_s", {}).get(v) for res in done]
    times = [t for t in times if isinstance(t, int | float)]
    step = f"{np.mean(times):.3f}" if times else MISSING
    lines.append(
      f"| {v} | {counts.get('trainable', MISSING):,} | {counts.get('inference', MISSING):,} "
      f"| {step} |"
    )
  return "\n".join(lines) + "\n"


def write_outputs(
  table: Table,
  out_dir: str | os.PathLike,
  *,
  scale: float = 100.0,
  digits: int = 1,
  costs: str = "",
) -> list[pathlib.Path]:
  """Writes results.md (+ `costs`), results.csv, results.tex and plot_<key>.png files.

  Returns the written paths.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  markdown = to_markdown(table, scale=scale, digits=digits)
  if costs:
    markdown += "\n" + costs
  for name, text in (
    ("results.md", markdown),
    ("results.csv", to_csv(table)),
    ("results.tex", to_latex(table, scale=scale, digits=digits)),
  ):
    (out / name).write_text(text, encoding="utf-8")
    written.append(out / name)
  for key in table.keys:
    path = out / f"plot_{key}.png"
    if plot_key(table, key, path, scale=scale):
      written.append(path)
  return written


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _split(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m launch.collect", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--sweep_dir", required=True, help="the folder `launch.sweep` wrote")
  parser.add_argument("--out", default=None, help="output folder (default: --sweep_dir)")
  parser.add_argument("--metric", default="accuracy", help="per-domain metric (default accuracy)")
  parser.add_argument(
    "--variants", default="", help="comma-separated variants to show (default all)"
  )
  parser.add_argument("--select_over", default="", help="comma-separated swept keys to select")
  parser.add_argument("--selection", choices=SELECTIONS, default="train_domain_val")
  parser.add_argument("--lower_is_better", action="store_true", help="e.g. for a loss or an ECE")
  parser.add_argument("--scale", type=float, default=100.0, help="display factor (default 100)")
  parser.add_argument("--digits", type=int, default=1, help="displayed decimals (default 1)")
  parser.add_argument(
    "--baseline",
    default="",
    help="variant to compare every other one with (default: the method's main baseline, "
    f"launch.collect.BASELINES; '{NO_BASELINE}': no comparison)",
  )
  parser.add_argument(
    "--bootstrap_samples",
    type=int,
    default=significance.DEFAULT_SAMPLES,
    help=f"paired bootstrap replicates (default {significance.DEFAULT_SAMPLES})",
  )
  parser.add_argument("--bootstrap_seed", type=int, default=0, help="fixes the bootstrap draws")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.digits < 0:
      raise ValueError(f"--digits={args.digits} is invalid; accepted: an integer >= 0")
    if args.bootstrap_samples < 1:
      raise ValueError(
        f"--bootstrap_samples={args.bootstrap_samples} is invalid; accepted: an integer >= 1"
      )
    records = load_records(args.sweep_dir)
    table = aggregate(
      records,
      metric=args.metric,
      variants=_split(args.variants) or None,
      baseline=resolve_baseline(records, args.baseline),
      bootstrap_samples=args.bootstrap_samples,
      bootstrap_seed=args.bootstrap_seed,
    )
    table = select_models(
      table,
      over=_split(args.select_over),
      selection=args.selection,
      higher_is_better=not args.lower_is_better,
    )
    costs = cost_table(records)
    written = write_outputs(
      table, args.out or args.sweep_dir, scale=args.scale, digits=args.digits, costs=costs
    )
  except ValueError as e:
    print(f"launch.collect: error: {e}", file=sys.stderr)
    return 2
  print(to_markdown(table, scale=args.scale, digits=args.digits))
  if costs:
    print(costs)
  for note in table.notes:
    if "no selection was made" in note:
      print(f"launch.collect: warning: {note}", file=sys.stderr)
  print("wrote " + ", ".join(str(p) for p in written))
  return 0


if __name__ == "__main__":
  sys.exit(main())
