"""Tests of moe_adapt.methods.adapter_soup and configs/adapter_soup.py.

- Pure pieces against hand-made inputs: similarity and clustering selection, mixture
  enumeration, greedy order, layer pruning, correlations, the evaluation cache.
- End to end through the CLI (`python -m moe_adapt.main --config=configs/adapter_soup.py:
  digits,tiny`, K = 3 adapters): results.json keys and invariants (the size-1 mixture is
  the own adapter, a 2-mixture's FSD is the pairwise entry, greedy follows the FSD
  matrix), the plots, and a rerun of the finished workdir that does no work.
- Bad inputs, each one ValueError naming the field.

The CLI subprocess compiles with XLA's cheap CPU settings (`--xla_backend_optimization_
level=0`): each training stage compiles its own step, and that cuts the compile time ~5×.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_adapt import main as main_lib
from moe_adapt.methods import adapter_soup as soup
from tests.methods import configs_util

REPO = pathlib.Path(__file__).resolve().parents[2]
DOMAINS = ("rot0", "rot45", "rot75")
OVERRIDES = {
  "data.domains": DOMAINS,
  "pruning.sparsities": (0.5, 0.9),
}


CONFIGS = configs_util.config_module("adapter_soup")


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The tiny digits config with dotted-key overrides."""
  return configs_util.with_overrides(CONFIGS.get_config("digits,tiny"), **overrides)


# ----------------------------------------------------------------------------- selection


def _blob(center, n, seed, scale=0.05):
  rng = np.random.default_rng(seed)
  return np.asarray(center, np.float64) + scale * rng.normal(size=(n, len(center)))


def test_similarity_scores_are_mean_pairwise_cosines():
  rng = np.random.default_rng(0)
  target = rng.normal(size=(5, 3))
  cands = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=(7, 3))}
  scores = soup.similarity_scores(target, cands)
  for name, emb in cands.items():
    cos = [u @ v / np.linalg.norm(u) / np.linalg.norm(v) for u in target for v in emb]
    assert scores[name] == pytest.approx(np.mean(cos), abs=1e-12)


def test_similarity_picks_the_nearest_domains_above_the_threshold():
  # Directions at 0°, 20°, 60°, 120° from the target's (cosines 1, .94, .5, -.5).
  def at(deg):
    return _blob([np.cos(np.radians(deg)), np.sin(np.radians(deg))], 20, int(deg), 0.01)

  target = at(0)
  cands = {"far": at(120), "mid": at(60), "near": at(20), "same": at(0.5)}
  sel = soup.select_by_similarity(target, cands, top_k=3, threshold=0.0)
  assert sel.selected == ("same", "near", "mid")  # best first; 'far' is below 0
  assert soup.select_by_similarity(target, cands, top_k=2, threshold=0.0).selected == (
    "same",
    "near",
  )
  high = soup.select_by_similarity(target, cands, top_k=4, threshold=0.9)
  assert high.selected == ("same", "near")
  assert all(high.scores[d] >= 0.9 for d in high.selected)
  # Nothing reaches the threshold: the most similar domain is still kept.
  assert soup.select_by_similarity(at(180), cands, top_k=3, threshold=0.99).selected == ("far",)


