"""The results table printed at the end of a run (moe_adapt/report.py)."""

import json
import random

from moe_adapt import report

RESULTS = {
  "method": "meta_dmoe",
  "benchmark": "digits_rot",
  "seed": 1,
  "target_domains": ["rot75", "rot0"],
  "metrics": {
    "erm": {"rot75": {"accuracy": 0.5}, "rot0": {"accuracy": 0.25}, "mean": {"accuracy": 0.375}},
    "meta_dmoe": {
      "rot75": {"accuracy": 0.625, "accuracy_per_draw": [0.6, 0.65]},
      "rot0": {"accuracy": 0.5},
      "mean": {"accuracy": 0.5625},
    },
    "expert_average": {"rot0": {"accuracy": 0.125}, "mean": {"accuracy": 0.125}},
    "zzz_custom": {"rot75": {"accuracy": 1.0}},
    "no_accuracy": {"rot75": {"loss": 0.3}},
  },
  "wall_time_s": 12.4,
  # Keys the table does not read (other tools add them).
  "per_example": {"erm": {"rot75": {"correct": [1, 0]}}},
  "selection": {"meta": {"checkpoint_step": 3}},
}


def _shuffled(results, seed):
  """The same results with every dict's keys in another order."""
  rng = random.Random(seed)

  def shuffle(node):
    if not isinstance(node, dict):
      return node
    items = list(node.items())
    rng.shuffle(items)
    return {k: shuffle(v) for k, v in items}

  return shuffle(results)


def test_table_has_title_header_marked_method_row_notes_and_footer():
  text = report.format_results(RESULTS, results_path="runs/x/results.json")
  lines = text.splitlines()
  assert (
    lines[0] == "Results: meta_dmoe on digits_rot, seed 1, target domains rot75, rot0 (accuracy, %)"
  )
  assert lines[1].split()[:4] == ["variant", "rot75", "rot0", "mean"]
  assert lines[1].rstrip().endswith("what it is")
  # The method first and marked, then its named baselines, then the others by name; a
  # variant without accuracy dropped.
  rows = lines[2:6]
  assert [r[2:].split()[0] for r in rows] == ["meta_dmoe", "erm", "expert_average", "zzz_custom"]
  assert rows[0].startswith("* meta_dmoe") and all(r.startswith("  ") for r in rows[1:])
  assert rows[0].split()[2:5] == ["62.5", "50.0", "56.2"]
  assert rows[2].split()[1:4] == ["-", "12.5", "12.5"]  # no rot75 accuracy: '-'
  assert rows[3].split()[1:] == ["100.0", "-", "-"]  # no note for an unknown variant
  assert "baseline: one model trained on the pooled source domains (ERM)" in rows[1]
  assert "no_accuracy" not in text
  assert lines[-1] == "Saved: runs/x/results.json (print it with --print_json)."
  assert "* = meta_dmoe itself" in text and "Wall time of the run: 12 s." in text
  assert "Smoke test" not in text


def test_table_is_the_same_whatever_the_key_order():
  expected = report.format_results(RESULTS)
  for seed in range(5):
    assert report.format_results(_shuffled(RESULTS, seed)) == expected
  # A JSON round trip (a rerun reads results.json, written with sorted keys) changes nothing.
  assert report.format_results(json.loads(json.dumps(RESULTS, sort_keys=True))) == expected


def test_unknown_method_many_variants_and_smoke_test():
  metrics = {f"v{i:02d}": {"d": {"accuracy": i / 100}} for i in range(report.MAX_ROWS + 5)}
  text = report.format_results(
    {"method": "mine", "metrics": metrics}, smoke_test=True, results_path="r.json"
  )
  lines = text.splitlines()
  assert lines[0] == "Results: mine (accuracy, %)"
  assert lines[1].split() == ["variant", "d"]  # no notes: no note column
  assert lines[2].split() == ["v00", "0.0"]
  assert "... and 5 more variants (all in results.json)" in text
  assert "*" not in text  # no row of the method itself to mark
  assert "Smoke test (',tiny')" in text


def test_results_without_metrics():
  assert report.format_results({"method": "x", "metrics": {}}).splitlines() == [
    "Results: x (accuracy, %)",
    "  (no accuracies in these results)",
  ]


def test_order_is_own_rows_then_named_baselines_then_the_rest_by_name():
  variants = ["zzz", "full", "adamix_lora", "aaa", "adapter", "adamix"]
  assert report.ordered_variants("adamix", variants) == [
    "adamix",
    "adamix_lora",
    "adapter",
    "full",
    "aaa",
    "zzz",
  ]
  assert report.ordered_variants("unknown", variants) == sorted(variants)
