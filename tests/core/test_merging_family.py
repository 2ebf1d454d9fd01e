"""Tests for the merge family (task arithmetic, DARE, Breadcrumbs, Fisher, RegMean, AdaMerging)
against NumPy transcriptions of each paper's (and PEFT's / mergekit's) formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.core import merging

RNG = np.random.default_rng(0)
SHAPES = {"dense": {"kernel": (4, 5)}, "bias": (5,)}


def random_tree(k, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: rng.normal(size=(k, *s)).astype(dtype), SHAPES, is_leaf=lambda x: isinstance(x, tuple)
  )


def leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_stack_members_and_task_vectors():
  members = [jax.tree.map(lambda x, k=k: x[k], random_tree(3)) for k in range(3)]
  stacked = merging.stack_members(members)
  for got, ref in zip(leaves(stacked), leaves(random_tree(3))):
    np.testing.assert_array_equal(got, ref)
  base = members[0]
  tau = merging.task_vectors(stacked, base)
  for t, x, b in zip(leaves(tau), leaves(stacked), leaves(base)):
    np.testing.assert_allclose(t, x - b[None], rtol=1e-6, atol=1e-7)
  # The sign analysis reads the same task vectors.
  flat = np.concatenate([t.reshape(3, -1) for t in leaves(tau)], 1)
  ref = np.mean((flat > 0).any(0) & (flat < 0).any(0))
  assert float(merging.sign_disagreement(tau)) == pytest.approx(ref, abs=1e-7)
  with pytest.raises(ValueError, match=r"members\[1\] has structure"):
    merging.stack_members([members[0], {"bias": members[1]["bias"]}])
  wrong = {**members[2], "bias": members[2]["bias"].astype(jnp.bfloat16)}
  with pytest.raises(ValueError, match=r"members\[2\]\['bias'\] has dtype bfloat16"):
    merging.stack_members([members[0], members[1], wrong])
  with pytest.raises(ValueError, match=r"base\['bias'\] has shape \(3,\); accepted: \(5,\)"):
    merging.task_vectors(stacked, {**base, "bias": np.zeros(3, np.float32)})


def test_task_arithmetic():
  stacked, base = random_tree(3), jax.tree.map(lambda x: x[0], random_tree(1, seed=5))
  w = np.array([0.5, -1.0, 2.0], np.float32)
  got = merging.task_arithmetic(stacked, scale=0.3, weights=w)
  for g, x in zip(leaves(got), leaves(stacked)):
    np.testing.assert_allclose(g, 0.3 * np.tensordot(w, x, 1), rtol=1e-5, atol=1e-6)
  got = merging.task_arithmetic(stacked, base, scale=0.3)
  for g, x, b in zip(leaves(got), leaves(stacked), leaves(base)):
    np.testing.assert_allclose(g, b + 0.3 * (x - b).sum(0), rtol=1e-5, atol=1e-6)


def test_random_prune_and_dare():
  key = jax.random.key(3)
  big = {"w": RNG.normal(size=(2, 4000)).astype(np.float32)}
  dropped = np.asarray(merging.random_prune(key, big, density=0.3)["w"])
  kept = dropped != 0
  np.testing.assert_allclose(dropped[kept], big["w"][kept] / 0.3, rtol=1e-6)
  assert abs(kept.mean() - 0.3) < 0.02
  np.testing.assert_array_equal(merging.random_prune(key, big, density=0.3)["w"], dropped)
  raw = np.asarray(merging.random_prune(key, big, density=0.3, rescale=False)["w"])
  np.testing.assert_array_equal(raw != 0, kept)
  np.testing.assert_array_equal(merging.random_prune(key, big, density=0.0)["w"], 0.0)
  np.testing.assert_array_equal(merging.random_prune(key, big, density=1.0)["w"], big["w"])
  # DARE (PEFT/mergekit `dare_linear`): the scaled sum of the dropped members.
  stacked = random_tree(3)
  pruned = leaves(merging.random_prune(key, stacked, density=0.5))
  for g, p in zip(leaves(merging.dare(key, stacked, density=0.5, scale=0.7)), pruned):
    np.testing.assert_allclose(g, 0.7 * p.sum(0), rtol=1e-5, atol=1e-6)


def np_elect_mean(trimmed, elected):
  agree = np.sign(trimmed) == elected
  return (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)


def test_dare_ties_matches_peft_formula():
  key = jax.random.key(7)
  # Integer members, so that the dropped members often cancel exactly.
  stacked = jax.tree.map(lambda x: np.round(x * 2).astype(np.float32), random_tree(3, seed=2))
  pruned = leaves(merging.random_prune(key, stacked, density=0.5))
  peft = merging.dare_ties(key, stacked, density=0.5, zero_sign="positive", scale=2.0)
  ours = merging.dare_ties(key, stacked, density=0.5)
  for g_peft, g_ours, p in zip(leaves(peft), leaves(ours), pruned):
    np.testing.assert_allclose(g_peft, 2.0 * np_elect_mean(p, np.where(p.sum(0) >= 0, 1, -1)))
    np.testing.assert_allclose(g_ours, np_elect_mean(p, np.sign(p.sum(0))))


def np_mergekit_breadcrumbs(row, density, gamma):
  """mergekit's `magnitude_outliers`: ascending sort, keep indices[n_bot : n_bot + target]."""
  n = row.size
  if density >= 1:
    return row
  target, n_top = int(density * n), int(gamma * n)
  n_bot = max(0, n - target - n_top)
  mask = np.zeros(n, bool)
  mask[np.argsort(np.abs(row), kind="stable")[n_bot : n_bot + target]] = True
  return np.where(mask, row, 0)


