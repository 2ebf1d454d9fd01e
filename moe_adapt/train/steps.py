"""The optimiser step every supervised stage shares; a method passes only its loss.

`supervised_update(state, model, tx, x, loss)` applies a Flax model to a batch, takes the
gradient of the method's `loss(outputs)` with respect to `state['params']`, applies the
optax update and, when the state carries BatchNorm statistics (`state['batch_stats']`),
returns the statistics the forward pass computed. The method keeps what is its own:
which examples form the batch, its random keys, and its loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import linen as nn

PyTree = Any


def supervised_update(
  state: Mapping[str, PyTree],
  model: nn.Module,
  tx: optax.GradientTransformation,
  x: jax.Array,
  loss: Callable[[Any], jax.Array],
  *,
  rngs: Mapping[str, jax.Array] | None = None,
  **apply_kwargs: Any,
) -> tuple[dict[str, PyTree], jax.Array]:
  """One optimiser step on `loss(model.apply(variables, x, **apply_kwargs))`.

  Args:
    state: {'params', 'opt_state'} and, for a model with BatchNorm, 'batch_stats'.
    model: the Flax module.
    tx: the optimiser that made `state['opt_state']`.
    x: the batch [B, ...].
    loss: model outputs (e.g. logits [B, C]) -> scalar loss (float32).
    rngs: the model's random streams (e.g. {'dropout': key}).
    **apply_kwargs: passed to `model.apply` (e.g. train=True).

  Returns:
    (the new state, with the same keys; the loss before the step).
  """
  has_stats = "batch_stats" in state

  def loss_fn(params):
    variables = {"params": params}
    if not has_stats:
      return loss(model.apply(variables, x, rngs=rngs, **apply_kwargs)), None
    variables["batch_stats"] = state["batch_stats"]
    out, updates = model.apply(variables, x, mutable=["batch_stats"], rngs=rngs, **apply_kwargs)
    return loss(out), updates["batch_stats"]

  (value, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new = {**state, "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
  if has_stats:
    new["batch_stats"] = stats
  return new, value
