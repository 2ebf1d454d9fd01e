"""Differentiable inner-loop adaptation (MAML-style) with fast second-order meta-gradients.

`inner_adapt` takes `steps` plain SGD steps on an inner loss; `meta_value_and_grad`
evaluates an outer loss at the adapted parameters and differentiates it with respect to
the initial parameters (and, optionally, a non-adapted `context` pytree).

Each SGD step θ' = θ − lr·∇θ L(θ, φ, batch) carries its own `jax.custom_vjp`. Its backward
pass, for a cotangent v on θ', needs (I − lr·H_θθ) v for θ and −lr·H_φθ v for φ. Both come
from ONE forward-over-reverse product: the JVP of `jax.grad(L, argnums=(θ, φ))` along θ in
direction v (mixed partials are symmetric, so the φ part of that JVP is ∂²L/∂φ∂θ · v). On
XLA:CPU this is about 3× faster than letting `jax.grad` differentiate through `jax.grad`
(reverse-over-reverse) and gives the same exact second-order gradient to float32 rounding
(`reference/performance_notes.md` §1; `benchmarks/meta_grad.py`: 2.8–3.7× on a small CNN,
measured on a loaded shared CPU). The step's forward pass linearises that gradient
(`jax.linearize`: the primal gradient for the update, plus the residuals of its JVP), so the
backward evaluates only the tangent half.

Memory (`remat`): by default each step's forward pass linearises its inner gradient and
keeps the linearisation's residuals (the step's inner activations) until its backward: peak
memory grows with `steps` × activation size. With `remat=True` a step keeps only its inputs
(θ_k, context, batch) and its backward recomputes ∇θL(θ_k) inside its Hessian-vector
product, forced apart from the forward pass's identical computation (which XLA's CSE would
otherwise merge back), so peak memory stays at about one step's worth for any `steps`, at
the cost of one more inner forward/backward per step in principle (on XLA:CPU the measured
time was within noise, sometimes lower). It matters when steps > 1 or activations are large
(measured on XLA:CPU, `benchmarks/meta_grad.py` CNN: 64 → 42 MB at 1 step, 140 → 43 MB at
3 steps). No effect when `first_order` (nothing is differentiated through the inner
gradient) and no effect on values. Wrapping each step in `jax.checkpoint` was measured to
change nothing here: the step's residuals already are its inputs, and XLA:CPU merges the
rematerialised computation back.

Sources: `inner_adapt` is the inner update of MAML (Finn, Abbeel & Levine, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017, §2.2 and Alg. 1), used by
Meta-DMoE (Zhong et al., NeurIPS 2022, Alg. 1) with L the feature-distillation loss on the
unlabeled support and φ the aggregator, for meta-training and for test-time adaptation (one
step). `meta_value_and_grad` is MAML's meta-objective and Meta-DMoE's bi-level step (inner
distillation on the support, outer CE on the query, gradients into the student θ and the
aggregator φ).

Loss functions are called as `loss_fn(params, batch)` when `context` is None and as
`loss_fn(params, batch, context)` otherwise, and must return a scalar.

Which inputs get gradients through an inner step:

- params θ: exact second-order (or, with `first_order=True`, the FOMAML identity).
- context φ: only through the mixed term −lr·∂²L_in/∂φ∂θ. With `first_order=True` the inner
  gradient is a constant, so φ gets gradient only where the OUTER loss uses it directly; in
  Meta-DMoE (φ = aggregator, used only to build the inner distillation target) that is zero,
  which is why Meta-DMoE needs the second-order mode.
- lr: exact (−⟨v, ∇θL⟩, which the backward pass gets for free), so a learned step size works.
- batch: treated as constant data; its cotangent is zero (float0 for integer leaves).

Forward-mode differentiation (`jax.jvp`) through a second-order inner step is not supported
(a `custom_vjp` limitation); `jax.grad`, `jax.jit` and `jax.vmap` (e.g. over tasks) are.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LossFn = Callable[..., jax.Array]

__all__ = ["inner_adapt", "meta_value_and_grad"]


# ----------------------------------------------------------------------------- validation


def _check_steps(steps: Any) -> None:
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
    raise ValueError(f"steps={steps!r} is invalid; accepted: a Python int >= 1.")


def _check_lr(lr: Any) -> None:
  """Accepts a finite real number or a real scalar array (checked for finiteness if concrete)."""
  if isinstance(lr, bool):
    raise ValueError(f"lr={lr!r} is invalid; accepted: a finite real number or real scalar array.")
  if isinstance(lr, numbers.Real):
    if not math.isfinite(lr):
      raise ValueError(f"lr={lr!r} is not finite; accepted: a finite real number.")
    return
  shape = getattr(lr, "shape", None)
  dtype = getattr(lr, "dtype", None)
  if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"lr={lr!r} is invalid; accepted: a finite real number or a floating scalar array "
      f"(got shape={shape}, dtype={dtype})."
    )
  if not isinstance(lr, jax.core.Tracer) and not np.isfinite(np.asarray(lr, np.float32)):
    raise ValueError(f"lr={lr!r} is not finite; accepted: a finite real number.")


def _check_params(params: PyTree) -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("params has no leaves; accepted: a non-empty pytree of floating arrays.")
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f"params leaf {jax.tree_util.keystr(path)} has dtype {dtype}; accepted: floating "
        "arrays (float32, bfloat16, ...)."
      )


def _check_common(steps: Any, lr: Any, first_order: Any, remat: Any) -> None:
  _check_steps(steps)
  _check_lr(lr)
  if not isinstance(first_order, bool):
    raise ValueError(f"first_order={first_order!r} is invalid; accepted: True or False.")
  if not isinstance(remat, bool):
    raise ValueError(f"remat={remat!r} is invalid; accepted: True or False.")


# ------------------------------------------------------------------------------ SGD step


def _with_context(loss_fn: LossFn, has_context: bool) -> Callable[[PyTree, PyTree, PyTree], Any]:
  """Returns L(θ, φ, batch) with one signature whether or not the user's loss takes φ."""
  if has_context:
    return lambda theta, context, batch: loss_fn(theta, batch, context)
  return lambda theta, context, batch: loss_fn(theta, batch)


