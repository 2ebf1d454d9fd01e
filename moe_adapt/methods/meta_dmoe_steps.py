"""Meta-DMoE's in-memory steps of stages 0, 2, 3 and of the meta stage's episodes.

Each stage's step is split into an update (`make_*_update`: the maths on a batch, shared
with the streaming path) and a step (`make_*_step`: the in-memory batch, indexed from the
device arrays of `Setup` with keys folded from the stage's key and the step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from moe_adapt import core, data, models
from moe_adapt.methods.meta_dmoe_setup import Setup
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import stages

PyTree = Any


@functools.cache
def _init_fn(model: models.Classifier) -> Callable:
  """`model.init` jitted once per model: run eagerly, every initialiser and layer of a deep
  network compiles on its own (minutes for a ResNet on CPU)."""
  return jax.jit(functools.partial(model.init, train=False))


def init_model(setup: Setup, key: jax.Array) -> PyTree:
  """{'params', 'batch_stats'} of one randomly initialised student-architecture model."""
  sample = jnp.zeros((1, *setup.benchmark.input_shape), jnp.float32)
  variables = _init_fn(setup.model)(key, sample)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def init_student(setup: Setup, tx: optax.GradientTransformation, backbone: PyTree) -> PyTree:
  """The ERM student's initial state: a copy of `backbone` ({'params', 'batch_stats'}).

  A copy, on the mesh: the student's step donates its state, and the backbone also
  starts the experts.
  """
  state = {**backbone, "opt_state": tx.init(backbone["params"])}
  return jax.tree.map(jnp.copy, mesh_lib.replicate(state, setup.mesh))


def make_aggregator_update(setup: Setup, tx) -> Callable:
  """`update(state, tokens [B, E, D], y [B], key) -> (state, metrics)`: one CE step through
  the aggregator's pretraining head (dropout drawn from `key`)."""

  def update(state, tokens, y, key):
    def loss_fn(params):
      logits = setup.agg_model.apply(
        {"params": params}, tokens, deterministic=False, rngs={"dropout": key}
      )
      return core.losses.cross_entropy(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, {"loss": loss}

  return update


def make_aggregator_step(setup: Setup, tx, feats: jax.Array) -> Callable:
  """CE through the aggregator's pretraining head, all experts, all source data."""
  cfg = setup.config.aggregator
  update = make_aggregator_update(setup, tx)

  def step(state, step, y, feats):
    key = jax.random.fold_in(setup.key("aggregator"), step)
    k_idx, k_drop = jax.random.split(key)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, y.shape[0])
    tokens = setup.constrain(jnp.swapaxes(feats[:, idx], 0, 1))  # [B, E, D]
    return update(state, tokens, y[idx], k_drop)

  return stages.bind(jax.jit(step, donate_argnums=0), setup.y, feats)


def make_student_update(setup: Setup, tx) -> Callable:
  """`update(state, xb [B, ...], yb [B]) -> (state, metrics)`: one ERM step (BatchNorm in
  training mode)."""

  def update(state, xb, yb):
    def loss_fn(params):
      logits, updates = setup.model.apply(
        {"params": params, "batch_stats": state["batch_stats"]},
        xb,
        train=True,
        mutable=["batch_stats"],
      )
      return core.losses.cross_entropy(logits, yb).mean(), updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": stats, "opt_state": opt_state}, {"loss": loss}

  return update


def make_student_step(setup: Setup, tx, *, stage: str = "student") -> Callable:
  """ERM on all source data (BatchNorm in training mode).

  `stage` ('student' or 'backbone') picks the config group (batch size) and the key.
  """
  cfg = setup.config[stage]
  update = make_student_update(setup, tx)

  def step(state, step, x, y):
    key = jax.random.fold_in(setup.key(stage), step)
    idx = jax.random.randint(key, (cfg.batch_size,), 0, y.shape[0])
    return update(state, setup.constrain(x[idx]), y[idx])

  return stages.bind(jax.jit(step, donate_argnums=0), setup.x, setup.y)


