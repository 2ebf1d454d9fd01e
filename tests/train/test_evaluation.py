"""train.evaluation: fixed-shape batches over a whole split, padding cut off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

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


def test_map_batches_pairs_rows_of_several_arrays_and_passes_each_batch_start():
  a = np.arange(7, dtype=np.int32)
  b = 10 * np.arange(7, dtype=np.int32)
  starts = []

  def fn(start, ab, bb):
    starts.append(start)
    assert ab.shape == bb.shape == (3,)
    return ab + bb

  np.testing.assert_array_equal(evaluation.map_batches(fn, (a, b), 3), 11 * a)
  assert starts == [0, 3, 6]


class _Routed(nn.Module):
  """logits = x + noise drawn from the 'routing' stream (a stand-in for random routing)."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    return x + jax.random.normal(self.make_rng("routing"), x.shape)


def test_apply_batched_fixed_key_repeats_its_draw_and_fresh_keys_differ_per_batch():
  model, x = _Routed(), np.zeros((4, 3), np.float32)
  key = jax.random.key(3)
  fixed = evaluation.apply_batched(model, {}, (x,), batch_size=2, key=key)
  np.testing.assert_array_equal(fixed[:2], fixed[2:])  # one key for every batch
  fresh = evaluation.apply_batched(model, {}, (x,), batch_size=2, key=key, fresh_keys=True)
  # The batch starting at row 2 draws with fold_in(key, 2).
  second = jax.random.fold_in(key, 2)
  want = evaluation.apply_batched(model, {}, (x[2:],), batch_size=2, key=second)
  np.testing.assert_array_equal(fresh[2:], want)
  assert not np.allclose(fresh[:2], fresh[2:])
