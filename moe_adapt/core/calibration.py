"""Calibration of classifiers: temperature scaling and expected calibration error.

From Guo et al., ICML 2017, "On Calibration of Modern Neural Networks". Co-Tuning calibrates
its source→target map with temperature scaling before reading the category relationship.
Pure and jit-able; computed in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["expected_calibration_error", "fit_temperature"]

_INV_GOLDEN = float((np.sqrt(5.0) - 1.0) / 2.0)  # 1/φ ≈ 0.618


def _check_logits_labels(name: str, scores: jax.Array, labels: jax.Array) -> None:
  scores_shape, labels_shape = jnp.shape(scores), jnp.shape(labels)
  if len(scores_shape) != 2 or scores_shape[0] == 0 or scores_shape[1] == 0:
    raise ValueError(f"{name} has shape {scores_shape}; accepted: [N, C] with N, C >= 1")
  if labels_shape != scores_shape[:1]:
    raise ValueError(
      f"labels has shape {labels_shape} but {name} has shape {scores_shape}; "
      f"accepted: labels of shape [{scores_shape[0]}]"
    )
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"labels has dtype {jnp.result_type(labels)}; accepted: integer dtypes")
  if not isinstance(labels, jax.core.Tracer):  # Concrete labels: check their range too.
    host = np.asarray(labels)  # NumPy: jnp would stage the check when called under jit.
    low, high = int(host.min()), int(host.max())
    if low < 0 or high >= scores_shape[1]:
      raise ValueError(
        f"labels range over [{low}, {high}]; accepted: integers in [0, {scores_shape[1]})"
      )


def _mean_nll(logits: jax.Array, labels: jax.Array, log_temperature: jax.Array) -> jax.Array:
  z = logits * jnp.exp(-log_temperature)
  picked = jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(z, axis=-1) - picked)


def fit_temperature(
  logits: jax.Array,
  labels: jax.Array,
  *,
  bounds: tuple[float, float] = (0.05, 20.0),
  num_iterations: int = 40,
) -> jax.Array:
  r"""Temperature T > 0 minimising the mean negative log-likelihood of softmax(logits / T).

  .. math::
    T^* = \arg\min_{T \in [T_{lo}, T_{hi}]} \ \frac1N \sum_i
      -\log \mathrm{softmax}(z_i / T)_{y_i}

  Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks",
  ICML 2017); Co-Tuning's Algorithm 2, "Neural network calibration" (You et al., NeurIPS 2020),
  which the official code fits with L-BFGS. The NLL is convex in 1/T, hence unimodal in u = log T,
  and is minimised by golden-section search on u over log(bounds) with a fixed number of iterations
  (a `lax.fori_loop`, so the function jit-compiles and cannot diverge). The search interval shrinks
  by 0.618 per iteration; 40 iterations reach float32 resolution. When the optimum lies outside the
  bounds — e.g. every prediction is correct, so the NLL keeps falling as T → 0 — the result is the
  nearest bound, finite and positive.

  Args:
    logits: [N, C] logits (float32 or bfloat16).
    labels: [N] integer labels in [0, C).
    bounds: (T_lo, T_hi) with 0 < T_lo < T_hi. Static.
    num_iterations: golden-section iterations. Static.

  Returns:
    float32 scalar T in [T_lo, T_hi].
  """
  _check_logits_labels("logits", logits, labels)
  low, high = bounds
  if not 0 < low < high or not np.isfinite(high):
    raise ValueError(f"bounds={bounds!r} is invalid; accepted: (low, high) with 0 < low < high")
  if not isinstance(num_iterations, int) or num_iterations < 1:
    raise ValueError(f"num_iterations={num_iterations!r} is invalid; accepted: an integer >= 1")
  # Casting before the jitted part lets float32 and bfloat16 inputs share one compilation.
  return _fit_temperature(
    jnp.asarray(logits, jnp.float32),
    jnp.asarray(labels, jnp.int32),
    bounds=(float(low), float(high)),
    num_iterations=num_iterations,
  )


@functools.partial(jax.jit, static_argnames=("bounds", "num_iterations"))
def _fit_temperature(
  logits: jax.Array, labels: jax.Array, *, bounds: tuple[float, float], num_iterations: int
) -> jax.Array:
  # Jitted so that an eager call is one compiled search rather than op-by-op dispatch.
  z = jnp.asarray(logits, jnp.float32)
  y = jnp.asarray(labels).astype(jnp.int32)
  f = lambda u: _mean_nll(z, y, u)
  low, high = bounds

  a, b = jnp.float32(np.log(low)), jnp.float32(np.log(high))
  c = b - _INV_GOLDEN * (b - a)
  d = a + _INV_GOLDEN * (b - a)

  def step(_, state):
    a, b, c, d, fc, fd = state
    # If f(c) < f(d) the minimum lies in [a, d] and the old c becomes the new d; otherwise
    # it lies in [c, b] and the old d becomes the new c. One new evaluation per iteration.
    left = fc < fd
    a, b = jnp.where(left, a, c), jnp.where(left, d, b)
    new = jnp.where(left, b - _INV_GOLDEN * (b - a), a + _INV_GOLDEN * (b - a))
    f_new = f(new)
    c, fc, d, fd = (
      jnp.where(left, new, d),
      jnp.where(left, f_new, fd),
      jnp.where(left, c, new),
      jnp.where(left, fc, f_new),
    )
    return a, b, c, d, fc, fd

  state = (a, b, c, d, f(c), f(d))
  a, b, *_ = lax.fori_loop(0, num_iterations, step, state)
  return jnp.exp(0.5 * (a + b)).astype(jnp.float32)


def expected_calibration_error(
  probs: jax.Array, labels: jax.Array, *, num_bins: int = 15
) -> jax.Array:
  r"""Expected calibration error with equal-width confidence bins.

  .. math::
    \mathrm{ECE} = \sum_{b=1}^{B} \frac{|S_b|}{N}\,
      \bigl|\mathrm{acc}(S_b) - \mathrm{conf}(S_b)\bigr|

  where the confidence of example i is max_c p_ic, its prediction argmax_c p_ic (ties:
  lowest class), and S_b holds the examples whose confidence falls in ((b−1)/B, b/B]
  (confidence 0 goes to the first bin). Guo et al., ICML 2017 (after Naeini et al., 2015).

  Args:
    probs: [N, C] predicted probabilities.
    labels: [N] integer labels.
    num_bins: B ≥ 1. Static.

  Returns:
    float32 scalar in [0, 1].
  """
  _check_logits_labels("probs", probs, labels)
  if not isinstance(num_bins, int) or num_bins < 1:
    raise ValueError(f"num_bins={num_bins!r} is invalid; accepted: an integer >= 1")
  p = jnp.asarray(probs, jnp.float32)
  confidence = jnp.max(p, axis=-1)
  correct = (jnp.argmax(p, axis=-1) == jnp.asarray(labels)).astype(jnp.float32)
  bins = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  # Σ_b |S_b|/N · |acc_b − conf_b| = Σ_b |Σ_{i∈S_b} (correct_i − conf_i)| / N.
  gap = jax.ops.segment_sum(correct - confidence, bins, num_segments=num_bins)
  return jnp.sum(jnp.abs(gap)) / p.shape[0]