@pytest.mark.parametrize("density,top", [(0.5, 0.1), (0.3, 0.0), (0.8, 0.5), (1.0, 0.2)])
def test_breadcrumbs_matches_mergekit(density, top):
  stacked = random_tree(3, seed=4)
  got = merging.breadcrumbs(stacked, density=density, top_fraction=top, keep_rule="floor")
  for g, x in zip(leaves(got), leaves(stacked)):
    rows = x.reshape(3, -1)
    ref = sum(np_mergekit_breadcrumbs(r, density, top) for r in rows).reshape(x.shape[1:])
    np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-7)


def test_breadcrumbs_hand_computed():
  x = {"w": np.array([[9.0, -1.0, 5.0, 3.0, -7.0, 0.5]], np.float32)}
  # Drop the round(1/6 · 6) = 1 largest (9), keep the next round(0.5 · 6) = 3: -7, 5, 3.
  got = merging.breadcrumbs(x, density=0.5, top_fraction=1 / 6, scale=2.0)
  np.testing.assert_array_equal(got["w"], [0.0, 0.0, 10.0, 6.0, -14.0, 0.0])


def test_fisher_merge():
  stacked = random_tree(3)
  fishers = jax.tree.map(lambda x: np.abs(x[::-1]) + 0.1, stacked)
  w = np.array([1.0, 2.0, 0.5], np.float32)
  got = merging.fisher_merge(stacked, fishers, weights=w, epsilon=1e-3)
  for g, x, f in zip(leaves(got), leaves(stacked), leaves(fishers)):
    weight = w[:, None] * (f.reshape(3, -1) + 1e-3)
    ref = (weight * x.reshape(3, -1)).sum(0) / weight.sum(0)
    np.testing.assert_allclose(g.reshape(-1), ref, rtol=1e-5)
  zeros = jax.tree.map(np.zeros_like, stacked)
  got = merging.fisher_merge(stacked, zeros, weights=w, epsilon=0.0)
  for g, x in zip(leaves(got), leaves(stacked)):
    np.testing.assert_allclose(g, np.tensordot(w / w.sum(), x, 1), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"fishers\['bias'\] has negative entries"):
    merging.fisher_merge(stacked, {**fishers, "bias": -fishers["bias"]})
  with pytest.raises(ValueError, match=r"weights=\[1.0, 0.0, 1.0\] is invalid; accepted: all > 0"):
    merging.fisher_merge(stacked, fishers, weights=np.array([1.0, 0.0, 1.0]))
  with pytest.raises(ValueError, match="fishers has structure"):
    merging.fisher_merge(stacked, {"bias": fishers["bias"]})


def linear_logits(params, x):
  return x @ params["w"] + params["b"]


def test_diagonal_fisher_matches_closed_form():
  # log softmax(xW + b)_y has gradient x ⊗ (e_y − p) for W and e_y − p for b.
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
  batches = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(2)]
  x = np.concatenate(batches).astype(np.float64)
  logits = x @ params["w"]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(4)[logits.argmax(1)]
  got = merging.diagonal_fisher(linear_logits, params, batches, labels="argmax")
  np.testing.assert_allclose(got["b"], ((onehot - p) ** 2).mean(0), rtol=1e-4)
  ref_w = np.mean(x[:, :, None] ** 2 * (onehot - p)[:, None, :] ** 2, 0)
  np.testing.assert_allclose(got["w"], ref_w, rtol=1e-4)
  got = merging.diagonal_fisher(linear_logits, params, batches, labels="expected")
  ref_b = np.einsum("ny,nyc->c", p, (np.eye(4)[None] - p[:, None, :]) ** 2) / len(x)
  np.testing.assert_allclose(got["b"], ref_b, rtol=1e-4)
  # A model sure of its answer samples its argmax.
  sure = {"w": params["w"] * 1e3, "b": params["b"]}
  sampled = merging.diagonal_fisher(linear_logits, sure, batches, key=jax.random.key(0))
  argmax = merging.diagonal_fisher(linear_logits, sure, batches, labels="argmax")
  np.testing.assert_allclose(sampled["w"], argmax["w"], atol=1e-6)
  with pytest.raises(ValueError, match="key is None"):
    merging.diagonal_fisher(linear_logits, params, batches)


