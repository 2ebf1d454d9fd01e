"""Tests for moe_adapt.train.mesh (on 8 fake CPU devices: `eight_devices`, tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_adapt.train import mesh as mesh_lib

pytestmark = pytest.mark.eight_devices


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh()


def test_make_mesh_defaults_to_all_devices_with_auto_axes(mesh):
  assert jax.device_count() == 8
  assert mesh.shape == {"data": 8}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  assert list(mesh.devices.flat) == jax.devices()


def test_make_mesh_subset_and_axis_name():
  mesh = mesh_lib.make_mesh(3, axis_name="batch")
  assert mesh.shape == {"batch": 3}
  assert list(mesh.devices.flat) == jax.devices()[:3]
  assert mesh_lib.data_sharding(mesh).spec == P("batch")


@pytest.mark.parametrize("bad", [9, 0, -1, 2.0, True])
def test_make_mesh_rejects_bad_device_counts(bad):
  with pytest.raises(ValueError, match=rf"num_devices={bad!r} (exceeds|is invalid)"):
    mesh_lib.make_mesh(bad)


def test_make_mesh_too_many_names_the_available_count():
  with pytest.raises(ValueError, match=r"num_devices=9 exceeds the 8 available cpu devices"):
    mesh_lib.make_mesh(9)


def test_shardings(mesh):
  assert mesh_lib.data_sharding(mesh) == NamedSharding(mesh, P("data"))
  assert mesh_lib.replicated(mesh) == NamedSharding(mesh, P())


def test_shard_batch_splits_every_leaf_on_its_leading_axis(mesh):
  batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "y": np.arange(16)}
  out = mesh_lib.shard_batch(batch, mesh)
  for name, leaf in out.items():
    assert leaf.sharding == mesh_lib.data_sharding(mesh)
    shards = leaf.addressable_shards
    assert len(shards) == 8
    assert {s.data.shape[0] for s in shards} == {2}
    # Device i holds rows 2i, 2i+1.
    for s in shards:
      i = jax.devices().index(s.device)
      np.testing.assert_array_equal(s.data, batch[name][2 * i : 2 * i + 2])


def test_shard_batch_rejects_indivisible_and_scalar_leaves(mesh):
  with pytest.raises(ValueError, match=r"batch size 10 of leaf \['y'\] is not divisible by the 8"):
    mesh_lib.shard_batch({"x": np.zeros((16, 2)), "y": np.zeros(10)}, mesh)
  with pytest.raises(ValueError, match=r"leaf \['s'\] is a scalar"):
    mesh_lib.shard_batch({"s": np.float32(1.0)}, mesh)


def test_replicate(mesh):
  params = {"w": jnp.ones((3, 2))}
  out = mesh_lib.replicate(params, mesh)
  assert out["w"].sharding == mesh_lib.replicated(mesh)
  assert all(s.data.shape == (3, 2) for s in out["w"].addressable_shards)


def test_prng_keys_are_placed_too(mesh):
  key = jax.random.key(3)
  out = mesh_lib.replicate({"key": key}, mesh)["key"]
  assert out.dtype == key.dtype and out.sharding == mesh_lib.replicated(mesh)
  np.testing.assert_array_equal(jax.random.key_data(out), jax.random.key_data(key))
  keys = jax.random.split(key, 16)
  out = mesh_lib.shard_batch(keys, mesh)
  assert out.dtype == keys.dtype and out.shape == (16,)
  assert out.sharding.spec == P("data")
  np.testing.assert_array_equal(jax.random.key_data(out), jax.random.key_data(keys))


def test_jitted_step_under_data_sharding_matches_single_device(mesh):
  """One SGD step of a linear model: sharded batch + replicated params == one device."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 5)).astype(np.float32)
  y = rng.normal(size=(32,)).astype(np.float32)
  w = rng.normal(size=(5,)).astype(np.float32)

  @jax.jit
  def step(w, x, y):
    loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
    return w - 0.1 * g, loss

  w1, loss1 = step(jnp.asarray(w), jnp.asarray(x), jnp.asarray(y))
  w8, loss8 = step(mesh_lib.replicate(jnp.asarray(w), mesh), *mesh_lib.shard_batch((x, y), mesh))
  assert w8.sharding.is_fully_replicated
  # The cross-device reduction may sum in another order: equal up to rounding.
  np.testing.assert_allclose(np.asarray(w8), np.asarray(w1), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6)
  # And both agree with NumPy.
  g = 2 * x.T @ (x @ w - y) / len(y)
  np.testing.assert_allclose(np.asarray(w8), w - 0.1 * g, rtol=1e-5, atol=1e-6)


# --- initialize_distributed --------------------------------------------------

_ENV_VARS = (
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "OMPI_COMM_WORLD_SIZE",
  "TPU_WORKER_HOSTNAMES",
  "JAX_COORDINATOR_ADDRESS",
  "COORDINATOR_ADDRESS",
  "JAX_NUM_PROCESSES",
  "JAX_PROCESS_ID",
)


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of making them."""
  for var in _ENV_VARS:
    monkeypatch.delenv(var, raising=False)
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  return recorded


def test_initialize_distributed_rejects_unknown_mode(calls):
  with pytest.raises(
    ValueError, match=r"distributed mode='yes' is unknown; accepted: auto, on, off"
  ):
    mesh_lib.initialize_distributed("yes")
  assert calls == []


def test_initialize_distributed_off_and_auto_single_process(calls):
  mesh_lib.initialize_distributed("off")
  mesh_lib.initialize_distributed("auto")
  assert calls == []


@pytest.mark.parametrize(
  "env, detected",
  [
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, True),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False),
    ({"SLURM_NTASKS": "4"}, False),  # A batch script outside `srun`.
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "h0"}, False),
    ({"COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
  ],
)
def test_initialize_distributed_auto_detects_launches(calls, monkeypatch, env, detected):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert mesh_lib.multi_process_env() == detected
  mesh_lib.initialize_distributed("auto")
  assert len(calls) == int(detected)


def test_initialize_distributed_passes_explicit_coordinates(calls, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:5555")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  mesh_lib.initialize_distributed("auto")
  assert calls == [{"coordinator_address": "127.0.0.1:5555", "num_processes": 2, "process_id": 1}]


def test_initialize_distributed_on_uses_auto_detection_and_is_idempotent(calls, monkeypatch):
  mesh_lib.initialize_distributed("on")
  assert calls == [{}]
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  mesh_lib.initialize_distributed("on")
  assert calls == [{}]
