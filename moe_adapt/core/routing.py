"""Routing and teacher-selection functions: which expert handles an input, and how much.

Covers AdaMix's stochastic routing, top-k gating, Monte-Carlo-dropout uncertainty and the
MUKA/MUKI integration of teachers with different label sets. Pure and jit-able; statistics
are computed and returned in float32.

Supervision integration (`integrate_teachers`, from Li et al.: MUKA, arXiv 2112.07327;
MUKI, Findings of EMNLP 2022; the official code's `overlap_class_number` option is the
overlapping case): each scattered teacher row has the mass of the teacher's row and the
weights sum to 1, so rows of the target sum to 1 whenever the teachers' rows do, with
overlaps too (a shared class collects the weighted probabilities of every teacher that
knows it). A disjoint `label_index` that lists the columns in concatenation order gives
exactly the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "integrate_teachers",
  "margin_weights",
  "mc_dropout_probs",
  "normalized_entropy",
  "random_route",
  "top_k_route",
]

INTEGRATION_MODES = ("hard", "soft")


def random_route(key: jax.Array, num_experts: int, shape: Sequence[int] = ()) -> jax.Array:
  r"""Uniformly random expert indices (AdaMix stochastic routing).

  .. math::
    e \sim \mathcal{U}\{0, 1, \dots, E - 1\}\ \text{independently for each entry of shape}

  AdaMix (Wang et al., EMNLP 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient
  Model Tuning", §3.1, after THOR: Zuo et al., 2021) picks, for every forward pass during
  training, one adaptation module per mixture uniformly at random instead of using a
  learned gate: no router, no load-balancing loss, no extra parameters.

  Args:
    key: a PRNG key.
    num_experts: number of experts E ≥ 1. Static (it sets the sampling range).
    shape: shape of the returned index array (e.g. () for one choice per step, [B] for one
      per example). Static.

  Returns:
    int32 array of `shape` with values uniform in [0, E).
  """
  if not isinstance(num_experts, int | np.integer) or num_experts < 1:
    raise ValueError(f"num_experts={num_experts!r} is invalid; accepted: an integer >= 1")
  return jax.random.randint(key, tuple(shape), 0, int(num_experts), dtype=jnp.int32)


def top_k_route(gate_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  r"""Indices and normalised weights of the k largest gate logits.

  .. math::
    \mathcal{I} = \operatorname{top-k}(g),\qquad
    w_i = \frac{e^{g_i}}{\sum_{j \in \mathcal{I}} e^{g_j}},\ i \in \mathcal{I}

  The sparse gate of Shazeer et al. (ICLR 2017, "Outrageously Large Neural Networks"),
  without its noise term. Ties go to the lower index.

  Args:
    gate_logits: [..., E] gate logits.
    k: number of experts to keep, 1 ≤ k ≤ E. Static (it sets the output shape).

  Returns:
    (indices, weights): int32 [..., k] in decreasing order of logit, and float32 [..., k]
    summing to 1 over the last axis.
  """
  num_experts = jnp.shape(gate_logits)[-1] if jnp.ndim(gate_logits) else 0
  if not isinstance(k, int | np.integer) or not 1 <= k <= num_experts:
    raise ValueError(
      f"k={k!r} is invalid for gate_logits of shape {jnp.shape(gate_logits)}; "
      f"accepted: an integer in [1, {num_experts}]"
    )
  values, indices = jax.lax.top_k(jnp.asarray(gate_logits, jnp.float32), int(k))
  return indices.astype(jnp.int32), jax.nn.softmax(values, axis=-1)


def mc_dropout_probs(
  apply_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
  params: Any,
  x: jax.Array,
  key: jax.Array,
  *,
  num_samples: int,
) -> jax.Array:
  r"""Softmax outputs of S stochastic (dropout) forward passes, vmapped over the keys.

  .. math::
    P_s = \mathrm{softmax}(f(\theta, x; \xi_s)),\quad \xi_1..\xi_S = \mathrm{split}(key, S)

  Monte-Carlo dropout (Gal & Ghahramani, ICML 2016) as used by MUKA/MUKI (Li et al.,
  Findings of EMNLP 2022, "From Mimicking to Integrating: Knowledge Integration for
  Pre-Trained Language Models") to score how confident each teacher is (M = 16 there).
  The S passes run as one vmapped call; pass i uses `jax.random.split(key, S)[i]`.

  Args:
    apply_fn: `apply_fn(params, x, key) -> logits [B, C]`, with dropout driven by `key`.
      Static (a Python callable).
    params: the model parameters (any pytree), shared by all passes.
    x: [B, ...] inputs.
    key: a PRNG key.
    num_samples: S ≥ 1. Static (it sets the output shape).

  Returns:
    float32 [S, B, C].
  """
  if not isinstance(num_samples, int | np.integer) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r} is invalid; accepted: an integer >= 1")
  keys = jax.random.split(key, int(num_samples))

  def one_pass(k: jax.Array) -> jax.Array:
    return jax.nn.softmax(jnp.asarray(apply_fn(params, x, k), jnp.float32), axis=-1)

  return jax.vmap(one_pass)(keys)


def normalized_entropy(probs: jax.Array) -> jax.Array:
  r"""Entropy over the last axis divided by its maximum log C, clipped to [0, 1].

  .. math::
    u(p) = \frac{-\sum_c p_c \log p_c}{\log C}

  MUKI's uncertainty u_k(x) = H(p̄_k(x)) / log|L_k| (Li et al., "From Mimicking to
  Integrating: Knowledge Integration for Pre-Trained Language Models", Findings of EMNLP
  2022; official code `models/monte_carlo.py`), computed on the MC-dropout mean p̄_k of
  teacher k over its own label set L_k; the confidence score is s_k = 1 − u_k. Zero
  probabilities contribute 0; C = 1 gives 0 (a single class is certain).

  Args:
    probs: [..., C] probabilities.

  Returns:
    float32 [...] in [0, 1].
  """
  if jnp.ndim(probs) < 1:
    raise ValueError("probs is a scalar; accepted: arrays of shape [..., C]")
  num_classes = jnp.shape(probs)[-1]
  p = jnp.asarray(probs, jnp.float32)
  if num_classes <= 1:
    return jnp.zeros(p.shape[:-1], jnp.float32)
  # The inner `where` keeps log's argument positive so that the gradient has no NaN.
  safe_p = jnp.where(p > 0, p, 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(safe_p), 0.0), axis=-1)
  return jnp.clip(entropy / np.log(num_classes), 0.0, 1.0)


def integrate_teachers(
  teacher_probs: Sequence[jax.Array],
  confidences: jax.Array,
  *,
  mode: str,
  temperature: float | jax.Array | None = None,
  label_index: Sequence[Any] | None = None,
  num_labels: int | None = None,
) -> jax.Array:
  r"""MUKA/MUKI target over the union of the teachers' label spaces.

  Teacher k predicts over its own label set L_k. By default (``label_index=None``) the
  union label space concatenates the sets in order, so teacher k's classes occupy columns
  [Σ_{j<k} C_j, Σ_{j≤k} C_j). With ``label_index`` the sets may overlap: teacher k's class
  i is union column ``label_index[k][i]`` of a union of ``num_labels`` classes, and each
  teacher's distribution is scattered (added) into its columns. With confidences s_k(x)
  (MUKI: 1 − normalised MC-dropout entropy):

  - ``mode='hard'``: q(x) = scatter(P_{k*}(x)), k* = argmax_k s_k(x) (ties: lowest k).
  - ``mode='soft'``: q(x) = Σ_k w_k(x) · scatter_k(P_k(x)), w = softmax_k(s(x) / T)
    (MUKI default T = 0.2).

  .. math::
    q_c(x) = \sum_k w_k(x) \sum_{i:\ \pi_k(i) = c} P_{k,i}(x),\qquad
    w_k(x) = \frac{e^{s_k(x)/T}}{\sum_j e^{s_j(x)/T}}\ \text{(soft)}\ \text{or}\
    [k = k^*(x)]\ \text{(hard)}

  where π_k maps teacher k's classes to union columns (the concatenation offsets by
  default); the module docstring says why rows of q sum to 1 and where this comes from.

  Args:
    teacher_probs: K arrays [B, C_k] (any matching leading batch shape) of teacher
      probabilities. Their number and class counts are static.
    confidences: [B, K] per-example confidence of each teacher (higher = more confident).
    mode: 'hard' or 'soft'. Static.
    temperature: T > 0 for 'soft' (required there); ignored by 'hard'.
    label_index: None (concatenation), or K integer arrays, ``label_index[k]`` of shape
      [C_k] with teacher k's union columns, each in [0, num_labels), no column twice
      within one teacher. Static: concrete values (NumPy arrays or lists), not tracers.
    num_labels: the union size; required with ``label_index`` (not derived from it, so
      that a union class no teacher covers still gets its column), refused without it.

  Returns:
    float32 [B, Σ_k C_k], or [B, num_labels] with ``label_index``.
  """
  if mode not in INTEGRATION_MODES:
    raise ValueError(f"mode={mode!r} is unknown; accepted: {', '.join(INTEGRATION_MODES)}")
  teacher_probs = list(teacher_probs)
  conf_shape = jnp.shape(confidences)
  _check_shapes(teacher_probs, conf_shape)
  columns = _check_label_index(teacher_probs, label_index, num_labels)
  conf = jnp.asarray(confidences, jnp.float32)
  weights = _teacher_weights(conf, mode, temperature)
  parts = [
    weights[..., k : k + 1] * jnp.asarray(p, jnp.float32) for k, p in enumerate(teacher_probs)
  ]
  if columns is None:
    return jnp.concatenate(parts, axis=-1)
  return _scatter(parts, columns, (*conf_shape[:-1], num_labels))


def _check_shapes(teacher_probs: list, conf_shape: tuple[int, ...]) -> None:
  """K teachers' [B, C_k] against confidences [B, K], or ValueError."""
  if not conf_shape or len(teacher_probs) != conf_shape[-1]:
    raise ValueError(
      f"teacher_probs has {len(teacher_probs)} teachers but confidences has shape "
      f"{conf_shape}; accepted: confidences of shape [B, K] with K = len(teacher_probs)"
    )
  for i, p in enumerate(teacher_probs):
    if jnp.ndim(p) < 1 or jnp.shape(p)[:-1] != conf_shape[:-1]:
      raise ValueError(
        f"teacher_probs[{i}] has shape {jnp.shape(p)}; accepted: batch shape "
        f"{conf_shape[:-1]} equal to that of confidences, followed by a class axis"
      )


