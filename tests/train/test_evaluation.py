"""train.evaluation: fixed-shape batches over a whole split, padding cut off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.train import evaluation


def test_padded_batches_have_one_shape_and_zero_padding():
  x = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
  batches = list(evaluation.padded_batches(x, 3))
  assert [b.shape for b in batches] == [(3, 2)] * 3
  np.testing.assert_array_equal(np.concatenate(batches)[:7], x)
  np.testing.assert_array_equal(batches[-1][1:], 0)


def test_map_batched_equals_one_call_and_compiles_once():
  traces = []

  @jax.jit
  def fn(xb):
    traces.append(xb.shape)
    return jnp.argmax(xb, axis=-1), xb.sum(-1)

  x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
  got = evaluation.map_batched(lambda xb: fn(xb)[0], x, 4)
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
  assert traces == [(4, 4)]
  assert evaluation.map_batched(lambda xb: fn(xb)[0], x[:0], 4).shape == (0,)


def test_bad_batch_size_is_named():
  with pytest.raises(ValueError, match=r"^batch_size=0 is invalid"):
    list(evaluation.padded_batches(np.zeros((2, 1)), 0))
