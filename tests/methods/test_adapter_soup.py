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

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_adapt import main as main_lib
from moe_adapt.core import merging
from moe_adapt.methods import adapter_soup as soup
from moe_adapt.methods import (
  adapter_soup_checks,
  sign_mixing,
  sign_pruning,
  sign_study,
  soup_core,
  soup_learned,
  soup_merges,
  soup_plots,
  soup_selection,
)
from tests.methods import configs_util

REPO = pathlib.Path(__file__).resolve().parents[2]
DOMAINS = ("rot0", "rot45", "rot75")
OVERRIDES = {
  "data.domains": DOMAINS,
  "pruning.sparsities": (0.5, 0.9),
  "selection.threshold_sweep": (-1.0, 0.99),
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
  scores = soup_selection.similarity_scores(target, cands)
  for name, emb in cands.items():
    cos = [u @ v / np.linalg.norm(u) / np.linalg.norm(v) for u in target for v in emb]
    assert scores[name] == pytest.approx(np.mean(cos), abs=1e-12)


def test_similarity_picks_the_nearest_domains_above_the_threshold():
  # Directions at 0°, 20°, 60°, 120° from the target's (cosines 1, .94, .5, -.5).
  def at(deg):
    return _blob([np.cos(np.radians(deg)), np.sin(np.radians(deg))], 20, int(deg), 0.01)

  target = at(0)
  cands = {"far": at(120), "mid": at(60), "near": at(20), "same": at(0.5)}
  sel = soup_selection.select_by_similarity(target, cands, top_k=3, threshold=0.0)
  assert sel.selected == ("same", "near", "mid")  # best first; 'far' is below 0
  assert soup_selection.select_by_similarity(target, cands, top_k=2, threshold=0.0).selected == (
    "same",
    "near",
  )
  high = soup_selection.select_by_similarity(target, cands, top_k=4, threshold=0.9)
  assert high.selected == ("same", "near")
  assert all(high.scores[d] >= 0.9 for d in high.selected)
  # Nothing reaches the threshold: the most similar domain is still kept.
  assert soup_selection.select_by_similarity(at(180), cands, top_k=3, threshold=0.99).selected == (
    "far",
  )


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
  shares = soup_selection.cluster_shares(target, cands, seed=0)
  assert shares == pytest.approx({"a": 0.3, "b": 0.1, "c": 0.6, "d": 0.0})
  sel = soup_selection.select_by_clustering(target, cands, top_k=3, min_share=0.2, seed=0)
  assert sel.selected == ("c", "a")  # b holds 10% < 20%
  assert soup_selection.select_by_clustering(
    target, cands, top_k=3, min_share=0.1, seed=0
  ).selected == (
    "c",
    "a",
    "b",
  )
  assert soup_selection.select_by_clustering(
    target, cands, top_k=1, min_share=0.1, seed=0
  ).selected == ("c",)
  # None reaches the share: the largest is kept. PCA to 2 dims keeps the blobs apart.
  assert soup_selection.select_by_clustering(
    target, cands, top_k=3, min_share=0.9, seed=0
  ).selected == ("c",)
  pca = soup_selection.cluster_shares(target, cands, pca_dim=3, covariance_type="full", seed=0)
  assert pca == pytest.approx(shares)


def test_selection_rejects_bad_embeddings():
  with pytest.raises(ValueError, match="candidate 'a' embeddings have shape"):
    soup_selection.similarity_scores(np.ones((3, 2)), {"a": np.ones((3, 4))})
  with pytest.raises(ValueError, match="candidates is empty"):
    soup_selection.select_by_clustering(np.ones((3, 2)), {}, top_k=1, min_share=0.1)
  with pytest.raises(ValueError, match="top_k=0"):
    soup_selection.select_by_similarity(
      np.ones((3, 2)), {"a": np.ones((3, 2))}, top_k=0, threshold=0
    )
  with pytest.raises(ValueError, match="NaN or Inf"):
    soup_selection.similarity_scores(np.full((3, 2), np.nan), {"a": np.ones((3, 2))})


# ----------------------------------------------------------------------------- mixtures


def test_exhaustive_mixtures():
  others = ["b", "c", "d", "e"]
  mixtures = sign_mixing.enumerate_mixtures("a", others, max_mixtures=16, seed=0)
  assert len(mixtures) == 16 and len(set(mixtures)) == 16
  assert all(m[0] == "a" and "a" not in m[1:] for m in mixtures)
  assert mixtures[0] == ("a",) and mixtures[-1] == ("a", *others)
  assert [len(m) for m in mixtures] == sorted(len(m) for m in mixtures)


@pytest.mark.parametrize("budget", [2, 5, 20, 100])
def test_sampled_mixtures_are_stratified_and_seeded(budget):
  others = [f"d{i}" for i in range(8)]  # 256 mixtures
  mixtures = sign_mixing.enumerate_mixtures("own", others, max_mixtures=budget, seed=3)
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
  assert sign_mixing.enumerate_mixtures("own", others, max_mixtures=budget, seed=3) == mixtures
  if budget > 2:
    assert sign_mixing.enumerate_mixtures("own", others, max_mixtures=budget, seed=4) != mixtures


def test_enumerate_mixtures_rejects_bad_input():
  with pytest.raises(ValueError, match="others="):
    sign_mixing.enumerate_mixtures("a", ["a", "b"], max_mixtures=4, seed=0)
  with pytest.raises(ValueError, match="max_mixtures=0"):
    sign_mixing.enumerate_mixtures("a", ["b"], max_mixtures=0, seed=0)


def test_greedy_order_against_a_hand_matrix():
  fsd = np.array(
    [
      [0.0, 0.4, 0.1, 0.3],
      [0.4, 0.0, 0.2, 0.05],
      [0.1, 0.2, 0.0, 0.5],
      [0.3, 0.05, 0.5, 0.0],
    ]
  )
  assert sign_mixing.greedy_order(fsd, 0) == [2, 3, 1]
  assert sign_mixing.greedy_order(fsd, 1) == [3, 2, 0]
  # Row means: 0.2, 0.1625, 0.2, 0.2125 -> ties (0 and 2) keep index order.
  assert sign_mixing.greedy_order(fsd, 3, rank="row_mean") == [1, 0, 2]
  assert sign_mixing.greedy_order(fsd, 1, rank="row_mean") == [0, 2, 3]
  with pytest.raises(ValueError, match="rank='max'"):
    sign_mixing.greedy_order(fsd, 0, rank="max")
  with pytest.raises(ValueError, match="own=4"):
    sign_mixing.greedy_order(fsd, 4)


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
  names, per_layer = sign_pruning.layer_fsd(stacked)
  assert names == ["['backbone']['block_0']", "['backbone']['block_1']"]
  np.testing.assert_allclose(per_layer[:, 0, 1], [0.0, 1.0])
  np.testing.assert_allclose(per_layer[:, 0, 0], [0.0, 0.0])
  assert sign_pruning.high_fsd_layers(per_layer, 0, fraction=0.5) == [1]
  assert sign_pruning.high_fsd_layers(per_layer, 1, fraction=1.0) == [0, 1]
  pruned = sign_pruning.prune_layers(tree(w0, w1), 0.25, [names[1]])
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
  c = sign_mixing.correlation(x, y)
  assert c["n"] == 5
  assert c["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
  ranks = np.argsort(np.argsort(y))
  assert c["spearman"] == pytest.approx(np.corrcoef(np.arange(5), ranks)[0, 1])
  assert sign_mixing.correlation([0.1, 0.1, 0.1], [1, 2, 3])["pearson"] is None
  assert sign_mixing.correlation([0.1, 0.2], [1, 2])["spearman"] is None


def test_macro_f1_against_sklearn():
  from sklearn.metrics import f1_score

  rng = np.random.default_rng(0)
  for n, c in ((50, 3), (7, 4), (30, 2)):
    label, pred = rng.integers(0, c, n), rng.integers(0, c, n)
    assert soup_core.macro_f1(pred, label) == pytest.approx(f1_score(label, pred, average="macro"))
  # The majority-class predictor: accuracy = the prior, macro-F1 much lower.
  label = np.array([0] * 8 + [1, 2])
  sc = soup_core.scores({"correct": (label == 0).astype(int).tolist(), "pred": [0] * 10,
                    "label": label.tolist()})  # fmt: skip
  assert sc["accuracy"] == 0.8 and sc["macro_f1"] == pytest.approx((2 * 8 / 18) / 3)
  with pytest.raises(ValueError, match="pred of shape"):
    soup_core.macro_f1([0, 1], [0])


def test_partial_correlation_against_residuals():
  rng = np.random.default_rng(1)
  size = np.repeat([2, 3, 4], 20)
  x = 0.1 * size + rng.normal(size=60)  # x and y both move with the size
  y = -0.3 * size - 0.5 * x + rng.normal(size=60)
  c = sign_study.partial_correlation(x, y, size, samples=300, seed=0)
  # Reference: residuals of x and y on stratum indicators (least squares), then Pearson.
  design = (size[:, None] == np.array([2, 3, 4])[None]).astype(float)
  rx = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
  ry = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
  assert c["pearson"] == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
  # The slope of x in y ~ x + stratum (least squares on [x, indicators]).
  coef = np.linalg.lstsq(np.column_stack([x, design]), y, rcond=None)[0]
  assert c["slope"] == pytest.approx(coef[0], abs=1e-10)
  assert c["n"] == 60 and c["pearson_ci"][0] <= c["pearson"] <= c["pearson_ci"][1]
  assert c["spearman_ci"][1] < 0  # a clear negative effect given the size
  # One stratum: the plain coefficients.
  plain = sign_study.partial_correlation(x, y, samples=0)
  assert plain["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1]) and plain["pearson_ci"] is None
  assert sign_study.partial_correlation([1, 2], [1, 2])["pearson"] is None
  with pytest.raises(ValueError, match="strata has shape"):
    sign_study.partial_correlation(x, y, size[:3])


def test_within_size_separates_the_size_effect():
  # FSD rises with the size and accuracy falls with it, but within a size they are unrelated.
  rng = np.random.default_rng(2)
  records = [
    {"domain": "a", "size": k, "fsd": 0.1 * k + 0.01 * rng.normal(),
     "accuracy_delta": -0.05 * k + 0.01 * rng.normal()}
    for k in (2, 3, 4) for _ in range(30)
  ]  # fmt: skip
  c = sign_study.within_size(records, samples=200)
  assert set(c) == {"size_2", "size_3", "size_4", "pooled_given_size"}
  pooled = np.corrcoef([r["fsd"] for r in records], [r["accuracy_delta"] for r in records])
  assert pooled[0, 1] < -0.9  # what a pooled correlation would report
  for name in ("size_2", "pooled_given_size"):
    lo, hi = c[name]["pearson_ci"]
    assert lo < 0 < hi, name


def test_rescaled_like_keeps_direction_and_takes_the_norm():
  tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
  ref = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([[0.0]])}
  out = sign_pruning.rescaled_like(tree, ref)
  assert np.allclose(out["a"], np.array([3.0, 0.0]) * np.sqrt(2) / 5)
  assert np.allclose(out["b"], np.array([[4.0]]) * np.sqrt(2) / 5)
  zero = {"a": jnp.zeros(2), "b": jnp.zeros((1, 1))}
  assert np.all(sign_pruning.rescaled_like(zero, ref)["a"] == 0)


def test_merged_delta_is_the_core_merge():
  rng = np.random.default_rng(3)
  deltas = {"w": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)}
  key = jnp.zeros((2,), jnp.uint32)
  hp = {"density": 0.5, "lambda": 0.7}
  pairs = {
    "task_arithmetic": merging.task_arithmetic(deltas, scale=0.7),
    "ties": merging.ties_merge(deltas, density=0.5, scale=0.7),
    "ties_member": merging.ties_merge(deltas, density=0.5, scale=0.7, trim="member"),
    "breadcrumbs": merging.breadcrumbs(
      deltas, density=0.5, top_fraction=soup_merges.BREADCRUMBS_TOP, scale=0.7
    ),
  }
  for name, want in pairs.items():
    got = soup_merges.merged_delta(name, deltas, hp, key)
    np.testing.assert_array_equal(got["w"], want["w"], err_msg=name)
  # λ = 1/K task arithmetic is the uniform average.
  avg = soup_merges.merged_delta("task_arithmetic", deltas, {"lambda": 1 / 3}, key)
  np.testing.assert_allclose(avg["w"], merging.weighted_average(deltas)["w"], atol=1e-6)
  with pytest.raises(ValueError, match="merge method 'fisher' is unknown"):
    soup_merges.merged_delta("fisher", deltas, hp, key)
  grids = soup_merges.merge_candidates(
    tiny_config(**{"merge.methods": ("ties", "task_arithmetic")})
  )
  assert list(grids) == ["ties", "task_arithmetic"]
  assert grids["task_arithmetic"] == [{"lambda": 0.5}, {"lambda": 1.0}]  # the tiny grid


def test_mixture_averages_adapters_and_keeps_the_own_head():
  k = 3
  stacked = {
    "backbone": {"adapter": jnp.arange(k * 2, dtype=jnp.float32).reshape(k, 2)},
    "head": {"kernel": 10.0 * jnp.arange(1, k + 1, dtype=jnp.float32)[:, None]},
  }
  s = soup_core.Soup(
    setup=None, names=("a", "b", "c"), model=None, model_plain=None, base={}, stacked=stacked,
    init_adapters=None, tests={}, vals={}, cache=None,
  )  # fmt: skip
  own = s.mixture(["a", "c"], head="c")
  np.testing.assert_allclose(own["backbone"]["adapter"], [2.0, 3.0])  # mean of rows 0, 2
  np.testing.assert_allclose(own["head"]["kernel"], [30.0])  # c's head, unaveraged
  both = s.mixture(["a", "c"])  # the ablation: heads averaged too
  np.testing.assert_allclose(both["head"]["kernel"], [20.0])
  np.testing.assert_allclose(s.with_head({"backbone": {}}, None)["head"]["kernel"], [20.0])


def test_lora_product_average_is_the_mean_update():
  from moe_adapt.models import adapters as adapters_lib

  rng = np.random.default_rng(4)
  k, n_in, r, n_out = 3, 5, 2, 4
  kernel, bias = rng.normal(size=(n_in, n_out)), rng.normal(size=n_out)
  a, b = rng.normal(size=(k, n_in, r)), rng.normal(size=(k, r, n_out))
  stacked = {
    "q": {
      "kernel": jnp.asarray(np.broadcast_to(kernel, (k, n_in, n_out)), jnp.float32),
      "bias": jnp.asarray(np.broadcast_to(bias, (k, n_out)), jnp.float32),
      "lora_a": jnp.asarray(a, jnp.float32),
      "lora_b": jnp.asarray(b, jnp.float32),
    }
  }
  w = np.array([1.0, 0.0, 3.0])
  merged = soup_core.lora_product_average(stacked, jnp.asarray(w))
  c = w / w.sum()
  want = sum(c[i] * a[i] @ b[i] for i in range(k))
  np.testing.assert_allclose(merged["q"]["lora_a"] @ merged["q"]["lora_b"], want, atol=1e-5)
  # Factor averaging differs: mean(A)·mean(B) has cross terms.
  mean_a, mean_b = np.einsum("k,kij->ij", c, a), np.einsum("k,kij->ij", c, b)
  assert not np.allclose(mean_a @ mean_b, want, atol=1e-3)
  # Through the layer: rank K·r with alpha K·α gives the mean of the members' outputs.
  x = jnp.asarray(rng.normal(size=(6, n_in)), jnp.float32)

  def apply(params, rank, alpha):
    layer = adapters_lib.LoRADense(features=n_out, rank=rank, alpha=alpha)
    return np.asarray(layer.apply({"params": params}, x))

  outs = [apply({n: v[i] for n, v in stacked["q"].items()}, r, 16.0) for i in range(k)]
  np.testing.assert_allclose(
    apply(merged["q"], k * r, k * 16.0), sum(c[i] * outs[i] for i in range(k)), atol=1e-4
  )


def test_eval_cache_computes_each_key_once(tmp_path):
  cache = soup_core.EvalCache(tmp_path)
  value = {"accuracy": 0.5, "macro_f1": 0.25}
  assert cache.get("rot0", "mix:a+b", lambda: value) == value
  assert cache.get("rot0", "mix:a+b", lambda: 1 / 0) == value
  assert cache.computed == 1

  def fail():
    raise AssertionError("evaluated a second time")

  again = soup_core.EvalCache(tmp_path)  # a resumed run
  assert again.get("rot0", "mix:a+b", fail) == value and again.computed == 0
  assert json.loads((tmp_path / soup_core.CACHE_FILE).read_text()) == {"rot0|mix:a+b": value}
  # An entry of the older format (a bare accuracy) is evaluated again.
  (tmp_path / soup_core.CACHE_FILE).write_text(json.dumps({"rot0|mix:a+b": 0.5}))
  assert soup_core.EvalCache(tmp_path).get("rot0", "mix:a+b", lambda: value) == value


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
    timeout=2700,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, json.loads((workdir / "results.json").read_text())


def test_cli_results(cli_run):
  workdir, r = cli_run
  k = len(DOMAINS)
  assert r["method"] == "adapter_soup" and r["adapter_domains"] == list(DOMAINS)
  assert r["target_domains"] == ["rot75"] and r["study_domains"] == list(DOMAINS)
  singles = {f"single_{d}" for d in DOMAINS[:-1]}
  sweep = {"similarity_tm1", "similarity_t0.99"}
  novel = set(soup.NOVEL_VARIANTS) | singles | sweep
  in_domain = {"own", "mix_all"} | {f"greedy_{n}" for n in range(1, k + 1)}
  in_domain |= {f"mix_size_{s}_{stat}" for s in range(2, k + 1) for stat in ("mean", "best")}
  pruning = ("prune_own", "prune", "prune_fsd", "ties", "avg_like_ties")
  in_domain |= {f"{v}_{s}" for v in pruning for s in (50, 90)}
  learned = {f"merge_{m}" for m in soup_learned.LEARNED_METHODS}
  merges = {f"merge_{m}" for m in soup_merges.MERGE_METHODS} | {"merge_avg_like_ties"} | learned
  assert set(r["metrics"]) == novel | in_domain | merges
  for variant, per in r["metrics"].items():
    domains = ["rot75"] if variant in novel else DOMAINS
    assert set(per) == {*domains, "mean"}, variant
    assert all(0.0 <= v["accuracy"] <= 1.0 and 0.0 <= v["macro_f1"] <= 1.0 for v in per.values())
  # Hyper-parameters of every merge, chosen on validation, from its grid.
  grids = {
    **soup_merges.merge_candidates(tiny_config()),
    **soup_learned.learned_candidates(tiny_config()),
  }
  assert set(grids) == set(soup_merges.MERGE_METHODS) | {"fisher", "regmean"}
  assert set(r["selection"]) == {f"merge_{m}" for m in grids}
  for method, grid in grids.items():
    chosen = dict(r["selection"][f"merge_{method}"])
    val = chosen.pop("val_accuracy")
    assert chosen in grid and val == max(r["merge_validation"][f"merge_{method}"].values())
  # AdaMerging: declared settings, coefficients per study domain, the test-time note.
  ada = r["adamerging"]
  assert ada["settings"] == soup_learned.adamerging_settings(tiny_config())
  assert set(ada["coefficients"]) == set(DOMAINS) and "unlabelled" in ada["note"]
  assert r["notes"]["merge_adamerging"] == soup_learned.ADAMERGING_NOTE
  # Per-example outcomes of every variant but the aggregates over several mixtures.
  configs_util.check_per_example(r, {v for v in r["metrics"] if not v.startswith("mix_size_")})
  m = r["metrics"]
  assert m["best_single"]["rot75"]["accuracy"] == max(m[s]["rot75"]["accuracy"] for s in singles)
  sel = r["selections"]["rot75"]
  assert sel["candidates"] == list(DOMAINS[:-1])
  for method in ("similarity", "clustering", "all", "best_single", *sweep):
    chosen = sel[method]["selected"]
    assert 1 <= len(chosen) <= 3 and set(chosen) <= set(DOMAINS[:-1])
    # Each selector's row says how many adapters it averaged.
    assert m[method]["rot75"]["num_adapters"] == len(chosen), method
  # Threshold -1 keeps the top_k most similar; 0.99 (no MiniLM-like cosine reaches it) one.
  assert len(sel["similarity_tm1"]["selected"]) == min(3, len(DOMAINS) - 1)
  assert len(sel["similarity_t0.99"]["selected"]) == 1
  assert "ORACLE" in r["notes"]["best_single"]
  assert {p.name for p in (workdir / "plots").iterdir()} == set(soup_plots.PLOT_FILES)
  assert r["plots"] == sorted(f"plots/{p}" for p in soup_plots.PLOT_FILES)
  for stage in (*(f"adapter_{d}" for d in DOMAINS), "zero_shot_head_rot75", "pretrain"):
    assert (workdir / "checkpoints" / stage).is_dir()


def test_sign_study_tables_of_a_run(cli_run, capsys):
  workdir, _ = cli_run
  assert sign_study.main(["--sweep_dir", str(workdir)]) == 0
  out = capsys.readouterr().out
  assert "| fsd | size 2 |" in out and "pooled given size" in out
  assert "| rot75 | similarity_t0.99 | 0 |" in out
  assert "| merge_ties |" in out and "density=" in out
  with pytest.raises(ValueError, match="holds no adapter_soup results"):
    sign_study.load_runs(str(workdir / "plots"))


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
    # The size-1 mixture is the trained adapter exactly.
    assert own[0]["accuracy"] == m["own"][d]["accuracy"] == m["greedy_1"][d]["accuracy"]
    assert m["mix_all"][d] == m[f"greedy_{k}"][d]
    for x in mixtures:
      if x["domain"] == d and x["size"] == 2:
        i, j = (DOMAINS.index(n) for n in x["members"])
        assert x["fsd"] == pytest.approx(fsd[i, j], abs=1e-6)
    # One mixture holds all K: its mean is its best and the all-K entry of greedy mixing.
    assert m[f"mix_size_{k}_mean"][d] == m[f"mix_size_{k}_best"][d] == m[f"greedy_{k}"][d]
    # Greedy mixing by row-mean FSD (Alg. 1, the default).
    order = r["greedy"][d]["order"]
    row_mean = fsd.mean(axis=1)
    assert [row_mean[DOMAINS.index(o)] for o in order] == sorted(
      row_mean[DOMAINS.index(o)] for o in order
    )
  corr = r["correlations"]["fsd"]
  for size in range(2, k + 1):
    assert corr[f"size_{size}"]["n"] == sum(x["size"] == size for x in mixtures)
  assert corr["pooled_given_size"]["n"] == sum(x["size"] >= 2 for x in mixtures)
  assert r["heads"] == "own head per domain"
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


# ----------------------------------------------------------------------------- learned merges


@pytest.fixture(scope="module")
def untrained_soup(tmp_path_factory):
  """A `Soup` of the tiny digits config (random ViT, no training): K = 3 adapters, the
  shared initialisation plus seeded noise, each with its own head."""
  from moe_adapt.methods import adapter_harness as finetune
  from moe_adapt.models import adapters as adapters_lib

  config = tiny_config(**OVERRIDES)
  setup = soup.make_setup(config)
  model = finetune.build_model(setup, soup.soup_adapter_config(config))
  init = finetune.init_params(setup, model, jax.random.key(0), None)
  base, init_tree = adapters_lib.split_params(init, include_head=True)
  leaves, treedef = jax.tree.flatten(init_tree)
  rng = np.random.default_rng(0)
  trees = [
    jax.tree.unflatten(treedef, [x + 0.05 * rng.normal(size=x.shape) for x in leaves])
    for _ in DOMAINS
  ]
  tests = soup_core.eval_subsets(setup, DOMAINS)
  return soup_core.Soup(
    setup=setup,
    names=DOMAINS,
    model=model,
    model_plain=finetune.build_model(setup, adapters_lib.AdapterConfig()),
    base=base,
    stacked=jax.tree.map(jnp.float32, soup_core.stack_trees(trees)),
    init_adapters=soup_core.without_head(init_tree),
    tests={d: ex.take(np.arange(32)) for d, ex in tests.items()},
    vals=soup_core.val_subsets(setup, DOMAINS),
    cache=soup_core.EvalCache(tmp_path_factory.mktemp("untrained_soup")),
  )


def _deltas(s):
  adapters = soup_core.without_head(s.stacked)
  return jax.tree.map(lambda x, x0: x - x0[None], adapters, s.init_adapters)


def _allclose(a, b, **kw):
  return all(np.allclose(x, y, **kw) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_learned_merges_of_equal_members_are_the_member(untrained_soup):
  """Fisher and RegMean weight each member by statistics of its own domain's data; when
  every member is the same adapter the merge is that adapter, whatever the weights."""
  s = untrained_soup
  first = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), s.stacked)
  same = dataclasses.replace(s, stacked=first)
  deltas = _deltas(same)
  member = jax.tree.map(lambda x: x[0], deltas)
  fishers = soup_learned.member_fishers(same, examples=8)
  assert _allclose(soup_learned.fisher_delta(deltas, fishers, 1e-3), member, atol=1e-7)
  grams = soup_learned.member_grams(same, examples=8)
  regmean = merging.regmean_merge(deltas, grams, alpha=0.5)
  assert _allclose(regmean, member, atol=1e-5)