def test_clustering_picks_the_domains_holding_the_targets_samples():
  centers = {"a": [0, 0, 0, 5.0], "b": [0, 5.0, 0, 0], "c": [5.0, 0, 0, 0], "d": [0, 0, 5.0, 0]}
  cands = {d: _blob(c, 40, i, 0.3) for i, (d, c) in enumerate(centers.items())}
  # 60% near c, 30% near a, 10% near b, none near d.
  target = np.concatenate(
    [
      _blob(centers["c"], 30, 10, 0.3),
      _blob(centers["a"], 15, 11, 0.3),
      _blob(centers["b"], 5, 12, 0.3),
    ]
  )
  shares = soup.cluster_shares(target, cands, seed=0)
  assert shares == pytest.approx({"a": 0.3, "b": 0.1, "c": 0.6, "d": 0.0})
  sel = soup.select_by_clustering(target, cands, top_k=3, min_share=0.2, seed=0)
  assert sel.selected == ("c", "a")  # b holds 10% < 20%
  assert soup.select_by_clustering(target, cands, top_k=3, min_share=0.1, seed=0).selected == (
    "c",
    "a",
    "b",
  )
  assert soup.select_by_clustering(target, cands, top_k=1, min_share=0.1, seed=0).selected == ("c",)
  # None reaches the share: the largest is kept. PCA to 2 dims keeps the blobs apart.
  assert soup.select_by_clustering(target, cands, top_k=3, min_share=0.9, seed=0).selected == ("c",)
  pca = soup.cluster_shares(target, cands, pca_dim=3, covariance_type="full", seed=0)
  assert pca == pytest.approx(shares)


def test_selection_rejects_bad_embeddings():
  with pytest.raises(ValueError, match="candidate 'a' embeddings have shape"):
    soup.similarity_scores(np.ones((3, 2)), {"a": np.ones((3, 4))})
  with pytest.raises(ValueError, match="candidates is empty"):
    soup.select_by_clustering(np.ones((3, 2)), {}, top_k=1, min_share=0.1)
  with pytest.raises(ValueError, match="top_k=0"):
    soup.select_by_similarity(np.ones((3, 2)), {"a": np.ones((3, 2))}, top_k=0, threshold=0)
  with pytest.raises(ValueError, match="NaN or Inf"):
    soup.similarity_scores(np.full((3, 2), np.nan), {"a": np.ones((3, 2))})


# ----------------------------------------------------------------------------- mixtures


def test_exhaustive_mixtures():
  others = ["b", "c", "d", "e"]
  mixtures = soup.enumerate_mixtures("a", others, max_mixtures=16, seed=0)
  assert len(mixtures) == 16 and len(set(mixtures)) == 16
  assert all(m[0] == "a" and "a" not in m[1:] for m in mixtures)
  assert mixtures[0] == ("a",) and mixtures[-1] == ("a", *others)
  assert [len(m) for m in mixtures] == sorted(len(m) for m in mixtures)


@pytest.mark.parametrize("budget", [2, 5, 20, 100])
def test_sampled_mixtures_are_stratified_and_seeded(budget):
  others = [f"d{i}" for i in range(8)]  # 256 mixtures
  mixtures = soup.enumerate_mixtures("own", others, max_mixtures=budget, seed=3)
  assert len(mixtures) == budget and len(set(frozenset(m) for m in mixtures)) == budget
  assert all(m[0] == "own" and len(set(m)) == len(m) for m in mixtures)
  assert ("own",) in mixtures and ("own", *others) in mixtures  # sizes with one mixture
  counts = np.bincount([len(m) for m in mixtures], minlength=10)[1:]  # sizes 1..9
  held = np.array([math.comb(8, size) for size in range(9)])  # mixtures of each size
  assert np.all(counts <= held)
  if budget >= 20:  # every size is represented; sizes not exhausted share evenly
    open_sizes = counts[counts < held]
    assert counts.min() >= 1 and open_sizes.max() - open_sizes.min() <= 1
    assert np.all(counts[counts == held] <= open_sizes.min())
  assert soup.enumerate_mixtures("own", others, max_mixtures=budget, seed=3) == mixtures
  if budget > 2:
    assert soup.enumerate_mixtures("own", others, max_mixtures=budget, seed=4) != mixtures


def test_enumerate_mixtures_rejects_bad_input():
  with pytest.raises(ValueError, match="others="):
    soup.enumerate_mixtures("a", ["a", "b"], max_mixtures=4, seed=0)
  with pytest.raises(ValueError, match="max_mixtures=0"):
    soup.enumerate_mixtures("a", ["b"], max_mixtures=0, seed=0)