def _sgd_update(theta: PyTree, grads: PyTree, lr: jax.Array) -> PyTree:
  # Update in each leaf's own dtype so bfloat16 leaves stay bfloat16 (no silent upcast by lr).
  return jax.tree.map(lambda t, g: t - jnp.asarray(lr, t.dtype) * g.astype(t.dtype), theta, grads)


def _zero_cotangent(x: Any) -> Any:
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sgd_step(loss_fn, remat, lr, theta, context, batch):
  """θ' = θ − lr·∇θ loss_fn(θ, context, batch), with a forward-over-reverse backward."""
  del remat  # Only changes the backward pass.
  grads = jax.grad(loss_fn)(theta, context, batch)
  return _sgd_update(theta, grads, lr)


def _sgd_step_fwd(loss_fn, remat, lr, theta, context, batch):
  if remat:
    # Residuals are only the inputs; the backward recomputes what it needs inside one JVP.
    return _sgd_step(loss_fn, remat, lr, theta, context, batch), (lr, theta, context, batch)
  # Linearise ∇(θ,φ)L at θ once, here: `jax.linearize` computes the primal gradient (for the
  # update) and keeps the residuals of its JVP (activations, ReLU masks, cotangents) in a
  # `jax.tree_util.Partial`, a pytree of arrays, so the backward runs only the tangent half.
  # Recomputing the primal inside a `jax.jvp` in the backward relied on XLA's CSE to merge it
  # with this pass, which it did only in part (Meta-DMoE step, ConvNet student: 4 of 34
  # convolutions were duplicates; 10-15 % of the step, `benchmarks/README.md`).
  grad_fn = lambda t: jax.grad(loss_fn, argnums=(0, 1))(t, context, batch)
  (grads, _), hvp_fn = jax.linearize(grad_fn, theta)
  return _sgd_update(theta, grads, lr), (lr, grads, hvp_fn, context, batch)