def _teacher_weights(conf: jax.Array, mode: str, temperature: Any) -> jax.Array:
  """[B, K] float32 weights of the teachers: one-hot argmax ('hard') or softmax(conf / T)."""
  if mode == "hard":
    return jax.nn.one_hot(jnp.argmax(conf, axis=-1), conf.shape[-1], dtype=jnp.float32)
  if temperature is None:
    raise ValueError("temperature=None is invalid for mode='soft'; accepted: a number > 0")
  if isinstance(temperature, int | float) and not temperature > 0:
    raise ValueError(f"temperature={temperature!r} is invalid; accepted: a number > 0")
  return jax.nn.softmax(conf / temperature, axis=-1)


def _scatter(parts: list[jax.Array], columns: list, shape: tuple[int, ...]) -> jax.Array:
  """The sum of each part [B, C_k] added into its union columns of a zero array `shape`."""
  q = jnp.zeros(shape, jnp.float32)
  for part, cols in zip(parts, columns):
    q = q.at[..., cols].add(part)  # no duplicates within a teacher: add = place
  return q


def _check_label_index(
  teacher_probs: Sequence[jax.Array], label_index: Sequence[Any] | None, num_labels: int | None
) -> list[np.ndarray] | None:
  """`integrate_teachers`' label_index as K int32 NumPy arrays (None: concatenation)."""
  if label_index is None:
    if num_labels is not None:
      raise ValueError(
        f"num_labels={num_labels!r} is given without label_index; accepted: num_labels only "
        "together with label_index (the concatenated union has Σ_k C_k labels)"
      )
    return None
  if isinstance(num_labels, bool) or not isinstance(num_labels, int | np.integer) or num_labels < 1:
    raise ValueError(
      f"num_labels={num_labels!r} is invalid with label_index; accepted: the union size, an "
      "integer >= 1"
    )
  if isinstance(label_index, str) or len(label_index) != len(teacher_probs):
    raise ValueError(
      f"label_index has {len(label_index)} entries for {len(teacher_probs)} teachers; "
      "accepted: one integer array [C_k] per teacher"
    )
  columns = []
  for k, (idx, p) in enumerate(zip(label_index, teacher_probs)):
    if isinstance(idx, jax.core.Tracer):
      raise ValueError(
        f"label_index[{k}] is a traced array; accepted: concrete integers (close over "
        "label_index instead of passing it as a jit argument)"
      )
    arr = np.asarray(idx)
    c_k = jnp.shape(p)[-1]
    if arr.ndim != 1 or arr.shape[0] != c_k or (arr.size and arr.dtype.kind not in "iu"):
      raise ValueError(
        f"label_index[{k}] has shape {arr.shape} and dtype {arr.dtype}; accepted: a 1-D "
        f"integer array of length C_{k} = {c_k} (teacher_probs[{k}]'s class count)"
      )
    if arr.size and (arr.min() < 0 or arr.max() >= num_labels):
      raise ValueError(
        f"label_index[{k}] has values in [{arr.min()}, {arr.max()}]; accepted: columns in "
        f"[0, {num_labels}) (num_labels={num_labels})"
      )
    if len(np.unique(arr)) != arr.size:
      raise ValueError(
        f"label_index[{k}] lists a column twice ({arr.tolist()}); accepted: distinct columns "
        "within one teacher"
      )
    columns.append(arr.astype(np.int32))
  return columns


def margin_weights(confidences: jax.Array) -> jax.Array:
  r"""Per-example gap between the two largest teacher confidences (MUKI re-weighting).

  .. math::
    r(x) = s_{(1)}(x) - s_{(2)}(x) \ \ge 0

  MUKI (Li et al., "From Mimicking to Integrating: Knowledge Integration for Pre-Trained
  Language Models", Findings of EMNLP 2022: "instance-wise re-weighting ... based on the
  margin of uncertainty scores") multiplies each example's distillation loss by r (plus
  1e-6 in the official code; add it yourself if you want it), so that examples where the
  teachers are about equally confident — conflicting supervision — count less.

  Args:
    confidences: [B, K] teacher confidences, K ≥ 2.

  Returns:
    float32 [B].
  """
  shape = jnp.shape(confidences)
  if len(shape) < 1 or shape[-1] < 2:
    raise ValueError(f"confidences has shape {shape}; accepted: [B, K] with K >= 2 teachers")
  top2, _ = jax.lax.top_k(jnp.asarray(confidences, jnp.float32), 2)
  return top2[..., 0] - top2[..., 1]
