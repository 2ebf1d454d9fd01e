"""Tests of launch/collect.py against the golden sweep in fixtures/sweep and small records.

The fixture (hand-written numbers) is a sweep over `aggregator.kind` with two variants:
- kind=mean: one run per seed (0, 1, 2) and target (rot0, rot75); the seed-2 rot75 run
  has no results, so that row has 3 seeds for rot0 but 2 for rot75 and for the mean;
- kind=max: one run per seed (0, 1) holding both targets;
- the base config (no override; config.json says kind=transformer): seed 0 only;
- every run fixes meta.steps=40; only meta_dmoe reports a source_val accuracy.
"""

import csv
import io
import json
import math
import pathlib

import numpy as np
import pytest

from launch import collect

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sweep"

# Worked out by hand from the fixture's numbers (×100, one decimal), e.g. kind=mean/erm:
# rot0 80, 82, 84 -> 82.0 ± 2.0; rot75 60, 64 -> 62.0 ± 2.8; per-seed means 70, 73 ->
# 71.5 ± 2.1 (seed 2 lacks rot75).
GOLDEN_MARKDOWN = """\
Metric accuracy (×100): mean ± std over seeds; n = number of seeds.
9 runs: 8 with results, 1 without.
Fixed overrides: meta.steps=40.

| aggregator.kind | variant | rot0 | rot75 | mean | n |
| --- | --- | ---: | ---: | ---: | ---: |
| max | erm | 72.0 ± 2.8 | 51.0 ± 1.4 | 61.5 ± 2.1 | 2 |
| max | meta_dmoe | 89.0 ± 1.4 | 71.0 ± 1.4 | 80.0 ± 1.4 | 2 |
| mean | erm | 82.0 ± 2.0 | 62.0 ± 2.8 (n=2) | 71.5 ± 2.1 (n=2) | 3 |
| mean | meta_dmoe | 85.0 ± 2.0 | 67.0 ± 2.8 (n=2) | 76.5 ± 2.1 (n=2) | 3 |
| transformer | erm | 90.0 | 70.0 | 80.0 | 1 |
| transformer | meta_dmoe | 85.0 | 65.0 | 75.0 | 1 |
"""


@pytest.fixture(scope="module")
def records():
  return collect.load_records(FIXTURE)


@pytest.fixture(scope="module")
def table(records):
  return collect.aggregate(records)


def _raw_fixture():
  """(kind, seed, variant, domain) -> accuracy, read straight from the JSON files."""
  out = {}
  for run in FIXTURE.iterdir():
    results_path = run / "results.json"
    if not results_path.exists():
      continue
    spec = json.loads((run / "spec.json").read_text())
    kind = spec["overrides"].get("aggregator.kind", "transformer")
    results = json.loads(results_path.read_text())
    for variant, per_domain in results["metrics"].items():
      for domain, metrics in per_domain.items():
        if domain not in ("mean", "source_val"):
          out[(kind, results["seed"], variant, domain)] = metrics["accuracy"]
  return out


# ----------------------------------------------------------------------------- golden fixture


def test_golden_markdown(table):
  assert collect.to_markdown(table) == GOLDEN_MARKDOWN


def test_records_resolve_settings(records):
  assert len(records) == 9
  assert sum(r.results is None for r in records) == 1
  assert collect.swept_keys(records) == ("aggregator.kind",)
  assert collect.fixed_overrides(records) == {"meta.steps": 40}
  base = [r for r in records if "aggregator.kind" not in r.overrides]
  assert [collect.setting_value(r, "aggregator.kind") for r in base] == ["transformer"]
  assert collect.setting_value(base[0], "meta.nothing") == collect.DEFAULT


def test_csv_matches_numpy_reference(table):
  raw = _raw_fixture()
  rows = list(csv.DictReader(io.StringIO(collect.to_csv(table))))
  assert len(rows) == 18  # 3 kinds × 2 variants × (rot0, rot75, mean)
  for row in rows:
    kind, variant, column = row["aggregator.kind"], row["variant"], row["column"]
    per_seed = {}  # seed -> domain -> accuracy
    for (k, seed, v, domain), acc in raw.items():
      if (k, v) == (kind, variant):
        per_seed.setdefault(seed, {})[domain] = acc
    if column == "mean":  # Seeds with both targets, each averaged over the targets.
      values = [np.mean([d["rot0"], d["rot75"]]) for d in per_seed.values() if len(d) == 2]
    else:
      values = [d[column] for d in per_seed.values() if column in d]
    values = np.asarray(values)
    assert int(row["n"]) == len(values)
    assert float(row["mean"]) == pytest.approx(values.mean(), abs=1e-12)
    if len(values) > 1:
      assert float(row["std"]) == pytest.approx(values.std(ddof=1), abs=1e-12)
    else:
      assert math.isnan(float(row["std"]))


