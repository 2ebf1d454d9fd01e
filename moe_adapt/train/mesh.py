"""Device mesh and sharding helpers for data-parallel and expert-parallel `jax.jit` code.

`make_mesh` builds a 1-D mesh (axis `data` by default); `make_expert_mesh` a 2-D
`(data, expert)` mesh for stacked experts (leaves with a leading expert axis E):
the experts and their optimiser state are split over `expert`, each expert's batch
over `data` (`shard_stacked`, `expert_batch_sharding`, `make_stacked_step`; these live
in `expert_mesh`). Both use `Auto` axis types: JAX 0.10's `jax.make_mesh` defaults to
`Explicit` axes (sharding in types), under which plain jitted code that mixes sharded and
unsharded arrays fails; with `Auto` axes, `NamedSharding` objects on the inputs are enough
and XLA propagates the rest. The jitted code keeps its global meaning (e.g. BatchNorm
statistics over the whole per-expert batch), so results equal those of one device.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_adapt.train.expert_mesh import (
  DATA,
  EXPERT,
  expert_batch_sharding,
  make_expert_mesh,
  make_stacked_step,
  shard_stacked,
  stacked_shardings,
  vmap_stack,
)

# The stacked-expert helpers live in `expert_mesh`; their names stay importable here.
__all__ = [
  "DATA",
  "DISTRIBUTED_MODES",
  "EXPERT",
  "data_sharding",
  "expert_batch_sharding",
  "host_batch_to_global",
  "initialize_distributed",
  "make_expert_mesh",
  "make_mesh",
  "make_stacked_step",
  "multi_process_env",
  "per_device_bytes",
  "prefetch_to_device",
  "replicate",
  "replicated",
  "shard_batch",
  "shard_stacked",
  "stacked_shardings",
  "vmap_stack",
]

PyTree = Any

DISTRIBUTED_MODES = ("auto", "on", "off")


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


# ----------------------------------------------------------------------------
# Sharding constraints inside jitted steps
# ----------------------------------------------------------------------------


def constrain_batch(x: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
  """`x` [B, ...] with its leading (batch) axis sharded over the mesh's batch axis.

  For use inside a jitted step (e.g. on a batch gathered from replicated data). `x` is
  returned unchanged on a one-device mesh and when B does not divide evenly.
  """
  if mesh.size == 1 or x.shape[0] % _batch_devices(mesh):
    return x
  return jax.lax.with_sharding_constraint(x, data_sharding(mesh))
