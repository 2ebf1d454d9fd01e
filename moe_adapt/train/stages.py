"""Running one training stage of a method: resume, stage cache, checkpoints, metrics.

Every method is a sequence of stages (experts, pretraining, meta-training, ...).
`run_stage` gives each the same behaviour: it resumes from the stage's last
checkpoint under `<workdir>/checkpoints/<stage>`, returns at once when the stage
is finished, and shares finished stages between the runs of a sweep through the
stage cache (`config.stage_cache`), keyed by the config fields the stage depends on.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from moe_adapt.train import checkpoint as ckpt_lib
from moe_adapt.train import loop as loop_lib
from moe_adapt.train import stage_cache
from moe_adapt.train.metrics import MetricWriter

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BoundStep:
  """`step(state, step)` calling `jitted(state, step, *arrays)`.

  Data arrays are passed as arguments rather than closed over, so that they are
  not baked into the compiled program as constants; `jitted` and `arrays` stay
  visible for ahead-of-time compilation (benchmarks).
  """

  jitted: Callable
  arrays: tuple

  def __call__(self, state: PyTree, step: jax.Array):
    return self.jitted(state, step, *self.arrays)


def bind(jitted: Callable, *arrays) -> BoundStep:
  """A `BoundStep` of `jitted` with its data `arrays`."""
  return BoundStep(jitted, tuple(arrays))


def stage_key(seed: int, stage: str, index: int = 0) -> jax.Array:
  """The PRNG key of stage `stage` of a run with `seed`, `index` folded in (e.g. a domain).

  `fold_in(fold_in(key(seed), crc32(stage) mod 2³¹), index)`: a stage's key depends only
  on the seed and the stage's name, so adding or reordering stages changes no other key.
  """
  digest = zlib.crc32(stage.encode()) % (2**31)
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), digest), index)


def run_stage(
  config: Any,
  workdir: str,
  stage: str,
  step_fn: Callable,
  state: PyTree,
  num_steps: int,
  *,
  writer: MetricWriter | None,
  stage_fields: Mapping[str, Sequence[str]],
) -> PyTree:
  """Trains (or resumes, or fetches from the stage cache) one stage; returns its state.

  Args:
    config: the run's ConfigDict; reads `stage_cache`, `checkpoint_every`, `log_every`.
    workdir: the run's directory.
    stage: the stage name (its checkpoint folder and metrics label).
    step_fn: `(state, step) -> (state, metrics)`, jitted.
    state: the initial state (also the template for restoring).
    num_steps: total steps of the stage.
    writer: where metrics go.
    stage_fields: config fields per shareable stage; a stage not listed is never shared.
  """
  directory = f"{workdir}/checkpoints/{stage}"
  cache, key = config.stage_cache, None
  if cache and stage in stage_fields:
    key = stage_cache.stage_key(config.to_dict(), stage_fields[stage])
    if stage_cache.fetch(cache, stage, key, directory):
      logging.info("stage %s: reused %s/%s-%s", stage, cache, stage, key)
  with ckpt_lib.Checkpointer(directory) as checkpointer:
    state = loop_lib.train_loop(
      step_fn,
      state,
      num_steps=num_steps,
      checkpointer=checkpointer,
      stage=stage,
      checkpoint_every=config.checkpoint_every,
      log_every=config.log_every,
      writer=writer,
      progress=True,
    )
  if key is not None and jax.process_index() == 0:
    stage_cache.store(cache, stage, key, directory)
  return state


def segment_ends(num_steps: int, num_segments: int) -> list[int]:
  """The last step of each of `num_segments` near-equal segments of `num_steps` steps."""
  return [num_steps * (i + 1) // num_segments for i in range(num_segments)]


def run_in_segments(
  config: Any,
  workdir: str,
  stage: str,
  step_fn: Callable,
  state: PyTree,
  num_steps: int,
  num_segments: int,
  *,
  writer: MetricWriter | None,
  stage_fields: Mapping[str, Sequence[str]],
  keep: Callable[[PyTree], PyTree],
) -> tuple[PyTree, list[tuple[int, PyTree]]]:
  """`run_stage` in segments, keeping a copy of `keep(state)` at the end of each one.

  The candidates of checkpoint selection: segment i of n is the stage `<stage>_<i>of<n>`
  (just `<stage>` when n == 1, so one segment is the plain stage), and `step_fn` sees the
  stage's global step index, so the segments together are the same run as one stage.

  Returns:
    (the final state, [(step reached, kept copy)] in order).
  """
  kept = []
  start = 0
  for i, end in enumerate(segment_ends(num_steps, num_segments)):
    suffix = "" if num_segments == 1 else f"_{i + 1}of{num_segments}"
    # The first segment calls `step_fn` itself: one segment is exactly `run_stage`.
    fn = step_fn if start == 0 else (lambda st, j, start=start: step_fn(st, j + start))
    state = run_stage(
      config,
      workdir,
      stage + suffix,
      fn,
      state,
      end - start,
      writer=writer,
      stage_fields=stage_fields,
    )
    # Copies: the next segment's step may donate `state`.
    kept.append((end, jax.tree.map(jnp.copy, keep(state))))
    start = end
  return state, kept


def choose(scores: Mapping[Any, float]) -> Any:
  """The key of the highest score; ties go to the earliest key (the earlier checkpoint)."""
  order = {key: i for i, key in enumerate(scores)}
  return max(scores, key=lambda key: (scores[key], -order[key]))
