"""Merges that use data: Fisher merging, RegMean, AdaMerging.

Fisher merging and RegMean weight each member by statistics of its own training data
(diagonal Fisher information; input Gram matrices of linear layers); AdaMerging learns
merging coefficients at test time from unlabelled target batches. Models enter as
`apply_fn(params, x) -> logits` callables, so any JAX model library works.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_adapt.core._merge_utils import (
  leaves_with_names,
  like_members,
  stacked_leaves,
  sum_members,
  validate_choice,
  validate_density,
)

PyTree = Any


def _positive_weights(weights, k: int) -> jax.Array:
  if weights is None:
    return jnp.ones((k,), jnp.float32)
  if jnp.shape(weights) != (k,):
    raise ValueError(
      f"weights has shape {jnp.shape(weights)}; accepted: ({k},), one weight per member"
    )
  if not isinstance(weights, jax.core.Tracer) and not np.all(np.asarray(weights) > 0):
    raise ValueError(f"weights={np.asarray(weights).tolist()} is invalid; accepted: all > 0")
  return jnp.asarray(weights, jnp.float32)


def fisher_merge(
  stacked: PyTree,
  fishers: PyTree,
  *,
  weights: jax.Array | None = None,
  epsilon: float = 1e-8,
) -> PyTree:
  r"""Fisher-weighted average of K models, entry by entry.

  .. math::
    \theta^*_i = \frac{\sum_k w_k (F_{k,i} + \epsilon)\, \theta_{k,i}}
                      {\sum_k w_k (F_{k,i} + \epsilon)}

  Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, with
  the diagonal Fisher F_k of each model (e.g. from `diagonal_fisher`). ε keeps
  the quotient defined where every Fisher is 0; there the merge is the w-weighted average.

  Args:
    stacked: pytree of [K, ...] floating leaves (models or task vectors).
    fishers: pytree like `stacked` of [K, ...] non-negative diagonal Fishers.
    weights: optional [K] positive model weights w_k (the paper's λ_k; 1 when None).
    epsilon: ε ≥ 0 added to every Fisher entry.

  Returns:
    pytree like one member, leaves in their input dtype.
  """
  leaves, treedef, k = stacked_leaves(stacked, floating=True)
  fisher_leaves = like_members(fishers, "fishers", treedef, leaves, stacked=True)
  for name, f in zip(leaves_with_names(fishers, "fishers")[0], fisher_leaves):
    if not isinstance(f, jax.core.Tracer) and np.any(np.asarray(f, np.float32) < 0):
      raise ValueError(f"{name} has negative entries; accepted: Fisher values >= 0")
  if not epsilon >= 0:
    raise ValueError(f"epsilon={epsilon!r} is invalid; accepted: a float >= 0")
  w = _positive_weights(weights, k)
  return jax.tree_util.tree_unflatten(treedef, _fisher_merge(leaves, fisher_leaves, w, epsilon))


@jax.jit
def _fisher_merge(leaves, fishers, w, epsilon) -> list[jax.Array]:
  out = []
  for x, f in zip(leaves, fishers):
    k = x.shape[0]
    weight = [w[i] * (f[i].astype(jnp.float32) + epsilon) for i in range(k)]
    num = sum_members(lambda i, x=x, weight=weight: weight[i] * x[i].astype(jnp.float32), k)
    den = sum_members(lambda i, weight=weight: weight[i], k)
    # Where every weight is 0 (ε = 0, zero Fishers) fall back to the w-weighted average.
    plain = sum_members(lambda i, x=x: w[i] * x[i].astype(jnp.float32), k) / jnp.sum(w)
    out.append(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), plain).astype(x.dtype))
  return out


def diagonal_fisher(
  logits_fn: Callable[[PyTree, jax.Array], jax.Array],
  params: PyTree,
  batches: Sequence[jax.Array],
  *,
  labels: str = "sample",
  key: jax.Array | None = None,
) -> PyTree:
  r"""Diagonal empirical-model Fisher: the mean squared per-example gradient of log p(y|x).

  .. math::
    F = \frac{1}{N} \sum_{n} \big(\nabla_\theta \log p_\theta(y_n \mid x_n)\big)^2

  with y_n drawn from the model's own predictive distribution (`sample`, Matena & Raffel's
  estimator), its most likely class (`argmax`), or the exact expectation over the C classes
  (`expected`: Σ_y p(y|x) (∇ log p(y|x))², C backward passes per example).

  Args:
    logits_fn: `logits_fn(params, x) -> [B, C]` logits for a batch x of [B, ...].
    params: pytree of floating leaves.
    batches: sequence of input batches [B, ...] (unlabelled).
    labels: `sample`, `argmax` or `expected`.
    key: PRNG key, required for `sample`.

  Returns:
    pytree like `params` of float32 Fishers (≥ 0).
  """
  validate_choice(labels, "labels", ("sample", "argmax", "expected"))
  if labels == "sample" and key is None:
    raise ValueError("key is None; accepted: a PRNG key when labels='sample'")
  if not batches:
    raise ValueError("batches is empty; accepted: at least one batch of inputs")

  def log_probs(p, x):  # one example x [...] -> [C]
    return jax.nn.log_softmax(logits_fn(p, x[None])[0].astype(jnp.float32))

  def squared_grads(p, x, k):
    lp = log_probs(p, x)
    if labels == "expected":
      grads = jax.vmap(lambda y: jax.grad(lambda q: log_probs(q, x)[y])(p))(jnp.arange(lp.size))
      probs = jnp.exp(lp)
      return jax.tree.map(lambda g: jnp.tensordot(probs, g.astype(jnp.float32) ** 2, 1), grads)
    y = jax.random.categorical(k, lp) if labels == "sample" else jnp.argmax(lp)
    return jax.tree.map(
      lambda g: g.astype(jnp.float32) ** 2, jax.grad(lambda q: log_probs(q, x)[y])(p)
    )

  @jax.jit
  def batch_sum(p, x, k):
    keys = jax.random.split(k, x.shape[0])
    per_example = jax.vmap(squared_grads, in_axes=(None, 0, 0))(p, x, keys)
    return jax.tree.map(lambda g: jnp.sum(g, 0), per_example)

  key = jax.random.key(0) if key is None else key
  total, count = None, 0
  for i, x in enumerate(batches):
    part = batch_sum(params, x, jax.random.fold_in(key, i))
    total = part if total is None else jax.tree.map(jnp.add, total, part)
    count += int(jnp.shape(x)[0])
  return jax.tree.map(lambda t: t / count, total)


def input_gram(x: jax.Array) -> jax.Array:
  """G = Xᵀ X of a linear layer's inputs x [..., d_in] (leading axes flattened): [d_in, d_in]."""
  x = jnp.reshape(x, (-1, jnp.shape(x)[-1])).astype(jnp.float32)
  return x.T @ x


