"""Hypothesis fuzz of every function in core.{losses,routing,merging,calibration,category_mapping}.

Each test draws a seed (arrays come from NumPy with that seed), a dtype (float32/bfloat16)
and an option set from a small fixed list, so every function compiles only a few times;
values span ordinary and extreme magnitudes (logits ±1e4, temperatures 1e-3…1e3, all-zero
weights). Checked: outputs finite, right shape/dtype, and the invariants of each function.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_adapt.core import calibration, losses, merging, routing
from moe_adapt.core import category_mapping as cm

FUZZ = settings(
  max_examples=200,
  deadline=None,
  derandomize=True,  # reproducible in CI; every run checks the same 200 cases
  database=None,
  suppress_health_check=[HealthCheck.too_slow],
)

seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from([jnp.float32, jnp.bfloat16])
scales = st.sampled_from([1e-3, 1.0, 30.0, 1e4])
temperatures = st.sampled_from([1e-3, 0.5, 1.0, 1e3])


def as_np(x):
  return np.asarray(x).astype(np.float64)  # host-side: no device conversion to compile


def logits_like(seed, shape, scale, dtype):
  """Random logits; for the largest scale, a hard ±scale pattern (extreme logits)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=shape)
  if scale >= 1e4:
    z = np.sign(z) * scale
  else:
    z = z * scale
  return np.asarray(z, dtype)


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_prune(x, density):
  """NumPy magnitude pruning: the round(density·n) (≥ 1) largest |x|, ties to lower index."""
  flat = x.reshape(-1)
  keep = 0 if density == 0 else min(flat.size, max(1, round(density * flat.size)))
  order = np.lexsort((np.arange(flat.size), -np.abs(flat)))
  out = np.zeros_like(flat)
  out[order[:keep]] = flat[order[:keep]]
  return out.reshape(x.shape)


def assert_finite(*arrays):
  for a in arrays:
    assert np.all(np.isfinite(as_np(a))), a


# ----------------------------------------------------------------------------- losses

LOGIT_SHAPE = (6, 5)  # the shape of the unit tests, whose compilations are then reused
kl = jax.jit(losses.kl_divergence)
sym_kl = jax.jit(losses.symmetric_kl, static_argnames="stop_gradient_targets")
soft_ce = jax.jit(losses.soft_cross_entropy)
ce = jax.jit(losses.cross_entropy)
mse = jax.jit(losses.feature_mse)


@FUZZ
@given(seeds, scales, temperatures, dtypes)
def test_kl_divergence(seed, scale, temperature, dtype):
  shape = LOGIT_SHAPE
  a = logits_like(seed, shape, scale, dtype)
  b = logits_like(seed + 1, shape, scale, dtype)
  got, same = as_np(kl(a, b, temperature=temperature)), as_np(kl(a, a, temperature=temperature))
  assert got.shape == shape[:-1]
  assert_finite(got)
  assert np.all(got >= 0)
  np.testing.assert_array_equal(same, 0.0)
  za, zb = as_np(a) / temperature, as_np(b) / temperature
  log_p, log_q = np_log_softmax(za), np_log_softmax(zb)
  ref = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  tol = 1e-5 * (1.0 + np.abs(za).max() + np.abs(zb).max())
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=tol)


@FUZZ
@given(seeds, scales, temperatures, dtypes)
def test_symmetric_kl(seed, scale, temperature, dtype):
  shape = LOGIT_SHAPE
  a = logits_like(seed, shape, scale, dtype)
  b = logits_like(seed + 1, shape, scale, dtype)
  ab = as_np(sym_kl(a, b, temperature=temperature))
  ba = as_np(sym_kl(b, a, temperature=temperature))
  assert_finite(ab)
  assert np.all(ab >= 0)
  np.testing.assert_allclose(ab, ba, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(as_np(sym_kl(a, a, temperature=temperature)), 0.0)


@FUZZ
@given(seeds, scales, dtypes)
def test_soft_cross_entropy(seed, scale, dtype):
  shape = LOGIT_SHAPE
  z = logits_like(seed, shape, scale, dtype)
  rng = np.random.default_rng(seed)
  target = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
  target[..., 0] = 0.0  # some zero targets
  target /= target.sum(-1, keepdims=True)
  got = as_np(soft_ce(z, np.asarray(target, dtype)))
  assert_finite(got)
  # Cross-entropy >= entropy of the target >= 0.
  t = as_np(np.asarray(target, dtype))
  entropy = -np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0).sum(-1)
  assert np.all(got >= entropy - 1e-3 * (1 + np.abs(as_np(z)).max()))
  ref = -(t * np_log_softmax(as_np(z))).sum(-1)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * (1 + np.abs(as_np(z)).max()))


