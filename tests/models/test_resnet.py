"""Tests for the ResNet backbones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moe_adapt.models import (
  BasicBlock,
  Bottleneck,
  ResNet,
  ResNet18,
  ResNet34,
  ResNet50,
  count_params,
)

KEY = jax.random.key(0)
EPS = 1e-5


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _fake_init(model, *args, seed=0, **kwargs):
  """model.init's variables filled with NumPy random values (no PRNG compilation)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(model.init, **kwargs), KEY, *args)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, s.shape)
    else:  # bias, mean
      value = rng.normal(size=s.shape) * 0.1
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _np_conv(x, kernel, stride):
  """Reference k×k convolution with padding k // 2: x [B, H, W, C], kernel [k, k, C, O]."""
  k = kernel.shape[0]
  pad = k // 2
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  out = np.zeros((b, ho, wo, kernel.shape[-1]))
  for i in range(k):
    for j in range(k):
      patch = xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
      out += patch @ kernel[i, j]
  return out


def _np_bn(x, params, stats):
  return (x - stats["mean"]) / np.sqrt(stats["var"] + EPS) * params["scale"] + params["bias"]


def _np_block(variables, x, strides, convs):
  """Reference residual block (eval mode): convs = [(name, bn name, stride)], ReLU between."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  s = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
  x = np.asarray(x, np.float64)
  y = x
  for n, (conv, bn, stride) in enumerate(convs):
    y = _np_bn(_np_conv(y, p[conv]["kernel"], stride), p[bn], s[bn])
    if n < len(convs) - 1:
      y = np.maximum(y, 0)
  shortcut = x
  if "proj_conv" in p:
    shortcut = _np_bn(_np_conv(x, p["proj_conv"]["kernel"], strides), p["proj_bn"], s["proj_bn"])
  return np.maximum(shortcut + y, 0)


@pytest.mark.parametrize("strides, in_ch, filters", [(2, 3, 4), (1, 4, 4)])
def test_basic_block_matches_numpy_reference(strides, in_ch, filters):
  block = BasicBlock(filters=filters, strides=strides)
  x = _images((2, 8, 8, in_ch))
  variables = _fake_init(block, x)
  assert ("proj_conv" in variables["params"]) == (strides != 1 or in_ch != filters)
  out = block.apply(variables, x)
  convs = [("conv1", "bn1", strides), ("conv2", "bn2", 1)]
  np.testing.assert_allclose(out, _np_block(variables, x, strides, convs), rtol=1e-4, atol=1e-5)


def test_bottleneck_matches_numpy_reference():
  block = Bottleneck(filters=2, strides=2)
  x = _images((2, 8, 8, 3))
  variables = _fake_init(block, x)
  out = block.apply(variables, x)
  assert out.shape == (2, 4, 4, 8)
  convs = [("conv1", "bn1", 1), ("conv2", "bn2", 2), ("conv3", "bn3", 1)]
  np.testing.assert_allclose(out, _np_block(variables, x, 2, convs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "ctor, small_input, params, dim",
  [
    # ImageNet layouts without the classifier: torchvision's counts minus the fc layer.
    (ResNet18, False, 11_689_512 - 513_000, 512),
    (ResNet34, False, 21_797_672 - 513_000, 512),
    (ResNet50, False, 25_557_032 - 2_049_000, 2048),
    # The 3×3 stem replaces the 7×7 one: 3·3·3·64 instead of 7·7·3·64 weights.
    (ResNet18, True, 11_689_512 - 513_000 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64, 512),
  ],
)
def test_full_size_param_counts_and_feature_dim(ctor, small_input, params, dim):
  model = ctor(small_input=small_input)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  out, variables = jax.eval_shape(model.init_with_output, KEY, x)
  assert out.shape == (2, dim) and model.output_dim == dim
  assert count_params(variables["params"]) == params
  # Every BatchNorm has as many running statistics (mean, var) as affine params (scale, bias).
  bn_affine = sum(
    int(np.prod(leaf.shape))
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
    if "bn" in path[-2].key
  )
  assert count_params(variables["batch_stats"]) == bn_affine


@pytest.mark.parametrize(
  "ctor, kwargs, shape, dim",
  [
    (ResNet18, dict(num_filters=4, small_input=True), (2, 16, 16, 3), 32),
    (ResNet50, dict(num_filters=2), (2, 32, 32, 3), 64),
    (ResNet18, dict(num_filters=2, small_input=True, dtype=jnp.bfloat16), (2, 28, 28, 1), 16),
  ],
)
def test_tiny_forward_shapes_and_dtypes(ctor, kwargs, shape, dim):
  model = ctor(**kwargs)
  x = _images(shape)
  variables = _fake_init(model, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  out = jax.jit(model.apply)(variables, x)  # one compile beats op-by-op dispatch here
  assert out.shape == (shape[0], dim)
  assert out.dtype == kwargs.get("dtype", jnp.float32)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_stems():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  imagenet = jax.eval_shape(ResNet18(num_filters=4).init, KEY, x)["params"]
  small = jax.eval_shape(ResNet18(num_filters=4, small_input=True).init, KEY, x)["params"]
  assert imagenet["stem_conv"]["kernel"].shape == (7, 7, 3, 4)
  assert small["stem_conv"]["kernel"].shape == (3, 3, 3, 4)


def test_batchnorm_train_updates_stats_and_eval_does_not():
  model = ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=2, small_input=True)
  x = _images((4, 8, 8, 3))
  variables = _fake_init(model, x)
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(
    lambda a, b: not np.allclose(a, b), state["batch_stats"], variables["batch_stats"]
  )
  assert all(jax.tree.leaves(changed))
  _, state = model.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(stage_sizes=(), block_cls=BasicBlock), "stage_sizes=()"),
    (dict(stage_sizes=(2, 0), block_cls=BasicBlock), r"stage_sizes=\(2, 0\)"),
    (dict(stage_sizes=(2, 2), block_cls=nn.Dense), "block_cls=.*accepted: BasicBlock"),
    (dict(stage_sizes=(2, 2), block_cls=BasicBlock, num_filters=0), "num_filters=0"),
  ],
)
def test_rejects_bad_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ResNet(**kwargs)


def test_rejects_non_image_input():
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    jax.eval_shape(ResNet18(num_filters=2).init, KEY, jnp.zeros((8, 8, 3)))
