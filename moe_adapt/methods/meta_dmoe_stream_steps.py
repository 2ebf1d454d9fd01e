"""The streaming path's training steps: streamed batches into Meta-DMoE's updates.

Each step reads its batch on the host (`StreamedStep.read`: read, decode, augment, place on
the mesh) and runs the in-memory path's update on it (`StreamedStep.compute`, jitted); the
frozen experts' tokens are computed inside the steps (nothing is cached).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_adapt.data import streaming
from moe_adapt.methods import meta_dmoe
from moe_adapt.methods import meta_dmoe_experts as experts_lib
from moe_adapt.methods import meta_dmoe_steps as steps_lib
from moe_adapt.methods.meta_dmoe_stages import StepBuilders
from moe_adapt.methods.meta_dmoe_stream_setup import StreamSetup, replicated_batch, to_device

PyTree = Any

# Seeds of the streams: (config.seed, tag[, index]) -> one stream's shuffle and augmentation.
STREAM_TAGS = {"experts": 1, "aggregator": 2, "student": 3, "meta": 4, "backbone": 6}


@dataclasses.dataclass(frozen=True)
class StreamedStep:
  """`step(state, step) = compute(state, step, *read(step))`.

  `read` is the host's part (read, decode, augment, place on the mesh; the stream reads
  ahead on its threads), `compute` the jitted step; apart, so that a benchmark can time
  each (`benchmarks/stream.py --meta_step`).
  """

  read: Callable[[Any], tuple]
  compute: Callable

  def __call__(self, state: PyTree, step: jax.Array):
    return self.compute(state, step, *self.read(step))


def make_expert_step(setup: StreamSetup, tx: optax.GradientTransformation) -> Callable:
  """All experts, expert k on the next batch of super-domain k's stream."""
  cfg = setup.config.experts
  streams = [
    setup.stream(setup.pooled(group), cfg.batch_size, STREAM_TAGS["experts"], k)
    for k, group in enumerate(setup.super_domains)
  ]

  def batch(step) -> tuple[np.ndarray, np.ndarray]:
    batches = [s(step) for s in streams]
    return np.stack([b["image"] for b in batches]), np.stack([b["label"] for b in batches])

  if setup.expert_mesh is not None:
    return experts_lib.ExpertMeshStep(setup, tx, batch)
  update = experts_lib.make_expert_update(setup, tx)

  def compute(state, step, xb, yb):
    del step
    return update(state, setup.constrain(xb, leading=1), yb)

  def read(step):
    xb, yb = batch(step)
    return to_device(setup, xb, leading=1), to_device(setup, yb, leading=1)

  return StreamedStep(read, jax.jit(compute, donate_argnums=0))


def make_student_step(setup: StreamSetup, tx, *, stage: str = "student") -> Callable:
  """ERM on the pooled source stream (`stage` 'student' or 'backbone')."""
  stream = setup.stream(
    setup.pooled(setup.sources), setup.config[stage].batch_size, STREAM_TAGS[stage]
  )
  update = steps_lib.make_student_update(setup, tx)

  def compute(state, step, xb, yb):
    del step
    return update(state, setup.constrain(xb), yb)

  return StreamedStep(_reader(setup, stream), jax.jit(compute, donate_argnums=0))


def make_aggregator_step(setup: StreamSetup, tx, experts: PyTree) -> Callable:
  """CE through the aggregator's pretraining head on the pooled stream, the frozen
  experts' tokens computed in the step."""
  stream = setup.stream(
    setup.pooled(setup.sources), setup.config.aggregator.batch_size, STREAM_TAGS["aggregator"]
  )
  update = steps_lib.make_aggregator_update(setup, tx)

  def compute(state, step, xb, yb, experts):
    # The in-memory step's key split: its first half drew the batch indices.
    _, k_drop = jax.random.split(jax.random.fold_in(setup.key("aggregator"), step))
    tokens = setup.constrain(experts_lib.expert_tokens(setup, experts, setup.constrain(xb)))
    return update(state, tokens, yb, k_drop)

  read = _reader(setup, stream)
  return StreamedStep(lambda step: (*read(step), experts), jax.jit(compute, donate_argnums=0))


def _reader(setup: StreamSetup, stream: streaming.StepBatches) -> Callable:
  """`step -> (images, labels)` of `stream`'s batch `step`, on the mesh."""

  def read(step):
    b = stream(step)
    return to_device(setup, b["image"]), to_device(setup, b["label"])

  return read