def regmean_merge(stacked: PyTree, grams: PyTree, *, alpha: float) -> PyTree:
  r"""RegMean: the closed-form merge of linear layers from their input Gram matrices.

  For a kernel W_k [d_in, d_out] (y = x W) with input Gram G_k = X_kᵀ X_k:

  .. math::
    \tilde G_k = \alpha G_k + (1 - \alpha)\,\mathrm{diag}(G_k),\qquad
    W^* = \Big(\sum_k \tilde G_k\Big)^{-1} \sum_k \tilde G_k W_k

  the minimiser of Σ_k ‖X_k W − X_k W_k‖² (α = 1), with the off-diagonal entries of each
  Gram scaled by α to regularise it (α = 0: a per-input-feature weighted average). Jin, Ren,
  Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
  Models", ICLR 2023; the paper tunes α on validation data. Leaves without a Gram (biases,
  norms, embeddings) are averaged uniformly, as in the paper.

  Args:
    stacked: pytree of [K, ...] floating leaves.
    grams: pytree of `stacked`'s structure whose leaf is None (averaged) or, for a kernel
      leaf [K, d_in, d_out], the members' Gram matrices [K, d_in, d_in] (`input_gram`).
    alpha: α in [0, 1].

  Returns:
    pytree like one member, leaves in their input dtype. The solve runs in float32; ΣG̃
    must be invertible (α < 1 helps when inputs are rank-deficient).
  """
  alpha = validate_density(alpha, "alpha")
  names, _, _ = leaves_with_names(stacked, "stacked")
  leaves, treedef, k = stacked_leaves(stacked, floating=True)
  gram_leaves, gram_def = jax.tree_util.tree_flatten(grams, is_leaf=lambda x: x is None)
  if gram_def != treedef:
    raise ValueError(
      f"grams has structure {gram_def}; accepted: the structure of stacked, {treedef}, "
      "with None for leaves that are averaged"
    )
  for name, g, leaf in zip(names, gram_leaves, leaves):
    if g is None:
      continue
    if jnp.ndim(leaf) != 3:
      raise ValueError(
        f"grams for {name} is given but {name} has shape {jnp.shape(leaf)}; accepted: a Gram "
        "only for kernels [K, d_in, d_out] (None elsewhere)"
      )
    want = (k, jnp.shape(leaf)[1], jnp.shape(leaf)[1])
    if jnp.shape(g) != want:
      gram_name = "grams" + name[len("stacked") :]
      raise ValueError(f"{gram_name} has shape {jnp.shape(g)}; accepted: {want} = [K, d_in, d_in]")
  return jax.tree_util.tree_unflatten(treedef, _regmean(leaves, gram_leaves, alpha))


