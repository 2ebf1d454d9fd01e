"""Paired variants: the compared variants of one run share data order, init and random streams.

For fine-tuning and AdaMix (`adapter_harness.variant_key`), co_tuning and muka (one training key
and one starting state for every variant). Everything runs in-process on 1 device with a
1-block ViT without dropout (its random bits make a step compile ~10x slower on CPU), so
no test here trains more than one step; that the dropout and routing streams are shared
follows from the shared key, which `test_run_trains_every_variant_with_the_shared_key`
checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.methods import adamix, finetune
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.models import adapted
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import finetuning
from tests.methods import configs_util

CONFIGS = configs_util.config_module("adamix")


def _config(**overrides):
  small = {"model.options.depth": 1, "num_devices": 1, "model.dropout": 0.0}
  return configs_util.with_overrides(CONFIGS.get_config("digits,tiny"), **{**small, **overrides})


@pytest.fixture(scope="module")
def setup():
  return ft.make_setup(_config())


@pytest.fixture(scope="module")
def backbone(setup):
  model = ft.build_model(setup, adapters_lib.AdapterConfig())
  return ft.backbone_of(setup, ft.init_params(setup, model, jax.random.key(7), None))


def _init(setup, backbone, name):
  model = ft.build_model(setup, adamix.variant_adapter(setup.config, name))
  return model, ft.init_params(setup, model, setup.key("init"), backbone)


def test_every_variant_starts_from_the_same_head_and_backbone(setup, backbone):
  _, first = _init(setup, backbone, "adapter")
  for name in adamix.VARIANTS:
    _, params = _init(setup, backbone, name)
    jax.tree.map(
      np.testing.assert_array_equal, params[adapters_lib.HEAD_KEY], first[adapters_lib.HEAD_KEY]
    )
    jax.tree.map(np.testing.assert_array_equal, ft.backbone_of(setup, params), backbone)


def _step_ce(setup, model, params, train_mode, key, step=3):
  """The CE of step `step` of `make_train_step` (batch and dropout drawn from `key`)."""
  tx = finetuning.make_optimizer(10, 1e-3, warmup_fraction=0.0, weight_decay=0.0)
  frozen, trainable = adapted.split_trainable(params, train_mode)
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates its state
  state = {"params": trainable, "opt_state": jax.jit(tx.init)(trainable)}
  fn = finetuning.make_train_step(model, tx, batch_size=8, mesh=setup.mesh)
  examples = setup.task.train["rot0"]
  _, metrics = fn(state, jnp.int32(step), key, frozen, *examples.inputs, examples.labels)
  return float(metrics["ce"])


@pytest.mark.slow
def test_the_shared_key_gives_the_same_batches(setup, backbone):
  # LoRA (B = 0), routed LoRA mixtures (B = 0) and plain full fine-tuning all start as the
  # backbone + head exactly, so their losses at a step agree iff they see the same batch.
  key = ft.variant_key(setup)
  ces = {
    name: _step_ce(setup, *_init(setup, backbone, name), adamix.VARIANTS[name].train_mode, key)
    for name in ("lora", "adamix_lora", "full")
  }
  assert ces["adamix_lora"] == pytest.approx(ces["lora"], abs=1e-5)
  assert ces["full"] == pytest.approx(ces["lora"], abs=1e-5)
  other = _step_ce(setup, *_init(setup, backbone, "lora"), "adapters", jax.random.key(123))
  assert other != pytest.approx(ces["lora"], abs=1e-5)


@pytest.mark.parametrize("method", ["adamix", "finetune"])
def test_run_trains_every_variant_with_the_shared_key(
  setup, backbone, method, tmp_path, monkeypatch
):
  module = adamix if method == "adamix" else finetune
  config = _config() if method == "adamix" else _finetune_config()
  run_setup = setup if method == "adamix" else ft.make_setup(config)
  calls = {}

  def fake_train(s, workdir, writer, *, stage, params, key=None, **kwargs):
    calls[stage] = (key, params)
    return ft.Trained(params, 0.0)

  def fake_eval(s, model, params, domains, **kwargs):
    outcomes = {d: {"correct": [1], "pred": [0], "label": [0]} for d in domains}
    metrics = {d: {"accuracy": 1.0} for d in (*domains, "mean")}
    return metrics, outcomes

  monkeypatch.setattr(ft, "pretrained_backbone", lambda s, workdir, writer: backbone)
  monkeypatch.setattr(ft, "train", fake_train)
  monkeypatch.setattr(ft, "evaluate_outcomes", fake_eval)
  monkeypatch.setattr(adamix, "evaluate_mixture", _fake_mixture_eval(fake_eval))
  module.run(config, str(tmp_path), setup=run_setup)
  assert sorted(calls) == sorted(config.variants)
  key = jax.random.key_data(ft.variant_key(run_setup))
  heads = []
  for stage_key, params in calls.values():
    assert stage_key is not None
    np.testing.assert_array_equal(jax.random.key_data(stage_key), key)
    heads.append(params[adapters_lib.HEAD_KEY])
  for head in heads[1:]:
    jax.tree.map(np.testing.assert_array_equal, head, heads[0])


def _finetune_config():
  small = {"model.options.depth": 1, "num_devices": 1, "model.dropout": 0.0}
  config = configs_util.config_module("finetune").get_config("digits,tiny")
  return configs_util.with_overrides(config, **small)


def _fake_mixture_eval(fake_eval):
  def evaluate_mixture(s, adapter, params, domains, *, key):
    metrics, outcomes = fake_eval(s, None, params, domains)
    return {
      "merged": metrics,
      "fixed": metrics,
      "random": metrics,
      "spread": [1.0],
      "per_example": {"merged": outcomes, "fixed": outcomes},
    }

  return evaluate_mixture
