"""Shared pieces of the MUKA tests: the tiny config and untrained teachers."""

from __future__ import annotations

import jax
import ml_collections
import optax

from moe_adapt.methods import muka
from tests.methods import configs_util

# The variants a MUKA run trains a student for (results.json's metric keys besides teachers).
TRAINED = ("muki", "hard", "no_margin", "single_pass", "vanilla_kd", "uhc", "oracle")

CONFIGS = configs_util.config_module("muka")


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The tiny config with dotted-key overrides, e.g. `**{"teachers.num_teachers": 4}`."""
  return configs_util.with_overrides(CONFIGS.get_config("fmnist,tiny"), **overrides)


def untrained_teachers(setup: muka.Setup) -> list[dict]:
  """One {'params', 'batch_stats'} per teacher, freshly initialised (scores computed from
  them are well-formed, not meaningful)."""
  tx = optax.adam(1e-3)
  teachers = []
  for k, model in enumerate(setup.teacher_models):
    state = muka.init_model(model, jax.random.key(k), setup.input_shape, tx)
    teachers.append({"params": state["params"], "batch_stats": state["batch_stats"]})
  return teachers
