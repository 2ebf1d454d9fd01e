"""Meta-DMoE's experts stage on a (data, expert) mesh (`experts.mesh_shape`).

tests/conftest.py fakes 8 CPU devices. Four experts of the tiny digits config take two
steps on the data-parallel step (every expert on every device) and on the stacked step of
`train.mesh` in the (2, 4) and (4, 2) layouts: the same batches (same keys), the same
losses, parameters, BatchNorm statistics and optimiser state, with the experts' state really
split over `expert`. Plain SGD, so that parameters differ only by lr × gradient rounding.
"""

import jax
import numpy as np
import optax
import pytest

from moe_adapt.methods import meta_dmoe
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import stages
from tests.methods import configs_util

CONFIGS = configs_util.config_module("meta_dmoe")
STEPS = 2


def tiny_config(**overrides):
  config = CONFIGS.get_config("digits_rot,tiny")
  overrides = {"experts.num_experts": 4, "num_devices": 1, **overrides}
  return configs_util.with_overrides(config, **overrides)


def run_experts(shape):
  setup = meta_dmoe.make_setup(tiny_config(**{"experts.mesh_shape": shape}))
  tx = optax.sgd(0.1)
  state = meta_dmoe.place_experts(setup, meta_dmoe.init_experts(setup, tx))
  step_fn = meta_dmoe.make_expert_step(setup, tx)
  losses = []
  for i in range(STEPS):
    state, metrics = step_fn(state, np.int32(i))
    losses.append(float(metrics["loss"]))
  return setup, state, losses


@pytest.fixture(scope="module")
def one_device():
  return run_experts(())


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
  """The (2, 4) experts stage through `stages.run_stage`, checkpointed at every step:
  (stage() -> the stage's final state, its workdir); a second call restores."""
  config = tiny_config(**{"experts.mesh_shape": (2, 4), "checkpoint_every": 1})
  setup = meta_dmoe.make_setup(config)
  tx = optax.sgd(0.1)
  workdir = str(tmp_path_factory.mktemp("expert_mesh"))

  def stage():
    initial = meta_dmoe.place_experts(setup, meta_dmoe.init_experts(setup, tx))
    step_fn = meta_dmoe.make_expert_step(setup, tx)
    return stages.run_stage(
      config, workdir, "experts", step_fn, initial, STEPS, writer=None, stage_fields={}
    )

  return setup, stage(), stage


def _assert_equal_to_one_device(setup, state, one_device, shape):
  _, want_state, _ = one_device
  assert setup.expert_mesh.shape == {"data": shape[0], "expert": shape[1]}
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    jax.device_get(state),
    jax.device_get(want_state),
  )
  # Split, not replicated: each device holds 4 / expert of the experts.
  kernel = jax.tree.leaves(state["params"])[0]
  assert kernel.sharding.spec[0] == mesh_lib.EXPERT
  assert {s.data.shape[0] for s in kernel.addressable_shards} == {4 // shape[1]}


@pytest.mark.slow  # ~15 CPU-seconds: two compilations of the 4-expert step
def test_expert_mesh_4_2_equals_one_device(one_device):
  setup, state, losses = run_experts((4, 2))
  np.testing.assert_allclose(losses, one_device[2], rtol=1e-5)
  _assert_equal_to_one_device(setup, state, one_device, (4, 2))


@pytest.mark.slow  # ~10 CPU-seconds: one compilation of the stacked step
def test_expert_mesh_2_4_stage_equals_one_device_and_restores_split(one_device, staged):
  # The (2, 4) layout through stages.run_stage: the same state as one device; a restarted
  # run restores the finished state, still split over `expert`, without stepping.
  setup, trained, stage = staged
  _assert_equal_to_one_device(setup, trained, one_device, (2, 4))
  restored = stage()
  kernel = jax.tree.leaves(restored["params"])[0]
  assert kernel.sharding.spec[0] == mesh_lib.EXPERT
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(trained))


@pytest.mark.parametrize(
  "overrides, match",
  [
    (
      {"experts.mesh_shape": (3, 1)},
      r"experts\.mesh_shape=\(3, 1\): data \* expert = 3 does not divide the 8 cpu devices",
    ),
    (
      {"experts.mesh_shape": (1, 8)},
      r"experts\.mesh_shape=\(1, 8\): expert = 8 does not divide the 4 experts",
    ),
    (
      {"experts.mesh_shape": (8, 1), "experts.batch_size": 12},
      r"experts\.batch_size=12 does not divide over the data axis of experts\.mesh_shape",
    ),
  ],
)
def test_bad_mesh_shapes_name_the_field(overrides, match):
  config = tiny_config(**overrides)
  meta_dmoe.validate_config(config)
  with pytest.raises(ValueError, match=match):
    meta_dmoe.make_expert_mesh(config)


@pytest.mark.parametrize("shape", [(2,), (2, 4, 1), (0, 2), (2.0, 4), (True, 2)])
def test_malformed_mesh_shapes_are_refused(shape):
  with pytest.raises(ValueError, match=r"experts\.mesh_shape=.* is invalid; accepted: \(\)"):
    meta_dmoe.validate_config(tiny_config(**{"experts.mesh_shape": shape}))
