"""Running one training stage of a method: resume, stage cache, checkpoints, metrics.

Every method is a sequence of stages (experts, pretraining, meta-training, ...).
`run_stage` gives each the same behaviour: it resumes from the stage's last
checkpoint under `<workdir>/checkpoints/<stage>`, returns at once when the stage
is finished, and shares finished stages between the runs of a sweep through the
stage cache (`config.stage_cache`), keyed by the config fields the stage depends on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
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
