"""Paired Co-Tuning variants (issue #19 item 4): one run's variants share their start and data.

`co_tuning.run` on the tiny preset with every training stage recorded instead of trained
(`stages.run_stage` patched: it keeps each stage's step and starting state and returns the
state as it is), so the test costs the data, the calibration and relationships, one compile
of the shared fine-tuning step and the evaluations. Asserted on what the run hands to its
stages: every candidate of every variant (fine_tune, l2_sp, co_tuning_direct,
co_tuning_reverse) starts from the same source weights and the same new target head, and
its step draws the same batch at every step index: the target head's CE at the common
start, which reads the batch only, is equal across variants at a step and differs between
steps.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.methods import co_tuning, co_tuning_finetune
from moe_adapt.train import stages
from tests.methods import configs_util

# One recorded run (data, teacher or source initialisation, compiles): ~20 s of CPU.
pytestmark = pytest.mark.slow

VARIANTS = ("fine_tune", "l2_sp", "co_tuning_direct", "co_tuning_reverse")


def _config():
  config = configs_util.config_module("co_tuning").get_config("fmnist,tiny")
  return configs_util.with_overrides(config, num_devices=1)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
  """(setup, stage -> (step_fn, host copy of its starting state)) of one tiny run.

  The source model is a random one standing in for a pre-trained one (`source_variables`,
  the path of a loaded checkpoint), initialised in one compiled call.
  """
  config = _config()
  setup = co_tuning.make_setup(config)
  sample = jnp.zeros((1, *setup.task.input_shape), jnp.float32)
  init = jax.jit(lambda key: setup.source_model.init(key, sample, train=False))
  setup = dataclasses.replace(setup, source_variables=jax.device_get(init(jax.random.key(5))))
  calls = {}

  def record(config, workdir, stage, step_fn, state, num_steps, **kwargs):
    calls[stage] = (step_fn, jax.device_get(state))
    return state

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(stages, "run_stage", record)
    co_tuning.run(config, str(tmp_path_factory.mktemp("paired_co_tuning")), setup=setup)
  return setup, calls


def _finetune_stages(setup, calls):
  """Every fine-tuning stage of the run, by variant (one per candidate of its grid)."""
  out = {}
  for variant in VARIANTS:
    grid = co_tuning_finetune.candidates(setup.config, variant)
    names = [
      variant if len(grid) == 1 else co_tuning_finetune.candidate_stage(variant, candidate)
      for candidate in grid
    ]
    out[variant] = {name: calls[name] for name in names}
  return out


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_every_candidate_of_every_variant_is_a_stage(recorded):
  setup, calls = recorded
  by_variant = _finetune_stages(setup, calls)
  assert set(calls) == {s for v in by_variant.values() for s in v}
  assert all(len(v) > 1 for v in by_variant.values())  # the tiny preset has grids


def test_variants_start_from_the_source_weights_and_one_new_head(recorded):
  setup, calls = recorded
  source = setup.source_variables
  starts = [
    state for stages_ in _finetune_stages(setup, calls).values() for _, state in stages_.values()
  ]
  for state in starts:
    _assert_trees_equal(state["params"]["backbone"], source["params"]["backbone"])
    _assert_trees_equal(state["params"]["source_head"], source["params"]["head"])
    _assert_trees_equal(state["params"]["target_head"], starts[0]["params"]["target_head"])
    _assert_trees_equal(state["batch_stats"], source["batch_stats"])
  # The new head is a fresh draw (setup.key('target_head')), not a copy of anything.
  assert np.std(np.asarray(starts[0]["params"]["target_head"]["kernel"])) > 0


def _target_ce(step_fn, state, step):
  """The target head's CE of step `step`'s batch, at `state` (before the update)."""
  state = jax.tree.map(jnp.array, state)  # fresh device copies: the step donates them
  _, metrics = step_fn(state, jnp.int32(step))
  return float(metrics["target_ce"])


def test_variants_see_the_same_batches(recorded):
  setup, calls = recorded
  by_variant = _finetune_stages(setup, calls)
  bound = [fn for stages_ in by_variant.values() for fn, _ in stages_.values()]
  # One compiled step over one target training set for every variant and candidate.
  assert all(fn.jitted is bound[0].jitted for fn in bound)
  assert all(fn.arrays[0] is setup.x_target and fn.arrays[1] is setup.y_target for fn in bound)
  # Each variant's own step (its relationship, anchor and coefficients) at the common start:
  # the CE of the target head reads the batch only, so it is the same iff the batch is.
  start = calls[next(iter(by_variant["fine_tune"]))][1]
  for step in (0, 3):
    ces = {v: _target_ce(next(iter(s.values()))[0], start, step) for v, s in by_variant.items()}
    assert len(set(ces.values())) == 1, (step, ces)
  first = next(iter(by_variant["fine_tune"].values()))[0]
  assert _target_ce(first, start, 0) != _target_ce(first, start, 3)  # batches change