@FUZZ
@given(seeds, scales, dtypes)
def test_cross_entropy(seed, scale, dtype):
  shape = (2, 3, 4)  # extra batch axes
  z = logits_like(seed, shape, scale, dtype)
  labels = np.random.default_rng(seed).integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
  got = as_np(ce(z, labels))
  assert got.shape == shape[:-1]
  assert_finite(got)
  assert np.all(got >= 0)
  ref = -np.take_along_axis(np_log_softmax(as_np(z)), labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * (1 + np.abs(as_np(z)).max()))


@FUZZ
@given(seeds, scales, dtypes)
def test_feature_mse(seed, scale, dtype):
  shape = (2, 3, 4)  # several feature axes
  s = logits_like(seed, shape, scale, dtype)
  t = logits_like(seed + 1, shape, scale, dtype)
  got = as_np(mse(s, t))
  assert got.shape == shape[:1]
  assert_finite(got)
  np.testing.assert_array_equal(as_np(mse(s, s)), 0.0)
  ref = ((as_np(s) - as_np(t)) ** 2).reshape(shape[0], -1).mean(-1)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


# ---------------------------------------------------------------------------- routing


route = jax.jit(routing.random_route, static_argnums=(1, 2))  # as in test_routing


@FUZZ
@given(seeds, st.sampled_from([(5, (20000,)), (3, ()), (1, (7,))]))
def test_random_route(seed, option):
  num_experts, shape = option
  idx = np.asarray(route(jax.random.key(seed), num_experts, shape))
  assert idx.shape == shape and idx.dtype == np.int32
  assert idx.min() >= 0 and idx.max() < num_experts


top_k = jax.jit(routing.top_k_route, static_argnames="k")


@FUZZ
@given(seeds, st.sampled_from([(1, jnp.float32), (4, jnp.bfloat16), (6, jnp.float32)]), scales)
def test_top_k_route(seed, option, scale):
  k, dtype = option
  shape = (2, 3, 6)
  gates = logits_like(seed, shape, scale, dtype)
  idx, w = top_k(gates, k)
  idx, w = np.asarray(idx), as_np(w)
  assert idx.shape == w.shape == (*shape[:-1], k)
  assert_finite(w)
  assert np.all(w >= 0)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  g = as_np(gates)
  picked = np.take_along_axis(g, idx, -1)
  # The picked gates are the k largest and in decreasing order; indices are distinct.
  np.testing.assert_array_equal(picked, -np.sort(-g, -1)[..., :k])
  assert np.all(np.sort(idx, -1)[..., 1:] != np.sort(idx, -1)[..., :-1])


def dropout_apply(params, x, key):
  # Key-driven feature dropout without threefry mask generation (which compiles slowly).
  drop = jax.random.key_data(key)[-1] % x.shape[1]
  return jnp.where(jnp.arange(x.shape[1]) != drop, x, 0).astype(jnp.float32) @ params


mc = jax.jit(routing.mc_dropout_probs, static_argnames=("apply_fn", "num_samples"))


@FUZZ
@given(seeds, st.sampled_from([(1, jnp.float32), (3, jnp.bfloat16)]), scales)
def test_mc_dropout_probs(seed, option, scale):
  num_samples, dtype = option
  x = logits_like(seed, (4, 3), scale, dtype)
  params = np.asarray(np.random.default_rng(seed).normal(size=(3, 5)), jnp.float32)
  probs = as_np(mc(dropout_apply, params, x, jax.random.key(seed), num_samples=num_samples))
  assert probs.shape == (num_samples, 4, 5)
  assert_finite(probs)
  assert np.all(probs >= 0)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


