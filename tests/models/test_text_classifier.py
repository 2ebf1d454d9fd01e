"""Tests of TextClassifier: pooling, loading a pretrained encoder beside new adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.models import adapters, bert, text_classifier

TINY = bert.BertConfig(
  vocab_size=40,
  hidden_size=8,
  num_hidden_layers=1,
  num_attention_heads=2,
  intermediate_size=16,
  max_position_embeddings=12,
)
IDS = jnp.asarray([[5, 6, 7, 8, 0], [9, 10, 0, 0, 0]], jnp.int32)
MASK = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], jnp.int32)


def hf_state_dict(seed=0):
  rng = np.random.default_rng(seed)
  return {
    name: rng.normal(0, 0.3, shape).astype(np.float32)
    for name, (_, shape, _) in bert.hf_weight_map(TINY).items()
  }


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_pooling_choices(pooling):
  model = text_classifier.TextClassifier(TINY, 3, pooling=pooling)
  params = model.init(jax.random.key(0), IDS, MASK)["params"]
  assert ("pooler" in params["encoder"]) == (pooling == "pooler")
  features = model.apply({"params": params}, IDS, MASK, method="features")
  encoder = bert.BertEncoder(TINY, add_pooler=pooling == "pooler")
  out = encoder.apply({"params": params["encoder"]}, IDS, MASK)
  expected = {
    "mean": lambda: bert.mean_pool(out.hidden, MASK),
    "cls": lambda: out.hidden[:, 0],
    "pooler": lambda: out.pooled,
  }[pooling]()
  np.testing.assert_allclose(features, expected, atol=1e-6)
  logits = model.apply({"params": params}, IDS, MASK)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32


def test_with_pretrained_encoder_keeps_adapters_and_head():
  model = text_classifier.TextClassifier(
    TINY, 3, adapter=adapters.AdapterConfig("houlsby", bottleneck=4)
  )
  params = model.init(jax.random.key(0), IDS, MASK)["params"]
  pretrained = bert.load_hf_weights(TINY, hf_state_dict())
  loaded = text_classifier.with_pretrained_encoder(params, pretrained)
  backbone, adapter_tree = adapters.split_params(loaded["encoder"])
  _, init_adapters = adapters.split_params(params["encoder"])
  assert loaded["head"] is params["head"]
  assert jax.tree.all(jax.tree.map(lambda a, b: a is b, adapter_tree, init_adapters))
  # The pooler is dropped: mean pooling has none.
  assert "pooler" in pretrained and "pooler" not in backbone
  np.testing.assert_array_equal(
    backbone["layer_0"]["attention"]["query"]["kernel"],
    pretrained["layer_0"]["attention"]["query"]["kernel"],
  )


def test_with_pretrained_encoder_rejects_a_different_architecture():
  model = text_classifier.TextClassifier(TINY, 3)
  params = jax.eval_shape(model.init, jax.random.key(0), IDS, MASK)["params"]
  wider = bert.BertConfig(**{**TINY.__dict__, "intermediate_size": 24})
  rng = np.random.default_rng(0)
  pretrained = bert.load_hf_weights(
    wider,
    {
      n: rng.normal(size=s).astype(np.float32) for n, (_, s, _) in bert.hf_weight_map(wider).items()
    },
  )
  with pytest.raises(ValueError, match=r"/layer_0/mlp_in/bias: model \(16,\), given \(24,\)"):
    text_classifier.with_pretrained_encoder(params, pretrained)


def test_invalid_options():
  with pytest.raises(ValueError, match="pooling='max' is unknown; accepted: mean, cls, pooler"):
    text_classifier.TextClassifier(TINY, 3, pooling="max")
  with pytest.raises(ValueError, match="num_classes=0 must be an int >= 1"):
    text_classifier.TextClassifier(TINY, 0)
