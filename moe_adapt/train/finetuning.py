"""Training a part of a model's parameters on labelled arrays: the fine-tuning loop.

`train` runs one stage (resumable, `stages.run_stage`) of AdamW steps on the trainable part
of a params tree (`models.adapted.split_trainable`: adapters + head, the head, or all).
The training arrays live on device and every step draws its batch in-jit from
`fold_in(key, step)`, so a resumed stage is bitwise the uninterrupted one; the same key
gives the same batches, dropout and routing draws, which is how compared variants pair up.

A method passes only its loss: `loss(forward, labels) -> (scalar, metrics)`, where
`forward(i)` is the logits [B, C] of training-mode forward pass i ∈ {0, 1} of the batch,
each pass with its own dropout and routing keys (`cross_entropy` uses pass 0; AdaMix's
consistency loss compares both).

With `epochs` > 0 training goes in passes over the examples (a permutation per epoch),
each its own stage, and `select` (params -> dev score) picks the epoch kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from moe_adapt import core
from moe_adapt.data.examples import Examples
from moe_adapt.models.adapted import join, split_trainable
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import stages

PyTree = Any
# forward(pass index) -> logits [B, C]; loss(forward, labels [B]) -> (loss, metrics).
Loss = Callable[[Callable[[int], jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
# Steps timed after training to report the cost of one step.
TIMED_STEPS = 5


class Trained(NamedTuple):
  """A trained model: its full params and the measured cost of one training step (s).

  `selection` (epoch training with a dev set only): {'epoch': the selected epoch (1-based),
  'dev_accuracy': [one per epoch]}; `params` are that epoch's.
  """

  params: PyTree
  step_time_s: float
  selection: dict[str, Any] | None = None


def cross_entropy(forward: Callable[[int], jax.Array], labels: jax.Array):
  """The plain supervised loss: mean CE of the first forward pass; metrics {'ce'}."""
  ce = jnp.mean(core.losses.cross_entropy(forward(0), labels))
  return ce, {"ce": ce}


def make_optimizer(steps: int, lr: float, *, warmup_fraction: float, weight_decay: float):
  """AdamW with linear warm-up over `warmup_fraction` of the steps, then linear decay to 0."""
  warmup = round(warmup_fraction * steps)
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, lr, max(warmup, 1)),
      optax.linear_schedule(lr, 0.0, max(steps - warmup, 1)),
    ],
    [warmup],
  )
  return optax.adamw(schedule, weight_decay=weight_decay)


def epoch_steps(num_examples: int, batch_size: int) -> int:
  """Steps of one pass over `num_examples` (the last batch wraps round): ceil(N / B)."""
  return -(-num_examples // batch_size)


def epoch_batch(
  key: jax.Array, step: jax.Array, num_examples: int, *, batch_size: int, epoch_steps: int
) -> jax.Array:
  """Indices [batch_size] of step `step` in epoch training: batch `step mod epoch_steps` of
  a permutation of the examples drawn per epoch from `key` (the last batch of an epoch
  wraps round to the permutation's start)."""
  # The permutations' keys: a branch of `key` that the per-step keys (fold_in) never take.
  perm_key = jax.random.fold_in(jax.random.split(key)[0], step // epoch_steps)
  position = (step % epoch_steps) * batch_size + jnp.arange(batch_size)
  return jax.random.permutation(perm_key, num_examples)[position % num_examples]


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh,
  loss: Loss = cross_entropy,
  epoch_steps: int = 0,
) -> Callable:
  """`jitted(state, step, key, frozen, *inputs, labels)`: one optimiser step on a batch.

  `state` = {'params': trainable tree, 'opt_state'}; `frozen` is the rest of the
  parameters. The batch is drawn from `fold_in(key, step)` (with replacement; with
  `epoch_steps` > 0 without: `epoch_batch`). The key is an argument, not a constant, so
  stages differing only in it compile to the same program (a persistent compilation cache
  then serves them all). Returns the new state and the metrics: 'loss' and the loss function's own.
  """

  def step(state, step, key, frozen, *arrays):
    *inputs, labels = arrays
    k = jax.random.fold_in(key, step)
    idx_key, *pass_keys = jax.random.split(k, 5)  # per pass: (dropout, routing)
    n = labels.shape[0]
    if epoch_steps:
      idx = epoch_batch(key, step, n, batch_size=batch_size, epoch_steps=epoch_steps)
    else:
      idx = jax.random.randint(idx_key, (batch_size,), 0, n)
    batch = [mesh_lib.constrain_batch(a[idx], mesh) for a in inputs]

    def loss_fn(trainable):
      params = join(frozen, trainable)

      def forward(i: int) -> jax.Array:
        dropout_key, routing_key = pass_keys[2 * i], pass_keys[2 * i + 1]
        rngs = {"dropout": dropout_key, "routing": routing_key}
        return model.apply({"params": params}, *batch, train=True, rngs=rngs)

      return loss(forward, labels[idx])

    (value, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, {"loss": value, **aux}

  return jax.jit(step, donate_argnums=0)


def _run_epochs(
  config: Any,
  workdir: str,
  stage: str,
  bound: Callable,
  state: PyTree,
  per_epoch: int,
  epochs: int,
  writer: Any,
  select: Callable[[PyTree], float] | None,
  frozen: PyTree,
) -> tuple[PyTree, PyTree, dict[str, Any] | None]:
  """Stages `<stage>/epoch_<e>`; (last state, kept trainable params, selection or None)."""
  dev, best, kept = [], -1.0, None
  for epoch in range(epochs):

    def shifted(state, step, offset=epoch * per_epoch):
      return bound(state, step + offset)

    name = f"{stage}/epoch_{epoch + 1:03d}"
    state = stages.run_stage(
      config, workdir, name, shifted, state, per_epoch, writer=writer, stage_fields={}
    )
    if select is None:
      continue
    dev.append(float(select(join(frozen, state["params"]))))
    if dev[-1] > best:  # a host copy: the next step donates the state's buffers
      best, kept = dev[-1], jax.device_get(state["params"])
  if select is None:
    return state, state["params"], None
  selection = {"epoch": int(np.argmax(dev)) + 1, "dev_accuracy": dev}
  return state, jax.tree.map(jnp.asarray, kept), selection


def _time_step(bound: Callable, state: PyTree) -> float:
  """Seconds per step over `TIMED_STEPS` steps on a copy of `state` (discarded)."""
  probe = jax.tree.map(jnp.copy, state)
  probe, _ = bound(probe, jnp.int32(0))  # compiled already unless the stage was restored
  jax.block_until_ready(probe)
  start = time.perf_counter()
  for i in range(TIMED_STEPS):
    probe, _ = bound(probe, jnp.int32(i))
  jax.block_until_ready(probe)
  return (time.perf_counter() - start) / TIMED_STEPS


def train(
  config: Any,
  workdir: str,
  writer: Any,
  *,
  stage: str,
  model: nn.Module,
  params: PyTree,
  train_mode: str,
  examples: Examples,
  steps: int,
  lr: float,
  batch_size: int,
  mesh: jax.sharding.Mesh,
  key: jax.Array,
  loss: Loss = cross_entropy,
  stage_fields: Mapping[str, Sequence[str]] | None = None,
  time_steps: bool = True,
  epochs: int = 0,
  select: Callable[[PyTree], float] | None = None,
) -> Trained:
  """Trains the `train_mode` part of `params` on `examples` as stage `stage` (resumable).

  `key` fixes the batch order and the dropout and routing draws. With `epochs` > 0,
  `steps` is ignored: `epochs` passes over `examples` (a fresh permutation per epoch, one
  learning-rate schedule over all), each its own stage `<stage>/epoch_<e>`; `select(full
  params) -> dev accuracy` then picks the epoch whose end state is returned (the first
  best, as the paper's best-epoch selection; without `select`, the last). Reads
  `config.train.{warmup_fraction, weight_decay}`.

  Returns the full params and the seconds per step (`TIMED_STEPS` extra steps on a copy of
  the final state; with `time_steps=False` NaN, and a restored stage compiles nothing).
  """
  per_epoch = epoch_steps(len(examples), batch_size) if epochs else 0
  steps = epochs * per_epoch if epochs else steps
  cfg = config.train
  tx = make_optimizer(steps, lr, warmup_fraction=cfg.warmup_fraction, weight_decay=cfg.weight_decay)
  frozen, trainable = split_trainable(params, train_mode)
  # A copy: the step donates its state, and callers share backbone leaves between models.
  trainable = jax.tree.map(jnp.copy, trainable)
  state = mesh_lib.replicate({"params": trainable, "opt_state": tx.init(trainable)}, mesh)
  arrays = jax.device_put((frozen, *examples.inputs, examples.labels), mesh_lib.replicated(mesh))
  step_fn = make_train_step(
    model, tx, batch_size=batch_size, mesh=mesh, loss=loss, epoch_steps=per_epoch
  )
  bound = stages.bind(step_fn, key, *arrays)
  if epochs:
    state, final, selection = _run_epochs(
      config, workdir, stage, bound, state, per_epoch, epochs, writer, select, frozen
    )
  else:
    fields = stage_fields or {}
    state = stages.run_stage(
      config, workdir, stage, bound, state, steps, writer=writer, stage_fields=fields
    )
    final, selection = state["params"], None
  step_time = _time_step(bound, state) if time_steps else float("nan")
  return Trained(join(frozen, final), step_time, selection)
