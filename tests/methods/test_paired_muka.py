"""Paired MUKA student variants (issue #19 item 4): one run's students share their inputs.

`muka.run` on the tiny preset with every training stage recorded instead of trained
(`stages.run_stage` patched: it keeps each stage's step and starting state and returns the
state as it is; teachers stay at their initialisation). Asserted on what the run hands to
its stages: every student variant (muki, hard, no_margin, single_pass, vanilla_kd, uhc,
oracle) starts from the same student initialisation, runs one compiled step over the same
transfer set and draws the same transfer batch at every step index, and every variant's
targets come from the same teacher scores, computed once (the MC-dropout passes draw from
the run's `mc` key, so computing them again gives the same scores).

The batch of a step is read off each variant's own step: the gradient of its loss
mean_b w[idx_b] · KL_b with respect to the per-example weights w is non-zero exactly on
the examples in the batch. The dropout key of a step is split from the same per-step key
as the batch indices, inside the one shared step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.methods import muka
from moe_adapt.train import stages
from tests.methods.muka_util import TRAINED, tiny_config

# One recorded run (data, teacher or source initialisation, compiles): ~20 s of CPU.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
  """(setup, workdir, stage -> (step_fn, host starting state), variant -> scores it got,
  number of `compute_scores` calls) of one tiny run."""
  setup = muka.make_setup(tiny_config(num_devices=1))
  workdir = tmp_path_factory.mktemp("paired_muka")
  calls, scores_seen, computed = {}, {}, []

  def record(config, workdir, stage, step_fn, state, num_steps, **kwargs):
    calls[stage] = (step_fn, jax.device_get(state))
    return state

  def count_scores(setup, teachers):
    computed.append(1)
    return compute_scores(setup, teachers)

  def keep_scores(setup, variant, scores):
    scores_seen[variant] = scores
    return variant_targets(setup, variant, scores)

  compute_scores, variant_targets = muka.compute_scores, muka.variant_targets
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(stages, "run_stage", record)
    patch.setattr(muka, "compute_scores", count_scores)
    patch.setattr(muka, "variant_targets", keep_scores)
    muka.run(setup.config, str(workdir), setup=setup)
  return setup, workdir, calls, scores_seen, len(computed)


def _students(recorded):
  setup, _, calls, _, _ = recorded
  assert setup.config.student.select_checkpoints == 1  # one stage per variant
  return {v: calls[v] for v in TRAINED}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_students_start_from_one_initialisation(recorded):
  setup, _, calls, _, _ = recorded
  teachers = {f"teacher_{k}" for k in range(setup.num_teachers)}
  assert set(calls) == set(TRAINED) | teachers
  students = _students(recorded)
  first = students["muki"][1]
  for _, state in students.values():
    _assert_trees_equal(state, first)  # params, batch statistics and optimiser state


def test_students_share_the_step_and_the_transfer_set(recorded):
  setup = recorded[0]
  bound = [fn for fn, _ in _students(recorded).values()]
  assert all(fn.jitted is bound[0].jitted for fn in bound)
  assert all(fn.arrays[0] is setup.x_train for fn in bound)


def _batch(step_fn, state, step):
  """The transfer examples in batch `step` of a variant's own step: where the gradient of
  its loss with respect to the per-example weights is non-zero."""
  x, targets, weights, groups, coefs = step_fn.arrays

  def loss(w):
    fresh = jax.tree.map(jnp.array, state)  # the step donates its state
    return step_fn.jitted(fresh, jnp.int32(step), x, targets, w, groups, coefs)[1]["loss"]

  return frozenset(np.flatnonzero(np.asarray(jax.grad(loss)(weights))).tolist())


def test_students_see_the_same_transfer_batches(recorded):
  setup = recorded[0]
  students = _students(recorded)
  batches = {
    step: {v: _batch(fn, state, step) for v, (fn, state) in students.items()} for step in (0, 3)
  }
  for step, by_variant in batches.items():
    assert len(set(by_variant.values())) == 1, (step, by_variant)
    # At most batch_size examples (draws with replacement may repeat one).
    assert 0 < len(by_variant["muki"]) <= setup.config.student.batch_size
  assert batches[0]["muki"] != batches[3]["muki"]  # the batch moves with the step


def test_every_variant_integrates_the_same_teacher_scores(recorded):
  setup, workdir, calls, scores_seen, computed = recorded
  assert computed == 1
  assert set(scores_seen) == set(TRAINED)
  first = scores_seen["muki"]
  assert all(scores is first for scores in scores_seen.values())
  # Computed again from the same teachers, the MC-dropout scores are the same.
  teachers = [
    {"params": state["params"], "batch_stats": state["batch_stats"]}
    for _, state in (calls[f"teacher_{k}"] for k in range(setup.num_teachers))
  ]
  again = muka.compute_scores(setup, teachers)
  assert set(again) == set(first)
  for name, values in again.items():
    np.testing.assert_array_equal(values, first[name], err_msg=name)
  saved = np.load(workdir / muka.CONFIDENCE_FILE)
  np.testing.assert_array_equal(saved["mc"], first["mc"])
  # MC dropout is on: the MC scores are not the deterministic single-pass ones.
  assert not np.array_equal(first["mc"], first["single"])