def test_latex(table):
  tex = collect.to_latex(table)
  lines = tex.splitlines()
  assert lines[:3] == [
    "% Metric accuracy (×100): mean ± std over seeds; n = number of seeds.",
    "% 9 runs: 8 with results, 1 without.",
    "% Fixed overrides: meta.steps=40.",
  ]
  assert r"\begin{tabular}{llrrrr}" in lines
  assert r"aggregator.kind & variant & rot0 & rot75 & mean & n \\" in lines
  assert (
    r"mean & meta\_dmoe & 85.0 $\pm$ 2.0 & 67.0 $\pm$ 2.8 (n=2) & 76.5 $\pm$ 2.1 (n=2) & 3 \\"
    in lines
  )
  assert lines[-2:] == [r"\bottomrule", r"\end{tabular}"]


def test_oracle_selection_picks_best_mean_per_variant(table):
  selected = collect.select_models(table, over=["aggregator.kind"], selection="oracle")
  assert selected.keys == ()
  assert selected.selected_keys == ("aggregator.kind",)
  # erm: transformer 80.0 > mean 71.5 > max 61.5; meta_dmoe: max 80.0 > mean 76.5 > 75.0.
  assert [(r.variant, r.selected) for r in selected.rows] == [
    ("erm", (("aggregator.kind", "transformer"),)),
    ("meta_dmoe", (("aggregator.kind", "max"),)),
  ]
  markdown = collect.to_markdown(selected)
  assert "| aggregator.kind (selected) | variant | rot0 | rot75 | mean | n |" in markdown
  assert "| max | meta_dmoe | 89.0 ± 1.4 | 71.0 ± 1.4 | 80.0 ± 1.4 | 2 |" in markdown
  assert "Model selection oracle over aggregator.kind" in markdown


def test_train_domain_val_falls_back_when_a_variant_lacks_it(table):
  selected = collect.select_models(table, over=["aggregator.kind"], selection="train_domain_val")
  assert selected.rows == table.rows and selected.keys == table.keys
  assert "no selection was made" in selected.notes[-1]
  assert "no selection was made" in collect.to_markdown(selected)


def test_train_domain_val_selects_by_source_validation(records):
  table = collect.aggregate(records, variants=["meta_dmoe"])
  selected = collect.select_models(table, over=["aggregator.kind"], selection="train_domain_val")
  # Source-val means: transformer 0.96 > max 0.945 > mean 0.9167 (the target-best is max).
  assert [r.selected for r in selected.rows] == [(("aggregator.kind", "transformer"),)]
  assert selected.rows[0].val.mean == pytest.approx(0.96)


def test_lower_is_better_flips_the_choice(table):
  selected = collect.select_models(
    table, over=["aggregator.kind"], selection="oracle", higher_is_better=False
  )
  assert [dict(r.selected)["aggregator.kind"] for r in selected.rows] == ["max", "transformer"]


def test_cli_writes_every_output(tmp_path, capsys):
  assert collect.main([f"--sweep_dir={FIXTURE}", f"--out={tmp_path}"]) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.md", "results.tex"]
  # The fixture stores no per-example outcomes: the CLI says why there are no intervals.
  note = (
    "No differences to erm: no run stores per-example outcomes of it and another variant "
    "(results.json 'per_example').\n"
  )
  fixed = "Fixed overrides: meta.steps=40.\n"
  want = GOLDEN_MARKDOWN.replace(fixed, fixed + note)
  assert (tmp_path / "results.md").read_text() == want
  assert want in capsys.readouterr().out


# ----------------------------------------------------------------------------- small records


