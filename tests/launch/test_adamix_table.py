"""`python -m launch.adamix_table`: the converged one-factor table, paired across runs."""

import json

import numpy as np
import pytest

from launch import adamix_table


def _write_run(path, seed, *, weight, bottleneck, variants):
  """A finished run: `variants` maps a variant to its per-example 0/1 outcomes (one domain)."""
  path.mkdir()
  config = {"adapter": {"bottleneck": bottleneck}, "adamix": {"consistency_weight": weight}}
  results = {
    "method": "adamix",
    "seed": seed,
    "metrics": {v: {"mean": {"accuracy": float(np.mean(c))}} for v, c in variants.items()},
    "per_example": {v: {"d": {"correct": c}} for v, c in variants.items()},
    "selection": {v: {"epoch": 3} for v in variants},
    "expert_spread": {v: (0.5 if v != "adapter" else None) for v in variants},
    "consistency_kl": {v: ([0.4, 0.3, 0.2, 0.1] if v != "adapter" else []) for v in variants},
  }
  (path / "config.json").write_text(json.dumps(config))
  (path / "results.json").write_text(json.dumps(results))


def test_rows_pair_variants_across_runs_by_seed_and_bottleneck(tmp_path, capsys):
  single, better = [1, 0, 1, 0], [1, 1, 1, 0]
  for seed in (0, 1):
    _write_run(
      tmp_path / f"base{seed}",
      seed,
      weight=1.0,
      bottleneck=16,
      variants={"adapter": single, "adamix": better, "adamix_no_consistency": single},
    )
    _write_run(
      tmp_path / f"w10_{seed}", seed, weight=10.0, bottleneck=16, variants={"adamix": better}
    )
  rows = adamix_table.load_rows(tmp_path)
  assert set(rows) == {
    ("adapter", 0.0, 16),
    ("adamix", 0.0, 16),
    ("adamix", 1.0, 16),
    ("adamix", 10.0, 16),
  }
  diff = adamix_table.paired_diff(rows, ("adamix", 10.0, 16), ("adapter", 0.0, 16))
  assert diff.mean == pytest.approx(0.25) and diff.n == 2
  assert rows[("adamix", 1.0, 16)][0]["kl"] == (0.4, 0.1)
  assert adamix_table.main([f"--sweep_dir={tmp_path}"]) == 0
  out = capsys.readouterr().out
  assert "| AdaMix, merged (r = 16, w = 10) | 2 | 75.0 ± 0.0 | +25.0 [" in out
  assert (tmp_path / "adamix_table.md").read_text() in out


def test_no_run_is_one_clear_error(tmp_path, capsys):
  assert adamix_table.main([f"--sweep_dir={tmp_path}"]) == 2
  assert "no finished adamix run" in capsys.readouterr().err
