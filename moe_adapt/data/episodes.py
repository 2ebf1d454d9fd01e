"""Episode sampling over concatenated domains, in pure JAX (jit-able, no host transfers).

Several domains' splits are concatenated once on the host (`concat_domains`); an episode is
then a handful of global indices into those arrays, sampled inside a jitted step:

  train, domain_ids, index = concat_domains([data[d].train for d in sources])
  episode = sample_episode(key, index, support_size=32, query_size=32)
  support_x = train_x[episode.support_idx]          # unlabeled support set
  query_x, query_y = train_x[episode.query_idx], train_y[episode.query_idx]

Sizes are static Python ints, so one compilation serves every episode.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.data.registry import Split


class DomainIndex(NamedTuple):
  """Where each domain sits in the concatenated arrays.

  Attributes:
    offsets: [D] int32 position of each domain's first example.
    sizes: [D] int32 number of examples of each domain.
    max_size: the largest size, a static Python int (it fixes the sampler's shapes; as a
      pytree, a DomainIndex carries it as static data, so it can be a jit argument).
  """

  offsets: jax.Array
  sizes: jax.Array
  max_size: int


jax.tree_util.register_pytree_node(
  DomainIndex,
  lambda d: ((d.offsets, d.sizes), d.max_size),
  lambda max_size, children: DomainIndex(*children, max_size),
)


class Episode(NamedTuple):
  """One episode: a domain and disjoint support / query sets drawn from it.

  Attributes:
    domain: [] int32 domain number (position in the list given to `concat_domains`).
    support_idx: [S] int32 global indices of the (unlabeled) support examples.
    query_idx: [Q] int32 global indices of the (labeled) query examples.
  """

  domain: jax.Array
  support_idx: jax.Array
  query_idx: jax.Array


def concat_domains(splits: Sequence[Split]) -> tuple[Split, np.ndarray, DomainIndex]:
  """Concatenates per-domain splits in order.

  Args:
    splits: D non-empty splits whose images share one shape.

  Returns:
    (Split with x [N, H, W, C] and y [N], domain_ids [N] int32, DomainIndex).
  """
  if isinstance(splits, Split) or not len(splits):
    raise ValueError("splits must be a non-empty sequence of Split, one per domain")
  for i, split in enumerate(splits):
    if not isinstance(split, Split):
      raise ValueError(f"splits[{i}] must be a Split; got {type(split).__name__}")
    if len(split.x) == 0 or len(split.x) != len(split.y):
      raise ValueError(
        f"splits[{i}] must be non-empty with as many labels as images; got "
        f"x {np.shape(split.x)}, y {np.shape(split.y)}"
      )
    if split.x.shape[1:] != splits[0].x.shape[1:]:
      raise ValueError(
        f"splits[{i}].x has image shape {split.x.shape[1:]}; splits[0] has {splits[0].x.shape[1:]}"
      )
  sizes = np.array([len(s.x) for s in splits], np.int32)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  x = np.concatenate([s.x for s in splits])
  y = np.concatenate([s.y for s in splits])
  domain_ids = np.repeat(np.arange(len(splits), dtype=np.int32), sizes)
  index = DomainIndex(jnp.asarray(offsets), jnp.asarray(sizes), int(sizes.max()))
  return Split(x, y), domain_ids, index


def _check_positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{name} must be a positive int; got {value!r}")
  return int(value)


def check_episode_sizes(index_sizes, support_size: int, query_size: int) -> None:
  """Host-side check that every domain can supply `support_size + query_size` examples."""
  support_size = _check_positive_int(support_size, "support_size")
  query_size = _check_positive_int(query_size, "query_size")
  sizes = np.asarray(index_sizes)
  if sizes.size == 0:
    raise ValueError("index_sizes is empty: there are no domains to sample episodes from")
  smallest = int(sizes.min())
  if support_size + query_size > smallest:
    raise ValueError(
      f"support_size + query_size = {support_size} + {query_size} exceeds the smallest "
      f"domain's {smallest} examples (domain {int(sizes.argmin())}); lower support_size "
      "or query_size"
    )


def _check_sizes(index: DomainIndex, support_size: int, query_size: int) -> tuple[int, int]:
  """Checks against every domain when `index` is concrete, else against max_size only."""
  if not isinstance(index.sizes, jax.core.Tracer):
    check_episode_sizes(index.sizes, support_size, query_size)
  support_size = _check_positive_int(support_size, "support_size")
  query_size = _check_positive_int(query_size, "query_size")
  if support_size + query_size > index.max_size:
    raise ValueError(
      f"support_size + query_size = {support_size} + {query_size} exceeds the largest "
      f"domain's {index.max_size} examples"
    )
  return support_size, query_size


def _random_subset(key: jax.Array, size: jax.Array | int, upper: int, k: int) -> jax.Array:
  """k distinct indices drawn uniformly from range(size), in random order; size <= upper."""
  scores = jax.random.uniform(key, (upper,))
  # Positions beyond `size` can never win: valid scores lie in [0, 1).
  scores = jnp.where(jnp.arange(upper) < size, scores, -1.0)
  return jax.lax.top_k(scores, k)[1].astype(jnp.int32)


def sample_episode(
  key: jax.Array, index: DomainIndex, *, support_size: int, query_size: int
) -> Episode:
  """Draws a domain uniformly, then disjoint support and query sets from it.

  Both sets are drawn without replacement. Requires support_size + query_size to be at most
  the smallest domain's size: checked here when `index` is concrete, otherwise call
  `check_episode_sizes` once on the host.
  """
  support_size, query_size = _check_sizes(index, support_size, query_size)
  return _sample_episode(key, index, support_size, query_size)


# Jitted so eager calls run as one compiled program; inside a caller's jit it is inlined.
@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample_episode(key, index: DomainIndex, support_size: int, query_size: int) -> Episode:
  key_domain, key_items = jax.random.split(key)
  domain = jax.random.randint(key_domain, (), 0, index.sizes.shape[0], dtype=jnp.int32)
  local = _random_subset(key_items, index.sizes[domain], index.max_size, support_size + query_size)
  global_idx = index.offsets[domain] + local
  return Episode(domain, global_idx[:support_size], global_idx[support_size:])


def sample_episodes(
  key: jax.Array, index: DomainIndex, *, num_episodes: int, support_size: int, query_size: int
) -> Episode:
  """`num_episodes` independent episodes, stacked: domain [E], support [E, S], query [E, Q]."""
  num_episodes = _check_positive_int(num_episodes, "num_episodes")
  support_size, query_size = _check_sizes(index, support_size, query_size)
  return _sample_episodes(key, index, num_episodes, support_size, query_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sample_episodes(key, index, num_episodes, support_size, query_size) -> Episode:
  sample = lambda k: _sample_episode(k, index, support_size, query_size)
  return jax.vmap(sample)(jax.random.split(key, num_episodes))


def sample_support(key: jax.Array, n: int, size: int) -> jax.Array:
  """`size` distinct indices into range(n) (k unlabeled examples of one domain). [size] int32."""
  n = _check_positive_int(n, "n")
  size = _check_positive_int(size, "size")
  if size > n:
    raise ValueError(f"size={size} exceeds n={n}: cannot draw without replacement")
  return _sample_support(key, n, size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _sample_support(key, n: int, size: int) -> jax.Array:
  return _random_subset(key, n, n, size)