def make_episode_step(setup: Setup, update: Callable, feats: jax.Array) -> Callable:
  """The meta stage's step: `update(state, support, query)` (`meta_dmoe.make_meta_update`)
  on one single-domain episode drawn from fold_in(key('meta'), step), the support's tokens
  [S, E, D] from the feature cache `feats` [E, N_src, D], its domain's expert masked
  (`expert_mask`)."""
  cfg = setup.config.meta

  def step(state, step, x, y, feats, offsets, sizes, expert_of_domain):
    key = jax.random.fold_in(setup.key("meta"), step)
    index = setup.index._replace(offsets=offsets, sizes=sizes)
    ep = data.sample_episode(key, index, support_size=cfg.support_size, query_size=cfg.query_size)
    support = {
      "x": setup.constrain(x[ep.support_idx]),
      "tokens": setup.constrain(jnp.swapaxes(feats[:, ep.support_idx], 0, 1)),
      "mask": expert_mask(setup, expert_of_domain, ep.domain),
    }
    query = {"x": setup.constrain(x[ep.query_idx]), "y": y[ep.query_idx]}
    return update(state, support, query)

  return stages.bind(
    jax.jit(step, donate_argnums=0),
    setup.x,
    setup.y,
    feats,
    setup.index.offsets,
    setup.index.sizes,
    setup.expert_of_domain,
  )


def expert_mask(setup: Setup, expert_of_domain: jax.Array, domain: jax.Array) -> jax.Array:
  """[E] bool: the experts an episode of source domain `domain` (an index into
  `setup.sources`; `expert_of_domain` [D_src] as `setup.expert_of_domain`) distils from:
  all but its own super-domain's expert (`meta.mask_in_domain_expert`), else all."""
  experts = jnp.arange(setup.num_experts)
  if setup.config.meta.mask_in_domain_expert:
    return experts != expert_of_domain[domain]
  return jnp.ones_like(experts, dtype=bool)


def make_continued_update(setup: Setup, tx) -> Callable:
  """`update(state, xq [Q, ...], yq [Q]) -> (state, metrics)`: CE on a query batch,
  BatchNorm frozen (the `erm_continued` control's step)."""

  def update(state, xq, yq):
    def loss_fn(params):
      variables = {"params": params, "batch_stats": state["batch_stats"]}
      logits = setup.model.apply(variables, xq, train=False)
      return core.losses.cross_entropy(logits, yq).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {
      "params": optax.apply_updates(state["params"], updates),
      "batch_stats": state["batch_stats"],
      "opt_state": opt_state,
    }
    return new, {"loss": loss}

  return update


def make_continued_step(setup: Setup, tx) -> Callable:
  """The `erm_continued` control: the meta stage without its inner step.

  From the ERM student, CE on the same query batches as `make_meta_step` (the same
  episode keys), at the meta stage's student learning rate and schedule (`tx`), BatchNorm
  frozen as there: what meta-training adds beyond more supervised steps at a small lr.
  """
  return make_query_step(setup, make_continued_update(setup, tx))


def make_query_step(setup: Setup, update: Callable) -> Callable:
  """`update(state, xq [Q, ...], yq [Q])` on the query half of the episode that
  `make_episode_step` draws at the same step."""
  cfg = setup.config.meta

  def step(state, step, x, y, offsets, sizes):
    key = jax.random.fold_in(setup.key("meta"), step)
    index = setup.index._replace(offsets=offsets, sizes=sizes)
    ep = data.sample_episode(key, index, support_size=cfg.support_size, query_size=cfg.query_size)
    return update(state, setup.constrain(x[ep.query_idx]), y[ep.query_idx])

  return stages.bind(
    jax.jit(step, donate_argnums=0), setup.x, setup.y, setup.index.offsets, setup.index.sizes
  )
