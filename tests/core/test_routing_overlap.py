"""Tests of core.routing.integrate_teachers with `label_index` (overlapping label sets).

An independent NumPy reference (a loop over teachers and classes), hand cases, rows summing
to 1 with overlaps, equality with the concatenation for a disjoint label_index, and the
validation messages.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_adapt.core import routing


def reference(probs, conf, label_index, num_labels, *, mode, temperature=None):
  """q[b, c] = Σ_k w_k[b] Σ_{i: idx_k[i] = c} P_k[b, i], with explicit loops."""
  conf = np.asarray(conf, np.float64)
  b, k = conf.shape
  if mode == "hard":
    w = np.zeros_like(conf)
    w[np.arange(b), conf.argmax(1)] = 1.0
  else:
    e = np.exp((conf - conf.max(1, keepdims=True)) / temperature)
    w = e / e.sum(1, keepdims=True)
  q = np.zeros((b, num_labels))
  for t in range(k):
    for i, c in enumerate(label_index[t]):
      q[:, c] += w[:, t] * probs[t][:, i]
  return q


def test_overlapping_hand_case():
  # Teacher 0 knows union classes {0, 1, 2}, teacher 1 knows {2, 3} (class 2 is shared).
  p0 = np.array([[0.5, 0.3, 0.2]], np.float32)
  p1 = np.array([[0.6, 0.4]], np.float32)
  conf = np.array([[0.0, 0.2 * np.log(3.0)]], np.float32)  # soft weights 1/4, 3/4 at T = 0.2
  index = [np.array([0, 1, 2]), np.array([2, 3])]
  soft = routing.integrate_teachers(
    [p0, p1], conf, mode="soft", temperature=0.2, label_index=index, num_labels=4
  )
  expected = [[0.125, 0.075, 0.05 + 0.45, 0.3]]
  np.testing.assert_allclose(soft, expected, rtol=1e-5)
  hard = routing.integrate_teachers([p0, p1], conf, mode="hard", label_index=index, num_labels=4)
  np.testing.assert_allclose(hard, [[0.0, 0.0, 0.6, 0.4]], rtol=1e-6)
  assert soft.dtype == hard.dtype == jnp.float32


def _random_case(rng, sizes, num_labels, batch=6):
  probs = [rng.dirichlet(np.ones(c), size=batch).astype(np.float32) for c in sizes]
  index = [rng.choice(num_labels, size=c, replace=False) for c in sizes]
  conf = rng.uniform(size=(batch, len(sizes))).astype(np.float32)
  return probs, conf, index


@settings(max_examples=25, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4),
  extra=st.integers(0, 3),
  mode=st.sampled_from(["hard", "soft"]),
  temperature=st.sampled_from([0.2, 1.0]),
)
def test_matches_numpy_reference_and_rows_sum_to_one(seed, sizes, extra, mode, temperature):
  rng = np.random.default_rng(seed)
  num_labels = max(sizes) + extra  # random label sets: overlapping as often as not
  probs, conf, index = _random_case(rng, sizes, num_labels)
  got = routing.integrate_teachers(
    probs, conf, mode=mode, temperature=temperature, label_index=index, num_labels=num_labels
  )
  ref = reference(probs, conf, index, num_labels, mode=mode, temperature=temperature)
  assert got.shape == (6, num_labels) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(got, -1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_disjoint_label_index_equals_the_concatenation(mode):
  rng = np.random.default_rng(1)
  probs, conf, _ = _random_case(rng, (2, 3, 4), 9, batch=8)
  offsets = np.cumsum([0, 2, 3])
  index = [np.arange(o, o + c) for o, c in zip(offsets, (2, 3, 4))]
  concat = routing.integrate_teachers(probs, conf, mode=mode, temperature=0.5)
  scattered = routing.integrate_teachers(
    probs, conf, mode=mode, temperature=0.5, label_index=index, num_labels=9
  )
  np.testing.assert_array_equal(scattered, concat)
  # A permuted disjoint index moves the same columns (the reference agrees).
  perm = rng.permutation(9)
  moved = routing.integrate_teachers(
    probs, conf, mode=mode, temperature=0.5, label_index=[perm[i] for i in index], num_labels=9
  )
  np.testing.assert_array_equal(np.asarray(moved)[:, perm], concat)


def test_uncovered_union_class_gets_zero_and_jit_closes_over_the_index():
  rng = np.random.default_rng(2)
  probs, conf, _ = _random_case(rng, (2, 2), 5)
  index = [[0, 1], [1, 3]]  # union class 2 and 4 are nobody's
  fn = jax.jit(
    functools.partial(
      routing.integrate_teachers, mode="soft", temperature=0.2, label_index=index, num_labels=5
    )
  )
  got = np.asarray(fn(probs, conf))
  np.testing.assert_array_equal(got[:, [2, 4]], 0.0)
  ref = reference(probs, conf, index, 5, mode="soft", temperature=0.2)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_label_index_errors():
  p = [np.full((2, 2), 0.5, np.float32)] * 2
  conf = np.zeros((2, 2), np.float32)

  def call(index, num_labels=4):
    return routing.integrate_teachers(
      p, conf, mode="hard", label_index=index, num_labels=num_labels
    )

  with pytest.raises(ValueError, match=r"label_index has 1 entries for 2 teachers"):
    call([[0, 1]])
  with pytest.raises(ValueError, match=r"label_index\[1\] has shape \(3,\) .* length C_1 = 2"):
    call([[0, 1], [1, 2, 3]])
  with pytest.raises(ValueError, match=r"label_index\[0\] has shape \(2,\) and dtype float"):
    call([[0.0, 1.0], [1, 2]])
  with pytest.raises(ValueError, match=r"label_index\[1\] has values in \[2, 4\]; accepted: .*4\)"):
    call([[0, 1], [2, 4]])
  with pytest.raises(ValueError, match=r"label_index\[0\] has values in \[-1, 0\]"):
    call([[-1, 0], [2, 3]])
  with pytest.raises(ValueError, match=r"label_index\[0\] lists a column twice"):
    call([[1, 1], [2, 3]])
  with pytest.raises(ValueError, match=r"num_labels=None is invalid with label_index"):
    call([[0, 1], [2, 3]], num_labels=None)
  with pytest.raises(ValueError, match=r"num_labels=4 is given without label_index"):
    routing.integrate_teachers(p, conf, mode="hard", num_labels=4)
  with pytest.raises(ValueError, match=r"label_index\[0\] is a traced array"):
    jax.jit(
      lambda idx: routing.integrate_teachers(
        p, conf, mode="hard", label_index=[idx, [2, 3]], num_labels=4
      )
    )(jnp.arange(2))