entropy = jax.jit(routing.normalized_entropy)


@FUZZ
@given(
  seeds,
  st.sampled_from([((4, 1), jnp.float32), ((3, 5), jnp.float32), ((3, 5), jnp.bfloat16)]),
  scales,
  st.booleans(),
)
def test_normalized_entropy(seed, option, scale, sparse):
  shape, dtype = option
  z = as_np(logits_like(seed, shape, scale, jnp.float32))
  p = np.exp(np_log_softmax(z))
  if sparse:
    p = np.where(p >= p.max(-1, keepdims=True), 1.0, 0.0)  # one-hot (or tied) rows
    p /= p.sum(-1, keepdims=True)
  p = np.asarray(p, dtype)
  got = as_np(entropy(p))
  assert got.shape == shape[:-1]
  assert_finite(got)
  assert np.all((got >= 0) & (got <= 1))
  if shape[-1] == 1:
    np.testing.assert_array_equal(got, 0.0)
  if shape[-1] > 1:
    q = as_np(p)
    ref = -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(-1) / np.log(shape[-1])
    np.testing.assert_allclose(got, np.clip(ref, 0, 1), atol=1e-5)


integrate = jax.jit(routing.integrate_teachers, static_argnames="mode")


@FUZZ
@given(
  seeds,
  st.sampled_from(
    [
      ((2, 3), "hard", jnp.float32),
      ((1, 2, 4), "soft", jnp.bfloat16),
      ((2, 3), "soft", jnp.float32),
    ]
  ),
  temperatures,
)
def test_integrate_teachers(seed, option, temperature):
  sizes, mode, dtype = option
  rng = np.random.default_rng(seed)
  probs = [np.asarray(rng.dirichlet(np.ones(c), size=5), dtype) for c in sizes]
  conf = np.asarray(rng.uniform(size=(5, len(sizes))), dtype)
  out = as_np(integrate(probs, conf, mode=mode, temperature=temperature))
  assert out.shape == (5, sum(sizes))
  assert_finite(out)
  assert np.all(out >= 0)
  # Rows sum to 1 (up to the rounding of bfloat16 teacher rows).
  np.testing.assert_allclose(out.sum(-1), 1.0, atol=2e-2 if dtype == jnp.bfloat16 else 1e-5)
  # Each teacher's slot is a nonnegative multiple of its distribution.
  offsets = np.cumsum((0, *sizes))
  for k, p in enumerate(probs):
    slot = out[:, offsets[k] : offsets[k + 1]]
    weight = slot.sum(-1, keepdims=True) / as_np(p).sum(-1, keepdims=True)
    np.testing.assert_allclose(slot, weight * as_np(p), atol=1e-6)


margin = jax.jit(routing.margin_weights)


@FUZZ
@given(seeds, st.sampled_from([((5, 2), jnp.float32), ((3, 4), jnp.bfloat16)]))
def test_margin_weights(seed, option):
  shape, dtype = option
  conf = np.asarray(np.random.default_rng(seed).uniform(size=shape), dtype)
  got = as_np(margin(conf))
  assert got.shape == shape[:1]
  assert_finite(got)
  srt = np.sort(as_np(conf), -1)
  np.testing.assert_allclose(got, srt[:, -1] - srt[:, -2], atol=1e-7)
  assert np.all(got >= 0)


# ---------------------------------------------------------------------------- merging


def stacked_tree(seed, k, scale, dtype, *, identical=False):
  rng = np.random.default_rng(seed)
  # The structure and shapes of test_merging's `stacked` fixture, to share compilations.
  shapes = {"dense": {"kernel": (k, 4, 5)}, "bias": (k, 5)}

  def make(shape):
    x = rng.normal(size=shape) * scale
    x[rng.uniform(size=shape) < 0.2] = 0.0  # exact zeros
    if identical:
      x = np.broadcast_to(x[:1], shape)
    return np.asarray(x, dtype)

  return jax.tree.map(make, shapes, is_leaf=lambda x: isinstance(x, tuple))


