"""Meta-DMoE's variants are paired (issue #19, item 4), on the tiny digits config.

- every stage after the experts starts from the states the earlier ones hand over: the ERM
  student from the shared backbone (as the experts), meta-training and its `erm_continued`
  control both from the ERM student (and the pretrained aggregator);
- the control steps on the same query batches as meta-training, step for step;
- the adapted variants (`aggregator_pretrained`, `meta_dmoe` and its content-free targets)
  adapt on the same support images per draw, drawn at the in-memory path's seeded positions,
  and every meta candidate is scored on the same support of each source.

The steps and the adaptation are replaced by recorders: what is asserted is the wiring of
the stages and of the evaluation, which is the same whatever the steps compute.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_adapt.methods import meta_dmoe, meta_dmoe_eval, meta_dmoe_steps
from tests.methods import configs_util

CONFIGS = configs_util.config_module("meta_dmoe")


@pytest.fixture(scope="module")
def setup():
  config = configs_util.with_overrides(
    CONFIGS.get_config("digits_rot,tiny"), **{"num_devices": 1, "adapt.repeats": 2}
  )
  return meta_dmoe.make_setup(config)


def _same(a, b) -> None:
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_the_control_steps_on_the_meta_stage_query_batches(setup):
  dim = setup.config.model.options.feature_dim
  feats = jnp.zeros((setup.num_experts, setup.num_source_train, dim))
  meta_step = meta_dmoe_steps.make_episode_step(
    setup, lambda state, support, query: (state, query), feats
  )
  control_step = meta_dmoe_steps.make_query_step(
    setup, lambda state, xq, yq: (state, {"x": xq, "y": yq})
  )
  seen = []
  for step in range(4):
    _, query = meta_step({"w": jnp.zeros(())}, jnp.int32(step))
    _, control = control_step({"w": jnp.zeros(())}, jnp.int32(step))
    _same(query, control)
    seen.append(np.asarray(query["x"]))
  assert not np.array_equal(seen[0], seen[1])  # a new episode at every step


def test_every_stage_starts_from_the_state_it_is_handed(setup, tmp_path):
  first: dict = {}

  def recorder(name):
    def build(*txs):
      def step(state, step):
        first.setdefault(name, jax.device_get(state))
        return state, {"loss": jnp.zeros(())}

      return step

    return build

  steps = meta_dmoe.StepBuilders(*(recorder(n) for n in meta_dmoe.StepBuilders._fields))
  backbone = jax.device_get(meta_dmoe.init_model(setup, jax.random.key(7)))
  dim = setup.config.model.options.feature_dim
  trained = meta_dmoe.train_stages(
    setup.config, str(tmp_path), setup, steps, dim, writer=None, stage_fields={}, backbone=backbone
  )
  _same(first["student"]["params"], backbone["params"])
  _same(first["student"]["batch_stats"], backbone["batch_stats"])
  student, aggregator = trained.student, trained.aggregator["params"]
  _same(first["meta"]["student"], student["params"])
  _same(first["meta"]["batch_stats"], student["batch_stats"])
  _same(first["meta"]["aggregator"], aggregator)
  _same(first["continued"]["params"], student["params"])
  _same(first["continued"]["batch_stats"], student["batch_stats"])
  # The experts start from the same backbone, each a copy.
  experts = meta_dmoe.init_experts(setup, optax.sgd(0.1), backbone)
  for k in range(setup.num_experts):
    _same(jax.tree.map(lambda a, k=k: a[k], experts["params"]), backbone["params"])


def test_adapted_variants_share_their_support_draws(setup):
  num_experts, dim = setup.num_experts, setup.config.model.options.feature_dim

  def expert_outputs(x):
    # Features that identify the image: a support's tokens can be traced to its images.
    flat = x.reshape(len(x), -1)[:, :dim]
    feats = np.broadcast_to(flat, (num_experts, *flat.shape)).astype(np.float32)
    return jnp.asarray(feats), jnp.zeros((num_experts, len(x), setup.benchmark.num_classes))

  calls = []

  def adapt(student, stats, aggregator, xs, tokens, *, mask=None, target=None, lr_factor=1.0):
    calls.append((np.asarray(xs), mask is None, lr_factor))
    np.testing.assert_array_equal(
      np.asarray(tokens)[:, 0], np.asarray(xs).reshape(len(xs), -1)[:, :dim]
    )
    return student

  erm = meta_dmoe.init_model(setup, jax.random.key(1))
  tokens = jnp.zeros((1, num_experts, dim))
  aggregator = setup.agg_model.init(setup.key("init"), tokens)["params"]
  meta = {"student": erm["params"], "aggregator": aggregator, "batch_stats": erm["batch_stats"]}
  candidates = {"meta": [(2, meta), (4, meta)], "erm_continued": [(2, erm), (4, erm)]}
  _, details = meta_dmoe_eval.evaluate_variants(
    setup,
    meta_dmoe_eval.MemorySource(setup, expert_outputs),
    adapt=adapt,
    inner_lr=lambda d: 1.0,
    aggregator_pre=aggregator,
    student_erm=erm,
    candidates=candidates,
  )
  factors = len(setup.config.selection.inner_lr_factors)
  per_source = (len(candidates["meta"]) + 1) * factors
  selection = [c for c in calls if not c[1]]
  assert len(selection) == len(setup.sources) * per_source
  for i in range(len(setup.sources)):  # every candidate and factor: one support per source
    group = selection[i * per_source : (i + 1) * per_source]
    for xs, _, _ in group:
      np.testing.assert_array_equal(xs, group[0][0])
  targets = [c for c in calls if c[1]]
  adapted = 1 + 1 + len(meta_dmoe.CONTENT_FREE)  # aggregator_pretrained, meta_dmoe, controls
  repeats, k = setup.config.adapt.repeats, setup.config.adapt.support_size
  assert len(targets) == len(setup.targets) * repeats * adapted
  for d_idx, domain in enumerate(setup.targets):
    x = meta_dmoe.whole_domain(setup.splits[domain])[0]
    for r in range(repeats):
      start = (d_idx * repeats + r) * adapted
      key = jax.random.fold_in(jax.random.fold_in(setup.key("adapt"), d_idx), r)
      expected = x[np.asarray(jax.random.permutation(key, len(x))[:k])]
      for xs, _, _ in targets[start : start + adapted]:
        np.testing.assert_array_equal(xs, expected)
  per_example = details["per_example"]
  for name in (
    "aggregator_pretrained",
    "meta_dmoe",
    *(f"meta_dmoe_{c}" for c in meta_dmoe.CONTENT_FREE),
  ):
    for domain in setup.targets:
      assert len(per_example[name][domain]["correct_draws"]) == repeats
