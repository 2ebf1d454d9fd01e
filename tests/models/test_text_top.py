"""Tests of moe_adapt.models.text_top: the top layer(s) of a BERT on cached hidden states.

Checked: on the states of layer 0 of the tiny random BERT (`encoders.hidden_states`), the
module with that BERT's layer 1 gives the whole encoder's mean-pooled output
(`encoders.encode`); initialised from MiniLM's checkpoint (`weights`), its parameters are
MiniLM's layer 5 and its features on MiniLM's layer-4 states are all-MiniLM-L6-v2's sentence
embeddings; sizes that do not match the checkpoint are rejected naming the parameter.
"""

import jax
import numpy as np
import pytest

from moe_adapt import models
from moe_adapt.data import fetch
from moe_adapt.models import encoders, text_top
from tests import data_util


def tokens(vocab: int, n: int = 6, length: int = 12, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, vocab, size=(n, length)).astype(np.int32)
  lengths = rng.integers(3, length + 1, size=n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return ids * mask, mask


def inputs(name: str, ids, mask, *, frozen: int, minilm_dir=None) -> np.ndarray:
  hidden = encoders.hidden_states(name, minilm_dir, ids, mask, num_layers=frozen, batch_size=4)
  return np.concatenate([hidden, mask[..., None].astype(np.float32)], axis=-1)


def test_top_layer_on_cached_states_is_the_whole_encoder():
  config, params, _ = encoders.load("tiny_random")
  ids, mask = tokens(config.vocab_size)
  x = inputs("tiny_random", ids, mask, frozen=1)
  assert x.shape == (6, 12, 33)
  backbone = models.get_backbone("text_top", num_heads=2, mlp_dim=64, first_layer=1)
  variables = jax.jit(backbone.init)(jax.random.key(0), x[:1])
  assert jax.tree.structure(variables["params"]["layer_0"]) == jax.tree.structure(params["layer_1"])
  features = backbone.apply({"params": {"layer_0": params["layer_1"]}}, x, train=True)
  expected = encoders.encode("tiny_random", None, ids, mask, batch_size=4)
  np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)


def test_bad_input_rank_is_rejected():
  backbone = text_top.TextTop(num_heads=2, mlp_dim=64)
  with pytest.raises(ValueError, match=r"input must be \[B, T, D \+ 1\]"):
    backbone.init(jax.random.key(0), np.zeros((2, 33), np.float32))


@pytest.fixture(scope="module")
def minilm_dir():
  data_util.require_archive("minilm")  # fetched by the session start; missing = a failure
  return str(fetch.minilm_dir())


def test_minilm_initialisation_gives_the_sentence_embeddings(minilm_dir):
  config, params, _ = encoders.load(minilm_dir)
  ids, mask = tokens(config.vocab_size, n=3)
  x = inputs(minilm_dir, ids, mask, frozen=5)
  backbone = models.get_backbone("text_top", weights=minilm_dir, first_layer=5)
  variables = jax.jit(backbone.init)(jax.random.key(0), x[:1])
  for got, want in zip(
    jax.tree.leaves(variables["params"]["layer_0"]), jax.tree.leaves(params["layer_5"])
  ):
    np.testing.assert_array_equal(got, want)
  features = jax.jit(backbone.apply)(variables, x)
  expected = encoders.encode(minilm_dir, None, ids, mask, batch_size=4)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
  # Sizes the checkpoint does not have: the first mismatched parameter is named.
  wrong = models.get_backbone("text_top", weights=minilm_dir, first_layer=5, mlp_dim=64)
  with pytest.raises(ValueError, match=r"layer_5/mlp_in/bias has shape \(1536,\).*\(64,\)"):
    wrong.init(jax.random.key(0), x[:1])
  too_deep = models.get_backbone("text_top", weights=minilm_dir, first_layer=5, num_layers=2)
  with pytest.raises(ValueError, match=r"first_layer=5 \+ num_layers=2 exceeds the 6 layers"):
    too_deep.init(jax.random.key(0), x[:1])
