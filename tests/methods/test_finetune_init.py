"""`model.init`: the adapter harness (finetune, AdaMix, soups) starts its text encoder from a
Hugging Face checkpoint directory (tests/models/fixtures/hf)."""

import pathlib

import jax
import numpy as np
import pytest

from moe_adapt.methods import adapter_harness as ft
from moe_adapt.models import checkpoints
from tests.methods import configs_util

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "models" / "fixtures" / "hf"
CONFIGS = configs_util.config_module("finetune")


def fake_text_task(max_id: int) -> ft.Task:
  ids = np.random.default_rng(0).integers(1, max_id + 1, (6, 8)).astype(np.int32)
  ids[0, 0] = max_id
  examples = ft.Examples((ids, np.ones_like(ids)), np.array([0, 1] * 3, np.int32))
  split = {"tweets": examples, "movies": examples}
  return ft.Task(
    benchmark="vader_sentiment",
    modality="text",
    domains=("tweets", "movies"),
    class_names=("negative", "positive"),
    default_targets=("movies",),
    train=split,
    val=split,
    test=split,
  )


def config_with_init(init):
  config = CONFIGS.get_config("vader,tiny")
  config.model.init = str(init)
  config.data.target_domains = ("movies",)
  config.num_devices = 1
  return config


def test_encoder_starts_from_the_checkpoint(monkeypatch):
  monkeypatch.setattr(ft, "load_task", lambda config: fake_text_task(63))
  for name in ("bert", "distilbert"):
    setup = ft.make_setup(config_with_init(FIXTURES / name))
    ckpt = checkpoints.load_checkpoint(FIXTURES / name)
    assert setup.backbone_config == ckpt.module.config
    model = ft.build_model(setup, ft.adapter_config(setup.config, "lora"))
    params = ft.init_params(setup, model, setup.key("init"), setup.pretrained)
    # The encoder's backbone leaves are the checkpoint's (its pooler is unused: mean pooling).
    kernel = params["encoder"]["layer_1"]["attention"]["query"]["kernel"]
    np.testing.assert_array_equal(kernel, ckpt.params["layer_1"]["attention"]["query"]["kernel"])
    assert "lora_a" in params["encoder"]["layer_1"]["attention"]["query"]
    examples = setup.task.pooled("train", setup.task.domains)
    logits = model.apply({"params": params}, *examples.inputs)
    assert logits.shape == (12, 2) and bool(jax.numpy.all(jax.numpy.isfinite(logits)))


def test_checkpoints_that_do_not_fit_are_refused(monkeypatch):
  monkeypatch.setattr(ft, "load_task", lambda config: fake_text_task(64))
  with pytest.raises(ValueError, match=r"vocab_size=64, but the benchmark's token ids reach 64"):
    ft.make_setup(config_with_init(FIXTURES / "bert"))
  with pytest.raises(ValueError, match=r"holds a 'roberta' checkpoint; accepted for text"):
    ft.make_setup(config_with_init(FIXTURES / "roberta"))
  with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
    ft.make_setup(config_with_init(FIXTURES))
