"""Tests for moe_adapt.core.calibration against NumPy references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from moe_adapt.core import calibration

fit = calibration.fit_temperature  # jits internally, with inputs cast to float32 first
ece = jax.jit(calibration.expected_calibration_error, static_argnames="num_bins")


def np_nll(logits, labels, temperature):
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  log_norm = np.log(np.exp(z).sum(-1))
  return np.mean(log_norm - z[np.arange(len(labels)), labels])


@pytest.fixture(scope="module")
def tempered():
  """5000 examples whose labels are drawn from softmax(z / 2.5)."""
  rng = np.random.default_rng(0)
  z = (rng.normal(size=(5000, 10)) * 4.0).astype(np.float32)
  p = np.exp(z / 2.5 - (z / 2.5).max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  labels = (p.cumsum(-1) > rng.uniform(size=(5000, 1))).argmax(-1).astype(np.int32)
  return z, labels


def test_fit_temperature_recovers_known_temperature(tempered):
  z, labels = tempered
  t = fit(z, labels)
  assert t.shape == () and t.dtype == jnp.float32
  assert abs(float(t) - 2.5) / 2.5 < 0.1


def test_fit_temperature_under_jit(tempered):
  z, labels = tempered
  jitted = jax.jit(calibration.fit_temperature)(z[:1000], labels[:1000])
  assert float(jitted) == pytest.approx(float(fit(z[:1000], labels[:1000])), rel=1e-6)


def test_fit_temperature_matches_scipy(tempered):
  z, labels = tempered
  z, labels = z[:1000], labels[:1000]
  res = optimize.minimize_scalar(
    lambda u: np_nll(z, labels, np.exp(u)),
    bounds=(np.log(0.05), np.log(20.0)),
    method="bounded",
    options={"xatol": 1e-7},
  )
  t = float(fit(z, labels))
  assert t == pytest.approx(np.exp(res.x), rel=1e-4)
  assert np_nll(z, labels, t) <= res.fun + 1e-6


def test_fit_temperature_degenerate_cases_finite(tempered):
  z, labels = tempered
  z, labels = z[:1000], labels[:1000]
  # All predictions correct: NLL falls as T -> 0, so the lower bound is returned.
  t_correct = float(fit(z, z.argmax(-1).astype(np.int32)))
  assert t_correct == pytest.approx(0.05, rel=1e-4)
  # Extreme logits: finite and positive; every label is the wrong class here -> upper bound.
  extreme = np.where(z >= z.max(-1, keepdims=True), 1e4, -1e4).astype(np.float32)
  t_extreme = float(fit(extreme, (z.argmax(-1) + 1).astype(np.int32) % 10))
  assert np.isfinite(t_extreme) and t_extreme == pytest.approx(20.0, rel=1e-4)
  # A single class present among the labels.
  t_single = float(fit(z, np.zeros(1000, np.int32)))
  assert np.isfinite(t_single) and 0.05 <= t_single <= 20.0
  # bfloat16 logits.
  t16 = float(fit(np.asarray(z, jnp.bfloat16), labels))
  assert np.isfinite(t16) and t16 > 0


def np_ece(probs, labels, num_bins):
  conf, pred = probs.max(-1), probs.argmax(-1)
  acc = (pred == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  total = 0.0
  for b, (lo, hi) in enumerate(itertools.pairwise(edges)):
    in_bin = (conf > lo) & (conf <= hi) if b else (conf <= hi)
    if in_bin.any():
      total += in_bin.mean() * abs(acc[in_bin].mean() - conf[in_bin].mean())
  return total


@pytest.mark.parametrize("num_bins", [15, 7])
def test_ece_matches_numpy(tempered, num_bins):
  z, labels = tempered
  rng = np.random.default_rng(1)
  logits = z[:2000] / rng.uniform(0.5, 4.0)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
  got = ece(probs, labels[:2000], num_bins=num_bins)
  assert got.dtype == jnp.float32
  assert float(got) == pytest.approx(
    np_ece(probs.astype(np.float64), labels[:2000], num_bins), abs=1e-5
  )


def test_ece_special_cases():
  onehot = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 1]]
  labels = np.array([0, 1, 2, 3, 1], np.int32)
  assert float(ece(onehot, labels)) == 0.0  # confident and right
  assert float(ece(onehot, (labels + 1) % 4)) == 1.0  # confident and wrong
  # Confidence 0.5 in bin (7/15, 8/15] with accuracy 1/2: perfectly calibrated.
  half = np.array([[0.5, 0.5], [0.5, 0.5]], np.float32)
  assert float(ece(half, np.array([0, 1], np.int32))) == pytest.approx(0.0, abs=1e-7)
  got16 = ece(np.asarray(onehot, jnp.bfloat16), labels)
  assert got16.dtype == jnp.float32 and float(got16) == 0.0


def test_errors():
  logits = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"labels has shape \(3,\)"):
    calibration.fit_temperature(logits, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="labels has dtype float32"):
    calibration.fit_temperature(logits, np.zeros(4, np.float32))
  with pytest.raises(ValueError, match=r"logits has shape \(4,\)"):
    calibration.fit_temperature(np.zeros(4), np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="bounds="):
    calibration.fit_temperature(logits, np.zeros(4, np.int32), bounds=(0.0, 1.0))
  with pytest.raises(ValueError, match="num_bins=0"):
    calibration.expected_calibration_error(logits, np.zeros(4, np.int32), num_bins=0)
  with pytest.raises(ValueError, match=r"probs has shape \(0, 3\)"):
    calibration.expected_calibration_error(np.zeros((0, 3)), np.zeros(0, np.int32))
