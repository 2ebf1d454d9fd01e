"""Hot paths trace once: each method's jitted step, called for several steps, compiles once.

A step that retraces (a state leaf whose dtype, weak type or shape changes after the first
step, a Python scalar that becomes a constant, a fresh closure per call) recompiles every
step, which silently multiplies a training run's time. Each test builds a method's step the
way the method does, feeds the returned state back for `STEPS` calls with same-shaped inputs,
and checks the jitted function's cache: one entry after the first call, no new entry after.
Functions jitted at module level (shared with other tests) are checked by the number of
entries that the calls add. The setups are the methods' tiny configs on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_adapt.methods import adamix, co_tuning, meta_dmoe, muka
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.models import adapted
from moe_adapt.train import evaluation, finetuning
from moe_adapt.train import mesh as mesh_lib
from tests.methods import configs_util

STEPS = 3


def cache_size(jitted) -> int:
  """Number of compiled variants (traces) held by a `jax.jit` function."""
  return jitted._cache_size()


def assert_traces_once(jitted, call, state, *, steps: int = STEPS, fresh: bool = True):
  """Calls `state, _ = call(state, jnp.int32(i))` `steps` times; one trace in all.

  `fresh`: `jitted` was never called before, so exactly one entry must be there after.
  Otherwise (a module-level jit other tests may have used) the calls may add at most one.
  """
  before = cache_size(jitted)
  state, _ = call(state, jnp.int32(0))
  after_first = cache_size(jitted)
  for i in range(1, steps):
    state, _ = call(state, jnp.int32(i))
  jax.block_until_ready(state)
  after = cache_size(jitted)
  assert after == after_first, f"retraced: {after - after_first} extra traces after step 0"
  if fresh:
    assert before == 0 and after == 1, f"expected 1 trace, got {after - before}"
  else:
    assert after - before <= 1
  return state


# ----------------------------------------------------------------------------- Meta-DMoE


@pytest.fixture(scope="module")
def mdmoe():
  config = configs_util.config_module("meta_dmoe").get_config("digits_rot,tiny")
  config.num_devices = 1
  setup = meta_dmoe.make_setup(config)
  tx = optax.adam(1e-3)
  experts = mesh_lib.replicate(meta_dmoe.init_experts(setup, tx), setup.mesh)
  feats = meta_dmoe.expert_features(setup, experts, np.asarray(setup.x))
  return setup, experts, feats


def test_meta_dmoe_expert_step_traces_once(mdmoe):
  setup, experts, _ = mdmoe
  bound = meta_dmoe.make_expert_step(setup, optax.adam(1e-3))
  assert_traces_once(bound.jitted, bound, jax.tree.map(jnp.copy, experts))


def _aggregator_state(setup, feats, tx):
  tokens = jnp.zeros((1, setup.num_experts, feats.shape[-1]), jnp.float32)
  params = setup.agg_model.init(setup.key("init"), tokens)["params"]
  return mesh_lib.replicate({"params": params, "opt_state": tx.init(params)}, setup.mesh)


def _student_variables(setup):
  sample = jnp.zeros((1, *setup.benchmark.input_shape), jnp.float32)
  return setup.model.init(jax.random.fold_in(setup.key("init"), 1), sample, train=False)


def test_meta_dmoe_aggregator_and_student_steps_trace_once(mdmoe):
  setup, _, feats = mdmoe
  tx = optax.adam(1e-3)
  bound = meta_dmoe.make_aggregator_step(setup, tx, feats)
  assert_traces_once(bound.jitted, bound, _aggregator_state(setup, feats, tx))
  v = _student_variables(setup)
  state = {
    "params": v["params"],
    "batch_stats": v["batch_stats"],
    "opt_state": tx.init(v["params"]),
  }
  bound = meta_dmoe.make_student_step(setup, tx)
  assert_traces_once(bound.jitted, bound, mesh_lib.replicate(state, setup.mesh))


def test_meta_dmoe_meta_step_and_adapt_trace_once(mdmoe):
  setup, _, feats = mdmoe
  tx_s, tx_a = optax.adam(1e-4), optax.adam(1e-5)
  v = _student_variables(setup)
  agg = _aggregator_state(setup, feats, tx_a)["params"]
  state = {
    "student": v["params"],
    "aggregator": agg,
    "batch_stats": v["batch_stats"],
    "opt_student": tx_s.init(v["params"]),
    "opt_aggregator": tx_a.init(agg),
  }
  bound = meta_dmoe.make_meta_step(setup, tx_s, tx_a, feats)
  state = assert_traces_once(bound.jitted, bound, mesh_lib.replicate(state, setup.mesh))

  adapt = meta_dmoe.make_adapt_fn(setup)
  k = setup.config.adapt.support_size
  tokens = jnp.swapaxes(feats[:, :k], 0, 1)
  student = state["student"]
  for i in range(STEPS):  # different support images, same shapes; the adapted params fed back
    xs = setup.x[i * k : (i + 1) * k]
    student = adapt(student, state["batch_stats"], state["aggregator"], xs, tokens)
  assert cache_size(adapt.jitted) == 1


# ----------------------------------------------------------------------------- Co-Tuning


def test_co_tuning_finetune_step_traces_once():
  config = configs_util.config_module("co_tuning").get_config("fmnist,tiny")
  config.num_devices = 1
  setup = co_tuning.make_setup(config)
  source = co_tuning.init_source(setup, optax.adam(1e-3))
  source = {"params": source["params"], "batch_stats": source["batch_stats"]}
  tx = co_tuning.make_optimizer(config)
  step = co_tuning.make_finetune_step(setup, tx)
  start = co_tuning.finetune_start(setup, source)
  opt_state = co_tuning.set_weight_decay(tx.init(start), 0.01)
  # As `co_tuning.finetune_variant` does: the state and the data replicated on the mesh.
  state = {"params": start, "batch_stats": source["batch_stats"], "opt_state": opt_state}
  state = jax.tree.map(jnp.copy, mesh_lib.replicate(state, setup.mesh))
  relationship = np.full((setup.num_target_classes, setup.num_source_classes), 0.25, np.float32)
  coefs = {k: np.float32(0.1) for k in ("trade_off", "l2sp_alpha", "l2sp_beta", "lr_scale")}
  arrays = jax.device_put(
    (setup.x_target, setup.y_target, relationship, source["params"]["backbone"], coefs),
    mesh_lib.replicated(setup.mesh),
  )
  assert_traces_once(step, lambda s, i: step(s, i, *arrays), state)


# ----------------------------------------------------------------------------- MUKA


def test_muka_student_step_traces_once():
  config = configs_util.config_module("muka").get_config("fmnist,tiny")
  config.num_devices = 1
  setup = muka.make_setup(config)
  tx = optax.adam(1e-3)
  state = muka.init_model(setup.student_model, setup.key("student_init"), setup.input_shape, tx)
  n, c = len(setup.train.y), len(setup.class_names)
  targets = np.full((n, c), 1.0 / c, np.float32)
  groups = np.repeat(np.arange(setup.num_teachers), [len(ch) for ch in setup.chunks])
  coefs = {"temperature": np.float32(1.0), "scale": np.float32(1.0)}
  arrays = jax.device_put(
    (targets, np.ones((n,), np.float32), groups.astype(np.int32), coefs),
    mesh_lib.replicated(setup.mesh),
  )
  step = muka.make_student_step(setup, tx)
  state = mesh_lib.replicate(state, setup.mesh)  # as `muka.run` does
  assert_traces_once(step, lambda s, i: step(s, i, setup.x_train, *arrays), state)


# ----------------------------------------------------------------------------- finetune / AdaMix


def test_finetune_train_step_and_predict_trace_once():
  # AdaMix: the harness's step with routing and the consistency pass (the single adapter's
  # step is the same builder without them).
  variant = "adamix"
  config = configs_util.config_module("adamix").get_config("vader,tiny")
  config.num_devices = 1
  setup = ft.make_setup(config)
  adapter = adamix.variant_adapter(config, variant)
  model = ft.build_model(setup, adapter)
  params = ft.init_params(setup, model, setup.key("init"), None)
  frozen, trainable = adapted.split_trainable(params, "adapters")
  tx = finetuning.make_optimizer(4, 1e-3, warmup_fraction=0.5, weight_decay=0.01)
  consistency = config.adamix.consistency_weight
  step = finetuning.make_train_step(
    model,
    tx,
    batch_size=config.train.batch_size,
    mesh=setup.mesh,
    loss=adamix.consistency_loss(consistency),
  )
  examples = setup.task.pooled("train", setup.task.domains)
  # As `train.finetuning.train` does: the state and the data replicated on the mesh.
  rep = mesh_lib.replicated(setup.mesh)
  arrays = jax.device_put((frozen, *examples.inputs, examples.labels), rep)
  trainable = jax.tree.map(jnp.copy, trainable)
  state = mesh_lib.replicate({"params": trainable, "opt_state": tx.init(trainable)}, setup.mesh)
  key = setup.key(variant)
  state = assert_traces_once(step, lambda s, i: step(s, i, key, *arrays), state)

  # Evaluation: every batch (the last one padded) of every call reuses one compilation.
  trained = adapted.join(arrays[0], state["params"])
  few = ft.Examples(tuple(a[:10] for a in examples.inputs), examples.labels[:10])  # 3 batches
  before = cache_size(evaluation._apply_batch)
  first = ft.predict_logits(model, trained, few, batch_size=4)
  after_first = cache_size(evaluation._apply_batch)
  again = ft.predict_logits(model, trained, few, batch_size=4, routing_key=jax.random.key(1))
  assert first.shape == again.shape == (10, setup.task.num_classes)
  assert cache_size(evaluation._apply_batch) == after_first and after_first - before <= 1
