"""`model.dtype='bfloat16'`: bf16 compute, float32 parameters, optimiser state and losses.

For Meta-DMoE (ConvNet experts/student, transformer aggregator) and the fine-tuning harness
(BERT encoder with AdaMix adapters, as adamix and adapter_soup use it): the bf16 model gives
logits close to the float32 model's on the same parameters, one training step gives a finite
float32 loss and leaves every parameter and optimiser-state leaf float32, and a bad value is
one ValueError naming the field.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_adapt import models
from moe_adapt.methods import adamix, meta_dmoe
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.models import adapted
from moe_adapt.train import finetuning
from moe_adapt.train import mesh as mesh_lib
from tests.methods import configs_util

MDMOE = configs_util.config_module("meta_dmoe")
ADAMIX = configs_util.config_module("adamix")


def _float_dtypes(tree) -> set:
  return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("module, arg", [(MDMOE, "digits_rot,tiny"), (ADAMIX, "vader,tiny")])
def test_bad_dtype_is_one_clear_error(module, arg):
  config = module.get_config(arg)
  config.model.dtype = "float16"
  validate = meta_dmoe.validate_config if module is MDMOE else adamix.validate_config
  with pytest.raises(ValueError, match=r"model\.dtype='float16' is unknown; accepted: float32, "):
    validate(config)


def test_presets_default_to_float32_and_the_accelerator_preset_to_bfloat16():
  assert MDMOE.get_config("digits_rot").model.dtype == "float32"
  assert ADAMIX.get_config("vader").model.dtype == "float32"
  assert MDMOE.get_config("tfds").model.dtype == "bfloat16"


@pytest.mark.slow
def test_meta_dmoe_bfloat16_logits_and_meta_step():
  config = MDMOE.get_config("digits_rot,tiny")
  config.num_devices = 1
  setup32 = meta_dmoe.make_setup(config)
  config16 = config.copy_and_resolve_references()
  config16.model.dtype = "bfloat16"
  setup = meta_dmoe.make_setup(config16)

  tx = optax.adam(1e-3)
  experts = mesh_lib.replicate(meta_dmoe.init_experts(setup, tx), setup.mesh)
  x = setup.x[:16]
  variables = jax.tree.map(lambda a: a[0], {k: experts[k] for k in ("params", "batch_stats")})
  logits16 = setup.model.apply(variables, x, train=False)
  logits32 = setup32.model.apply(variables, x, train=False)
  assert logits16.dtype == jnp.float32  # the head computes in float32
  feats = setup.model.apply(variables, x, train=False, method=models.Classifier.features)
  assert feats.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(logits32)))
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale + 1e-3)

  feats = meta_dmoe.expert_features(setup, experts, np.asarray(setup.x))
  tx_s, tx_a = optax.adam(1e-4), optax.adam(1e-5)
  sample = jnp.zeros((1, *setup.benchmark.input_shape), jnp.float32)
  student = setup.model.init(jax.random.key(1), sample, train=False)
  tokens = jnp.zeros((1, setup.num_experts, feats.shape[-1]), jnp.float32)
  agg = setup.agg_model.init(jax.random.key(2), tokens)["params"]
  state = {
    "student": student["params"],
    "aggregator": agg,
    "batch_stats": student["batch_stats"],
    "opt_student": tx_s.init(student["params"]),
    "opt_aggregator": tx_a.init(agg),
  }
  step = meta_dmoe.make_meta_step(setup, tx_s, tx_a, feats)
  new, metrics = step(mesh_lib.replicate(state, setup.mesh), jnp.int32(0))
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
  assert np.isfinite(float(metrics["grad_norm_aggregator"]))
  assert _float_dtypes(new) == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_finetune_bfloat16_logits_and_train_step():
  config = ADAMIX.get_config("vader,tiny")
  config.num_devices = 1
  setup32 = ft.make_setup(config)
  config16 = config.copy_and_resolve_references()
  config16.model.dtype = "bfloat16"
  setup = ft.make_setup(config16)
  adapter = adamix.variant_adapter(config16, "adamix")
  model, model32 = ft.build_model(setup, adapter), ft.build_model(setup32, adapter)
  params = ft.init_params(setup, model, setup.key("init"), None)
  assert _float_dtypes(params) == {jnp.dtype(jnp.float32)}
  examples = setup.task.pooled("train", setup.task.domains)
  inputs = [jnp.asarray(a[:8]) for a in examples.inputs]
  logits16 = model.apply({"params": params}, *inputs, train=False)
  logits32 = model32.apply({"params": params}, *inputs, train=False)
  assert logits16.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(logits32)))
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale + 1e-3)

  frozen, trainable = adapted.split_trainable(params, "adapters")
  # No warm-up: the first step's learning rate is not 0, so the step must move the params.
  tx = finetuning.make_optimizer(4, 1e-3, warmup_fraction=0.0, weight_decay=0.01)
  step = finetuning.make_train_step(
    model,
    tx,
    batch_size=config16.train.batch_size,
    mesh=setup.mesh,
    loss=adamix.consistency_loss(1.0),
  )
  state = {"params": jax.tree.map(jnp.copy, trainable), "opt_state": tx.init(trainable)}
  new, metrics = step(
    state, jnp.int32(0), setup.key("t"), frozen, *examples.inputs, examples.labels
  )
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
  assert np.isfinite(float(metrics["consistency"]))
  assert _float_dtypes(new) == {jnp.dtype(jnp.float32)}
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new["params"], trainable)
  assert any(jax.tree.leaves(changed))
