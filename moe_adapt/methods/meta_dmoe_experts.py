"""Meta-DMoE's stage 1: the N experts, stacked on a leading axis and trained together.

Expert k is trained on batches of its super-domain, all experts in one compiled step by a
map over the expert axis (`experts.stack_map`), on the data-parallel mesh or split over the
(data, expert) mesh (`experts.mesh_shape`). Frozen after this stage, the experts give the
aggregator its tokens: `expert_features` (cached over all source images in memory) and
`expert_tokens` (inside the streaming path's steps).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_adapt import core, models
from moe_adapt.methods.meta_dmoe_setup import Setup
from moe_adapt.train import evaluation, stages
from moe_adapt.train import mesh as mesh_lib

PyTree = Any


def _unrolled_map(fn: Callable, xs):
  """`jax.lax.map` as an unrolled scan: one traced body, straight-line code."""
  _, ys = jax.lax.scan(lambda carry, x: (carry, fn(x)), None, xs, unroll=True)
  return ys


def _stack_map(setup: Setup) -> Callable:
  """`fn, xs -> stacked outputs` over the expert axis.

  Measured on XLA:CPU (2 cores, 5 ConvNet experts, batch 64; see
  benchmarks/stacked_experts.py): vmap over convolution kernels becomes a
  grouped convolution (~12x slower than a map, reference/performance_notes.md
  §2), and the *gradient* of a rolled `lax.map` (a while loop) is 14-20x slower
  than the same scan unrolled, so 'auto' picks the unrolled scan on CPU and vmap
  on accelerators, where grouped convolutions are fast.
  """
  return _stack_map_of(setup.config.experts.stack_map)


def _stack_map_of(choice: str) -> Callable:
  """`_stack_map` for an `experts.stack_map` value."""
  if choice == "auto":
    choice = "unrolled" if jax.default_backend() == "cpu" else "vmap"
  if choice == "unrolled":
    return _unrolled_map
  if choice == "map":
    return jax.lax.map
  return lambda fn, xs: jax.vmap(fn)(xs)


def init_experts(
  setup: Setup, tx: optax.GradientTransformation, backbone: PyTree | None = None
) -> PyTree:
  """Stacked expert variables [E, ...] and their optimiser state.

  With `backbone` ({'params', 'batch_stats'} of one model) every expert starts from
  those weights (the paper: one ImageNet network fine-tuned per super-domain);
  without, each from its own random initialisation (the `model.shared_init=False`
  ablation).
  """
  if backbone is None:
    sample = jnp.zeros((1, *setup.benchmark.input_shape), jnp.float32)
    keys = jax.random.split(setup.key("init"), setup.num_experts)
    variables = jax.jit(jax.vmap(lambda k: setup.model.init(k, sample, train=False)))(keys)
  else:
    variables = jax.tree.map(lambda a: jnp.broadcast_to(a, (setup.num_experts, *a.shape)), backbone)
  params, stats = variables["params"], variables.get("batch_stats", {})
  return {"params": params, "batch_stats": stats, "opt_state": tx.init(params)}


def make_expert_update(setup: Setup, tx: optax.GradientTransformation) -> Callable:
  """`update(state, xb [E, B, ...], yb [E, B]) -> (state, metrics)`: one SGD step of all
  experts, expert k on batch k (traced inside a jitted step; the data-parallel mesh).

  Shared by the in-memory step (`make_expert_step`, batches sampled from the pools) and the
  streaming one (`meta_dmoe_stream`, one stream per super-domain).
  """
  loss_one, stack_map = expert_loss(setup), _stack_map(setup)

  def update(state, xb, yb):
    def total(params):
      losses, stats = stack_map(loss_one, (params, state["batch_stats"], xb, yb))
      return losses.sum(), (losses, stats)

    (_, (losses, stats)), grads = jax.value_and_grad(total, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "batch_stats": stats, "opt_state": opt_state}
    return new, {"loss": losses.mean(), "loss_max": losses.max()}

  return update


def expert_loss(setup: Setup) -> Callable:
  """`loss_one((params, stats, xb, yb)) -> (mean CE, new batch_stats)` of one expert."""
  model = setup.model

  def loss_one(args):
    params, stats, xb, yb = args
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
    )
    return core.losses.cross_entropy(logits, yb).mean(), updates["batch_stats"]

  return loss_one


def make_expert_step(setup: Setup, tx: optax.GradientTransformation) -> Callable:
  """One jitted SGD step of all experts, each on a batch from its super-domain."""
  cfg = setup.config.experts

  def sample(step, pools, pool_sizes):
    key = jax.random.fold_in(setup.key("experts"), step)
    u = jax.random.randint(key, (setup.num_experts, cfg.batch_size), 0, pool_sizes[:, None])
    return jnp.take_along_axis(pools, u, axis=1)  # [E, B]

  if setup.expert_mesh is not None:
    take = jax.jit(lambda step, x, y, pools, sizes: _take(x, y, sample(step, pools, sizes)))
    return ExpertMeshStep(
      setup,
      tx,
      lambda step: take(step, setup.x, setup.y, setup.expert_pools, setup.pool_sizes),
    )
  update = make_expert_update(setup, tx)

  def step(state, step, x, y, pools, pool_sizes):
    idx = sample(step, pools, pool_sizes)
    return update(state, setup.constrain(x[idx], leading=1), y[idx])

  return stages.bind(
    jax.jit(step, donate_argnums=0), setup.x, setup.y, setup.expert_pools, setup.pool_sizes
  )


@functools.cache
def _features_fn(model: models.Classifier, stack_map: str) -> Callable:
  """The jitted `(params [E, ...], stats, xb [B, ...]) -> [E, B, D]`, one per model.

  Cached so that the features of every split (sources, their validation, each target)
  reuse one compiled function instead of compiling a new closure per call.
  """
  stack = _stack_map_of(stack_map)

  @jax.jit
  def features(params, stats, xb):
    def one(args):
      p, s = args
      return model.apply(
        {"params": p, "batch_stats": s}, xb, train=False, method=models.Classifier.features
      )

    return stack(one, (params, stats))

  return features


class ExpertMeshStep:
  """The experts step on the (data, expert) mesh (`mesh_lib.make_stacked_step`).

  `batch(step) -> (xb [E, B, ...], yb [E, B])` gives step `step`'s batches (the in-memory
  step samples them with the data-parallel step's keys; the streaming one reads one stream
  per super-domain); they are placed split over (expert, data) and the stacked step runs,
  its state (params, BatchNorm statistics, optimiser state) staying split over `expert`.
  The stacked step is built at the first call, from the state it gets.
  """

  def __init__(self, setup: Setup, tx, batch: Callable):
    self._setup, self._tx, self._batch = setup, tx, batch
    self._loss_one = expert_loss(setup)
    self._step = None

  def __call__(self, state: PyTree, step: jax.Array):
    mesh = self._setup.expert_mesh
    xb, yb = self._batch(step)
    batch = {
      name: jax.device_put(a, mesh_lib.expert_batch_sharding(mesh, a.ndim))
      for name, a in (("x", xb), ("y", yb))
    }
    if self._step is None:
      self._step = mesh_lib.make_stacked_step(
        lambda params, stats, b: self._loss_one((params, stats, b["x"], b["y"])),
        self._tx,
        mesh,
        state,
        batch,
      )
    state, losses = self._step(state, batch)
    return state, {"loss": losses.mean(), "loss_max": losses.max()}


def _take(x: jax.Array, y: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  return x[idx], y[idx]


def place_experts(setup: Setup, experts: PyTree) -> PyTree:
  """The experts stage's state on its mesh: split over `expert` on the (data, expert) mesh
  (experts.mesh_shape), else replicated on the data-parallel mesh."""
  if setup.expert_mesh is None:
    return mesh_lib.replicate(experts, setup.mesh)
  return mesh_lib.shard_stacked(experts, setup.expert_mesh, num_experts=setup.num_experts)


def expert_tokens(setup: Setup, experts: PyTree, xb: jax.Array) -> jax.Array:
  """Every expert's features of a batch as aggregator tokens: [B, E, D] (traceable: the
  streaming path computes them inside its jitted steps)."""
  features = _features_fn(setup.model, setup.config.experts.stack_map)
  return jnp.swapaxes(features(experts["params"], experts["batch_stats"], xb), 0, 1)


def expert_features(setup: Setup, experts: PyTree, x: np.ndarray) -> jax.Array:
  """Features of every expert on `x`: [E, N, D], computed in eval batches."""
  features = _features_fn(setup.model, setup.config.experts.stack_map)
  outs = [
    features(experts["params"], experts["batch_stats"], xb)
    for xb in evaluation.padded_batches(x, setup.config.eval_batch_size)
  ]
  return jnp.concatenate(outs, axis=1)[:, : len(x)]
