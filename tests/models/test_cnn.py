"""Tests for ConvNet, Classifier, get_backbone and count_params."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt import models
from moe_adapt.models import Classifier, ConvNet, count_params, get_backbone

KEY = jax.random.key(0)


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _fake_init(model, *args, seed=0, **kwargs):
  """model.init's variables filled with NumPy random values.

  Compiling JAX's PRNG for every parameter shape takes seconds on a busy 2-core machine;
  eval_shape only traces. Values are non-trivial (BatchNorm stats included), so eval-mode
  math is really exercised.
  """
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


def _np_conv3x3(x, kernel, stride):
  """Reference 3×3 convolution with padding 1: x [B, H, W, C], kernel [3, 3, C, O]."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  out = np.zeros((b, ho, wo, kernel.shape[-1]))
  for i in range(3):
    for j in range(3):
      patch = xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
      out += patch @ kernel[i, j]
  return out


def _np_convnet(variables, x, depth, eps=1e-5):
  """Reference eval-mode ConvNet forward in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  s = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
  h = np.asarray(x, np.float64)
  for i in range(depth):
    h = _np_conv3x3(h, p[f"conv_{i}"]["kernel"], 1 if i == 0 else 2)
    bn, st = p[f"bn_{i}"], s[f"bn_{i}"]
    h = (h - st["mean"]) / np.sqrt(st["var"] + eps) * bn["scale"] + bn["bias"]
    h = np.maximum(h, 0)
  h = h.mean(axis=(1, 2))
  return np.maximum(h @ p["fc"]["kernel"] + p["fc"]["bias"], 0)


# --------------------------------------------------------------------------- ConvNet


@pytest.mark.parametrize(
  "kwargs, shape, expected_dim",
  [
    (dict(width=4, depth=3, feature_dim=8), (2, 16, 16, 1), 8),
    (dict(width=4, depth=3, feature_dim=0, dtype=jnp.bfloat16), (2, 28, 28, 1), 8),
    (dict(width=4, depth=1, feature_dim=0), (2, 28, 28, 3), 4),
  ],
)
def test_convnet_shapes_and_dtypes(kwargs, shape, expected_dim):
  model = ConvNet(**kwargs)
  x = _images(shape)
  # Parameters stay float32 whatever the compute dtype.
  shapes = jax.eval_shape(model.init, KEY, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  out = model.apply(_fake_init(model, x), x)
  assert out.shape == (shape[0], expected_dim) == (shape[0], model.output_dim)
  assert out.dtype == kwargs.get("dtype", jnp.float32)
  assert np.all(np.asarray(out, np.float32) >= 0)  # ReLU features


def test_convnet_matches_numpy_reference():
  model = ConvNet(width=3, depth=3, feature_dim=5)
  x = _images((2, 16, 16, 2))
  variables = _fake_init(model, x)
  out = model.apply(variables, x, train=False)
  np.testing.assert_allclose(out, _np_convnet(variables, x, depth=3), rtol=1e-4, atol=1e-5)


def test_convnet_without_batchnorm():
  model = ConvNet(width=4, depth=2, feature_dim=0, use_batchnorm=False)
  x = _images((2, 16, 16, 3))
  variables = _fake_init(model, x)
  assert set(variables) == {"params"}
  assert set(variables["params"]["conv_0"]) == {"kernel", "bias"}
  assert model.apply(variables, x, train=True).shape == (2, 8)


@pytest.fixture(scope="module")
def bn_setup():
  model = ConvNet(width=4, depth=2, feature_dim=6)
  x = _images((4, 16, 16, 1))
  return model, x, _fake_init(model, x)


def test_batchnorm_running_average_update(bn_setup):
  model, x, variables = bn_setup
  _, state = model.apply(
    variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
  )
  conv0 = np.asarray(state["intermediates"]["conv_0"]["__call__"][0], np.float64)
  old = variables["batch_stats"]["bn_0"]
  new = state["batch_stats"]["bn_0"]
  # momentum 0.9: new = 0.9·old + 0.1·batch statistic (biased variance over B, H, W).
  np.testing.assert_allclose(
    new["mean"], 0.9 * old["mean"] + 0.1 * conv0.mean((0, 1, 2)), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    new["var"], 0.9 * old["var"] + 0.1 * conv0.var((0, 1, 2)), rtol=1e-4, atol=1e-6
  )


def test_batchnorm_train_uses_batch_stats_eval_does_not(bn_setup):
  model, x, variables = bn_setup
  # Eval: an example's features do not depend on the rest of the batch.
  eval_all = model.apply(variables, x, train=False)
  eval_one = model.apply(variables, x[:1], train=False)
  np.testing.assert_allclose(eval_all[:1], eval_one, rtol=1e-5, atol=1e-6)
  # Train: batch statistics, so they do (and differ from eval).
  train_all, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  train_one, _ = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])
  assert not np.allclose(train_all[:1], train_one, atol=1e-4)
  assert not np.allclose(train_all, eval_all, atol=1e-4)


def test_eval_does_not_mutate_batch_stats(bn_setup):
  model, x, variables = bn_setup
  _, state = model.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
  # And eval needs no mutable collection at all.
  model.apply(variables, x, train=False)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(width=0), "width=0"),
    (dict(depth=0), "depth=0"),
    (dict(feature_dim=-1), "feature_dim=-1"),
  ],
)
def test_convnet_rejects_bad_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ConvNet(**kwargs)


def test_convnet_rejects_non_image_input():
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    ConvNet(width=2).init(KEY, jnp.zeros((16, 16, 1)))


# --------------------------------------------------------------------------- Classifier


@pytest.fixture(scope="module")
def clf_setup():
  model = Classifier(ConvNet(width=4, depth=2, feature_dim=6), num_classes=5)
  x = _images((3, 16, 16, 1))
  variables = jax.jit(model.init)(KEY, x)  # the one real init in this file
  return model, x, variables


def test_classifier_variable_layout(clf_setup):
  _, _, variables = clf_setup
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "head"}
  assert set(variables["batch_stats"]) == {"backbone"}
  assert variables["params"]["head"]["kernel"].shape == (6, 5)


def test_classifier_split_equals_call(clf_setup):
  model, x, variables = clf_setup
  logits = model.apply(variables, x, train=False)
  feats = model.apply(variables, x, train=False, method=Classifier.features)
  assert logits.shape == (3, 5) and feats.shape == (3, 6)
  np.testing.assert_array_equal(logits, model.apply(variables, feats, method=Classifier.classify))


def test_classifier_head_only_and_backbone_only(clf_setup):
  model, x, variables = clf_setup
  p_e, p_c = variables["params"]["backbone"], variables["params"]["head"]
  feats = model.apply(
    {"params": {"backbone": p_e}, "batch_stats": variables["batch_stats"]},
    x,
    method=Classifier.features,
  )
  logits = model.apply({"params": {"head": p_c}}, feats, method=Classifier.classify)
  expected = np.asarray(feats) @ np.asarray(p_c["kernel"]) + np.asarray(p_c["bias"])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(logits, model.apply(variables, x))


def test_classifier_grad_wrt_backbone_only(clf_setup):
  """The Meta-DMoE inner loop: differentiate w.r.t. params['backbone'] with the head fixed."""
  model, x, variables = clf_setup
  p_c, stats = variables["params"]["head"], variables["batch_stats"]

  def loss(p_e):
    v = {"params": {"backbone": p_e, "head": p_c}, "batch_stats": stats}
    return jnp.sum(model.apply(v, x, train=False) ** 2)

  grads = jax.grad(loss)(variables["params"]["backbone"])
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"]["backbone"])
  assert float(jnp.abs(grads["conv_0"]["kernel"]).sum()) > 0


def test_classifier_bfloat16_backbone_gives_float32_logits():
  model = Classifier(ConvNet(width=4, depth=2, feature_dim=6, dtype=jnp.bfloat16), 3)
  x = _images((2, 16, 16, 1))
  variables = _fake_init(model, x)
  assert model.apply(variables, x, method=Classifier.features).dtype == jnp.bfloat16
  assert model.apply(variables, x).dtype == jnp.float32


def test_classifier_rejects_bad_fields(clf_setup):
  with pytest.raises(ValueError, match="num_classes=0"):
    Classifier(ConvNet(width=2), num_classes=0)
  with pytest.raises(ValueError, match="backbone="):
    Classifier(lambda x, train: x, num_classes=2)
  model, _, variables = clf_setup
  with pytest.raises(ValueError, match=r"features must be \[B, D\]"):
    model.apply(variables, jnp.zeros((2, 3, 6)), method=Classifier.classify)


# --------------------------------------------------------------------------- registry, counting


def test_get_backbone_builds_registered_modules():
  assert get_backbone("convnet", width=8) == ConvNet(width=8)
  net = get_backbone("resnet50", num_filters=8, small_input=True)
  assert isinstance(net, models.ResNet)
  assert net.block_cls is models.Bottleneck and tuple(net.stage_sizes) == (3, 4, 6, 3)
  assert get_backbone("resnet18").output_dim == 512


def test_get_backbone_errors():
  with pytest.raises(ValueError, match="name='vgg' is unknown; accepted: convnet, mlp, resnet18"):
    get_backbone("vgg")
  with pytest.raises(ValueError, match=r"unknown option.*widht.*accepted:.*width"):
    get_backbone("convnet", widht=8)


def test_count_params_arrays_and_shape_structs():
  tree = {
    "a": jnp.zeros((3, 4)),
    "b": [np.ones(5), jax.ShapeDtypeStruct((2, 3, 7), jnp.bfloat16)],
    "c": 1.0,
    "empty": {},
  }
  assert count_params(tree) == 12 + 5 + 42 + 1
  model = ConvNet(width=2, depth=2, feature_dim=3)
  shapes = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
  # conv 3·3·1·2 + 3·3·2·4, BN (scale, bias) 2·2 + 2·4, fc 4·3 + 3.
  assert count_params(shapes["params"]) == 18 + 72 + 4 + 8 + 15