# (weights, dtype) pairs: three compilations (None/array × float32, array × bfloat16).
weight_options = st.sampled_from(
  [
    ("none", jnp.float32),
    ("zeros", jnp.bfloat16),
    ("random", jnp.float32),
    ("random", jnp.bfloat16),
    ("cancel", jnp.float32),
  ]
)


@FUZZ
@given(seeds, weight_options, scales, st.booleans())
def test_weighted_average(seed, weight_option, scale, identical):
  weight_kind, dtype = weight_option
  tree = stacked_tree(seed, 3, scale, dtype, identical=identical)
  rng = np.random.default_rng(seed)
  weights = {
    "none": None,
    "zeros": np.zeros(3, np.float32),
    "random": rng.uniform(0.0, 2.0, size=3).astype(np.float32),
    "cancel": np.array([1.0, -1.0, 0.0], np.float32),
  }[weight_kind]
  out = merging.weighted_average(tree, weights)
  for got, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    assert got.dtype == dtype and got.shape == leaf.shape[1:]
    assert_finite(got)
    if identical:
      np.testing.assert_allclose(as_np(got), as_np(leaf[0]), rtol=1e-6)
    # Uniform weights when None or when they sum to zero; otherwise normalised weights.
    if weights is None or weights.sum() == 0:
      w = np.full(3, 1 / 3)
    else:
      w = weights / weights.sum()
    ref = np.tensordot(w, as_np(leaf), axes=1)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(as_np(got), ref, rtol=tol, atol=tol * scale)


member_options = st.sampled_from([(1, jnp.float32), (3, jnp.float32), (3, jnp.bfloat16)])


@FUZZ
@given(seeds, member_options, scales)
def test_sign_disagreement(seed, option, scale):
  k, dtype = option
  tree = stacked_tree(seed, k, scale, dtype)
  got = merging.sign_disagreement(tree)
  assert got.shape == () and got.dtype == jnp.float32
  flat = np.concatenate([as_np(x).reshape(k, -1) for x in jax.tree.leaves(tree)], axis=1)
  ref = np.mean((flat > 0).any(0) & (flat < 0).any(0))
  assert 0.0 <= float(got) <= 1.0
  assert abs(float(got) - ref) < 1e-7
  if k == 1:
    assert float(got) == 0.0


@FUZZ
@given(seeds, member_options, scales)
def test_pairwise_sign_disagreement(seed, option, scale):
  k, dtype = option
  tree = stacked_tree(seed, k, scale, dtype)
  got = np.asarray(merging.pairwise_sign_disagreement(tree))
  assert got.shape == (k, k) and got.dtype == np.float32
  assert np.all((got >= 0) & (got <= 1))
  np.testing.assert_array_equal(got, got.T)
  np.testing.assert_array_equal(np.diag(got), 0.0)
  flat = np.concatenate([as_np(x).reshape(k, -1) for x in jax.tree.leaves(tree)], axis=1)
  ref = np.mean(flat[:, None, :] * flat[None, :, :] < 0, axis=-1)
  np.testing.assert_allclose(got, ref, atol=1e-7)
  # Pairwise conflicts never exceed the set-wise conflict fraction.
  assert got.max() <= float(merging.sign_disagreement(tree)) + 1e-7


densities = st.sampled_from([0.0, 1e-3, 0.1, 0.25, 0.5, 0.77, 1.0])


