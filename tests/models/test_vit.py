"""Tests of the ViT backbone: shapes, parameter count, validation, and that it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_adapt.models import adapters, vit


def test_default_vit_on_fashion_mnist_shapes_and_param_count():
  model = vit.vit_classifier(10)
  images = jnp.zeros((2, 28, 28, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  logits = jax.eval_shape(lambda p: model.apply({"params": p}, images), params)
  features = jax.eval_shape(lambda p: model.apply({"params": p}, images, method="features"), params)
  assert logits.shape == (2, 10) and features.shape == (2, 128)
  # By hand: patch conv 4·4·1·128 + 128; cls 128; positions (49 + 1)·128; per block two
  # LayerNorms 4·128, q/k/v/out 4·(128² + 128), FFN 128·256 + 256 + 256·128 + 128; final
  # LayerNorm 2·128; head 128·10 + 10.
  block = 4 * 128 + 4 * (128 * 128 + 128) + (128 * 256 + 256) + (256 * 128 + 128)
  expected = (16 * 128 + 128) + 128 + 50 * 128 + 4 * block + 2 * 128 + (128 * 10 + 10)
  assert adapters.count_params(params) == expected == 540_170
  assert set(params) == {"backbone", "head"}
  assert {f"block_{i}" for i in range(4)} <= set(params["backbone"])


def test_mean_pooling_has_no_class_token():
  model = vit.ViT(pool="mean", hidden_size=32, depth=1, num_heads=2, mlp_dim=64)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  assert "cls" not in params
  assert params["pos_embed"]["embedding"].shape == (1, 4, 32)


def test_grayscale_without_channel_axis_is_accepted():
  model = vit.ViT(hidden_size=16, depth=1, num_heads=2, mlp_dim=32)
  params = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))["params"]
  x = np.random.default_rng(0).uniform(size=(2, 8, 8)).astype(np.float32)
  np.testing.assert_array_equal(
    model.apply({"params": params}, x), model.apply({"params": params}, x[..., None])
  )


def test_invalid_options_and_inputs():
  with pytest.raises(ValueError, match="pool='max' is unknown; accepted: cls, mean"):
    vit.ViT(pool="max")
  with pytest.raises(ValueError, match="hidden_size=30 must be divisible by num_heads=4"):
    vit.ViT(hidden_size=30)
  with pytest.raises(ValueError, match="depth=0 is invalid"):
    vit.ViT(depth=0)
  with pytest.raises(ValueError, match=r"multiples of patch_size=4; got shape \(1, 30, 30, 1\)"):
    jax.eval_shape(vit.ViT().init, jax.random.key(0), jnp.zeros((1, 30, 30, 1)))


def test_small_vit_learns_a_simple_image_task():
  """Bright top half vs bright bottom half: a few Adam steps fit it perfectly."""
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 0.3, (32, 8, 8, 1)).astype(np.float32)
  y = np.arange(32) % 2
  x[y == 0, :4] += 0.7
  x[y == 1, 4:] += 0.7
  model = vit.vit_classifier(2, hidden_size=16, depth=1, num_heads=2, mlp_dim=32)
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.adam(3e-3)

  def loss_fn(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  state = tx.init(params)
  first = None
  for _ in range(60):
    params, state, loss = step(params, state)
    first = loss if first is None else first
  accuracy = (model.apply({"params": params}, x).argmax(-1) == y).mean()
  assert loss < 0.2 * first and accuracy == 1.0