@dataclasses.dataclass(frozen=True)
class EpisodePlan:
  """Which source domain each meta step draws, and where in that domain's stream.

  The domain of step t is draw t of a generator seeded by (seed, 'meta'), uniform over the
  source domains (as `data.sample_episode`); `position[t]` counts the earlier steps of the
  same domain, so each domain's stream is read in order (one prefetching iterator) and a
  resumed stage reads from the checkpointed step alone.
  """

  domain: np.ndarray  # [T] int32 index into setup.sources
  position: np.ndarray  # [T] int64 batch of that domain's stream

  @classmethod
  def make(cls, seed: int, num_domains: int, num_steps: int) -> EpisodePlan:
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_TAGS["meta"]]))
    domain = rng.integers(0, num_domains, size=num_steps).astype(np.int32)
    position = np.zeros(num_steps, np.int64)
    counts = np.zeros(num_domains, np.int64)
    for t, d in enumerate(domain):
      position[t] = counts[d]
      counts[d] += 1
    return cls(domain, position)


class EpisodeStreams:
  """Step t's episode: the next S + Q examples of the planned domain's stream."""

  def __init__(self, setup: StreamSetup):
    cfg = setup.config.meta
    self._plan = EpisodePlan.make(setup.config.seed, len(setup.sources), cfg.steps)
    size = cfg.support_size + cfg.query_size
    # Every host reads the whole episode (it is small, and split into support and query).
    self._streams = [
      setup.stream(setup.domain_sources[d].train, size, STREAM_TAGS["meta"], i, every_host=True)
      for i, d in enumerate(setup.sources)
    ]

  def __call__(self, step) -> tuple[int, dict[str, np.ndarray]]:
    step = int(step)
    domain = int(self._plan.domain[step])
    return domain, self._streams[domain](int(self._plan.position[step]))


def _split_episode(setup: StreamSetup, x: jax.Array, y: jax.Array):
  """(support x [S, ...], query x [Q, ...], query y [Q]) of an episode batch [S + Q, ...]."""
  s = setup.config.meta.support_size
  return x[:s], x[s:], y[s:]


def make_meta_step(setup: StreamSetup, tx_student, tx_agg, experts: PyTree) -> Callable:
  """One second-order meta-step on a streamed single-domain episode."""
  feature_dim = experts["params"]["head"]["kernel"].shape[-2]
  update = meta_dmoe.make_meta_update(setup, tx_student, tx_agg, feature_dim)
  episodes = EpisodeStreams(setup)

  def compute(state, step, x, y, domain, experts, expert_of_domain):
    del step
    xs, xq, yq = _split_episode(setup, x, y)
    xs = setup.constrain(xs)
    support = {
      "x": xs,
      "tokens": setup.constrain(experts_lib.expert_tokens(setup, experts, xs)),
      "mask": steps_lib.expert_mask(setup, expert_of_domain, domain),
    }
    return update(state, support, {"x": setup.constrain(xq), "y": yq})

  def read(step):
    domain, b = episodes(step)
    x, y = replicated_batch(setup, b["image"]), replicated_batch(setup, b["label"])
    return x, y, jnp.int32(domain), experts, setup.expert_of_domain

  return StreamedStep(read, jax.jit(compute, donate_argnums=0))


def make_continued_step(setup: StreamSetup, tx) -> Callable:
  """The `erm_continued` control on the query halves of the meta stage's episodes."""
  update = steps_lib.make_continued_update(setup, tx)
  episodes = EpisodeStreams(setup)

  def compute(state, step, x, y):
    del step
    _, xq, yq = _split_episode(setup, x, y)
    return update(state, setup.constrain(xq), yq)

  def read(step):
    _, b = episodes(step)
    return replicated_batch(setup, b["image"]), replicated_batch(setup, b["label"])

  return StreamedStep(read, jax.jit(compute, donate_argnums=0))


def stream_steps(setup: StreamSetup, experts: PyTree) -> StepBuilders:
  """The streaming steps of the stages after the experts' (frozen `experts`)."""
  return StepBuilders(
    backbone=lambda tx: make_student_step(setup, tx, stage="backbone"),
    aggregator=lambda tx: make_aggregator_step(setup, tx, experts),
    student=lambda tx: make_student_step(setup, tx),
    meta=lambda tx_s, tx_a: make_meta_step(setup, tx_s, tx_a, experts),
    continued=lambda tx: make_continued_step(setup, tx),
  )