def test_greedy_order_against_a_hand_matrix():
  fsd = np.array(
    [
      [0.0, 0.4, 0.1, 0.3],
      [0.4, 0.0, 0.2, 0.05],
      [0.1, 0.2, 0.0, 0.5],
      [0.3, 0.05, 0.5, 0.0],
    ]
  )
  assert soup.greedy_order(fsd, 0) == [2, 3, 1]
  assert soup.greedy_order(fsd, 1) == [3, 2, 0]
  # Row means: 0.2, 0.1625, 0.2, 0.2125 -> ties (0 and 2) keep index order.
  assert soup.greedy_order(fsd, 3, rank="row_mean") == [1, 0, 2]
  assert soup.greedy_order(fsd, 1, rank="row_mean") == [0, 2, 3]
  with pytest.raises(ValueError, match="rank='max'"):
    soup.greedy_order(fsd, 0, rank="max")
  with pytest.raises(ValueError, match="own=4"):
    soup.greedy_order(fsd, 4)


def test_layer_fsd_and_layer_pruning():
  rng = np.random.default_rng(0)
  w0, w1 = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))

  def tree(a, b):
    return {
      "backbone": {
        "block_0": {"adapter_mlp": {"kernel": jnp.asarray(a, jnp.float32)}},
        "block_1": {"adapter_mlp": {"kernel": jnp.asarray(b, jnp.float32)}},
      }
    }

  # Two members: equal in block_0 (FSD 0), opposite in block_1 (FSD 1).
  stacked = tree(np.stack([w0, w0]), np.stack([w1, -w1]))
  names, per_layer = soup.layer_fsd(stacked)
  assert names == ["['backbone']['block_0']", "['backbone']['block_1']"]
  np.testing.assert_allclose(per_layer[:, 0, 1], [0.0, 1.0])
  np.testing.assert_allclose(per_layer[:, 0, 0], [0.0, 0.0])
  assert soup.high_fsd_layers(per_layer, 0, fraction=0.5) == [1]
  assert soup.high_fsd_layers(per_layer, 1, fraction=1.0) == [0, 1]
  pruned = soup.prune_layers(tree(w0, w1), 0.25, [names[1]])
  np.testing.assert_array_equal(
    pruned["backbone"]["block_0"]["adapter_mlp"]["kernel"], w0.astype(np.float32)
  )
  cut = np.asarray(pruned["backbone"]["block_1"]["adapter_mlp"]["kernel"])
  assert np.count_nonzero(cut) == 3  # round(25% of 12)
  kept = np.abs(w1) >= np.sort(np.abs(w1).ravel())[-3]
  np.testing.assert_array_equal(cut, np.where(kept, w1, 0.0).astype(np.float32))


