"""train.steps.supervised_update against a hand-written step (SGD, so the update is -lr·g)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from moe_adapt.train import steps


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(3)(nn.relu(x))


class PlainNet(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    return nn.Dense(3)(x)


def data():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), jnp.asarray([0, 1, 2, 0, 1, 2])


def ce(labels):
  return lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_step_with_batch_stats_equals_the_hand_written_step():
  x, y = data()
  model, tx = BNNet(), optax.sgd(0.1)
  variables = model.init(jax.random.key(0), x, train=False)
  state = {**variables, "opt_state": tx.init(variables["params"])}
  new, loss = steps.supervised_update(state, model, tx, x, ce(y), train=True)

  def direct(params):
    out, upd = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    return ce(y)(out), upd["batch_stats"]

  (want_loss, want_stats), grads = jax.value_and_grad(direct, has_aux=True)(variables["params"])
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  want = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new["params"], want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b), new["batch_stats"], want_stats)
  assert set(new) == {"params", "batch_stats", "opt_state"}


def test_step_without_batch_stats_and_its_gradient_against_finite_differences():
  x, y = data()
  model, tx = PlainNet(), optax.sgd(1.0)
  params = model.init(jax.random.key(1), x, train=False)["params"]
  state = {"params": params, "opt_state": tx.init(params)}
  new, _ = steps.supervised_update(state, model, tx, x, ce(y), train=True)
  assert set(new) == {"params", "opt_state"}
  grad = jax.tree.map(lambda a, b: a - b, params, new["params"])  # lr 1: the gradient
  kernel = np.asarray(params["Dense_0"]["kernel"], np.float64)
  eps = 1e-3

  def loss_at(k):
    p = {"Dense_0": {**params["Dense_0"], "kernel": jnp.asarray(k, jnp.float32)}}
    return float(ce(y)(model.apply({"params": p}, x, train=True)))

  bump = np.zeros_like(kernel)
  bump[2, 1] = eps
  fd = (loss_at(kernel + bump) - loss_at(kernel - bump)) / (2 * eps)
  np.testing.assert_allclose(grad["Dense_0"]["kernel"][2, 1], fd, rtol=2e-2, atol=1e-4)