def _tie_to(tree: PyTree, v: PyTree) -> PyTree:
  """Returns `tree` unchanged in value but data-dependent on `v` (adds 0·Σv).

  XLA does not fold 0·x for floats (NaN semantics), so computations on the result can neither
  be merged (CSE) with identical ones on `tree` in the forward pass nor scheduled before `v`
  exists. `jax.lax.optimization_barrier` does not achieve this on XLA:CPU (measured).
  """
  zero = 0.0 * sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(v))
  return jax.tree.map(lambda t: t + zero.astype(t.dtype), tree)


def _sgd_step_bwd(loss_fn, remat, residuals, v):
  if remat:
    lr, theta, context, batch = residuals
    # Without this, XLA merges the JVP's primal recomputation of ∇θL(θ_k) with the forward
    # pass's identical computation and keeps step k's activations alive until here, so memory
    # grows with `steps`; tied to v, they are recomputed and freed within this step.
    theta = _tie_to(theta, v)
    grad_fn = lambda t: jax.grad(loss_fn, argnums=(0, 1))(t, context, batch)
    # One forward-over-reverse pass: primal (∇θL, ∇φL) and tangent (H_θθ v, H_φθ v).
    (grad_theta, _), (hvp_theta, hvp_context) = jax.jvp(grad_fn, (theta,), (v,))
  else:
    # The tangent half of the forward pass's linearisation: (H_θθ v, H_φθ v).
    lr, grad_theta, hvp_fn, context, batch = residuals
    hvp_theta, hvp_context = hvp_fn(v)
  theta_bar = jax.tree.map(
    lambda vi, hi: vi - jnp.asarray(lr, vi.dtype) * hi.astype(vi.dtype), v, hvp_theta
  )
  context_bar = jax.tree.map(
    lambda c, h: (-jnp.asarray(lr, h.dtype) * h).astype(c.dtype), context, hvp_context
  )
  # ∂θ'/∂lr = −∇θL, so lr̄ = −⟨v, ∇θL⟩ (accumulated in float32 for bfloat16 leaves).
  dots = [
    jnp.vdot(vi.astype(jnp.float32), gi.astype(jnp.float32))
    for vi, gi in zip(jax.tree.leaves(v), jax.tree.leaves(grad_theta))
  ]
  lr_bar = (-sum(dots)).astype(jnp.result_type(lr))
  batch_bar = jax.tree.map(_zero_cotangent, batch)
  return lr_bar, theta_bar, context_bar, batch_bar


_sgd_step.defvjp(_sgd_step_fwd, _sgd_step_bwd)


def _first_order_step(loss_fn, lr, theta, context, batch):
  """FOMAML step: the inner gradient is a constant, so dθ'/dθ = I and dθ'/dφ = 0."""
  grads = jax.lax.stop_gradient(jax.grad(loss_fn)(theta, context, batch))
  return _sgd_update(theta, grads, lr)


# ------------------------------------------------------------------------------ public API


def inner_adapt(
  loss_fn: LossFn,
  params: PyTree,
  batch: PyTree,
  *,
  lr: float | jax.Array,
  steps: int = 1,
  first_order: bool = False,
  context: PyTree | None = None,
  remat: bool = False,
) -> PyTree:
  r"""Takes `steps` SGD steps θ ← θ − lr·∇θ loss_fn(θ, batch[, context]).

  .. math::
    \theta_0 = \theta,\qquad
    \theta_{j+1} = \theta_j - \alpha\, \nabla_\theta L(\theta_j, \text{batch}[, \phi]),
    \quad j = 0, \dots, \text{steps} - 1

  The inner update of MAML, as Meta-DMoE uses it (sources in the module docstring).

  The result is differentiable with respect to `params` (exact second order, through a
  forward-over-reverse Hessian-vector product in each step's backward), `context` (through
  the mixed derivative ∂²L/∂φ∂θ) and `lr`, unless `first_order`, in which case dθ'/dθ = I
  and `context` gets no gradient through the inner loop.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar`, or `loss_fn(params, batch, context)` when
      `context` is given. Static (treated as a non-differentiable Python callable).
    params: pytree of floating arrays (float32, bfloat16 or mixed); updates are computed in
      each leaf's dtype.
    batch: pytree of arrays (e.g. `{"x": [B, ...], "y": [B]}`), integer leaves allowed;
      treated as constant data (zero gradient).
    lr: inner learning rate: a finite Python number or a floating scalar array.
    steps: number of SGD steps (Python int >= 1; the loop is unrolled).
    first_order: if True, stop the gradient through the inner gradient (FOMAML).
    context: optional pytree the loss depends on but that is not adapted (Meta-DMoE: the
      aggregator φ that produces the distillation target).
    remat: trade compute for memory in the second-order backward: peak memory stays at
      about one step's worth for any `steps` (see "Memory" in the module docstring). No
      effect when `first_order` and no effect on values.

  Returns:
    The adapted parameters, a pytree with the structure and dtypes of `params`.

  Raises:
    ValueError: if `steps`, `lr`, `first_order`, `remat` or `params` is invalid.
  """
  _check_common(steps, lr, first_order, remat)
  _check_params(params)
  loss = _with_context(loss_fn, context is not None)
  if first_order:
    step = functools.partial(_first_order_step, loss)
  else:
    step = functools.partial(_sgd_step, loss, remat)
  theta = params
  for _ in range(steps):
    theta = step(lr, theta, context, batch)
  return theta


