"""Tests for moe_adapt.core.routing against NumPy references and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.core import routing

top_k = jax.jit(routing.top_k_route, static_argnames="k")
entropy = jax.jit(routing.normalized_entropy)
integrate = jax.jit(routing.integrate_teachers, static_argnames="mode")
margin = jax.jit(routing.margin_weights)


def test_random_route_range_dtype_and_uniformity():
  route = jax.jit(routing.random_route, static_argnums=(1, 2))
  idx = np.asarray(route(jax.random.key(0), 5, (20000,)))
  assert idx.dtype == np.int32 and idx.shape == (20000,)
  assert idx.min() == 0 and idx.max() == 4
  counts = np.bincount(idx, minlength=5)
  chi2 = np.sum((counts - 4000.0) ** 2 / 4000.0)
  assert chi2 < 25.0  # df = 4: P(chi2 > 25) ≈ 5e-5 for a uniform sampler
  scalar = route(jax.random.key(1), 3, ())
  assert scalar.shape == () and 0 <= int(scalar) < 3
  # Deterministic in the key.
  np.testing.assert_array_equal(route(jax.random.key(0), 5, (20000,)), idx)


def test_top_k_route_matches_argsort():
  rng = np.random.default_rng(0)
  gates = rng.normal(size=(7, 6)).astype(np.float32)
  idx, w = top_k(gates, 3)
  assert idx.dtype == jnp.int32 and w.dtype == jnp.float32 and idx.shape == w.shape == (7, 3)
  ref_idx = np.argsort(-gates, axis=-1, kind="stable")[:, :3]
  np.testing.assert_array_equal(idx, ref_idx)
  sel = np.take_along_axis(gates, ref_idx, -1).astype(np.float64)
  ref_w = np.exp(sel - sel.max(-1, keepdims=True))
  ref_w /= ref_w.sum(-1, keepdims=True)
  np.testing.assert_allclose(w, ref_w, rtol=1e-6)
  np.testing.assert_allclose(np.sum(w, -1), 1.0, rtol=1e-6)


def test_top_k_route_ties_and_k1():
  idx, w = top_k(np.array([[1.0, 3.0, 3.0, 0.0]], np.float32), 1)
  np.testing.assert_array_equal(idx, [[1]])
  np.testing.assert_array_equal(w, [[1.0]])


def test_mc_dropout_probs_equals_loop_over_split_keys():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)

  def apply_fn(params, x, key):
    # A cheap key-dependent stand-in for dropout (threefry-based masks compile slowly):
    # zero the input feature chosen by the key's bits.
    drop = jax.random.key_data(key)[-1] % x.shape[1]
    keep = jnp.arange(x.shape[1]) != drop
    return jnp.where(keep, x, 0.0) @ params["w"]

  fn = jax.jit(routing.mc_dropout_probs, static_argnames=("apply_fn", "num_samples"))
  key = jax.random.key(42)
  got = fn(apply_fn, params, x, key, num_samples=4)
  assert got.shape == (4, 5, 3) and got.dtype == jnp.float32
  keys = jax.random.split(key, 4)
  one_pass = jax.jit(lambda k: jax.nn.softmax(apply_fn(params, x, k)))
  ref = np.stack([np.asarray(one_pass(k)) for k in keys])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
  # The passes really differ (dropout is active) and each row is a distribution.
  assert np.abs(np.diff(np.asarray(got)[:2], axis=0)).max() > 1e-3
  np.testing.assert_allclose(np.sum(got, -1), 1.0, rtol=1e-5)


def test_normalized_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(4), size=6).astype(np.float32)
  p[0] = [0.5, 0.5, 0.0, 0.0]  # zeros are safe
  p[1] = [0.0, 1.0, 0.0, 0.0]  # certain -> 0
  p[2] = 0.25  # uniform -> 1
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * np.log(p), 0.0)
  ref = -terms.sum(-1) / np.log(4)
  got = entropy(p)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[:3], [np.log(2) / np.log(4), 0.0, 1.0], atol=1e-6)
  np.testing.assert_array_equal(entropy(np.ones((3, 1), np.float32)), np.zeros(3))
  grad = jax.jit(jax.grad(lambda q: jnp.sum(routing.normalized_entropy(q))))(p)
  assert np.all(np.isfinite(grad))


def test_integrate_teachers_hand_computed():
  p1 = np.array([[0.9, 0.1], [0.4, 0.6]], np.float32)
  p2 = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], np.float32)
  conf = np.array([[0.9, 0.5], [0.2, 0.7]], np.float32)
  hard = integrate([p1, p2], conf, mode="hard")
  np.testing.assert_allclose(
    hard, [[0.9, 0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.1, 0.1, 0.8]], rtol=1e-7
  )
  soft = integrate([p1, p2], conf, mode="soft", temperature=0.2)
  # Row 0: w = softmax([0.9, 0.5] / 0.2) = softmax([4.5, 2.5]).
  w0 = 1.0 / (1.0 + np.exp(-2.0))
  w1 = 1.0 / (1.0 + np.exp(-2.5))  # row 1: softmax([1.0, 3.5]) puts w1 on teacher 2
  ref = np.array(
    [
      [0.9 * w0, 0.1 * w0, 0.2 * (1 - w0), 0.3 * (1 - w0), 0.5 * (1 - w0)],
      [0.4 * (1 - w1), 0.6 * (1 - w1), 0.1 * w1, 0.1 * w1, 0.8 * w1],
    ]
  )
  np.testing.assert_allclose(soft, ref, rtol=1e-6)
  for out in (hard, soft):
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.sum(out, -1), 1.0, rtol=1e-6)


def test_integrate_teachers_three_teachers_rows_sum_to_one():
  rng = np.random.default_rng(3)
  probs = [rng.dirichlet(np.ones(c), size=8).astype(np.float32) for c in (2, 3, 4)]
  conf = rng.uniform(size=(8, 3)).astype(np.float32)
  soft = np.asarray(integrate(probs, conf, mode="soft", temperature=1.0))
  e = np.exp(conf - conf.max(-1, keepdims=True))
  w = e / e.sum(-1, keepdims=True)
  ref = np.concatenate([w[:, k : k + 1] * probs[k] for k in range(3)], -1)
  np.testing.assert_allclose(soft, ref, rtol=1e-5)
  hard = np.asarray(integrate(probs, conf, mode="hard"))
  best = conf.argmax(-1)
  slots = [(0, 2), (2, 5), (5, 9)]
  for i in range(8):
    lo, hi = slots[best[i]]
    np.testing.assert_array_equal(hard[i, lo:hi], probs[best[i]][i])
    assert np.sum(hard[i]) == pytest.approx(1.0, rel=1e-6)


def test_integrate_teachers_errors():
  p = [np.full((2, 2), 0.5, np.float32)] * 2
  conf = np.zeros((2, 2), np.float32)
  with pytest.raises(ValueError, match=r"mode='mean' is unknown; accepted: hard, soft"):
    routing.integrate_teachers(p, conf, mode="mean", temperature=1.0)
  with pytest.raises(ValueError, match="teacher_probs has 3 teachers"):
    routing.integrate_teachers(p + p[:1], conf, mode="hard")
  with pytest.raises(ValueError, match="temperature"):
    routing.integrate_teachers(p, conf, mode="soft")
  with pytest.raises(ValueError, match="temperature"):
    routing.integrate_teachers(p, conf, mode="soft", temperature=0.0)
  with pytest.raises(ValueError, match=r"teacher_probs\[1\] has shape"):
    routing.integrate_teachers([p[0], np.ones((3, 2))], conf, mode="hard")


def test_margin_weights():
  conf = np.array([[0.9, 0.5, 0.7], [0.3, 0.3, 0.1], [0.0, 1.0, 0.2]], np.float32)
  got = margin(conf)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, [0.2, 0.0, 0.8], atol=1e-7)
  srt = np.sort(conf, -1)
  np.testing.assert_allclose(got, srt[:, -1] - srt[:, -2], atol=1e-7)
  with pytest.raises(ValueError, match="K >= 2"):
    routing.margin_weights(np.ones((3, 1)))


def test_other_errors():
  with pytest.raises(ValueError, match="num_experts=0"):
    routing.random_route(jax.random.key(0), 0)
  with pytest.raises(ValueError, match=r"k=4 is invalid .* accepted: an integer in \[1, 3\]"):
    routing.top_k_route(np.zeros((2, 3)), 4)
  with pytest.raises(ValueError, match="num_samples=0"):
    routing.mc_dropout_probs(
      lambda p, x, k: x, None, np.zeros((1, 2)), jax.random.key(0), num_samples=0
    )
  with pytest.raises(ValueError, match="probs is a scalar"):
    routing.normalized_entropy(np.float32(1.0))