def test_correlation_against_numpy():
  x = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
  y = np.array([0.9, 0.7, 0.8, 0.3, 0.1])
  c = soup.correlation(x, y)
  assert c["n"] == 5
  assert c["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
  ranks = np.argsort(np.argsort(y))
  assert c["spearman"] == pytest.approx(np.corrcoef(np.arange(5), ranks)[0, 1])
  assert soup.correlation([0.1, 0.1, 0.1], [1, 2, 3])["pearson"] is None
  assert soup.correlation([0.1, 0.2], [1, 2])["spearman"] is None


def test_eval_cache_computes_each_key_once(tmp_path):
  cache = soup.EvalCache(tmp_path)
  assert cache.get("rot0", "mix:a+b", lambda: 0.5) == 0.5
  assert cache.get("rot0", "mix:a+b", lambda: 1 / 0) == 0.5
  assert cache.computed == 1

  def fail():
    raise AssertionError("evaluated a second time")

  again = soup.EvalCache(tmp_path)  # a resumed run
  assert again.get("rot0", "mix:a+b", fail) == 0.5 and again.computed == 0
  assert json.loads((tmp_path / soup.CACHE_FILE).read_text()) == {"rot0|mix:a+b": 0.5}


# ----------------------------------------------------------------------------- the CLI


def _flag(value) -> str:
  if isinstance(value, tuple):
    return "(" + ",".join(repr(v) for v in value) + ",)"
  return str(value)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("adapter_soup_cli") / "run"
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
    JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "moe_adapt.main",
      "--config=configs/adapter_soup.py:digits,tiny",
      *(f"--config.{k}={_flag(v)}" for k, v in OVERRIDES.items()),
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, json.loads((workdir / "results.json").read_text())


def test_cli_results(cli_run):
  workdir, r = cli_run
  k = len(DOMAINS)
  assert r["method"] == "adapter_soup" and r["adapter_domains"] == list(DOMAINS)
  assert r["target_domains"] == ["rot75"] and r["study_domains"] == list(DOMAINS)
  singles = {f"single_{d}" for d in DOMAINS[:-1]}
  in_domain = {"own"} | {f"greedy_{n}" for n in range(1, k + 1)}
  in_domain |= {f"mix_size_{s}_{stat}" for s in range(2, k + 1) for stat in ("mean", "best")}
  in_domain |= {f"{v}_{s}" for v in ("prune_own", "prune", "prune_fsd", "ties") for s in (50, 90)}
  assert set(r["metrics"]) == set(soup.NOVEL_VARIANTS) | singles | in_domain
  for variant, per in r["metrics"].items():
    domains = ["rot75"] if variant in soup.NOVEL_VARIANTS or variant in singles else DOMAINS
    assert set(per) == {*domains, "mean"}, variant
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in per.values())
  # Per-example outcomes of every variant but the aggregates over several mixtures.
  configs_util.check_per_example(r, {v for v in r["metrics"] if not v.startswith("mix_size_")})
  m = r["metrics"]
  assert m["best_single"]["rot75"]["accuracy"] == max(m[s]["rot75"]["accuracy"] for s in singles)
  sel = r["selections"]["rot75"]
  assert sel["candidates"] == list(DOMAINS[:-1])
  for method in ("similarity", "clustering"):
    chosen = sel[method]["selected"]
    assert 1 <= len(chosen) <= 3 and set(chosen) <= set(DOMAINS[:-1])
  assert "ORACLE" in r["notes"]["best_single"]
  assert {p.name for p in (workdir / "plots").iterdir()} == set(soup.PLOT_FILES)
  assert r["plots"] == sorted(f"plots/{p}" for p in soup.PLOT_FILES)
  for stage in (*(f"adapter_{d}" for d in DOMAINS), "zero_shot_head_rot75", "pretrain"):
    assert (workdir / "checkpoints" / stage).is_dir()


def test_cli_in_domain_invariants(cli_run):
  _, r = cli_run
  m, k = r["metrics"], len(DOMAINS)
  fsd = np.asarray(r["fsd_matrix"]["values"])
  assert fsd.shape == (k, k) and np.allclose(fsd, fsd.T) and np.all(np.diag(fsd) == 0)
  mixtures = r["mixtures"]
  assert len(mixtures) == k * 2 ** (k - 1)  # exhaustive: 2^(K-1) <= study.max_mixtures
  for d in DOMAINS:
    own = [x for x in mixtures if x["domain"] == d and x["size"] == 1]
    assert len(own) == 1 and own[0]["members"] == [d] and own[0]["fsd"] == 0.0
    # The size-1 mixture (averaging path) is the trained adapter exactly.
    assert own[0]["accuracy"] == m["own"][d]["accuracy"] == m["greedy_1"][d]["accuracy"]
    for x in mixtures:
      if x["domain"] == d and x["size"] == 2:
        i, j = (DOMAINS.index(n) for n in x["members"])
        assert x["fsd"] == pytest.approx(fsd[i, j], abs=1e-6)
    # One mixture holds all K: its mean is its best and the all-K entry of greedy mixing.
    assert m[f"mix_size_{k}_mean"][d] == m[f"mix_size_{k}_best"][d] == m[f"greedy_{k}"][d]
    order = r["greedy"][d]["order"]
    row = fsd[DOMAINS.index(d)]
    assert [row[DOMAINS.index(o)] for o in order] == sorted(row[DOMAINS.index(o)] for o in order)
  corr = r["correlations"]["fsd"]["pooled"]
  assert corr["n"] == sum(x["size"] >= 2 for x in mixtures)
  pr = r["pruning"]
  assert set(pr["fsd"]) == {"dense", "50", "90"}
  # Pruning zeroes entries, and zeros never count as sign differences.
  assert pr["fsd"]["90"]["magnitude"]["fsd"] <= pr["fsd"]["dense"]["fsd"]
  assert all(len(layers) == 1 for layers in pr["pruned_layers"].values())  # 1 of 2 blocks


