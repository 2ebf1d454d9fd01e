"""Stacked experts on a 2-D `(data, expert)` mesh (leaves with a leading expert axis E).

The experts and their optimiser state are split over `expert`, each expert's batch over
`data` (`shard_stacked`, `expert_batch_sharding`, `make_stacked_step`); the mesh uses
`Auto` axis types, as `mesh.make_mesh` explains. The jitted code keeps its global meaning
(e.g. BatchNorm statistics over the whole per-expert batch), so results equal those of one
device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

DATA, EXPERT = "data", "expert"


def make_expert_mesh(
  shape: Sequence[int], *, num_experts: int | None = None, field: str = "mesh.shape"
) -> jax.sharding.Mesh:
  """A 2-D `(data, expert)` mesh over the first `data * expert` devices.

  Args:
    shape: `(data, expert)` sizes, each >= 1; their product must divide the device
      count (the first `data * expert` devices are used).
    num_experts: when given, `expert` must divide it (every device holds the same
      number of whole experts).
    field: the config field `shape` came from, named in error messages.

  Raises:
    ValueError: naming `field`, when `shape` is not two positive ints, its product
      does not divide the device count, or `expert` does not divide `num_experts`.
  """
  if (
    not isinstance(shape, Sequence)
    or isinstance(shape, str)
    or len(shape) != 2
    or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)
  ):
    raise ValueError(
      f"{field}={shape!r} is invalid; accepted: (data, expert), two ints >= 1, e.g. (2, 4)"
    )
  data, expert = shape
  devices = jax.devices()
  size = data * expert
  if len(devices) % size:
    divisors = [d for d in range(1, len(devices) + 1) if len(devices) % d == 0]
    raise ValueError(
      f"{field}={tuple(shape)}: data * expert = {size} does not divide the {len(devices)} "
      f"{jax.default_backend()} devices; accepted: products in {divisors}"
    )
  if num_experts is not None and num_experts % expert:
    raise ValueError(
      f"{field}={tuple(shape)}: expert = {expert} does not divide the {num_experts} experts; "
      f"accepted: expert in {[d for d in range(1, num_experts + 1) if num_experts % d == 0]}"
    )
  return jax.make_mesh(
    (data, expert),
    (DATA, EXPERT),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
    devices=devices[:size],
  )


def _num_experts(tree: PyTree) -> int:
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(tree) if jnp.ndim(leaf) >= 1}
  if len(sizes) != 1:
    raise ValueError(
      f"a stacked pytree needs one leading expert axis shared by its leaves; got sizes {sizes}"
    )
  return sizes.pop()


def _check_expert_count(num_experts: int, mesh: jax.sharding.Mesh) -> None:
  if num_experts % mesh.shape[EXPERT]:
    raise ValueError(
      f"num_experts={num_experts} is not divisible by the mesh's expert axis "
      f"({mesh.shape[EXPERT]} devices)"
    )


def _check_stacked_batch(batch: PyTree, mesh: jax.sharding.Mesh, num_experts: int) -> None:
  """Every leaf is [E, B, ...] with B divisible over the mesh's data axis, or ValueError."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    if jnp.ndim(leaf) < 2 or jnp.shape(leaf)[0] != num_experts:
      raise ValueError(
        f"batch leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; "
        f"accepted: [E={num_experts}, B, ...]"
      )
    if jnp.shape(leaf)[1] % mesh.shape[DATA]:
      raise ValueError(
        f"per-expert batch size {jnp.shape(leaf)[1]} of {jax.tree_util.keystr(path)} is not "
        f"divisible by the mesh's data axis ({mesh.shape[DATA]} devices)"
      )


def stacked_shardings(tree: PyTree, mesh: jax.sharding.Mesh, *, num_experts: int) -> PyTree:
  """Shardings of a stacked pytree (e.g. experts' params and optimiser state).

  Leaves whose leading axis has `num_experts` entries are split over `expert`
  (`P('expert')`); other leaves (scalars such as an optimiser's step count) are
  replicated.
  """
  expert, rep = NamedSharding(mesh, P(EXPERT)), NamedSharding(mesh, P())

  def one(leaf):
    stacked = jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == num_experts
    return expert if stacked else rep

  return jax.tree.map(one, tree)


