"""Tests of the paired bootstrap (launch/significance.py) and its use in launch/collect.py.

References are independent: the normal-approximation paired interval (SciPy's normal
quantile with the plug-in variance of the two-stage resampling) and a brute-force
bootstrap that draws explicit seed and example indices.
"""

import numpy as np
import pytest
from scipy import stats

from launch import collect, significance

Z = stats.norm.ppf(0.975)


def _diffs(rng, n, p_up, p_down):
  """[n] paired differences: +1 with p_up, −1 with p_down, else 0."""
  u = rng.random(n)
  return np.where(u < p_up, 1.0, np.where(u < p_up + p_down, -1.0, 0.0))


def test_one_seed_matches_the_normal_approximation():
  d = _diffs(np.random.default_rng(0), 20_000, 0.20, 0.15)
  got = significance.paired_bootstrap([[d]], num_samples=20_000, rng=np.random.default_rng(1))
  half = Z * d.std() / np.sqrt(len(d))
  assert got.mean == pytest.approx(d.mean())
  assert got.n == 1
  assert got.low == pytest.approx(d.mean() - half, abs=0.06 * half)
  assert got.high == pytest.approx(d.mean() + half, abs=0.06 * half)
  assert got.significant  # +5 points on 20,000 pairs


def test_two_stage_variance_matches_the_plug_in_formula():
  # Seeds differ in their mean difference; within a seed, examples are noisy.
  rng = np.random.default_rng(2)
  seeds = [[_diffs(rng, 4000, p, 0.1)] for p in (0.10, 0.14, 0.18, 0.22, 0.26, 0.30)]
  got = significance.paired_bootstrap(seeds, num_samples=40_000, rng=np.random.default_rng(3))
  means = np.array([s[0].mean() for s in seeds])
  within = np.mean([s[0].var() / len(s[0]) for s in seeds])
  # One replicate = mean of S i.i.d. draws: a random seed's mean plus its resampling noise.
  sd = np.sqrt((means.var() + within) / len(seeds))
  assert got.mean == pytest.approx(means.mean())
  assert (got.high - got.low) / 2 == pytest.approx(Z * sd, rel=0.1)


def _brute_force(seeds, num_samples, rng):
  """The same two-stage bootstrap with explicit indices (slow, obviously right)."""
  out = []
  for _ in range(num_samples):
    picks = rng.integers(0, len(seeds), len(seeds))
    stats_ = [np.mean([d[rng.integers(0, len(d), len(d))].mean() for d in seeds[s]]) for s in picks]
    out.append(np.mean(stats_))
  return np.quantile(out, [0.025, 0.975])


def test_matches_a_brute_force_bootstrap_with_several_domains():
  rng = np.random.default_rng(4)
  seeds = [[_diffs(rng, 150, 0.2, 0.1), _diffs(rng, 90, 0.1, 0.2)] for _ in range(3)]
  got = significance.paired_bootstrap(seeds, num_samples=4000, rng=np.random.default_rng(5))
  low, high = _brute_force(seeds, 4000, np.random.default_rng(6))
  half = (high - low) / 2
  assert got.mean == pytest.approx(np.mean([np.mean([d.mean() for d in s]) for s in seeds]))
  assert got.low == pytest.approx(low, abs=0.1 * half)
  assert got.high == pytest.approx(high, abs=0.1 * half)


def test_fixed_seed_is_deterministic():
  rng = np.random.default_rng(7)
  seeds = [[_diffs(rng, 300, 0.1, 0.1)] for _ in range(3)]
  draw = lambda seed: significance.paired_bootstrap(
    seeds, num_samples=500, rng=np.random.default_rng(seed)
  )
  assert draw(0) == draw(0)
  assert draw(0) != draw(1)
  assert significance.rng_for("a", 1).random() == significance.rng_for("a", 1).random()
  assert significance.rng_for("a", 1).random() != significance.rng_for("a", 2).random()


def test_null_differences_are_covered():
  # Identical outcomes: the interval is exactly [0, 0].
  same = significance.paired_bootstrap(
    [[np.zeros(50)]] * 3, num_samples=100, rng=np.random.default_rng(0)
  )
  assert same == significance.Diff(0.0, 0.0, 0.0, 3)
  assert not same.significant
  # Two independent Bernoulli(0.7) variants on 300 examples, 3 seeds: no real difference,
  # so a 95 % interval excludes 0 in about 5 % of repetitions.
  rng = np.random.default_rng(8)
  excluded = 0
  for _ in range(200):
    seeds = [[(rng.random(300) < 0.7) * 1.0 - (rng.random(300) < 0.7)] for _ in range(3)]
    excluded += significance.paired_bootstrap(seeds, num_samples=400, rng=rng).significant
  assert excluded / 200 < 0.12


