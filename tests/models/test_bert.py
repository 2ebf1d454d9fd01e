"""Tests of the BERT encoder: HF weight loading, forward math, padding, errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.models import bert

TINY = bert.BertConfig(
  vocab_size=50,
  hidden_size=16,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=32,
  max_position_embeddings=24,
  type_vocab_size=2,
  layer_norm_eps=1e-12,
)


def random_state_dict(config, seed=0, *, pooler=True):
  """An HF-named state dict with random tensors of the right shapes."""
  rng = np.random.default_rng(seed)
  out = {
    name: rng.normal(0.0, 0.3, shape).astype(np.float32)
    for name, (_, shape, _) in bert.hf_weight_map(config, add_pooler=pooler).items()
  }
  out["embeddings.position_ids"] = np.arange(config.max_position_embeddings)[None]
  return out


def _erf(x):
  return np.vectorize(math.erf)(x)


def numpy_bert(sd, config, ids, mask):
  """HF BertModel forward written directly from the state dict (no shared code)."""

  def linear(x, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

  def layer_norm(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + config.layer_norm_eps) * sd[f"{name}.weight"] + sd[
      f"{name}.bias"
    ]

  b, t = ids.shape
  h = config.num_attention_heads
  dh = config.hidden_size // h
  x = (
    sd["embeddings.word_embeddings.weight"][ids]
    + sd["embeddings.position_embeddings.weight"][np.arange(t)][None]
    + sd["embeddings.token_type_embeddings.weight"][np.zeros_like(ids)]
  )
  x = layer_norm(x, "embeddings.LayerNorm")
  bias = (1.0 - mask[:, None, None, :]) * -1e30
  for n in range(config.num_hidden_layers):
    p = f"encoder.layer.{n}"

    def heads(y):
      return y.reshape(b, t, h, dh).transpose(0, 2, 1, 3)

    q, k, v = (heads(linear(x, f"{p}.attention.self.{w}")) for w in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + bias
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
    x = layer_norm(
      x + linear(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm"
    )
    inter = linear(x, f"{p}.intermediate.dense")
    inter = 0.5 * inter * (1.0 + _erf(inter / np.sqrt(2.0)))
    x = layer_norm(x + linear(inter, f"{p}.output.dense"), f"{p}.output.LayerNorm")
  pooled = np.tanh(linear(x[:, 0], "pooler.dense"))
  return x, pooled


@pytest.fixture(scope="module")
def loaded():
  sd = random_state_dict(TINY)
  params = bert.load_hf_weights(TINY, sd)
  model = bert.BertEncoder(TINY)
  apply = lambda p, i, m: model.apply({"params": p}, i, m)  # eager: cheaper than compiling
  return sd, params, apply


def test_loaded_tree_matches_initialised_model(loaded):
  _, params, _ = loaded
  model = bert.BertEncoder(TINY)
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda x: x.shape, init)


def test_forward_matches_numpy_reference(loaded):
  sd, params, apply = loaded
  rng = np.random.default_rng(1)
  ids = rng.integers(0, TINY.vocab_size, (3, 7)).astype(np.int32)
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], np.int32)
  out = apply(params, ids, mask)
  ref_hidden, ref_pooled = numpy_bert(sd, TINY, ids, mask)
  assert out.hidden.shape == (3, 7, 16) and out.pooled.shape == (3, 16)
  np.testing.assert_allclose(out.hidden, ref_hidden, atol=2e-5)
  np.testing.assert_allclose(out.pooled, ref_pooled, atol=2e-5)


def test_padding_does_not_change_mean_pooled_output(loaded):
  _, params, apply = loaded
  rng = np.random.default_rng(2)
  ids = rng.integers(1, TINY.vocab_size, (3, 7)).astype(np.int32)
  mask = np.ones((3, 7), np.int32)
  # The same sentences padded to 12 tokens with arbitrary (not just [PAD]) ids.
  ids_padded = np.concatenate([ids, rng.integers(0, TINY.vocab_size, (3, 5))], 1).astype(np.int32)
  mask_padded = np.concatenate([mask, np.zeros((3, 5), np.int32)], 1)
  short = bert.mean_pool(apply(params, ids, mask).hidden, mask)
  padded_out = apply(params, ids_padded, mask_padded)
  padded = bert.mean_pool(padded_out.hidden, mask_padded)
  np.testing.assert_allclose(padded, short, atol=1e-5)
  np.testing.assert_allclose(padded_out.hidden[:, :7], apply(params, ids, mask).hidden, atol=1e-5)


def test_mean_pool_and_l2_normalize():
  rng = np.random.default_rng(3)
  hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.int32)
  pooled = np.asarray(bert.mean_pool(jnp.asarray(hidden), jnp.asarray(mask)))
  np.testing.assert_allclose(pooled[0], hidden[0, :2].mean(0), rtol=1e-6)
  np.testing.assert_allclose(pooled[1], hidden[1].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(pooled[2], np.zeros(4))  # all padding: zeros, not NaN
  normed = np.asarray(bert.l2_normalize(jnp.asarray(pooled[:2])))
  np.testing.assert_allclose(np.linalg.norm(normed, axis=-1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="mean_pool needs"):
    bert.mean_pool(jnp.asarray(hidden), jnp.asarray(mask[:, :3]))


def test_load_ignores_position_ids_and_strips_prefix():
  sd = random_state_dict(TINY)
  prefixed = {f"bert.{k}": v for k, v in sd.items()}
  a = bert.load_hf_weights(TINY, sd)
  b = bert.load_hf_weights(TINY, prefixed, prefix="bert.")
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))
  # Kernels are the transposed HF weights.
  np.testing.assert_array_equal(
    a["layer_1"]["mlp_in"]["kernel"], sd["encoder.layer.1.intermediate.dense.weight"].T
  )


def test_without_pooler_pooler_tensors_are_ignored():
  params = bert.load_hf_weights(TINY, random_state_dict(TINY), add_pooler=False)
  assert "pooler" not in params
  model = bert.BertEncoder(TINY, add_pooler=False)
  out = jax.eval_shape(model.apply, {"params": params}, jnp.ones((1, 3), jnp.int32))
  assert out.pooled is None and out.hidden.shape == (1, 3, 16)


def test_one_error_lists_missing_unexpected_and_mismatched():
  sd = random_state_dict(TINY)
  del sd["encoder.layer.1.attention.self.key.bias"]
  sd["classifier.weight"] = np.zeros((2, 16), np.float32)
  sd["encoder.layer.0.output.dense.weight"] = np.zeros((16, 31), np.float32)
  with pytest.raises(bert.WeightLoadError) as info:
    bert.load_hf_weights(TINY, sd)
  message = str(info.value)
  assert "missing tensors (1)" in message
  assert "encoder.layer.1.attention.self.key.bias" in message
  assert "unexpected tensors (1)" in message and "classifier.weight" in message
  assert "shape mismatches (1)" in message
  assert "encoder.layer.0.output.dense.weight: checkpoint (16, 31), config expects (16, 32)" in (
    message
  )
  assert isinstance(info.value, ValueError)


def test_wrong_config_reports_every_bad_layer():
  sd = random_state_dict(TINY)
  three_layers = bert.BertConfig(**{**TINY.__dict__, "num_hidden_layers": 3})
  with pytest.raises(bert.WeightLoadError, match=r"missing tensors \(16\)"):
    bert.load_hf_weights(three_layers, sd)


def test_config_from_hf_dict():
  hf = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
    "use_cache": True,
  }
  config = bert.BertConfig.from_dict(hf)
  assert config.hidden_size == 384 and config.activation == "gelu"
  assert bert.BertConfig.from_dict({**hf, "model_type": "roberta"}).model_type == "roberta"
  with pytest.raises(ValueError, match="model_type='gpt2' is unsupported; accepted: bert, rob"):
    bert.BertConfig.from_dict({**hf, "model_type": "gpt2"})
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
    bert.BertConfig.from_dict({**hf, "position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="hidden_size=384 must be divisible by"):
    bert.BertConfig.from_dict({**hf, "num_attention_heads": 5})
  with pytest.raises(ValueError, match="hidden_act='swish' is unsupported"):
    bert.BertConfig.from_dict({**hf, "hidden_act": "swish"})


def test_encoder_input_validation(loaded):
  _, params, _ = loaded
  apply = functools.partial(bert.BertEncoder(TINY).apply, {"params": params})
  with pytest.raises(ValueError, match="token_ids must be"):
    jax.eval_shape(apply, jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match="max_position_embeddings=24"):
    jax.eval_shape(apply, jnp.ones((1, 25), jnp.int32))
  with pytest.raises(ValueError, match="attention_mask shape"):
    jax.eval_shape(apply, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))


def test_dropout_is_active_only_when_training(loaded):
  _, params, apply = loaded
  model = bert.BertEncoder(TINY)
  ids = jnp.ones((3, 7), jnp.int32)
  mask = jnp.ones((3, 7), jnp.int32)

  def train(p, key):
    return model.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": key}).hidden

  a, b = train(params, jax.random.key(0)), train(params, jax.random.key(1))
  assert not np.allclose(a, apply(params, ids, mask).hidden)
  assert not np.allclose(a, b)