@FUZZ
@given(seeds, densities, scales, dtypes)
def test_magnitude_prune(seed, density, scale, dtype):
  tree = stacked_tree(seed, 3, scale, dtype)  # pruned as a plain tree (whole leaves)
  out = merging.magnitude_prune(tree, density)
  for pruned_leaf, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    got, x = as_np(pruned_leaf), as_np(leaf)
    assert pruned_leaf.dtype == dtype and got.shape == x.shape
    assert_finite(got)
    keep = 0 if density == 0 else max(1, round(density * x.size))
    # Survivors are untouched, their count is right (zeros may be among the "kept"), and
    # every survivor is at least as large as every pruned entry.
    assert np.all((got == x) | (got == 0))
    assert np.count_nonzero(got) == min(keep, np.count_nonzero(x))
    pruned = np.abs(x[(got == 0) & (x != 0)])
    if pruned.size and np.count_nonzero(got):
      assert np.abs(got[got != 0]).min() >= pruned.max()


@FUZZ
@given(seeds, densities, st.sampled_from([0.0, 0.3, 1.0, 2.0]), scales, dtypes, st.booleans())
def test_ties_merge(seed, density, scale_factor, scale, dtype, identical):
  tree = stacked_tree(seed, 3, scale, dtype, identical=identical)
  out = merging.ties_merge(tree, density=density, scale=scale_factor)
  for merged, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    got = as_np(merged)
    assert merged.dtype == dtype and got.shape == leaf.shape[1:]
    assert_finite(got)
    members = np.stack([np_prune(m, density) for m in as_np(leaf)])
    # The merged value lies between the extreme trimmed values (times the scale), and its
    # sign is never against the majority mass.
    lo = np.minimum(members.min(0), 0) * scale_factor
    hi = np.maximum(members.max(0), 0) * scale_factor
    tol = 1e-6 * scale + (1e-2 * scale if dtype == jnp.bfloat16 else 0)
    assert np.all((got >= lo - tol) & (got <= hi + tol))
    assert np.all(got * np.sign(members.sum(0)) >= -tol)
    if identical:
      np.testing.assert_allclose(got, members[0] * scale_factor, rtol=1e-2, atol=tol)


# ------------------------------------------------------------------------- calibration

fit = calibration.fit_temperature  # jits internally after casting to float32
ece = jax.jit(calibration.expected_calibration_error, static_argnames="num_bins")


@FUZZ
@given(
  seeds,
  st.sampled_from([1e-3, 1.0, 5.0, 1e4]),
  dtypes,
  st.sampled_from(["random", "one", "argmax"]),
)
def test_fit_temperature(seed, scale, dtype, label_kind):
  z = logits_like(seed, (1000, 10), scale, dtype)  # test_calibration's shape: shared compile
  rng = np.random.default_rng(seed)
  labels = {
    "random": rng.integers(0, 10, size=1000),
    "one": np.full(1000, 2),  # a single class present
    "argmax": np.argmax(as_np(z), -1),  # all predictions correct
  }[label_kind].astype(np.int32)
  t = float(fit(z, labels))
  assert np.isfinite(t) and 0.05 * (1 - 1e-5) <= t <= 20.0 * (1 + 1e-5)
  if label_kind == "argmax" and 1.0 <= scale < 1e4:
    # Untied logits, all predictions right: the NLL falls as T -> 0, so the lower bound.
    # (The ±1e4 pattern ties several maxima: the NLL is flat there and any T is optimal.)
    assert t < 0.06


@FUZZ
@given(seeds, st.sampled_from([(15, jnp.float32), (15, jnp.bfloat16), (1, jnp.float32)]), scales)
def test_expected_calibration_error(seed, option, scale):
  num_bins, dtype = option
  z = as_np(logits_like(seed, (50, 4), scale, jnp.float32))
  probs = np.asarray(np.exp(np_log_softmax(z)), dtype)
  labels = np.random.default_rng(seed).integers(0, 4, size=50).astype(np.int32)
  got = float(ece(probs, labels, num_bins=num_bins))
  assert np.isfinite(got) and 0.0 <= got <= 1.0 + 1e-6
  # ECE is at least the gap between mean accuracy and mean confidence (one-bin ECE).
  p = as_np(probs)
  gap = abs(np.mean(p.argmax(-1) == labels) - p.max(-1).mean())
  assert got >= gap - 1e-5
  if num_bins == 1:
    assert got == np.float32(gap) or abs(got - gap) < 1e-5


