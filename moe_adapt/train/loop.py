"""A resumable training loop with checkpoints, metric logging and divergence checks.

Step numbering: `step_fn(state, step)` is called with step = 0, 1, ...,
num_steps - 1. The checkpoint "of step k" holds the state after k completed
steps, i.e. the input of call k; a resumed loop continues with call k. Metrics
are logged under the index of the call that produced them.

Determinism: the loop passes the step index to `step_fn` as an int32 jnp
scalar (a traced value, so the jitted step never retraces), and `step_fn`
should derive all its randomness from that index and from what is in `state`
(e.g. `jax.random.fold_in(key, step)`, with the key stored in the state) and
sample its batches or episodes the same way. Then a run killed and resumed
gives bitwise the same result as one run straight through, because `state`
(parameters, optimizer state, PRNG keys, ...) is all the loop carries.

Resumption: on entry `train_loop` restores the newest intact checkpoint (with
`state` as the template: structure, dtypes, shardings). If the stage is already
finished its state is returned and `step_fn` is never called; otherwise the loop
continues from the restored step (or 0). A checkpoint is saved every
`checkpoint_every` completed steps and, marked finished, after the last one.

Divergence: the loss is watched on device (`metrics['loss']`, any shape) without
a host sync per step; the flag is read at log and checkpoint boundaries and at
the end. A non-finite loss raises `TrainingDivergedError` naming the first bad
step; the diverged state is never saved.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import tqdm

from moe_adapt.train.checkpoint import Checkpointer
from moe_adapt.train.metrics import MetricWriter

PyTree = Any
StepFn = Callable[[PyTree, jax.Array], tuple[PyTree, Mapping[str, jax.Array]]]


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""

  def __init__(self, stage: str, step: int, last_good_step: int | None, directory: Any):
    self.stage, self.step, self.last_good_step, self.directory = (
      stage,
      step,
      last_good_step,
      directory,
    )
    if last_good_step is None:
      kept = f"no checkpoint had been saved yet in {directory}"
    else:
      kept = f"the last good checkpoint (step {last_good_step}) is kept in {directory}"
    super().__init__(f"stage '{stage}': non-finite loss at step {step}; {kept}")


@jax.jit
def _first_bad_step(first_bad: jax.Array, loss: jax.Array, step: jax.Array) -> jax.Array:
  """`step` if `loss` has a non-finite entry and no earlier step had one, else `first_bad`.

  Runs on device as part of the asynchronous dispatch stream, so watching the
  loss costs no host synchronisation per step.
  """
  bad = jnp.logical_not(jnp.all(jnp.isfinite(loss)))
  return jnp.where((first_bad < 0) & bad, step, first_bad)


def _check_positive_int(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= {minimum}")


def _postfix(metrics: Mapping[str, Any]) -> dict[str, str]:
  out = {}
  for k, v in metrics.items():
    try:
      out[k] = f"{float(v):.4g}"
    except (TypeError, ValueError):
      continue
  return out


def _progress_bar(stage: str, total: int, done: int, *, disable: bool) -> tqdm.tqdm:
  """A bar starting at `done` steps: its rate and ETA cover only the steps shown after it."""
  return tqdm.tqdm(
    total=total,
    initial=done,
    desc=stage,
    unit="step",
    disable=disable,
    dynamic_ncols=True,
  )


@jax.jit
def _state_is_finite(state: PyTree) -> jax.Array:
  """True when every floating leaf of `state` is finite."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(state)
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _check_args(stage: Any, num_steps: Any, checkpoint_every: Any, log_every: Any) -> None:
  _check_positive_int("num_steps", num_steps, 0)
  _check_positive_int("checkpoint_every", checkpoint_every, 1)
  _check_positive_int("log_every", log_every, 1)
  if not isinstance(stage, str) or not stage:
    raise ValueError(f"stage={stage!r} is invalid; accepted: a non-empty string")


def _restore(
  checkpointer: Checkpointer, state: PyTree, *, stage: str, num_steps: int, progress: bool
) -> tuple[int | None, PyTree, bool]:
  """(restored step or None, state, whether the stage had finished) from the newest checkpoint."""
  restored = checkpointer.restore(state)
  if restored is None:
    return None, state, False
  start, state, meta = restored
  if meta.get("finished"):
    if start != num_steps:
      raise ValueError(
        f"stage '{stage}' finished at step {start} in {checkpointer.directory}, but "
        f"num_steps={num_steps}; accepted: num_steps={start} (or another --workdir)"
      )
    if progress and jax.process_index() == 0:
      tqdm.tqdm.write(
        f"stage '{stage}': finished earlier; restored from {checkpointer.directory}",
        file=sys.stderr,
      )
    return start, state, True
  if start > num_steps:
    raise ValueError(
      f"stage '{stage}' has a checkpoint at step {start} in {checkpointer.directory}, beyond "
      f"num_steps={num_steps}; accepted: num_steps >= {start} (or another --workdir)"
    )
  return start, state, False


def _check_metrics(stage: str, metrics: Any) -> None:
  if not isinstance(metrics, Mapping) or "loss" not in metrics:
    got = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
    raise ValueError(
      f"step_fn of stage '{stage}' must return (state, metrics) with a 'loss' metric; got {got}"
    )