def test_regmean_matches_numpy_solve():
  rng = np.random.default_rng(2)
  kernels = rng.normal(size=(3, 4, 2)).astype(np.float32)
  inputs = [rng.normal(size=(20, 4)).astype(np.float32) * (k + 1) for k in range(3)]
  grams = np.stack([np.asarray(merging.input_gram(x)) for x in inputs])
  np.testing.assert_allclose(grams[1], inputs[1].T.astype(np.float64) @ inputs[1], rtol=1e-5)
  stacked = {"kernel": kernels, "bias": rng.normal(size=(3, 2)).astype(np.float32)}
  for alpha in (1.0, 0.6):
    got = merging.regmean_merge(stacked, {"kernel": grams, "bias": None}, alpha=alpha)
    g = grams.astype(np.float64)
    scaled = alpha * g + (1 - alpha) * g * np.eye(4)
    ref = np.linalg.solve(scaled.sum(0), np.einsum("kij,kjo->io", scaled, kernels))
    np.testing.assert_allclose(got["kernel"], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["bias"], stacked["bias"].mean(0), rtol=1e-6)
  # Exact least squares: with α = 1 the merge minimises Σ_k ‖X_k W − X_k W_k‖².
  got = merging.regmean_merge(stacked, {"kernel": grams, "bias": None}, alpha=1.0)["kernel"]
  x_all = np.concatenate(inputs).astype(np.float64)
  y_all = np.concatenate([x @ w for x, w in zip(inputs, kernels.astype(np.float64))])
  np.testing.assert_allclose(got, np.linalg.lstsq(x_all, y_all, rcond=None)[0], rtol=1e-3)
  with pytest.raises(ValueError, match=r"grams\['kernel'\] has shape \(3, 2, 2\); accepted"):
    merging.regmean_merge(stacked, {"kernel": grams[:, :2, :2], "bias": None}, alpha=0.5)
  with pytest.raises(ValueError, match=r"alpha=1.5 is invalid"):
    merging.regmean_merge(stacked, {"kernel": grams, "bias": None}, alpha=1.5)


def test_adamerging_recovers_the_helpful_task():
  # Target inputs separated along x_0. Task 1 separates them; task 2 is −½ task 1, so
  # lower entropy means more of task 1 and less of task 2: the optimum in [0, 1] is (1, 0).
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, size=64)
  x = np.stack([np.where(labels, 2.0, -2.0), rng.normal(size=64)], 1).astype(np.float32)
  base = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
  tau1 = {"w": np.array([[-1.0, 1.0], [0.0, 0.0]], np.float32), "b": np.zeros(2, np.float32)}
  stacked = jax.tree.map(lambda a: np.stack([a, -0.5 * a]), tau1)
  batches = [x[:32], x[32:]]
  result = merging.adamerging(linear_logits, base, stacked, batches, steps=60, learning_rate=0.05)
  np.testing.assert_allclose(result.coefficients, [1.0, 0.0], atol=1e-6)
  assert float(result.entropy[-1]) < float(result.entropy[0])
  np.testing.assert_allclose(result.params["w"], tau1["w"], atol=1e-6)
  assert np.mean(np.argmax(linear_logits(result.params, x), 1) == labels) == 1.0
  layer = merging.adamerging(
    linear_logits, base, stacked, batches, granularity="layer", steps=60, learning_rate=0.05
  )
  assert jax.tree.structure(layer.coefficients) == jax.tree.structure(base)
  np.testing.assert_allclose(layer.coefficients["w"], [1.0, 0.0], atol=1e-6)
  assert float(layer.entropy[-1]) < float(layer.entropy[0])


def test_bad_density_and_options():
  stacked = random_tree(2)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"density=1.2 is invalid; accepted: .*\[0, 1\]"):
    merging.dare(key, stacked, density=1.2)
  with pytest.raises(ValueError, match=r"density=-0.5 is invalid"):
    merging.dare_ties(key, stacked, density=-0.5)
  with pytest.raises(ValueError, match=r"top_fraction=2 is invalid"):
    merging.breadcrumbs(stacked, density=0.5, top_fraction=2)
  with pytest.raises(ValueError, match=r"granularity='block' is invalid; accepted: task, layer"):
    merging.adamerging(linear_logits, {}, stacked, [np.zeros((1, 2))], granularity="block")


def test_bfloat16_members_keep_their_dtype():
  # bfloat16 members merge like their exact float32 values, rounded once at the end.
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_tree(3, seed=6))
  wide = jax.tree.map(lambda x: np.asarray(x, np.float32), half)
  key = jax.random.key(2)
  cases = [
    lambda t: merging.task_arithmetic(t, scale=0.5),
    lambda t: merging.dare_ties(key, t, density=0.5),
    lambda t: merging.breadcrumbs(t, density=0.5, top_fraction=0.1),
    lambda t: merging.fisher_merge(t, jax.tree.map(jnp.abs, t)),
  ]
  for fn in cases:
    for g, r in zip(jax.tree.leaves(fn(half)), jax.tree.leaves(fn(wide))):
      assert g.dtype == jnp.bfloat16
      np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=1e-2, atol=1e-2)
