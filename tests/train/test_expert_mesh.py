"""The (data, expert) mesh: stacked experts trained on 8 fake CPU devices equal one device.

The experts are the pipeline's models (`models.Classifier` over a small ConvNet with
BatchNorm), stacked on a leading expert axis as `meta_dmoe.init_experts` stores them, with
Adam state; each expert trains on its own batch. A few steps on a (2, 4) and a (4, 2) mesh
give the losses, parameters, BatchNorm statistics and optimiser state of a (1, 1) mesh, and
every stacked leaf is really split: each device holds E / expert experts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_adapt import core, models
from moe_adapt.train import mesh as mesh_lib

pytestmark = pytest.mark.eight_devices

E, B, STEPS = 4, 8, 3
SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def problem():
  model = models.Classifier(
    backbone=models.get_backbone("convnet", width=4, depth=1, feature_dim=8), num_classes=3
  )
  tx = optax.adam(1e-2)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *SHAPE)), train=False))
  experts = [init(key) for key in jax.random.split(jax.random.key(0), E)]
  variables = jax.tree.map(lambda *leaves: np.stack(leaves), *experts)
  params = variables["params"]
  # Host (NumPy) values: every mesh gets its own device copies to donate.
  state = jax.device_get(
    {"params": params, "batch_stats": variables["batch_stats"], "opt_state": tx.init(params)}
  )
  rng = np.random.default_rng(0)
  batches = [
    {
      "x": rng.normal(size=(E, B, *SHAPE)).astype(np.float32),
      "y": rng.integers(0, 3, size=(E, B)).astype(np.int32),
    }
    for _ in range(STEPS)
  ]

  def loss_one(params, stats, batch):
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats}, batch["x"], train=True, mutable=["batch_stats"]
    )
    return core.losses.cross_entropy(logits, batch["y"]).mean(), updates["batch_stats"]

  return loss_one, tx, state, batches


def _train(problem, shape):
  loss_one, tx, state, batches = problem
  mesh = mesh_lib.make_expert_mesh(shape, num_experts=E)
  state = mesh_lib.shard_stacked(state, mesh, num_experts=E)
  step = mesh_lib.make_stacked_step(loss_one, tx, mesh, state, batches[0])
  losses = []
  for batch in batches:
    state, loss = step(state, batch)
    losses.append(loss)
  return state, np.stack([np.asarray(loss) for loss in losses])


@pytest.fixture(scope="module")
def one_device(problem):
  return _train(problem, (1, 1))


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
def test_sharded_training_equals_one_device(problem, one_device, shape):
  ref_state, ref_losses = one_device
  state, losses = _train(problem, shape)
  assert losses.shape == (STEPS, E)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for ref, got in zip(jax.tree.leaves(ref_state), jax.tree.leaves(state), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)
  # The experts really are split: every device holds E / expert of them, and the
  # step's outputs keep that layout (the next step needs no resharding).
  data, expert = shape
  kernel = jax.tree.leaves(state["params"])[0]
  assert kernel.sharding.spec[0] == "expert"
  assert {s.data.shape[0] for s in kernel.addressable_shards} == {E // expert}
  mu = jax.tree.leaves(state["opt_state"])[1]
  assert mu.shape[0] == E and {s.data.shape[0] for s in mu.addressable_shards} == {E // expert}
  sizes = mesh_lib.per_device_bytes(state["params"])
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(state["params"]))
  assert len(sizes) == data * expert and set(sizes.values()) == {total // expert}


def test_batches_split_over_data_and_expert():
  mesh = mesh_lib.make_expert_mesh((2, 4))
  x = jax.device_put(jnp.zeros((4, 8, 3)), mesh_lib.expert_batch_sharding(mesh, 3))
  assert {s.data.shape for s in x.addressable_shards} == {(1, 4, 3)}
  flat = mesh_lib.shard_batch({"x": np.zeros((6, 2))}, mesh)  # [B, ...]: over data only.
  assert {s.data.shape for s in flat["x"].addressable_shards} == {(3, 2)}
  with pytest.raises(ValueError, match=r"batch size 5 of leaf .* not divisible by the 2 devices"):
    mesh_lib.shard_batch({"x": np.zeros((5, 2))}, mesh)


@pytest.mark.parametrize(
  "shape, message",
  [
    ((3, 1), r"mesh.shape=\(3, 1\): data \* expert = 3 does not divide the 8 cpu devices; "
     r"accepted: products in \[1, 2, 4, 8\]"),
    ((2, 4, 1), r"mesh.shape=\(2, 4, 1\) is invalid; accepted: \(data, expert\)"),
    ((0, 2), r"mesh.shape=\(0, 2\) is invalid"),
    ("24", r"mesh.shape='24' is invalid"),
    ((1, 8), r"mesh.shape=\(1, 8\): expert = 8 does not divide the 4 experts; accepted: expert "
     r"in \[1, 2, 4\]"),
  ],
)  # fmt: skip
def test_make_expert_mesh_bad_shapes(shape, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.make_expert_mesh(shape, num_experts=4)


def test_make_stacked_step_bad_batches(problem):
  loss_one, tx, state, batches = problem
  mesh = mesh_lib.make_expert_mesh((4, 2))
  bad = {"x": batches[0]["x"][:, :6], "y": batches[0]["y"][:, :6]}
  with pytest.raises(ValueError, match=r"per-expert batch size 6 of \['x'\] is not divisible"):
    mesh_lib.make_stacked_step(loss_one, tx, mesh, state, bad)
  with pytest.raises(ValueError, match=r"batch leaf \['y'\] has shape \(4,\); accepted: \[E=4"):
    mesh_lib.make_stacked_step(loss_one, tx, mesh, state, {**batches[0], "y": np.zeros(4)})
  three = jax.tree.map(lambda leaf: leaf[:3] if leaf.ndim else leaf, state)
  with pytest.raises(ValueError, match="num_experts=3 is not divisible by the mesh's expert axis"):
    mesh_lib.make_stacked_step(loss_one, tx, mesh, three, batches[0])


def test_host_batches_become_global_batches_ahead_of_time():
  mesh = mesh_lib.make_expert_mesh((4, 2))
  batches = [{"x": np.full((8, 3), i, np.float32), "y": np.arange(8) + i} for i in range(5)]
  placed = list(mesh_lib.prefetch_to_device(iter(batches), mesh, size=2))
  assert len(placed) == 5
  for i, batch in enumerate(placed):
    assert batch["x"].sharding == mesh_lib.data_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(batch["y"]), np.arange(8) + i)
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 3)}
  with pytest.raises(ValueError, match="host batch size 6 of leaf \\['x'\\] is not divisible"):
    mesh_lib.host_batch_to_global({"x": np.zeros((6, 3))}, mesh)
  with pytest.raises(ValueError, match="size=0 is invalid"):
    next(mesh_lib.prefetch_to_device(iter(batches), mesh, size=0))


@pytest.mark.slow  # Compiles a ConvNet step for a 2 x 2 mesh: ~10 s on 2 busy cores.
def test_experts_train_on_streamed_domains(tmp_path):
  """Each expert of a (2, 2) mesh trains on the stream of its own domain (no feature
  cache, no dataset in memory): the per-domain batches are stacked into [E, B, ...]."""
  from moe_adapt.data import streaming, tfds_builders

  builder = tfds_builders.prepare_mock("domainnet", tmp_path, per_class={"train": 8, "test": 1})
  name = f"{builder.name}/{builder.builder_config.name}"
  transform = streaming.image_transform(image_size=16)
  streams = [
    iter(
      streaming.train_batches(
        streaming.open_split(
          name, split="train", data_dir=str(tmp_path), domain_key="domain", domains=(d,)
        ),
        transform,
        batch_size=B,
        seed=k,
      )
    )
    for k, d in enumerate(("clipart", "painting"))
  ]
  model = models.Classifier(
    backbone=models.get_backbone("convnet", width=8, depth=2, feature_dim=16), num_classes=3
  )
  tx = optax.adam(3e-3)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 16, 16, 3)), train=False))
  experts = [init(key) for key in jax.random.split(jax.random.key(0), 2)]
  variables = jax.tree.map(lambda *leaves: np.stack(leaves), *experts)
  state = jax.device_get(
    {
      "params": variables["params"],
      "batch_stats": variables["batch_stats"],
      "opt_state": tx.init(variables["params"]),
    }
  )

  def loss_one(params, stats, batch):
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats}, batch["x"], train=True, mutable=["batch_stats"]
    )
    return core.losses.cross_entropy(logits, batch["y"]).mean(), updates["batch_stats"]

  def next_batch():
    parts = [next(s) for s in streams]
    return {
      "x": np.stack([p["image"] for p in parts]),
      "y": np.stack([p["label"] for p in parts]),
    }

  mesh = mesh_lib.make_expert_mesh((2, 2), num_experts=2)
  state = mesh_lib.shard_stacked(state, mesh, num_experts=2)
  first = next_batch()
  step = mesh_lib.make_stacked_step(loss_one, tx, mesh, state, first)
  losses = []
  batch = first
  for _ in range(30):
    state, loss = step(state, batch)
    losses.append(np.asarray(loss))
    batch = next_batch()
  losses = np.stack(losses)  # [steps, E]
  assert np.all(losses[-5:].mean(0) < 0.7 * losses[:5].mean(0)), losses
