"""Tests for moe_adapt.data.episodes: invariants (hypothesis), determinism, jit, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_adapt import data
from moe_adapt.data import DomainIndex, Split

SUPPORT, QUERY, MAX_SIZE, NUM_DOMAINS = 3, 4, 12, 4


def _splits(sizes, shape=(2, 2, 1)):
  return [
    Split(np.full((n, *shape), d, np.float32), np.arange(n, dtype=np.int32))
    for d, n in enumerate(sizes)
  ]


def test_concat_domains():
  (x, y), domain_ids, index = data.concat_domains(_splits([3, 5, 2]))
  assert x.shape == (10, 2, 2, 1) and y.shape == (10,)
  np.testing.assert_array_equal(domain_ids, [0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(x[:, 0, 0, 0], domain_ids)
  np.testing.assert_array_equal(index.offsets, [0, 3, 8])
  np.testing.assert_array_equal(index.sizes, [3, 5, 2])
  assert index.max_size == 5 and isinstance(index.max_size, int)
  assert index.offsets.dtype == jnp.int32 and domain_ids.dtype == np.int32


def test_concat_domains_errors():
  with pytest.raises(ValueError, match="non-empty sequence"):
    data.concat_domains([])
  with pytest.raises(ValueError, match=r"splits\[1\] must be non-empty"):
    data.concat_domains(_splits([3, 0]))
  with pytest.raises(ValueError, match=r"splits\[1\]\.x has image shape"):
    data.concat_domains([*_splits([3]), *_splits([2], shape=(3, 3, 1))])
  with pytest.raises(ValueError, match=r"splits\[0\] must be a Split"):
    data.concat_domains([(np.zeros((2, 1, 1, 1)), np.zeros(2))])


# One compiled sampler for every hypothesis example: the index is a jit argument whose
# max_size is static, and sizes/offsets vary as traced values.
@jax.jit
@chex.assert_max_traces(n=1)
def _sample(key, index):
  return data.sample_episode(key, index, support_size=SUPPORT, query_size=QUERY)


def _index(sizes):
  sizes = np.asarray(sizes, np.int32)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  return DomainIndex(jnp.asarray(offsets), jnp.asarray(sizes), MAX_SIZE)


@settings(max_examples=60, deadline=None)
@given(
  sizes=st.lists(
    st.integers(SUPPORT + QUERY, MAX_SIZE), min_size=NUM_DOMAINS, max_size=NUM_DOMAINS
  ),
  seed=st.integers(0, 2**31 - 1),
)
def test_episode_invariants(sizes, seed):
  index = _index(sizes)
  episode = _sample(jax.random.key(seed), index)
  domain = int(episode.domain)
  support, query = np.asarray(episode.support_idx), np.asarray(episode.query_idx)
  assert support.shape == (SUPPORT,) and query.shape == (QUERY,)
  assert support.dtype == np.int32 and query.dtype == np.int32
  lo = int(index.offsets[domain])
  hi = lo + sizes[domain]
  both = np.concatenate([support, query])
  assert 0 <= domain < NUM_DOMAINS
  assert np.all((both >= lo) & (both < hi))  # Inside the chosen domain.
  assert len(np.unique(both)) == SUPPORT + QUERY  # No repeats; support ∩ query = ∅.
  again = _sample(jax.random.key(seed), index)
  for a, b in zip(episode, again):
    np.testing.assert_array_equal(a, b)


def test_sampling_is_uniform_over_domains_and_items():
  sizes = [7, 12, 9, 10]
  index = _index(sizes)
  episodes = jax.jit(jax.vmap(lambda k: _sample(k, index)))(
    jax.random.split(jax.random.key(0), 4000)
  )
  counts = np.bincount(np.asarray(episodes.domain), minlength=NUM_DOMAINS)
  np.testing.assert_allclose(counts / 4000, 0.25, atol=0.03)
  # Within domain 0 (7 items, 7 drawn per episode) every item appears in every episode; in
  # domain 1 (12 items) each item appears in 7/12 of its episodes, support or query alike.
  mask = np.asarray(episodes.domain) == 1
  chosen = np.concatenate([episodes.support_idx, episodes.query_idx], axis=1)[mask]
  freq = np.bincount(chosen.ravel() - 7, minlength=12) / mask.sum()
  np.testing.assert_allclose(freq, 7 / 12, atol=0.06)
  support_freq = np.bincount(np.asarray(episodes.support_idx)[mask].ravel() - 7, minlength=12)
  np.testing.assert_allclose(support_freq / mask.sum(), 3 / 12, atol=0.06)


def test_different_keys_give_different_episodes():
  index = _index([12, 12, 12, 12])
  a = _sample(jax.random.key(1), index)
  b = _sample(jax.random.key(2), index)
  assert not np.array_equal(
    np.concatenate([a.support_idx, a.query_idx]), np.concatenate([b.support_idx, b.query_idx])
  )


def test_sample_episodes_batches():
  _, _, index = data.concat_domains(_splits([8, 10, 9]))
  episodes = data.sample_episodes(
    jax.random.key(0), index, num_episodes=5, support_size=2, query_size=3
  )
  assert episodes.domain.shape == (5,)
  assert episodes.support_idx.shape == (5, 2) and episodes.query_idx.shape == (5, 3)
  with pytest.raises(ValueError, match="num_episodes must be a positive int"):
    data.sample_episodes(jax.random.key(0), index, num_episodes=0, support_size=2, query_size=3)


def test_episode_size_errors():
  _, _, index = data.concat_domains(_splits([8, 5, 9]))
  with pytest.raises(ValueError, match=r"support_size \+ query_size = 3 \+ 3 exceeds.*5"):
    data.sample_episode(jax.random.key(0), index, support_size=3, query_size=3)
  with pytest.raises(ValueError, match="support_size must be a positive int"):
    data.sample_episode(jax.random.key(0), index, support_size=0, query_size=3)
  with pytest.raises(ValueError, match="query_size must be a positive int"):
    data.check_episode_sizes(index.sizes, 2, 2.0)
  with pytest.raises(ValueError, match="query_size"):
    data.check_episode_sizes(np.array([8, 5]), 1, 5)
  data.check_episode_sizes(np.array([8, 5]), 1, 4)
  traced = jax.jit(lambda k, i: data.sample_episode(k, i, support_size=6, query_size=7))
  with pytest.raises(ValueError, match="exceeds the largest domain's 9 examples"):
    traced(jax.random.key(0), index)
  with pytest.raises(ValueError, match="exceeds the smallest"):
    data.sample_episodes(jax.random.key(0), index, num_episodes=2, support_size=3, query_size=3)


def test_sample_support():
  key = jax.random.key(3)
  idx = np.asarray(data.sample_support(key, 10, 6))
  assert idx.shape == (6,) and idx.dtype == np.int32
  assert len(np.unique(idx)) == 6 and idx.min() >= 0 and idx.max() < 10
  np.testing.assert_array_equal(idx, data.sample_support(key, 10, 6))
  full = np.asarray(data.sample_support(key, 5, 5))
  np.testing.assert_array_equal(np.sort(full), np.arange(5))
  with pytest.raises(ValueError, match="size=11 exceeds n=10"):
    data.sample_support(key, 10, 11)
  with pytest.raises(ValueError, match="n must be a positive int"):
    data.sample_support(key, 0, 1)