@jax.jit
def _regmean(leaves, grams, alpha) -> list[jax.Array]:
  out = []
  for w, g in zip(leaves, grams):
    w32 = w.astype(jnp.float32)
    if g is None:
      out.append(jnp.mean(w32, axis=0).astype(w.dtype))
      continue
    g = g.astype(jnp.float32)
    eye = jnp.eye(g.shape[-1], dtype=jnp.float32)
    scaled = alpha * g + (1.0 - alpha) * g * eye  # off-diagonals × α, diagonal kept
    rhs = jnp.einsum("kij,kjo->io", scaled, w32, precision="highest")
    out.append(jnp.linalg.solve(jnp.sum(scaled, 0), rhs).astype(w.dtype))
  return out


class AdaMergingResult(NamedTuple):
  """`coefficients`: [K] (task-wise) or a pytree like one member of [K] arrays (layer-wise);
  `params`: the merged model; `entropy`: [steps] mean prediction entropy before each step."""

  coefficients: Any
  params: PyTree
  entropy: jax.Array


def adamerging(
  apply_fn: Callable[[PyTree, jax.Array], jax.Array],
  base: PyTree,
  stacked: PyTree,
  batches: Sequence[jax.Array],
  *,
  granularity: str = "task",
  init: float = 0.3,
  steps: int = 100,
  learning_rate: float = 1e-3,
  bounds: tuple[float, float] | None = (0.0, 1.0),
) -> AdaMergingResult:
  r"""AdaMerging: merging coefficients learned by entropy minimisation on unlabelled data.

  .. math::
    \theta(\lambda) = \theta_{base} + \sum_k \lambda_k^{(l)} \tau_k,\qquad
    \min_\lambda\ \mathbb{E}_x\, H\big(\mathrm{softmax}(f(\theta(\lambda), x))\big)

  one λ_k per task (`task`) or per task and leaf (`layer`: λ_k^{(l)}, l a leaf). Yang et
  al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024 (Adam,
  λ initialised to 0.3, batches of the target tasks' unlabelled test inputs). Step s uses
  batches[s mod len(batches)]; after each Adam step the coefficients are clipped to
  `bounds` (None: unbounded).

  Args:
    apply_fn: `apply_fn(params, x) -> [B, C]` logits.
    base: pytree of floating leaves (the pre-trained model).
    stacked: pytree like `base` of [K, ...] task vectors.
    batches: sequence of unlabelled input batches [B, ...].
    granularity: `task` or `layer`.
    init: initial value of every coefficient.
    steps: Adam steps (≥ 1).
    learning_rate: Adam's learning rate.
    bounds: (low, high) the coefficients are kept in, or None.

  Returns:
    AdaMergingResult(coefficients, params, entropy).
  """
  validate_choice(granularity, "granularity", ("task", "layer"))
  if not batches:
    raise ValueError("batches is empty; accepted: at least one batch of inputs")
  if not (isinstance(steps, int) and steps >= 1):
    raise ValueError(f"steps={steps!r} is invalid; accepted: an int >= 1")
  leaves, treedef, k = stacked_leaves(stacked, floating=True)
  base_leaves = like_members(base, "base", treedef, leaves, stacked=False)
  if granularity == "task":
    coeffs = jnp.full((k,), init, jnp.float32)
  else:
    coeffs = [jnp.full((k,), init, jnp.float32) for _ in leaves]
  merge = functools.partial(_merged, base_leaves, leaves, treedef, granularity)
  opt = optax.adam(learning_rate)
  step, state = _adamerging_step(apply_fn, merge, opt, bounds), opt.init(coeffs)
  history = []
  for s in range(steps):
    coeffs, state, value = step(coeffs, state, batches[s % len(batches)])
    history.append(value)
  params = jax.jit(merge)(coeffs)
  if granularity == "layer":
    coeffs = jax.tree_util.tree_unflatten(treedef, coeffs)
  return AdaMergingResult(coeffs, params, jnp.stack(history))


def _merged(base_leaves, leaves, treedef, granularity: str, c) -> PyTree:
  """θ_base + Σ_k c_k τ_k per leaf: `c` [K] (`task`) or one [K] per leaf (`layer`)."""
  per_leaf = [c] * len(leaves) if granularity == "task" else c
  merged = [
    (b.astype(jnp.float32) + jnp.tensordot(ci, t.astype(jnp.float32), 1)).astype(b.dtype)
    for b, t, ci in zip(base_leaves, leaves, per_leaf)
  ]
  return jax.tree_util.tree_unflatten(treedef, merged)


def _adamerging_step(apply_fn, merge, opt, bounds):
  """The jitted `step(c, state, x) -> (c, state, entropy)`: one Adam step on the mean
  prediction entropy of the merged model on batch x, coefficients clipped to `bounds`."""

  def entropy(c, x):
    logp = jax.nn.log_softmax(apply_fn(merge(c), x).astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(c, state, x):
    value, grad = jax.value_and_grad(entropy)(c, x)
    updates, state = opt.update(grad, state, c)
    c = optax.apply_updates(c, updates)
    if bounds is not None:
      c = jax.tree.map(lambda v: jnp.clip(v, *bounds), c)
    return c, state, value

  return step