def _record(name, overrides, per_variant, *, config=None, seed=0):
  metrics = {v: {d: {"accuracy": a} for d, a in doms.items()} for v, doms in per_variant.items()}
  results = {"seed": seed, "metrics": metrics}
  return collect.Record(name, {"seed": seed, **overrides}, config or {}, results)


def _numeric_records():
  """experts.num_experts swept over 2, 3, 5 (5 only in config.json), two seeds each."""
  out = []
  for seed in (0, 1):
    for k, acc in ((2, 0.5), (3, 0.6), (None, 0.8)):
      overrides = {} if k is None else {"experts.num_experts": k}
      config = {"experts.num_experts": 5 if k is None else k}
      values = {"erm": {"rot75": acc + 0.01 * seed}, "meta_dmoe": {"rot75": acc + 0.1}}
      out.append(_record(f"{k}-{seed}", overrides, values, config=config, seed=seed))
  return out


def test_plot_lines_and_png(tmp_path):
  table = collect.aggregate(_numeric_records())
  assert table.keys == ("experts.num_experts",)
  lines = collect.plot_lines(table, "experts.num_experts")
  assert sorted(lines) == ["erm", "meta_dmoe"]
  assert [x for x, _ in lines["erm"]] == [2.0, 3.0, 5.0]
  assert [c.mean for _, c in lines["erm"]] == pytest.approx([0.505, 0.605, 0.805])
  written = collect.write_outputs(table, tmp_path)
  png = tmp_path / "plot_experts.num_experts.png"
  assert png in written
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_plot_for_a_categorical_key(tmp_path, table):
  assert collect.plot_lines(table, "aggregator.kind") == {}
  assert not collect.plot_key(table, "aggregator.kind", tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()


def test_one_line_per_setting_of_the_other_keys():
  records = [
    _record(f"{lr}-{wd}", {"lr": lr, "wd": wd}, {"erm": {"d": lr * 10 + wd}})
    for lr in (0.1, 0.2)
    for wd in (0, 1)
  ]
  lines = collect.plot_lines(collect.aggregate(records), "lr")
  assert sorted(lines) == ["erm (wd=0)", "erm (wd=1)"]


# ----------------------------------------------------------------------------- bad input


def test_errors(tmp_path, records, table):
  with pytest.raises(ValueError, match="metric='ece' appears in no run's results; accepted: acc"):
    collect.aggregate(records, metric="ece")
  with pytest.raises(ValueError, match=r"variants \['foo'\] appear in no run; accepted: erm"):
    collect.aggregate(records, variants=["foo"])
  with pytest.raises(
    ValueError, match=r"select_over keys \['seed'\] are not swept; swept keys: agg"
  ):
    collect.select_models(table, over=["seed"], selection="oracle")
  with pytest.raises(ValueError, match="selection='best' is unknown; accepted: train_domain_val"):
    collect.select_models(table, over=[], selection="best")
  with pytest.raises(ValueError, match="is not a directory"):
    collect.load_records(tmp_path / "missing")
  with pytest.raises(ValueError, match="holds no run folder"):
    collect.load_records(tmp_path)
  with pytest.raises(ValueError, match=r"no run has results\.json yet"):
    collect.aggregate([r._replace(results=None) for r in records])


def test_cli_error_is_one_line(tmp_path, capsys):
  assert collect.main([f"--sweep_dir={FIXTURE}", f"--out={tmp_path}", "--metric=ece"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("launch.collect: error: metric='ece'") and err.count("\n") == 1
  assert not any(tmp_path.iterdir())


def test_cost_table_lists_params_and_mean_step_time():
  def run(seed, step):
    results = {
      "params": {
        "adapter": {"trainable": 1200, "inference": 5000},
        "full": {"trainable": 9, "inference": 9},
      },
      "step_time_s": {"adapter": step, "full": 2 * step},
    }
    return collect.Record(f"r{seed}", {"seed": seed}, {}, results)

  text = collect.cost_table([run(0, 0.1), run(1, 0.3), collect.Record("x", {}, {}, None)])
  lines = text.strip().splitlines()
  assert lines[2] == "| adapter | 1,200 | 5,000 | 0.200 |"
  assert lines[3] == "| full | 9 | 9 | 0.400 |"
  assert collect.cost_table([collect.Record("x", {}, {}, {"metrics": {}})]) == ""