def test_member_grams_are_the_adapter_inputs(untrained_soup):
  """RegMean's Gram of an `up` projection is Σ gelu(h) gelu(h)ᵀ, h the `down` output
  captured by Flax's `capture_intermediates` (independent of the method's interception)."""
  import flax.linen as nn

  s = untrained_soup
  grams = soup_learned.member_grams(s, examples=10)
  for i, d in enumerate(DOMAINS):
    sample = soup_learned.domain_sample(s.setup, d, 10, "regmean")
    params = s.params(soup_core.member(s.stacked, i))
    _, state = s.model.apply(
      {"params": params}, *sample.inputs, train=False, capture_intermediates=True
    )
    block = state["intermediates"]["backbone"]["block_0"]["adapter_mlp"]
    h = nn.gelu(block["down"]["__call__"][0], approximate=False)
    h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
    got = grams["backbone"]["block_0"]["adapter_mlp"]["up"]["kernel"][i]
    np.testing.assert_allclose(got, h.T @ h, rtol=1e-4, atol=1e-6)
    assert grams["backbone"]["block_0"]["adapter_mlp"]["up"]["bias"] is None
    assert got.shape == (4, 4)


def test_fishers_are_seeded_and_non_negative(untrained_soup):
  a = soup_learned.member_fishers(untrained_soup, examples=6)
  b = soup_learned.member_fishers(untrained_soup, examples=6)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert all(np.all(np.asarray(x) >= 0) for x in jax.tree.leaves(a))
  assert jax.tree.structure(a) == jax.tree.structure(soup_core.without_head(untrained_soup.stacked))