# ------------------------------------------------------------------- category mapping

direct = jax.jit(cm.direct_relationship, static_argnums=2)
# test_category_mapping's shapes and options, so its compilation is shared.
N_TRAIN, N_VAL, C_T, C_S, GRID, MAX_ITER = 240, 120, 4, 8, (1.0, 0.01), 60


def source_probs(seed, scale, dtype, n, c_s=C_S):
  z = as_np(logits_like(seed, (n, c_s), scale, jnp.float32))
  return np.asarray(np.exp(np_log_softmax(z)), dtype)


def check_relationship(rel, labels, c_t, c_s, atol):
  rel = as_np(rel)
  assert rel.shape == (c_t, c_s)
  assert_finite(rel)
  assert np.all(rel >= 0)
  np.testing.assert_allclose(rel.sum(-1), 1.0, atol=atol)
  for c in set(range(c_t)) - set(labels.tolist()):
    np.testing.assert_allclose(rel[c], 1.0 / c_s, rtol=1e-6)  # empty class: uniform


@FUZZ
@given(seeds, scales, dtypes)
def test_direct_relationship(seed, scale, dtype):
  # Under jit, so that labels missing a class exercise the uniform-row path.
  probs = source_probs(seed, scale, dtype, 30)
  labels = np.random.default_rng(seed).integers(0, C_T, size=30).astype(np.int32)
  rel = direct(probs, labels, C_T)
  check_relationship(rel, labels, C_T, C_S, atol=2e-2 if dtype == jnp.bfloat16 else 1e-5)
  # The mean of the class rows weighted by class frequency is the source marginal.
  counts = np.bincount(labels, minlength=C_T)
  present = counts > 0
  marginal = (counts[present, None] * as_np(rel)[present]).sum(0) / counts.sum()
  np.testing.assert_allclose(marginal, as_np(probs).mean(0), atol=1e-5)


@FUZZ
@given(seeds, scales, dtypes)
def test_reverse_relationship(seed, scale, dtype):
  rng = np.random.default_rng(seed)
  labels, val_labels = (
    np.concatenate([np.arange(C_T), rng.integers(0, C_T, size=n - C_T)]).astype(np.int32)
    for n in (N_TRAIN, N_VAL)
  )
  rel = cm.reverse_relationship(
    source_probs(seed, scale, dtype, N_TRAIN),
    labels,
    C_T,
    val_source_probs=source_probs(seed + 1, scale, dtype, N_VAL),
    val_labels=val_labels,
    l2_grid=GRID,
    max_iter=MAX_ITER,
  )
  check_relationship(rel, labels, C_T, C_S, atol=1e-5)


co_tuning = jax.jit(cm.co_tuning_loss)


@FUZZ
@given(seeds, scales, dtypes, st.sampled_from([0.0, 2.3, 1e3]))
def test_co_tuning_loss(seed, scale, dtype, trade_off):
  rng = np.random.default_rng(seed)
  t_logits = logits_like(seed, (4, 3), scale, dtype)
  s_logits = logits_like(seed + 1, (4, 5), scale, dtype)
  labels = rng.integers(0, 3, size=4).astype(np.int32)
  rel = np.asarray(rng.dirichlet(np.ones(5), size=3), jnp.float32)
  got = as_np(co_tuning(t_logits, s_logits, labels, rel, trade_off=trade_off))
  assert got.shape == (4,)
  assert_finite(got)
  target_ce = -np.take_along_axis(np_log_softmax(as_np(t_logits)), labels[:, None], -1)[:, 0]
  soft = -(as_np(rel)[labels] * np_log_softmax(as_np(s_logits))).sum(-1)
  tol = 1e-5 * (1 + np.abs(as_np(t_logits)).max() + np.abs(as_np(s_logits)).max())
  assert np.all(got >= target_ce - tol)
  np.testing.assert_allclose(
    got, target_ce + trade_off * soft, rtol=1e-4, atol=tol * (1 + trade_off)
  )
