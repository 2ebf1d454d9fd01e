"""Per-example losses shared by the methods (distillation, Co-Tuning, AdaMix, MUKI, UHC).

Every function is pure and jit-able, takes batch-first float32 or bfloat16 inputs, computes
in float32 (bfloat16 log-probabilities are too coarse for KL terms near zero) and returns a
float32 array with the batch shape, one value per example; reduce it as the method needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
  "cross_entropy",
  "feature_mse",
  "grouped_kl",
  "kl_divergence",
  "l2_sp_penalty",
  "masked_kl",
  "soft_cross_entropy",
  "symmetric_kl",
]


def _check_temperature(temperature) -> None:
  # Only Python numbers can be checked here; an array temperature may be traced.
  if isinstance(temperature, int | float) and not temperature > 0:
    raise ValueError(f"temperature={temperature!r} is invalid; accepted: a number > 0")


def _check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
      f"{name_a} has shape {jnp.shape(a)} but {name_b} has shape {jnp.shape(b)}; "
      "accepted: equal shapes"
    )
  if jnp.ndim(a) < 1:
    raise ValueError(f"{name_a} is a scalar; accepted: arrays with a class/feature axis")


def _kl_from_logits(target_logits: jax.Array, logits: jax.Array, temperature) -> jax.Array:
  log_p = jax.nn.log_softmax(jnp.asarray(target_logits, jnp.float32) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
  p = jnp.exp(log_p)
  # Entries with p == 0 contribute 0 (the 0·log 0 convention); the `where` also keeps
  # -inf logits (masked classes) from turning 0·(-inf) into NaN.
  terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
  # Rounding can leave a sum of about -1e-8 where the true value is 0.
  return jnp.maximum(jnp.sum(terms, axis=-1), 0.0)


def kl_divergence(
  target_logits: jax.Array, logits: jax.Array, *, temperature: float | jax.Array = 1.0
) -> jax.Array:
  r"""Per-example KL divergence between tempered softmax distributions.

  .. math::
    \mathrm{KL}(p \,\|\, q) = \sum_c p_c (\log p_c - \log q_c),\quad
    p = \mathrm{softmax}(t / T),\; q = \mathrm{softmax}(l / T)

  This is the distillation term of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
  Network" (NIPS 2014 Deep Learning Workshop, arXiv 1503.02531, 2015), without the T² factor some
  implementations multiply in (MUKI, for one, does not). Computed with log_softmax, so it stays
  finite for logits of ±1e4 at T = 1e-3, is ≥ 0, and is exactly 0 when both inputs are equal.

  Args:
    target_logits: [..., C] logits of the target distribution p (e.g. the teacher).
    logits: [..., C] logits of the model distribution q (e.g. the student).
    temperature: T > 0, a Python number or a scalar array.

  Returns:
    [...] float32, one KL value per example.
  """
  _check_same_shape("target_logits", target_logits, "logits", logits)
  _check_temperature(temperature)
  return _kl_from_logits(target_logits, logits, temperature)


def symmetric_kl(
  logits_a: jax.Array,
  logits_b: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  stop_gradient_targets: bool = False,
) -> jax.Array:
  r"""Per-example symmetric KL divergence (AdaMix consistency regulariser).

  .. math::
    \tfrac12\left[\mathrm{KL}(a \,\|\, b) + \mathrm{KL}(b \,\|\, a)\right]

  with a = softmax(logits_a / T), b = softmax(logits_b / T). AdaMix (Wang et al., EMNLP
  2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning") uses it
  between two stochastically routed forward passes, and its code detaches the target side
  of each term. With ``stop_gradient_targets=True`` this function computes

  .. math::
    \tfrac12\left[\mathrm{KL}(\mathrm{sg}(a) \,\|\, b) + \mathrm{KL}(\mathrm{sg}(b) \,\|\, a)
    \right]

  which has the same value but a different gradient: each pass is pulled towards the
  other, and no gradient flows through the distribution used as the target of a term.

  Args:
    logits_a: [..., C] logits of the first distribution.
    logits_b: [..., C] logits of the second distribution.
    temperature: T > 0, a Python number or a scalar array.
    stop_gradient_targets: detach the target (first) argument of each KL term. Static.

  Returns:
    [...] float32, one value per example; symmetric in its two arguments.
  """
  _check_same_shape("logits_a", logits_a, "logits_b", logits_b)
  _check_temperature(temperature)
  sg = jax.lax.stop_gradient if stop_gradient_targets else (lambda x: x)
  forward = _kl_from_logits(sg(logits_a), logits_b, temperature)
  backward = _kl_from_logits(sg(logits_b), logits_a, temperature)
  return 0.5 * (forward + backward)


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
  r"""Per-example cross-entropy with a soft (probability-vector) target.

  .. math::
    \mathrm{CE}(y, z) = -\sum_c y_c \log \mathrm{softmax}(z)_c

  The "source label" term of Co-Tuning (You et al., NeurIPS 2020, "Co-Tuning for Transfer
  Learning") and the soft-target term of knowledge distillation. Classes with target 0
  contribute 0, even where a logit is -inf.

  Args:
    logits: [..., C] model logits.
    target_probs: [..., C] target distribution (rows normally sum to 1; not enforced).

  Returns:
    [...] float32, one value per example.
  """
  _check_same_shape("logits", logits, "target_probs", target_probs)
  log_q = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  y = jnp.asarray(target_probs, jnp.float32)
  return -jnp.sum(jnp.where(y != 0, y * log_q, 0.0), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  r"""Per-example cross-entropy with integer labels.

  .. math::
    \mathrm{CE}(y, z) = -\log \mathrm{softmax}(z)_y = \log \sum_c e^{z_c} - z_y

  The standard multinomial (softmax) cross-entropy (Goodfellow, Bengio & Courville, "Deep
  Learning", MIT Press 2016, ch. 6); the supervised term of every method here, e.g. the
  target term CE(H(F(x)), y_t) of Co-Tuning (You et al., NeurIPS 2020) and the query loss
  of Meta-DMoE's outer step (Zhong et al., NeurIPS 2022, Alg. 1).

  Args:
    logits: [..., C] model logits.
    labels: [...] integer class indices in [0, C). Out-of-range labels give a wrong
      (but finite) value under jit; they are rejected when the labels are concrete.

  Returns:
    [...] float32, one value per example.
  """
  logits_shape, labels_shape = jnp.shape(logits), jnp.shape(labels)
  if len(logits_shape) < 1 or logits_shape[:-1] != labels_shape:
    raise ValueError(
      f"labels has shape {labels_shape} but logits has shape {logits_shape}; "
      "accepted: labels.shape == logits.shape[:-1]"
    )
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"labels has dtype {jnp.result_type(labels)}; accepted: integer dtypes")
  if not isinstance(labels, jax.core.Tracer) and jnp.size(labels) > 0:
    num_classes = logits_shape[-1]
    low, high = int(jnp.min(labels)), int(jnp.max(labels))
    if low < 0 or high >= num_classes:
      raise ValueError(
        f"labels range over [{low}, {high}]; accepted: integers in [0, {num_classes})"
      )
  log_q = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_q, jnp.asarray(labels)[..., None], axis=-1)
  return -picked[..., 0]


def feature_mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
  r"""Per-example mean squared error over all non-batch (feature) axes.

  .. math::
    \mathrm{MSE}_b = \frac{1}{D} \sum_{d} (s_{b,d} - t_{b,d})^2

  The feature-distillation loss of Meta-DMoE (Zhong et al., NeurIPS 2022, "Meta-DMoE:
  Adapting to Domain Shift by Meta-Distillation from Mixture-of-Experts", Alg. 1), where the
  student's features are regressed onto the aggregated expert features. The paper writes
  the L2 distance ‖A(M_e(x)) − f(x; θ_e)‖₂; the official code's `l2_loss` is this mean of
  squares (it only rescales the inner learning rate α).

  Args:
    student: [B, ...] student features.
    teacher: [B, ...] teacher features, same shape.

  Returns:
    [B] float32.
  """
  _check_same_shape("student", student, "teacher", teacher)
  diff = jnp.asarray(student, jnp.float32) - jnp.asarray(teacher, jnp.float32)
  feature_axes = tuple(range(1, diff.ndim))
  return jnp.mean(jnp.square(diff), axis=feature_axes)


def grouped_kl(target_probs: jax.Array, logits: jax.Array, groups: jax.Array, num_groups: int):
  """Per-example Σ_c q_c (log q_c − log p̂_c), p̂ = softmax of `logits` within each group.

  With one group this is KL(q ‖ softmax(logits)); with the teachers' label groups and q the
  concatenated teacher distributions it is UHC's Σ_k KL(P_k ‖ renormalised student). The
  groups are a partition of the classes; `masked_kl` takes overlapping groups.

  Args:
    target_probs: [B, C] (each group's slot a distribution, or the whole row one).
    logits: [B, C] student logits.
    groups: [C] int32 group of each class, in [0, num_groups).
    num_groups: G (static).

  Returns:
    float32 [B].
  """
  member = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)  # [C, G]
  # A large finite negative (not -inf) keeps empty groups' logsumexp and gradients finite.
  bias = jnp.where(member > 0, 0.0, -1e9)
  lse = jax.nn.logsumexp(logits[:, :, None] + bias[None], axis=1)  # [B, G]
  log_p = logits - lse[:, groups]
  q = jnp.asarray(target_probs, jnp.float32)
  return jnp.sum(jax.scipy.special.xlogy(q, q) - q * log_p, axis=-1)


def masked_kl(target_probs: jax.Array, logits: jax.Array, mask: jax.Array) -> jax.Array:
  r"""Per-example Σ_g KL(q_g ‖ softmax of `logits` over the classes of group g).

  .. math::
    \ell = \sum_g \sum_{c \in S_g} q_{g,c}\,\big(\log q_{g,c} - z_c
      + \log \textstyle\sum_{c' \in S_g} e^{z_{c'}}\big)

  Groups S_g = {c : mask[g, c] > 0} may overlap: with row g of q teacher g's distribution
  over its label set, this is UHC's Σ_k KL(P_k ‖ the student renormalised over L_k) for
  overlapping label sets. For a partition it equals `grouped_kl`. Entries of q outside a
  group's mask are ignored; a group whose q row is 0 (e.g. an empty group) adds 0.

  Args:
    target_probs: [B, G, C] per-group targets (each used row a distribution over S_g).
    logits: [B, C] student logits.
    mask: [G, C] 0/1 membership of each class in each group.

  Returns:
    float32 [B].
  """
  member = jnp.asarray(mask) > 0
  # A large finite negative (not -inf) keeps empty groups' logsumexp and gradients finite.
  bias = jnp.where(member, 0.0, -1e9)
  z = jnp.asarray(logits, jnp.float32)
  lse = jax.nn.logsumexp(z[:, None, :] + bias[None], axis=-1)  # [B, G]
  log_p = z[:, None, :] - lse[:, :, None]  # [B, G, C]
  q = jnp.where(member[None], jnp.asarray(target_probs, jnp.float32), 0.0)
  return jnp.sum(jax.scipy.special.xlogy(q, q) - q * log_p, axis=(1, 2))


# ----------------------------------------------------------------------------
# Parameter penalties (a scalar per model, not per example)
# ----------------------------------------------------------------------------


def l2_sp_penalty(params, anchor=None, *, alpha: float | jax.Array) -> jax.Array:
  r"""L2-SP's pull of `params` toward a starting point: α/2 · ||θ − θ⁰||² over every leaf.

  .. math::
    \Omega(\theta) = \frac{\alpha}{2} \sum_{\text{leaves}} \lVert \theta - \theta^0 \rVert_2^2

  Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with
  Convolutional Networks", ICML 2018: α toward the pre-trained weights θ⁰ on the transferred
  layers; with `anchor=None` (θ⁰ = 0) it is the plain L2 term β/2 · ||θ||² L2-SP puts on the
  new layers.

  Args:
    params: a pytree of arrays θ.
    anchor: a pytree of the same structure and shapes (θ⁰), or None for zeros.
    alpha: the coefficient α (a number or a traced scalar).

  Returns:
    float32 scalar.
  """
  if anchor is None:
    anchor = jax.tree.map(jnp.zeros_like, params)
  leaves, anchors = jax.tree.leaves(params), jax.tree.leaves(anchor)
  if jax.tree.structure(params) != jax.tree.structure(anchor):
    raise ValueError(
      f"anchor has structure {jax.tree.structure(anchor)} but params has "
      f"{jax.tree.structure(params)}; accepted: the same pytree structure"
    )
  for a, b in zip(leaves, anchors, strict=True):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(
        f"anchor has a leaf of shape {jnp.shape(b)} where params has {jnp.shape(a)}; "
        "accepted: the same shapes"
      )
  distance = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(leaves, anchors, strict=True))
  return 0.5 * alpha * distance
