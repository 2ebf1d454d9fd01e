"""Tests for Meta-DMoE's Aggregator and AggregatorClassifier."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from moe_adapt.models import Aggregator, AggregatorClassifier

KEY = jax.random.key(0)
B, N, D, HEADS = 3, 5, 8, 2
KINDS = ("transformer", "mean", "max")


def _fake_init(model, *args, seed=0, **kwargs):
  """model.init's variables filled with NumPy random values (no PRNG compilation)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(model.init, **kwargs), KEY, *args)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, s.shape)
    else:
      value = rng.normal(size=s.shape) * 0.1
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).normal(size=(B, N, D)), jnp.float32)


@pytest.fixture(scope="module")
def setups(tokens):
  """kind -> (module, variables, jitted apply); the transformer has 2 blocks, dropout 0.1.

  One compiled program per input shape is much cheaper here than op-by-op dispatch.
  """
  out = {}
  for kind in KINDS:
    model = Aggregator(kind=kind, depth=2, num_heads=HEADS, dropout=0.1)
    out[kind] = (model, _fake_init(model, tokens), jax.jit(model.apply))
  return out


# --------------------------------------------------------------------------- NumPy references


def _np_layernorm(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _np_masked_mean(x, mask):
  m = mask[..., None].astype(np.float64)
  return (np.where(m > 0, x, 0)).sum(1) / np.maximum(m.sum(1), 1)


def _np_transformer(params, tokens, mask):
  """Pre-LN blocks (MHA with key mask, exact-GELU MLP), then the masked mean; float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.where(mask[..., None], np.asarray(tokens, np.float64), 0)
  for i in range(len(p)):
    blk = p[f"block_{i}"]
    y = _np_layernorm(x, blk["norm_attn"])
    q, k, v = (
      np.einsum("bnd,dhk->bnhk", y, blk["attn"][n]["kernel"]) + blk["attn"][n]["bias"]
      for n in ("query", "key", "value")
    )
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", w, v)
    x = x + np.einsum("bqhk,hkd->bqd", o, blk["attn"]["out"]["kernel"]) + blk["attn"]["out"]["bias"]
    y = _np_layernorm(x, blk["norm_mlp"])
    y = y @ blk["mlp_in"]["kernel"] + blk["mlp_in"]["bias"]
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    x = x + y @ blk["mlp_out"]["kernel"] + blk["mlp_out"]["bias"]
  return _np_masked_mean(x, mask)


MASK_BN = np.array([[True, False, True, True, True], [True, True, True, False, False], [True] * 5])


@pytest.mark.parametrize("mask", [None, MASK_BN], ids=["no_mask", "mask_BN"])
def test_transformer_matches_numpy_reference(setups, tokens, mask):
  _, variables, apply = setups["transformer"]
  out = apply(variables, tokens, mask)
  np_mask = np.ones((B, N), bool) if mask is None else mask
  expected = _np_transformer(variables["params"], tokens, np_mask)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_mean_and_max_match_numpy(setups, tokens):
  x = np.asarray(tokens, np.float64)
  mean = setups["mean"][2]({}, tokens, MASK_BN)
  np.testing.assert_allclose(mean, _np_masked_mean(x, MASK_BN), rtol=1e-6, atol=1e-6)
  mx = setups["max"][2]({}, tokens, MASK_BN)
  expected = np.stack([x[b, MASK_BN[b]].max(0) for b in range(B)])
  np.testing.assert_array_equal(mx, expected.astype(np.float32))


# --------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("kind", KINDS)
def test_permutation_invariance(setups, tokens, kind):
  _, variables, apply = setups[kind]
  base = apply(variables, tokens, MASK_BN)
  for seed in range(3):
    perm = np.random.default_rng(seed).permutation(N)
    out = apply(variables, tokens[:, perm], MASK_BN[:, perm])
    np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_equals_removal_shared_mask(setups, tokens, kind):
  _, variables, apply = setups[kind]
  keep = np.array([True, False, True, True, True])
  masked = apply(variables, tokens, jnp.asarray(keep))
  removed = apply(variables, tokens[:, keep])
  np.testing.assert_allclose(masked, removed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_equals_removal_per_example_mask(setups, tokens, kind):
  _, variables, apply = setups[kind]
  drop = [0, 2, 4]  # a different expert left out in each example
  mask = np.ones((B, N), bool)
  mask[np.arange(B), drop] = False
  masked = apply(variables, tokens, jnp.asarray(mask))
  removed = jnp.stack([tokens[b, mask[b]] for b in range(B)])  # [B, N - 1, D]
  np.testing.assert_allclose(masked, apply(variables, removed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_token_values_are_never_read(setups, tokens, kind):
  _, variables, apply = setups[kind]
  mask = jnp.asarray(MASK_BN)  # masks tokens (0, 1), (1, 3), (1, 4)
  poisoned = tokens.at[0, 1].set(jnp.nan).at[1, 3].set(1e30).at[1, 4].set(-jnp.inf)
  out = apply(variables, poisoned, mask)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out, apply(variables, tokens, mask))


@pytest.mark.parametrize("kind", KINDS)
def test_example_without_experts_gives_zeros(setups, tokens, kind):
  _, variables, apply = setups[kind]
  mask = np.ones((B, N), bool)
  mask[1] = False
  out = apply(variables, tokens, jnp.asarray(mask))
  np.testing.assert_array_equal(out[1], np.zeros(D))
  full = apply(variables, tokens)
  np.testing.assert_allclose(out[::2], full[::2], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dtypes, dropout


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shape_and_dtype(setups, tokens, kind, dtype):
  model, variables, apply = setups[kind]
  out = jax.jit(model.clone(dtype=dtype).apply)(variables, tokens.astype(dtype), MASK_BN)
  assert out.shape == (B, D) and out.dtype == dtype
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  reference = apply(variables, tokens, MASK_BN)
  np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=0.05, atol=0.05)


def test_dropout_only_when_not_deterministic(setups, tokens):
  model, variables, apply = setups["transformer"]
  train_apply = jax.jit(functools.partial(model.apply, deterministic=False))
  # RBG keys: the same semantics, and XLA:CPU compiles them much faster than threefry.
  rngs = lambda seed: {"dropout": jax.random.key(seed, impl="rbg")}
  plain = apply(variables, tokens)
  np.testing.assert_array_equal(plain, apply(variables, tokens, rngs=rngs(1)))
  dropped = train_apply(variables, tokens, rngs=rngs(1))
  assert not np.allclose(dropped, plain, atol=1e-3)
  np.testing.assert_array_equal(dropped, train_apply(variables, tokens, rngs=rngs(1)))
  assert not np.allclose(dropped, train_apply(variables, tokens, rngs=rngs(2)), atol=1e-3)
  with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
    jax.eval_shape(train_apply, variables, tokens)


@pytest.mark.parametrize("kind", ["mean", "max"])
def test_param_free_kinds_ignore_dropout(setups, tokens, kind):
  model, _, apply = setups[kind]
  np.testing.assert_array_equal(model.apply({}, tokens, deterministic=False), apply({}, tokens))


# --------------------------------------------------------------------------- parameter-free kinds


@pytest.mark.parametrize("kind", ["mean", "max"])
def test_param_free_init_apply_and_grad(tokens, kind):
  agg = Aggregator(kind=kind)
  assert agg.init(KEY, tokens) == {"params": {}}
  np.testing.assert_array_equal(agg.apply({}, tokens), agg.apply({"params": {}}, tokens))

  model = AggregatorClassifier(agg, num_classes=4)
  assert jax.eval_shape(model.init, KEY, tokens)["params"]["aggregator"] == {}
  variables = _fake_init(model, tokens)
  labels = jnp.array([0, 1, 3])

  def loss(params):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert grads["aggregator"] == {}
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  tx = optax.adam(1e-3)
  updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
  assert optax.apply_updates(variables["params"], updates)["aggregator"] == {}
  # Differentiating w.r.t. the (empty) aggregator params alone works too.
  grad_agg = jax.grad(
    lambda pa: jnp.sum(
      model.apply({"params": {"aggregator": pa}}, tokens, method=AggregatorClassifier.aggregate)
    )
  )({})
  assert grad_agg == {}


# --------------------------------------------------------------------------- AggregatorClassifier


@pytest.fixture(scope="module")
def classifier_setup(tokens):
  model = AggregatorClassifier(Aggregator(num_heads=HEADS), num_classes=4)
  variables = jax.jit(model.init)(KEY, tokens)  # the one real init of this file
  return model, variables


def test_aggregator_classifier_layout_and_split(classifier_setup, tokens):
  model, variables = classifier_setup
  params = variables["params"]
  assert set(variables) == {"params"} and set(params) == {"aggregator", "head"}
  assert set(params["head"]) == {"norm", "dense"}
  aggregate = jax.jit(functools.partial(model.apply, method=AggregatorClassifier.aggregate))
  feats = aggregate({"params": {"aggregator": params["aggregator"]}}, tokens, MASK_BN)
  assert feats.shape == (B, D)
  logits = jax.jit(model.apply)(variables, tokens, MASK_BN)
  assert logits.shape == (B, 4) and logits.dtype == jnp.float32
  head = jax.tree.map(lambda a: np.asarray(a, np.float64), params["head"])
  expected = _np_layernorm(np.asarray(feats, np.float64), head["norm"])
  expected = expected @ head["dense"]["kernel"] + head["dense"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_aggregator_classifier_bfloat16_gives_float32_logits(tokens):
  model = AggregatorClassifier(Aggregator(num_heads=HEADS, dtype=jnp.bfloat16), num_classes=4)
  variables = _fake_init(model, tokens)
  assert jax.jit(model.apply)(variables, tokens).dtype == jnp.float32


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(kind="attention"), "kind='attention' is unknown; accepted: transformer, mean, max"),
    (dict(depth=0), "depth=0"),
    (dict(num_heads=0), "num_heads=0"),
    (dict(mlp_ratio=0.0), "mlp_ratio=0.0"),
    (dict(dropout=1.0), r"dropout=1.0 is invalid; accepted: \[0, 1\)"),
  ],
)
def test_rejects_bad_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Aggregator(**kwargs)


def test_rejects_bad_inputs(setups, tokens):
  model, variables, _ = setups["transformer"]
  with pytest.raises(ValueError, match=r"tokens must be .*\[B, N, D\]"):
    model.apply(variables, tokens[0])
  with pytest.raises(ValueError, match="mask must be None or bool"):
    model.apply(variables, tokens, jnp.ones((N,), jnp.float32))
  with pytest.raises(ValueError, match="mask must be None or bool"):
    model.apply(variables, tokens, jnp.ones((B, N - 1), bool))
  with pytest.raises(ValueError, match="num_heads=3 must divide"):
    jax.eval_shape(Aggregator(num_heads=3).init, KEY, tokens)


def test_classifier_rejects_bad_fields():
  with pytest.raises(ValueError, match="num_classes=0"):
    AggregatorClassifier(Aggregator(), num_classes=0)
  with pytest.raises(ValueError, match="aggregator="):
    AggregatorClassifier("mean", num_classes=3)
