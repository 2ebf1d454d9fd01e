"""Device mesh and sharding helpers for data-parallel and expert-parallel `jax.jit` code.

`make_mesh` builds a 1-D mesh (axis `data` by default); `make_expert_mesh` a 2-D
`(data, expert)` mesh for stacked experts (leaves with a leading expert axis E):
the experts and their optimiser state are split over `expert`, each expert's batch
over `data` (`shard_stacked`, `expert_batch_sharding`, `make_stacked_step`). Both
use `Auto` axis types: JAX 0.10's `jax.make_mesh` defaults to `Explicit` axes
(sharding in types), under which plain jitted code that mixes sharded and unsharded
arrays fails; with `Auto` axes, `NamedSharding` objects on the inputs are enough and
XLA propagates the rest. The jitted code keeps its global meaning (e.g. BatchNorm
statistics over the whole per-expert batch), so results equal those of one device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

DISTRIBUTED_MODES = ("auto", "on", "off")
DATA, EXPERT = "data", "expert"


def make_mesh(num_devices: int | None = None, *, axis_name: str = "data") -> jax.sharding.Mesh:
  """A 1-D mesh over the first `num_devices` devices (all devices when None).

  Raises:
    ValueError: `num_devices` is not a positive int or exceeds the device count.
  """
  if not isinstance(axis_name, str) or not axis_name:
    raise ValueError(f"axis_name={axis_name!r} is invalid; accepted: a non-empty string")
  devices = jax.devices()
  if num_devices is None:
    num_devices = len(devices)
  if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
    raise ValueError(f"num_devices={num_devices!r} is invalid; accepted: None or an int >= 1")
  if num_devices > len(devices):
    raise ValueError(
      f"num_devices={num_devices} exceeds the {len(devices)} available "
      f"{jax.default_backend()} devices; accepted: None or 1..{len(devices)}"
    )
  return jax.make_mesh(
    (num_devices,),
    (axis_name,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=devices[:num_devices],
  )


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


def _batch_axis(mesh: jax.sharding.Mesh) -> str:
  if len(mesh.axis_names) == 1:
    return mesh.axis_names[0]
  if DATA not in mesh.axis_names:
    raise ValueError(f"mesh has axes {mesh.axis_names}; a batch needs a 1-D mesh or a 'data' axis")
  return DATA


def _batch_devices(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape[_batch_axis(mesh)]


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading axis split over the data axis, other axes whole: `P('data')`.

  On a 1-D mesh, its single axis; on a `(data, expert)` mesh the batch is
  replicated over `expert`.
  """
  return NamedSharding(mesh, P(_batch_axis(mesh)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """A full copy on every device of the mesh: `P()`."""
  return NamedSharding(mesh, P())


def constrain_batch(x: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
  """Inside jit: shards x's leading (batch) axis over a 1-D mesh when it divides evenly."""
  if mesh.size == 1 or x.shape[0] % mesh.size:
    return x
  spec = P(mesh.axis_names[0], *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_batch(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Places every leaf ([B, ...]) with its leading (batch) axis split over the mesh.

  `tree` is the global batch: with several processes every process passes the
  same values.

  Raises:
    ValueError: a leaf is a scalar, or its batch size is not divisible by the
      number of devices of the mesh.
  """
  sharding = data_sharding(mesh)
  n = _batch_devices(mesh)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", ())
    name = jax.tree_util.keystr(path) or "<root>"
    if len(shape) == 0:
      raise ValueError(f"leaf {name} is a scalar; shard_batch needs a leading batch axis [B, ...]")
    if shape[0] % n:
      raise ValueError(
        f"batch size {shape[0]} of leaf {name} is not divisible by the {n} devices of the mesh; "
        f"accepted: a multiple of {n}"
      )
  return _device_put(tree, sharding)


def host_batch_to_global(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Assembles every process's own batch ([B_host, ...] leaves) into one global batch.

  For input pipelines that shard by host (`data.streaming.train_batches`): each process
  passes only the examples it read, and the result is a global array of
  `process_count * B_host` examples split over the mesh's data axis. With one process
  this equals `shard_batch`.

  Raises:
    ValueError: a leaf is a scalar, or its per-process batch does not divide over this
      process's share of the data axis.
  """
  sharding = data_sharding(mesh)
  local = max(1, _batch_devices(mesh) // jax.process_count())
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", ())
    name = jax.tree_util.keystr(path) or "<root>"
    if len(shape) == 0:
      raise ValueError(f"leaf {name} is a scalar; a host batch needs a leading axis [B, ...]")
    if shape[0] % local:
      raise ValueError(
        f"host batch size {shape[0]} of leaf {name} is not divisible by this process's "
        f"{local} devices of the data axis; accepted: a multiple of {local}"
      )
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def prefetch_to_device(iterator: Any, mesh: jax.sharding.Mesh, *, size: int = 2) -> Any:
  """Yields `host_batch_to_global(batch, mesh)` of each batch, `size` batches ahead.

  The transfers are asynchronous, so the next batches travel to the devices while the
  current step runs.
  """
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ValueError(f"size={size!r} is invalid; accepted: an int >= 1")
  queue: list[PyTree] = []
  for batch in iterator:
    queue.append(host_batch_to_global(batch, mesh))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def replicate(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """A full copy of every leaf on every device of the mesh.

  With several processes every process passes the same values (host NumPy
  arrays, or jax arrays not committed to a device).
  """
  return _device_put(tree, replicated(mesh))


# ----------------------------------------------------------------------------
# Stacked experts on a (data, expert) mesh
# ----------------------------------------------------------------------------


def _num_experts(tree: PyTree) -> int:
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(tree) if jnp.ndim(leaf) >= 1}
  if len(sizes) != 1:
    raise ValueError(
      f"a stacked pytree needs one leading expert axis shared by its leaves; got sizes {sizes}"
    )
  return sizes.pop()


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
  if num_experts % mesh.shape[EXPERT]:
    raise ValueError(
      f"num_experts={num_experts} is not divisible by the mesh's expert axis "
      f"({mesh.shape[EXPERT]} devices)"
    )
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
  if num_experts % mesh.shape[EXPERT]:
    raise ValueError(
      f"num_experts={num_experts} is not divisible by the mesh's expert axis "
      f"({mesh.shape[EXPERT]} devices)"
    )
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
  state_sh = stacked_shardings(state, mesh, num_experts=num_experts)
  batch_sh = jax.tree.map(lambda leaf: expert_batch_sharding(mesh, jnp.ndim(leaf)), batch)
  loss_sh = NamedSharding(mesh, P(EXPERT))

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
    out_shardings=(state_sh, loss_sh),
    donate_argnums=0,
  )


def per_device_bytes(tree: PyTree) -> dict[str, int]:
  """Bytes of `tree`'s arrays held by each addressable device: `{str(device): bytes}`."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      key = str(shard.device)
      out[key] = out.get(key, 0) + math.prod(shard.data.shape) * shard.data.dtype.itemsize
  return out


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _device_put(tree: PyTree, sharding: NamedSharding) -> PyTree:
  """`jax.device_put` that also places typed PRNG keys across processes.

  Multi-process `device_put` onto devices of other processes accepts only
  plain arrays, so keys travel as their uint32 data and are re-wrapped.
  """
  leaves, treedef = jax.tree.flatten(tree)
  impls = [jax.random.key_impl(x) if _is_key(x) else None for x in leaves]
  data = [jax.random.key_data(x) if impl is not None else x for x, impl in zip(leaves, impls)]
  placed = jax.device_put(data, sharding)
  out = [
    x if impl is None else jax.random.wrap_key_data(x, impl=impl) for x, impl in zip(placed, impls)
  ]
  return jax.tree.unflatten(treedef, out)


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def multi_process_env() -> bool:
  """Whether the environment shows a launch of several JAX processes.

  Recognised: SLURM (`SLURM_NTASKS` > 1 inside a step with `SLURM_PROCID`),
  Open MPI (`OMPI_COMM_WORLD_SIZE` > 1), a Cloud TPU pod slice
  (`TPU_WORKER_HOSTNAMES` listing several hosts), or an explicit coordinator
  (`JAX_COORDINATOR_ADDRESS` or `COORDINATOR_ADDRESS`).
  """
  env = os.environ
  if _int_env("SLURM_NTASKS") > 1 and "SLURM_PROCID" in env:
    return True
  if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return True
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
    return True
  return bool(env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"))


def initialize_distributed(mode: str) -> None:
  """Starts multi-process JAX (`jax.distributed.initialize`) when asked or detected.

  Must run before anything touches a device (`jax.devices()`, any computation).
  Calling it again is a no-op.

  Args:
    mode: 'on': always initialise, with JAX's cluster auto-detection (SLURM,
      Open MPI, Cloud TPU, ...); 'auto': only when `multi_process_env()` sees a
      multi-process launch; 'off': never. With an explicit coordinator, the
      process count and id come from `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
      when set (else JAX detects them).

  Raises:
    ValueError: unknown `mode`.
    RuntimeError: devices were already touched in this process.
  """
  if mode not in DISTRIBUTED_MODES:
    accepted = ", ".join(DISTRIBUTED_MODES)
    raise ValueError(f"distributed mode={mode!r} is unknown; accepted: {accepted}")
  if jax.distributed.is_initialized() or mode == "off":
    return
  if mode == "auto" and not multi_process_env():
    return
  kwargs: dict[str, Any] = {}
  address = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS")
  if address:
    kwargs["coordinator_address"] = address
  if "JAX_NUM_PROCESSES" in os.environ:
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in os.environ:
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
