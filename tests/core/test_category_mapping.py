"""Tests for moe_adapt.core.category_mapping (Co-Tuning) against NumPy/sklearn references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from sklearn.linear_model import LogisticRegression

from moe_adapt.core import category_mapping as cm

C_T, C_S = 4, 8
MAPPING = np.array([5, 2, 7, 0])  # target class c is mostly seen as source class MAPPING[c]
GRID = (1.0, 0.01)  # a small grid: one very weak and one strong regularisation
MAX_ITER = 60


def make_split(rng, n):
  labels = np.concatenate([np.arange(C_T), rng.integers(0, C_T, n - C_T)]).astype(np.int32)
  logits = rng.normal(size=(n, C_S))
  logits[np.arange(n), MAPPING[labels]] += 2.5
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return (probs / probs.sum(-1, keepdims=True)).astype(np.float32), labels


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return make_split(rng, 240), make_split(rng, 120)


@pytest.fixture(scope="module")
def reverse(data):
  (x, y), (xv, yv) = data
  return np.asarray(
    cm.reverse_relationship(
      x, y, C_T, val_source_probs=xv, val_labels=yv, l2_grid=GRID, max_iter=MAX_ITER
    )
  )


def test_direct_relationship_matches_numpy(data):
  (x, y), _ = data
  got = cm.direct_relationship(x, y, C_T)
  assert got.shape == (C_T, C_S) and got.dtype == jnp.float32
  ref = np.stack([x[y == c].mean(0) for c in range(C_T)])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.sum(got, -1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(np.argmax(got, -1), MAPPING)
  got16 = cm.direct_relationship(np.asarray(x, jnp.bfloat16), y, C_T)
  assert got16.dtype == jnp.float32
  np.testing.assert_allclose(got16, ref, atol=1e-2)


def test_direct_relationship_empty_class(data):
  (x, y), _ = data
  with pytest.raises(ValueError, match=r"target class\(es\) \[4, 5\] .* target_labels"):
    cm.direct_relationship(x, y, 6)
  # Under jit the labels are unknown at trace time: the empty row is uniform, never NaN.
  got = jax.jit(cm.direct_relationship, static_argnums=2)(x, y, 6)
  np.testing.assert_allclose(got[4:], np.full((2, C_S), 1.0 / C_S), rtol=1e-7)
  assert np.all(np.isfinite(got))


def sklearn_reverse(x, y, xv, yv, grid):
  """The official recipe with sklearn and scipy: fit, select by val accuracy, calibrate, Bayes."""
  best_acc, best_w = -1.0, None
  for c in grid:
    w = LogisticRegression(C=c, fit_intercept=False, tol=1e-8, max_iter=2000).fit(x, y).coef_
    acc = np.mean(np.argmax(xv @ w.T, -1) == yv)
    if acc > best_acc:
      best_acc, best_w = acc, w
  z = xv.astype(np.float64) @ best_w.T

  def nll(u):
    s = z / np.exp(u)
    s = s - s.max(-1, keepdims=True)
    return np.mean(np.log(np.exp(s).sum(-1)) - s[np.arange(len(yv)), yv])

  t = np.exp(
    optimize.minimize_scalar(
      nll, bounds=(np.log(0.05), np.log(20)), method="bounded", options={"xatol": 1e-8}
    ).x
  )
  t_given_s = np.exp(best_w / t)
  t_given_s /= t_given_s.sum(0, keepdims=True)
  rel = t_given_s * np.concatenate([x, xv]).mean(0)[None, :]
  return rel / rel.sum(1, keepdims=True)


def test_reverse_relationship_matches_sklearn_recipe(data, reverse):
  (x, y), (xv, yv) = data
  assert reverse.shape == (C_T, C_S) and reverse.dtype == np.float32
  ref = sklearn_reverse(x, y, xv, yv, GRID)
  np.testing.assert_allclose(reverse, ref, atol=2e-3)


def test_reverse_relationship_recovers_mapping(reverse):
  np.testing.assert_allclose(np.sum(reverse, -1), 1.0, rtol=1e-5)
  assert np.all(reverse >= 0)
  np.testing.assert_array_equal(np.argmax(reverse, -1), MAPPING)


def test_reverse_relationship_under_jit_empty_class(data):
  (x, y), _ = data
  # Labels are traced under jit, so the missing class 4 cannot be reported: its row is
  # uniform instead, and the other rows are still distributions.
  fn = jax.jit(
    functools.partial(cm.reverse_relationship, l2_grid=(1.0,), max_iter=5), static_argnums=2
  )
  got = np.asarray(fn(np.asarray(x, jnp.bfloat16), y, 5))
  assert got.shape == (5, C_S) and np.all(np.isfinite(got)) and np.all(got >= 0)
  np.testing.assert_allclose(got[4], np.full(C_S, 1.0 / C_S), rtol=1e-6)
  np.testing.assert_allclose(np.sum(got, -1), 1.0, rtol=1e-5)


def test_reverse_relationship_errors(data):
  (x, y), (xv, yv) = data
  with pytest.raises(ValueError, match=r"target class\(es\) \[4\] .* target_labels"):
    cm.reverse_relationship(x, y, 5)
  with pytest.raises(ValueError, match="val_source_probs and val_labels must be given together"):
    cm.reverse_relationship(x, y, C_T, val_source_probs=xv)
  with pytest.raises(ValueError, match="val_source_probs has 3 source classes"):
    cm.reverse_relationship(x, y, C_T, val_source_probs=xv[:, :3], val_labels=yv)
  with pytest.raises(ValueError, match=r"val_labels contains \[7\]"):
    cm.reverse_relationship(x, y, C_T, val_source_probs=xv, val_labels=np.full_like(yv, 7))
  with pytest.raises(ValueError, match="l2_grid"):
    cm.reverse_relationship(x, y, C_T, l2_grid=(1.0, -1.0))
  with pytest.raises(ValueError, match="max_iter=0"):
    cm.reverse_relationship(x, y, C_T, max_iter=0)
  with pytest.raises(ValueError, match=r"target_labels contains \[-1\]"):
    cm.direct_relationship(x, np.where(y == 0, -1, y), C_T)
  with pytest.raises(ValueError, match="num_target_classes=0"):
    cm.direct_relationship(x, y, 0)
  with pytest.raises(ValueError, match=r"target_labels has shape \(3,\)"):
    cm.direct_relationship(x, y[:3], C_T)


def test_co_tuning_loss_matches_numpy(data, reverse):
  rng = np.random.default_rng(5)
  b = 6
  t_logits = rng.normal(size=(b, C_T)).astype(np.float32)
  s_logits = rng.normal(size=(b, C_S)).astype(np.float32) * 3
  labels = np.array([0, 1, 2, 3, 3, 1], np.int32)
  loss = jax.jit(cm.co_tuning_loss)
  got = loss(t_logits, s_logits, labels, reverse, trade_off=2.3)
  assert got.shape == (b,) and got.dtype == jnp.float32

  def log_softmax(z):
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  ce = -log_softmax(t_logits)[np.arange(b), labels]
  soft = -(reverse[labels] * log_softmax(s_logits)).sum(-1)
  np.testing.assert_allclose(got, ce + 2.3 * soft, rtol=1e-5)
  np.testing.assert_allclose(
    loss(t_logits, s_logits, labels, reverse, trade_off=0.0), ce, rtol=1e-5
  )
  with pytest.raises(ValueError, match=r"relationship has shape \(8, 4\)"):
    cm.co_tuning_loss(t_logits, s_logits, labels, reverse.T, trade_off=1.0)
  with pytest.raises(ValueError, match="same B"):
    cm.co_tuning_loss(t_logits[:2], s_logits, labels, reverse, trade_off=1.0)