def shard_stacked(tree: PyTree, mesh: jax.sharding.Mesh, *, num_experts: int) -> PyTree:
  """Places a stacked pytree with its experts split over the mesh's `expert` axis.

  Raises:
    ValueError: `num_experts` is not a multiple of the `expert` axis size.
  """
  _check_expert_count(num_experts, mesh)
  shardings = stacked_shardings(tree, mesh, num_experts=num_experts)
  return jax.tree.map(jax.device_put, tree, shardings)


def expert_batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Per-expert batches `[E, B, ...]` of rank `ndim`: E over `expert`, B over `data`."""
  return NamedSharding(mesh, P(EXPERT, DATA, *([None] * (ndim - 2))))


def vmap_stack(fn: Callable, xs: PyTree) -> PyTree:
  """`fn` mapped over the leading (expert) axis of `xs` with `jax.vmap`.

  vmap keeps the expert axis a batch axis of every op, which the SPMD partitioner
  splits over `expert` without gathering experts; a scan over the axis would slice
  it one expert at a time.
  """
  return jax.vmap(fn)(xs)


def make_stacked_step(
  loss_one: Callable[[PyTree, PyTree, PyTree], tuple[jax.Array, PyTree]],
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  state: PyTree,
  batch: PyTree,
  *,
  stack_map: Callable[[Callable, PyTree], PyTree] = vmap_stack,
) -> Callable[[PyTree, PyTree], tuple[PyTree, jax.Array]]:
  """A jitted training step of E stacked experts, each on its own batch.

  The state is `{'params', 'batch_stats', 'opt_state'}` with leaves stacked on a
  leading expert axis (as `methods.meta_dmoe.init_experts` makes it); the step sums
  the experts' losses, differentiates w.r.t. all stacked params at once and applies
  `tx`. Inputs and outputs are pinned to their shardings: params, BatchNorm
  statistics and optimiser state split over `expert`, batches `[E, B, ...]` over
  `(expert, data)`, the losses `[E]` over `expert`. On a `(1, 1)` mesh this is the
  plain one-device step.

  Args:
    loss_one: `(params, batch_stats, batch) -> (scalar loss, new batch_stats)` of ONE
      expert; `batch` leaves are `[B, ...]`.
    tx: the optimiser (its update must treat the experts independently for the
      experts to train independently, e.g. no global-norm clipping).
    mesh: from `make_expert_mesh`.
    state, batch: example values (shapes and structure) of the state and one batch.
    stack_map: how `loss_one` is mapped over the expert axis (default `vmap_stack`).

  Returns:
    `step(state, batch) -> (new state, losses [E])`; the state argument is donated.
    With one process, host NumPy batches are placed by the step itself; with several,
    pass global arrays (`jax.make_array_from_process_local_data` with
    `expert_batch_sharding`).

  Raises:
    ValueError: the experts do not divide over `expert`, or a batch's per-expert size
      does not divide over `data`.
  """
  num_experts = _num_experts(state["params"])
  _check_expert_count(num_experts, mesh)
  _check_stacked_batch(batch, mesh, num_experts)
  state_sh = stacked_shardings(state, mesh, num_experts=num_experts)
  batch_sh = jax.tree.map(lambda leaf: expert_batch_sharding(mesh, jnp.ndim(leaf)), batch)

  def step(state, batch):
    def total(params):
      losses, stats = stack_map(lambda args: loss_one(*args), (params, state["batch_stats"], batch))
      return losses.sum(), (losses, stats)

    (_, (losses, stats)), grads = jax.value_and_grad(total, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": stats, "opt_state": opt_state}, losses

  return jax.jit(
    step,
    in_shardings=(state_sh, batch_sh),
    out_shardings=(state_sh, NamedSharding(mesh, P(EXPERT))),  # losses [E]
    donate_argnums=0,
  )
