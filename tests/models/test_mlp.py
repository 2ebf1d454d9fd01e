"""Tests of moe_adapt.models.mlp (the `mlp` backbone for vector inputs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from moe_adapt import models


def test_mlp_is_dense_then_exact_gelu_against_numpy():
  net = models.get_backbone("mlp", hidden_dim=6, num_layers=2)
  x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  params = net.init(jax.random.key(0), x)["params"]
  y = np.asarray(net.apply({"params": params}, x, train=True))
  h = x
  for i in range(2):
    z = h @ np.asarray(params[f"dense_{i}"]["kernel"]) + np.asarray(params[f"dense_{i}"]["bias"])
    h = 0.5 * z * (1 + erf(z / np.sqrt(2)))
  assert y.shape == (3, 6) and y.dtype == np.float32
  np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-6)


def test_zero_width_is_the_identity_without_params():
  net = models.get_backbone("mlp", hidden_dim=0)
  x = jnp.arange(6.0).reshape(2, 3)
  variables = net.init(jax.random.key(0), x)
  assert not variables.get("params")
  np.testing.assert_array_equal(net.apply(variables, x), x)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"hidden_dim": -1}, r"MLP: hidden_dim=-1 is invalid; accepted: an int >= 0"),
    ({"num_layers": 1.5}, r"MLP: num_layers=1\.5 is invalid"),
    ({"width": 3}, r"backbone 'mlp': unknown option\(s\) width; accepted: dtype, hidden_dim"),
  ],
)
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.get_backbone("mlp", **kwargs)


def test_images_are_refused():
  net = models.get_backbone("mlp", hidden_dim=4)
  with pytest.raises(ValueError, match=r"MLP: x must be a non-empty batch of vectors \[B, D\]"):
    net.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1)))