class _Guard:
  """Watches the loss on device, saves only finite states and flushes metric lines in order."""

  def __init__(
    self,
    stage: str,
    checkpointer: Checkpointer,
    writer: MetricWriter | None,
    last_saved: int | None,
  ):
    self.stage, self.checkpointer, self.writer = stage, checkpointer, writer
    self.last_saved = last_saved
    self.first_bad = jnp.asarray(-1, jnp.int32)

  def observe(self, loss: jax.Array, step: jax.Array) -> None:
    self.first_bad = _first_bad_step(self.first_bad, loss, step)

  def flush(self) -> None:
    # A remote writer buffers lines. Flushed before each save, so that the lines a
    # checkpoint covers are visible (a resumed run does not log them again), and
    # before a divergence error, so that the lines leading up to it are kept.
    if self.writer is not None:
      self.writer.flush()

  def check(self, state: PyTree = None, step: int | None = None) -> None:
    bad = int(self.first_bad)  # A host sync: done at boundaries only.
    if bad >= 0:
      self.flush()
      raise TrainingDivergedError(self.stage, bad, self.last_saved, self.checkpointer.directory)
    # Before a save: a finite loss does not prove finite parameters (an update
    # can overflow), and a non-finite state must never become a checkpoint.
    if state is not None and not bool(_state_is_finite(state)):
      self.flush()
      raise TrainingDivergedError(self.stage, step, self.last_saved, self.checkpointer.directory)

  def save(self, done: int, state: PyTree, *, finished: bool = False) -> None:
    """Checks `state` (after `done` steps), flushes the metric lines, then saves it."""
    self.check(state, done - 1)
    self.flush()
    self.checkpointer.save(done, state, finished=finished)
    self.last_saved = done


def _log(
  writer: MetricWriter | None, bar: tqdm.tqdm, stage: str, step: int, metrics: Mapping
) -> None:
  if writer is not None or not bar.disable:
    host_metrics = jax.device_get(dict(metrics))
    if writer is not None:
      writer.write(stage, step, host_metrics)
    bar.set_postfix(_postfix(host_metrics), refresh=False)


def _run_steps(
  step_fn: StepFn,
  state: PyTree,
  guard: _Guard,
  *,
  start: int,
  num_steps: int,
  checkpoint_every: int,
  log_every: int,
  show: bool,
) -> PyTree:
  """Calls `step_fn` for steps `start`..`num_steps - 1`, logging and saving at boundaries."""
  stage, writer = guard.stage, guard.writer
  if show:
    where = f"resuming at step {start}" if start else "starting"
    tqdm.tqdm.write(
      f"stage '{stage}': {num_steps} steps, {where} (the first step compiles)", file=sys.stderr
    )
  # Created once the first step has run: its rate and ETA then count only compiled steps.
  bar = None
  try:
    for step in range(start, num_steps):
      step_arr = jnp.asarray(step, jnp.int32)
      state, metrics = step_fn(state, step_arr)
      _check_metrics(stage, metrics)
      guard.observe(metrics["loss"], step_arr)
      done = step + 1
      if bar is None:
        if show:
          jax.block_until_ready(metrics["loss"])  # Compilation and the first step are over.
        bar = _progress_bar(stage, num_steps, done, disable=not show)
      else:
        bar.update(1)
      if done % log_every == 0 or done == num_steps:
        _log(writer, bar, stage, step, metrics)
        guard.check()
      if done % checkpoint_every == 0 and done < num_steps:
        guard.save(done, state)
    guard.save(num_steps, state, finished=True)
  finally:
    if bar is not None:
      bar.close()
  return state


def train_loop(
  step_fn: StepFn,
  state: PyTree,
  *,
  num_steps: int,
  checkpointer: Checkpointer,
  stage: str,
  checkpoint_every: int,
  log_every: int,
  writer: MetricWriter | None = None,
  progress: bool = True,
) -> PyTree:
  """Runs `step_fn` for `num_steps` steps, resuming from and saving to `checkpointer`.

  Resumption and divergence checks are as the module docstring says.

  Args:
    step_fn: `(state, step) -> (state, metrics)`, normally jitted (it may donate
      `state`). `step` is an int32 jnp scalar; see the module docstring for how
      to make the run deterministic. `metrics` maps names to scalars and must
      include 'loss'.
    state: the initial state (all the loop carries: params, optimizer state,
      PRNG keys, ...).
    num_steps: total number of steps of the stage (>= 0).
    checkpointer: the stage's `Checkpointer`.
    stage: stage name, for the progress bar, metric lines and errors.
    checkpoint_every: save every this many steps (>= 1).
    log_every: fetch the metrics and write them every this many steps (>= 1),
      and after the last step.
    writer: where metric lines go (None: not written); flushed before every save and
      before a `TrainingDivergedError`.
    progress: on process 0, print a line as the stage starts and show a tqdm bar from the
      end of the first step on (so that its rate and ETA exclude compilation).

  Returns:
    The final state.

  Raises:
    ValueError: invalid arguments, a finished checkpoint whose step differs from
      `num_steps`, or metrics without 'loss'.
    TrainingDivergedError: the loss became NaN or infinite.
  """
  _check_args(stage, num_steps, checkpoint_every, log_every)
  restored, state, finished = _restore(
    checkpointer, state, stage=stage, num_steps=num_steps, progress=progress
  )
  if finished:
    return state
  guard = _Guard(stage, checkpointer, writer, last_saved=restored)
  show = progress and jax.process_index() == 0
  return _run_steps(
    step_fn,
    state,
    guard,
    start=restored or 0,
    num_steps=num_steps,
    checkpoint_every=checkpoint_every,
    log_every=log_every,
    show=show,
  )