def meta_value_and_grad(
  outer_loss_fn: LossFn,
  inner_loss_fn: LossFn,
  params: PyTree,
  support: PyTree,
  query: PyTree,
  *,
  lr: float | jax.Array,
  steps: int = 1,
  first_order: bool = False,
  context: PyTree | None = None,
  remat: bool = False,
) -> tuple[jax.Array, PyTree]:
  r"""Meta-objective value and its gradient.

  value = outer_loss_fn(θ', query[, context]) with
  θ' = inner_adapt(inner_loss_fn, params, support, lr=lr, steps=steps, ...):

  .. math::
    J(\theta, \phi) = L_{out}(\theta'(\theta, \phi), \text{query}[, \phi]),\qquad
    \nabla_\theta J = (I - \alpha H^{(0)}_{\theta\theta}) \cdots
      (I - \alpha H^{(n-1)}_{\theta\theta})\, \nabla_{\theta'} L_{out}

  with n = `steps`, α = `lr` and H^(j) the inner loss's Hessian blocks at θ_j (for one
  step: ∇φJ = −α H_φθ ∇θ' L_out + ∂L_out/∂φ); first order replaces every (I − αH) by I.
  MAML's meta-objective and Meta-DMoE's bi-level step (sources in the module docstring).

  Args:
    outer_loss_fn: `outer_loss_fn(params, query) -> scalar`, or with a third argument
      `context` when `context` is given.
    inner_loss_fn: `inner_loss_fn(params, support) -> scalar` (likewise with `context`).
    params: pytree of floating arrays; the initial (meta-learned) parameters.
    support: inner-loop batch (pytree of arrays, e.g. `{"x": [S, ...]}`).
    query: outer-loop batch (pytree of arrays, e.g. `{"x": [Q, ...], "y": [Q]}`).
    lr: the inner learning rate α, as in `inner_adapt`; not differentiated here (wrap
      `inner_adapt` in `jax.grad` yourself to learn it).
    steps, first_order, context, remat: as in `inner_adapt`.

  Returns:
    `(value, grads)` with `grads` like `params` when `context` is None, else
    `(value, (grads_params, grads_context))`. In first-order mode `grads_context` holds only
    the outer loss's direct dependence on `context` (zero for Meta-DMoE, whose outer loss
    does not use the aggregator).

  Raises:
    ValueError: if `steps`, `lr`, `first_order`, `remat` or `params` is invalid.
  """
  _check_common(steps, lr, first_order, remat)
  _check_params(params)
  outer = _with_context(outer_loss_fn, context is not None)
  options = dict(lr=lr, steps=steps, first_order=first_order, remat=remat)

  def objective(theta, ctx):
    return outer(inner_adapt(inner_loss_fn, theta, support, context=ctx, **options), ctx, query)

  if context is not None:
    return jax.value_and_grad(objective, argnums=(0, 1))(params, context)
  return jax.value_and_grad(lambda theta: objective(theta, None))(params)