def test_adamerging_is_deterministic_and_never_reads_labels(untrained_soup):
  s = untrained_soup
  deltas = _deltas(s)
  head = s.head_tree("rot0")
  first = soup_learned.adamerging_on(s, "rot0", deltas, head)
  # Test labels scrambled: the learned merge is the same (only the inputs are read).
  ex = s.tests["rot0"]
  scrambled = {**s.tests, "rot0": type(ex)(ex.inputs, (ex.labels + 1) % 10)}
  again = soup_learned.adamerging_on(dataclasses.replace(s, tests=scrambled), "rot0", deltas, head)
  assert _allclose(first.params, again.params, rtol=0, atol=0)
  coeffs = np.stack([np.asarray(c) for c in jax.tree.leaves(first.coefficients)])
  assert coeffs.shape[1] == len(DOMAINS) and np.all((coeffs >= 0) & (coeffs <= 1))
  assert first.entropy.shape == (s.setup.config.merge.adamerging_steps,)
  summary = soup_learned.coefficient_summary(first, DOMAINS)
  assert summary["min_rot0"] <= summary["mean_rot0"] <= summary["max_rot0"]


def test_reported_outcomes_persist_for_a_resumed_run(untrained_soup, tmp_path, monkeypatch):
  from moe_adapt.train import artifacts

  def fresh(s):
    return dataclasses.replace(
      s,
      cache=soup_core.EvalCache(tmp_path),
      outcome_cache=artifacts.JsonCache(tmp_path, soup_core.OUTCOMES_FILE),
      outcomes={},
      per_example={},
    )

  first = fresh(untrained_soup)
  scores = first.single_score("rot0", "rot0", variant="own")
  monkeypatch.setattr(soup_core, "evaluate_outcomes", lambda *a: pytest.fail("evaluated again"))
  resumed = fresh(untrained_soup)
  assert resumed.single_score("rot0", "rot0", variant="own") == scores
  assert resumed.per_example == first.per_example


