"""Tests for moe_adapt.core.losses against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.core import losses

kl = jax.jit(losses.kl_divergence)
sym_kl = jax.jit(losses.symmetric_kl, static_argnames="stop_gradient_targets")
soft_ce = jax.jit(losses.soft_cross_entropy)
ce = jax.jit(losses.cross_entropy)
mse = jax.jit(losses.feature_mse)


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(t, z, temperature=1.0):
  log_p = np_log_softmax(np.asarray(t, np.float64) / temperature)
  log_q = np_log_softmax(np.asarray(z, np.float64) / temperature)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


@pytest.fixture(scope="module")
def pair():
  rng = np.random.default_rng(0)
  return (
    rng.normal(size=(6, 5)).astype(np.float32) * 2,
    rng.normal(size=(6, 5)).astype(np.float32) * 2,
  )


@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.5])
def test_kl_matches_numpy(pair, temperature):
  a, b = pair
  got = kl(a, b, temperature=temperature)
  assert got.shape == (6,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_kl(a, b, temperature), rtol=1e-5, atol=1e-6)


def test_kl_nonnegative_and_zero_for_equal(pair):
  a, b = pair
  assert np.all(np.asarray(kl(a, b)) > 0)
  np.testing.assert_array_equal(kl(a, a), np.zeros(6, np.float32))


def test_kl_temperature_softens(pair):
  # Higher temperature flattens both distributions towards uniform, shrinking the KL.
  a, b = pair
  values = [np.asarray(kl(a, b, temperature=t)) for t in (0.5, 1.0, 4.0, 100.0)]
  for hotter, colder in zip(values[1:], values[:-1]):
    assert np.all(hotter < colder)
  assert np.all(values[-1] < 1e-3)


def test_kl_bfloat16_inputs_computed_in_float32(pair):
  a, b = pair
  a16, b16 = np.asarray(a, jnp.bfloat16), np.asarray(b, jnp.bfloat16)
  got = kl(a16, b16)
  assert got.dtype == jnp.float32
  ref = np_kl(np.asarray(a16, np.float32), np.asarray(b16, np.float32))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_kl_extreme_logits_finite():
  a = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], np.float32)
  b = np.array([[-1e4, 1e4, 0.0], [1e4, -1e4, -1e4]], np.float32)
  for t in (1e-3, 1.0, 1e3):
    got = np.asarray(kl(a, b, temperature=t))
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
  # At T=1 the first row puts all mass on class 0, where log q = -2e4.
  np.testing.assert_allclose(np.asarray(kl(a, b))[0], 2e4, rtol=1e-6)


def test_kl_masked_minus_inf_logits():
  a = np.array([[0.0, 1.0, -np.inf]], np.float32)
  b = np.array([[1.0, 0.0, -np.inf]], np.float32)
  np.testing.assert_allclose(kl(a, b), np_kl(a[:, :2], b[:, :2]), rtol=1e-6)


def test_symmetric_kl_matches_numpy_and_is_symmetric(pair):
  a, b = pair
  ref = 0.5 * (np_kl(a, b, 2.0) + np_kl(b, a, 2.0))
  np.testing.assert_allclose(sym_kl(a, b, temperature=2.0), ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(sym_kl(a, b), sym_kl(b, a))
  np.testing.assert_array_equal(
    sym_kl(a, b, stop_gradient_targets=True), sym_kl(a, b, stop_gradient_targets=False)
  )


def test_symmetric_kl_stop_gradient_changes_gradient(pair):
  a, b = pair

  @jax.jit
  def gradients(a, b):
    def grad_a(fn):
      return jax.grad(lambda x: jnp.sum(fn(x)))(a)

    return (
      grad_a(lambda x: losses.symmetric_kl(x, b)),
      grad_a(lambda x: losses.symmetric_kl(x, b, stop_gradient_targets=True)),
      # With targets detached only KL(sg(b) || a) depends on a, as the model side.
      grad_a(lambda x: 0.5 * losses.kl_divergence(b, x)),
      grad_a(lambda x: 0.5 * (losses.kl_divergence(x, b) + losses.kl_divergence(b, x))),
    )

  full, stopped, expected_stopped, expected_full = gradients(a, b)
  np.testing.assert_allclose(stopped, expected_stopped, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(full, expected_full, rtol=1e-5, atol=1e-7)
  assert np.max(np.abs(np.asarray(full) - np.asarray(stopped))) > 1e-2
  # Closed form of the stopped gradient: 0.5 * (softmax(a) - softmax(b)).
  softmax = lambda z: np.exp(np_log_softmax(z))
  np.testing.assert_allclose(stopped, 0.5 * (softmax(a) - softmax(b)), rtol=1e-4, atol=1e-6)


def test_soft_cross_entropy_matches_numpy(pair):
  a, b = pair
  target = np.exp(np_log_softmax(b)).astype(np.float32)
  ref = -(target * np_log_softmax(a)).sum(-1)
  np.testing.assert_allclose(soft_ce(a, target), ref, rtol=1e-5)
  # Equal to KL plus the target entropy.
  entropy = -(target * np.log(target)).sum(-1)
  np.testing.assert_allclose(soft_ce(a, target), np_kl(b, a) + entropy, rtol=1e-4)


def test_soft_cross_entropy_zero_target_on_masked_logit():
  logits = np.array([[0.0, -np.inf, 1.0]], np.float32)
  target = np.array([[0.5, 0.0, 0.5]], np.float32)
  got = np.asarray(soft_ce(logits, target))
  ref = -(0.5 * np_log_softmax(logits[:, [0, 2]])).sum(-1)
  np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_cross_entropy_matches_numpy(pair):
  a, _ = pair
  labels = np.array([0, 4, 2, 2, 1, 3], np.int32)
  ref = -np_log_softmax(a)[np.arange(6), labels]
  np.testing.assert_allclose(ce(a, labels), ref, rtol=1e-6)
  np.testing.assert_allclose(ce(np.asarray(a, jnp.bfloat16), labels), ref, rtol=2e-2)


def test_feature_mse_matches_numpy():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(3, 4, 2, 5)).astype(np.float32)
  t = rng.normal(size=(3, 4, 2, 5)).astype(np.float32)
  ref = ((s.astype(np.float64) - t) ** 2).reshape(3, -1).mean(-1)
  got = mse(s, t)
  assert got.shape == (3,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_array_equal(mse(s, s), np.zeros(3))


def test_errors():
  a = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="logits has shape"):
    losses.kl_divergence(a, np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="temperature"):
    losses.kl_divergence(a, a, temperature=0.0)
  with pytest.raises(ValueError, match="temperature"):
    losses.symmetric_kl(a, a, temperature=-1.0)
  with pytest.raises(ValueError, match="teacher has shape"):
    losses.feature_mse(a, np.zeros((3, 3), np.float32))
  with pytest.raises(ValueError, match="target_probs"):
    losses.soft_cross_entropy(a, np.zeros((2, 2), np.float32))
  with pytest.raises(ValueError, match=r"labels range over \[0, 3\]"):
    losses.cross_entropy(a, np.array([0, 3]))
  with pytest.raises(ValueError, match="labels has dtype"):
    losses.cross_entropy(a, np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="labels has shape"):
    losses.cross_entropy(a, np.array([0, 1, 2]))


# ----------------------------------------------------------------------------
# l2_sp_penalty
# ----------------------------------------------------------------------------


def test_l2_sp_penalty_matches_numpy():
  rng = np.random.default_rng(2)
  params = {"a": rng.normal(size=(3, 4)), "b": {"c": rng.normal(size=(5,))}}
  anchor = {"a": rng.normal(size=(3, 4)), "b": {"c": rng.normal(size=(5,))}}
  params, anchor = jax.tree.map(lambda x: x.astype(np.float32), (params, anchor))
  pairs = zip(jax.tree.leaves(params), jax.tree.leaves(anchor), strict=True)
  ref = 0.5 * 0.3 * sum(((np.float64(p) - q) ** 2).sum() for p, q in pairs)
  got = jax.jit(losses.l2_sp_penalty)(params, anchor, alpha=0.3)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  # No anchor: the plain L2 term toward 0; zero at the anchor itself.
  ref0 = 0.5 * 2.0 * sum((np.float64(x) ** 2).sum() for x in jax.tree.leaves(params))
  np.testing.assert_allclose(losses.l2_sp_penalty(params, alpha=2.0), ref0, rtol=1e-6)
  assert float(losses.l2_sp_penalty(params, params, alpha=5.0)) == 0.0


def test_l2_sp_penalty_gradient_is_alpha_times_distance():
  rng = np.random.default_rng(3)
  params = {"w": rng.normal(size=(4,)).astype(np.float32)}
  anchor = {"w": rng.normal(size=(4,)).astype(np.float32)}
  grad = jax.grad(lambda p: losses.l2_sp_penalty(p, anchor, alpha=0.5))(params)
  np.testing.assert_allclose(grad["w"], 0.5 * (params["w"] - anchor["w"]), rtol=1e-6)


def test_l2_sp_penalty_errors():
  with pytest.raises(ValueError, match="same pytree structure"):
    losses.l2_sp_penalty({"a": np.zeros(2)}, {"b": np.zeros(2)}, alpha=1.0)
  with pytest.raises(ValueError, match="anchor has a leaf of shape"):
    losses.l2_sp_penalty({"a": np.zeros(2)}, {"a": np.zeros(3)}, alpha=1.0)