def test_rerun_of_a_finished_workdir_does_no_work(cli_run, monkeypatch):
  workdir, results = cli_run
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}

  def fail(*args, **kwargs):
    raise AssertionError("a finished run did work again")

  monkeypatch.setattr(soup, "run", fail)
  config = tiny_config(**OVERRIDES)
  assert main_lib.run(config, str(workdir)) == results
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"adapter.kind": "adamix"}, "adapter.kind='adamix' is unknown"),
    ({"selection.top_k": 0}, "selection.top_k=0"),
    ({"selection.threshold": 2.0}, "selection.threshold=2.0"),
    ({"selection.covariance": "dense"}, "selection.covariance='dense' is unknown"),
    ({"study.max_mixtures": 0}, "study.max_mixtures=0"),
    ({"study.greedy_rank": "max"}, "study.greedy_rank='max' is unknown"),
    ({"pruning.sparsities": (0.5, 1.0)}, "pruning.sparsities="),
    ({"eval.max_examples": -1}, "eval.max_examples=-1"),
    ({"data.target_domains": ("rot0", "rot0")}, "data.target_domains="),
    ({"adapter.bottleneck": 0}, "adapter"),
  ],
)
def test_validate_config_names_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    soup.validate_config(tiny_config(**overrides))


@pytest.fixture(scope="module")
def task():
  from moe_adapt.methods import finetune

  return finetune.load_task(tiny_config())


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"data.domains": ("rot0", "rot5")}, r"data.domains has unknown \['rot5'\]"),
    ({"data.domains": ("rot0",)}, "gives 1 adapter"),
    ({"data.target_domains": ("rot90",)}, "data.target_domains has unknown"),
    ({"data.domains": ("rot0", "rot15"), "study.domains": ("rot30",)}, "study.domains has"),
  ],
)
def test_resolve_domains_names_the_field(task, overrides, match):
  with pytest.raises(ValueError, match=match):
    soup.resolve_domains(tiny_config(**overrides), task)


def test_resolve_domains_defaults(task):
  d = soup.resolve_domains(tiny_config(**{"data.domains": ("rot75", "rot0")}), task)
  assert d == soup.Domains(("rot0", "rot75"), ("rot75",), ("rot0", "rot75"))


def test_config_presets():
  # fmnist is left out: config_presets.adapter_harness('fmnist') fails on its own (it sets
  # the str field data.options.max_per_domain to an int), for every adapter config file.
  for preset in ("vader", "tweets", "digits"):
    config = CONFIGS.get_config(preset)
    soup.validate_config(config)
    assert config.method == "adapter_soup" and config.adapter.kind == "pfeiffer"
  assert CONFIGS.get_config("vader").data.target_domains == ("tweets", "movies", "amazon", "nyt")
  with pytest.raises(ValueError, match="preset='mnist' is unknown"):
    CONFIGS.get_config("mnist")