@pytest.mark.slow
def test_every_in_domain_row_is_paired(untrained_soup, tmp_path, monkeypatch):
  """Every mixture, pruning and merge row of a domain is scored on the same test examples
  in the same order with the domain's own head, and every merge setting chosen on
  validation (data-driven merges included) on the same validation examples."""
  from moe_adapt.models import adapters as adapters_lib

  config = configs_util.with_overrides(
    untrained_soup.setup.config.copy_and_resolve_references(),
    **{
      "study.sizes": (2,),
      "pruning.sparsities": (0.5,),
      "merge.methods": ("ties", "dare"),
      "merge.fisher_epsilons": (1e-3,),
      "merge.regmean_alphas": (0.5,),
      "merge.adamerging_steps": 2,
    },
  )
  s = dataclasses.replace(
    untrained_soup,
    setup=dataclasses.replace(untrained_soup.setup, config=config),
    cache=soup_core.EvalCache(tmp_path),
    outcomes={},
    per_example={},
  )
  calls = []
  evaluate, score = soup_core.evaluate_outcomes, soup_core.Soup.score

  def evaluate_spy(setup, model, params, examples):
    calls[-1]["evaluated"].append((params, examples))
    return evaluate(setup, model, params, examples)

  def score_spy(self, domain, what, params_fn, **kwargs):
    calls.append({"domain": domain, "split": kwargs.get("split", "test"), "evaluated": []})
    return score(self, domain, what, params_fn, **kwargs)

  monkeypatch.setattr(soup_core, "evaluate_outcomes", evaluate_spy)
  monkeypatch.setattr(soup_core.Soup, "score", score_spy)
  sign_mixing.in_domain_study(s, DOMAINS, soup_core.without_head(s.stacked))
  sign_pruning.pruning_study(s, DOMAINS)
  merges = soup_merges.merge_study(s, DOMAINS)
  evaluated = [(c, *e) for c in calls for e in c["evaluated"]]
  assert {c["split"] for c, *_ in evaluated} == {"test", "val"}
  # Test rows of each domain: one per variant of s.per_example, all on its test subset.
  assert len([1 for c, *_ in evaluated if c["split"] == "test"]) >= len(s.per_example)
  for c, params, examples in evaluated:
    d = c["domain"]
    expected = s.tests[d] if c["split"] == "test" else s.vals[d]
    assert all(np.array_equal(a, b) for a, b in zip(examples.inputs, expected.inputs))
    np.testing.assert_array_equal(examples.labels, expected.labels)
    head = adapters_lib.split_params(params, include_head=True)[1][adapters_lib.HEAD_KEY]
    assert _allclose(head, s.head_of(d)[adapters_lib.HEAD_KEY], rtol=0, atol=0), d
  # Each validation score covers every study domain, for every setting of every merge.
  settings = sum(len(v) for v in merges["validation"].values())
  val = [c["domain"] for c, *_ in evaluated if c["split"] == "val"]
  assert len(val) == len(DOMAINS) * settings and set(val) == set(DOMAINS)
  for variant, per in s.per_example.items():
    for d, entry in per.items():
      assert entry["label"] == s.tests[d].labels.tolist(), (variant, d)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"adapter.kind": "adamix"}, "adapter.kind='adamix' is unknown"),
    ({"selection.top_k": 0}, "selection.top_k=0"),
    ({"selection.threshold": 2.0}, r"selection.threshold=2.0 is invalid; accepted: .*\[-1"),
    ({"selection.threshold_sweep": (0.1, -1.5)}, "selection.threshold_sweep="),
    ({"study.sizes": (1,)}, "study.sizes=\\(1,\\)"),
    ({"merge.densities": (0.0,)}, "merge.densities="),
    ({"merge.sum_lambdas": ()}, "merge.sum_lambdas="),
    ({"merge.methods": ("fisher",)}, "merge.methods has unknown 'fisher'"),
    ({"merge.learned": ("dare",)}, "merge.learned has unknown 'dare'"),
    ({"merge.fisher_examples": 0}, "merge.fisher_examples=0 is invalid"),
    ({"merge.regmean_examples": -3}, "merge.regmean_examples=-3 is invalid"),
    ({"merge.fisher_epsilons": (-1.0,)}, "merge.fisher_epsilons="),
    ({"merge.regmean_alphas": (1.5,)}, "merge.regmean_alphas="),
    ({"merge.adamerging_steps": 0}, "merge.adamerging_steps=0 is invalid"),
    ({"merge.adamerging_lr": 0.0}, "merge.adamerging_lr=0.0 is invalid"),
    ({"merge.adamerging_granularity": "model"}, "merge.adamerging_granularity='model'"),
    ({"adapter.kind": "lora"}, "merge.learned has 'regmean' with adapter.kind='lora'"),
    ({"eval.max_val_examples": -1}, "eval.max_val_examples=-1"),
    ({"selection.covariance": "dense"}, "selection.covariance='dense' is unknown"),
    ({"study.max_mixtures": 0}, "study.max_mixtures=0"),
    ({"study.bootstrap_samples": -1}, "study.bootstrap_samples=-1"),
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
  from moe_adapt.data import examples

  return examples.load_task(tiny_config())


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
    adapter_soup_checks.resolve_domains(tiny_config(**overrides), task)


def test_resolve_domains_defaults(task):
  d = adapter_soup_checks.resolve_domains(tiny_config(**{"data.domains": ("rot75", "rot0")}), task)
  assert d == adapter_soup_checks.Domains(("rot0", "rot75"), ("rot75",), ("rot0", "rot75"))


def test_config_presets():
  # fmnist is left out: configs/_shared.adapter_harness('fmnist') fails on its own (it sets
  # the str field data.options.max_per_domain to an int), for every adapter config file.
  for preset in ("vader", "tweets", "digits"):
    config = CONFIGS.get_config(preset)
    soup.validate_config(config)
    assert config.method == "adapter_soup" and config.adapter.kind == "pfeiffer"
  assert CONFIGS.get_config("vader").data.target_domains == ("tweets", "movies", "amazon", "nyt")
  with pytest.raises(ValueError, match="preset='mnist' is unknown"):
    CONFIGS.get_config("mnist")