def test_bad_input():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="at least one seed"):
    significance.paired_bootstrap([], rng=rng)
  with pytest.raises(ValueError, match="same, non-zero number of domains"):
    significance.paired_bootstrap([[np.zeros(3)], [np.zeros(3), np.zeros(3)]], rng=rng)
  with pytest.raises(ValueError, match="non-empty"):
    significance.paired_bootstrap([[np.zeros(0)]], rng=rng)


# ----------------------------------------------------------------------------- in collect


def _run(name, seed, correct, *, method="adamix", setting=None):
  """A record whose variants have the given per-example 0/1 lists on domain 'd'."""
  metrics = {v: {"d": {"accuracy": float(np.mean(c))}} for v, c in correct.items()}
  per_example = {v: {"d": {"correct": list(map(int, c))}} for v, c in correct.items()}
  results = {"method": method, "seed": seed, "metrics": metrics, "per_example": per_example}
  overrides = {"seed": seed, **(setting or {})}
  return collect.Record(name, overrides, {}, results)


def _records():
  rng = np.random.default_rng(9)
  out = []
  for seed in range(3):
    base = rng.random(400) < 0.6
    better = base | (rng.random(400) < 0.3)  # clearly better, paired
    noise = np.where(rng.random(400) < 0.05, ~base, base)  # a few flips both ways
    out.append(_run(f"r{seed}", seed, {"adapter": base, "adamix": better, "lora": noise}))
  return out


def test_collect_reports_paired_differences_and_marks():
  records = _records()
  baseline = collect.resolve_baseline(records)
  assert baseline == collect.BASELINES["adamix"] == "adapter"
  table = collect.aggregate(records, baseline=baseline, bootstrap_samples=1000)
  rows = {row.variant: row for row in table.rows}
  assert not rows["adapter"].diffs
  for variant in ("adamix", "lora"):
    diff = rows[variant].diffs["d"]
    want = rows[variant].cells["d"].mean - rows["adapter"].cells["d"].mean
    assert diff.mean == pytest.approx(want)
    assert rows[variant].diffs["mean"].mean == diff.mean  # one domain
    assert diff.n == 3
  assert rows["adamix"].diffs["d"].significant
  assert not rows["lora"].diffs["d"].significant
  text = collect.to_markdown(table)
  assert "| adamix | " in text and "Difference to adapter" in text
  adamix_line = next(line for line in text.splitlines() if line.startswith("| adamix | "))
  assert adamix_line.count(" *") == 2  # domain and mean
  latex = collect.to_latex(table)
  assert "$^{*}$" in latex and latex.count(r"\begin{tabular}") == 2
  assert "significant" in collect.to_csv(table).splitlines()[0]
  # Deterministic for a fixed bootstrap seed, whatever else the table holds.
  again = collect.aggregate(records, baseline=baseline, bootstrap_samples=1000)
  assert again == table
  only = collect.aggregate(
    records, baseline=baseline, bootstrap_samples=1000, variants=["adapter", "adamix"]
  )
  assert {r.variant: r.diffs for r in only.rows}["adamix"] == rows["adamix"].diffs


def test_collect_baseline_errors(tmp_path):
  records = _records()
  with pytest.raises(ValueError, match=r"--baseline='full' names a variant that no run"):
    collect.resolve_baseline(records, "full")
  no_adapter = [
    r._replace(results={**r.results, "metrics": {"adamix": r.results["metrics"]["adamix"]}})
    for r in records
  ]
  with pytest.raises(ValueError, match=r"--baseline \(default: 'adapter'.*BASELINES"):
    collect.resolve_baseline(no_adapter)
  assert collect.resolve_baseline(no_adapter, "none") is None
  assert collect.resolve_baseline([_run("x", 0, {"a": [1]}, method="unknown")]) is None
  short = records[0].results["per_example"]["adamix"]["d"]["correct"][:-1]
  bad = records[0]._replace(
    results={
      **records[0].results,
      "per_example": {**records[0].results["per_example"], "adamix": {"d": {"correct": short}}},
    }
  )
  with pytest.raises(ValueError, match=r"run r0: per_example of 'adamix' and 'adapter'"):
    collect.aggregate([bad], baseline="adapter")


def test_collect_pairs_the_mean_over_draws():
  """A variant stored with `correct_draws` is compared by its mean over draws."""
  rng = np.random.default_rng(3)
  records = []
  for seed in range(3):
    base = rng.random(200) < 0.5
    draws = rng.random((3, 200)) < 0.7  # [draws, n]
    record = _run(f"r{seed}", seed, {"adapter": base, "adamix": draws[0]})
    record.results["per_example"]["adamix"]["d"]["correct_draws"] = draws.astype(int).tolist()
    record.results["metrics"]["adamix"]["d"]["accuracy"] = float(draws.mean())
    records.append(record)
  table = collect.aggregate(records, baseline="adapter", bootstrap_samples=200)
  rows = {row.variant: row for row in table.rows}
  want = rows["adamix"].cells["d"].mean - rows["adapter"].cells["d"].mean
  assert rows["adamix"].diffs["d"].mean == pytest.approx(want)
