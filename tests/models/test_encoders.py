"""Tests of moe_adapt.models.encoders: the frozen sentence encoders of the `embedded` benchmark."""

import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.models import encoders


def test_tiny_random_encoder_is_fixed():
  _, a, sha_a = encoders.load("tiny_random")
  _, b, sha_b = encoders.load("tiny_random")
  assert sha_a == sha_b and len(sha_a) == 64
  np.testing.assert_array_equal(
    a["embeddings"]["word_embeddings"]["embedding"], b["embeddings"]["word_embeddings"]["embedding"]
  )


def test_encode_pads_the_last_batch_and_cuts_it_off():
  config, params, _ = encoders.load("tiny_random")
  ids = np.random.default_rng(0).integers(5, 400, size=(7, 8)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[3, 5:] = 0
  out = encoders.embed(config, params, ids, mask, batch_size=4, progress=False)
  one = encoders.embed(config, params, ids, mask, batch_size=7, progress=False)
  assert out.shape == (7, 32) and out.dtype == np.float32
  np.testing.assert_allclose(out, one, rtol=1e-5, atol=1e-6)
  # Padding positions do not count: row 3 equals its unpadded 5 tokens.
  short = encoders.embed(config, params, ids[3:4, :5], mask[3:4, :5], batch_size=1)
  np.testing.assert_allclose(out[3], short[0], rtol=1e-4, atol=1e-5)
  assert jnp.asarray(out).shape == (7, 32)


def test_plan_reads_the_width_without_weights():
  assert encoders.plan("tiny_random") == (32, 30522)


def test_minilm_needs_its_directory():
  with pytest.raises(ValueError, match=r"^minilm_dir=None is invalid for encoder='minilm'"):
    encoders.plan("minilm")
