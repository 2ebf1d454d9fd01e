"""Tests for moe_adapt.core.merging against NumPy references and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.core import merging

average = jax.jit(merging.weighted_average)
sign_dis = jax.jit(merging.sign_disagreement)
pairwise = jax.jit(merging.pairwise_sign_disagreement)
# Called without an outer jit: both jit internally with the density's keep counts traced,
# so every density below shares one compilation per tree shape.
prune = merging.magnitude_prune
ties = merging.ties_merge


def np_prune(x, density):
  """Keeps the round(density·n) (≥ 1) largest |x|, ties to the lowest flat index."""
  flat = np.asarray(x).reshape(-1)
  n = flat.size
  keep = 0 if density == 0 else min(n, max(1, round(density * n)))
  order = np.lexsort((np.arange(n), -np.abs(flat.astype(np.float64))))
  mask = np.zeros(n, bool)
  mask[order[:keep]] = True
  return np.where(mask, flat, 0).reshape(np.shape(x))


def np_ties(leaf, density, scale=1.0):
  """Straightforward TIES on one stacked leaf [K, ...], member by member."""
  trimmed = np.stack([np_prune(m, density) for m in leaf]).astype(np.float64)
  elected = np.sign(trimmed.sum(0))
  out = np.zeros(leaf.shape[1:])
  for idx in np.ndindex(*leaf.shape[1:]):
    vals = [t[idx] for t in trimmed if t[idx] != 0 and np.sign(t[idx]) == elected[idx]]
    out[idx] = np.mean(vals) * scale if vals else 0.0
  return out


@pytest.fixture(scope="module")
def stacked():
  rng = np.random.default_rng(0)
  return {
    "dense": {"kernel": rng.normal(size=(3, 4, 5)).astype(np.float32)},
    "bias": rng.normal(size=(3, 5)).astype(np.float32),
  }


def test_weighted_average_hand_computed():
  tree = {"a": np.array([[1.0, 2.0], [3.0, 6.0]], np.float32)}
  np.testing.assert_allclose(average(tree)["a"], [2.0, 4.0])
  np.testing.assert_allclose(average(tree, np.array([3.0, 1.0]))["a"], [1.5, 3.0])
  # Weights are normalised by their sum, negative weights included.
  np.testing.assert_allclose(average(tree, np.array([2.0, -1.0]))["a"], [-1.0, -2.0])
  # All-zero (or zero-sum) weights fall back to the uniform average.
  np.testing.assert_allclose(average(tree, np.zeros(2))["a"], [2.0, 4.0])
  np.testing.assert_allclose(average(tree, np.array([1.0, -1.0]))["a"], [2.0, 4.0])


def test_weighted_average_matches_numpy_and_keeps_structure(stacked):
  w = np.array([0.2, 0.5, 1.3], np.float32)
  got = average(stacked, w)
  assert jax.tree.structure(got) == jax.tree.structure(jax.tree.map(lambda x: x[0], stacked))
  for g, leaf in zip(jax.tree.leaves(got), jax.tree.leaves(stacked)):
    ref = np.tensordot(w / w.sum(), leaf.astype(np.float64), axes=1)
    assert g.shape == leaf.shape[1:] and g.dtype == jnp.float32
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


def test_weighted_average_identical_members_and_bfloat16():
  member = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
  same = {"w": np.stack([member] * 3)}
  np.testing.assert_allclose(average(same)["w"], member, rtol=1e-6)
  np.testing.assert_allclose(average(same, np.array([0.1, 0.7, 5.0]))["w"], member, rtol=1e-6)
  member16 = np.asarray(member, jnp.bfloat16)
  got = average({"w": np.stack([member16] * 3)})["w"]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got, member16)


def test_sign_disagreement_hand_computed():
  pair = {"w": np.array([[1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 0.0, -2.0]], np.float32)}
  assert float(sign_dis(pair)) == 0.5
  # Zeros never count as a difference but stay in the denominator.
  pair0 = {"w": np.array([[0.0, -1.0, 3.0], [5.0, 0.0, 2.0]], np.float32)}
  assert float(sign_dis(pair0)) == 0.0
  # K = 3: positions 0 (+,-,+), 2 (+,0,-) conflict; 1 (-,-,0) and 3 (0,0,0) do not.
  three = {"w": np.array([[1, -1, 2, 0], [-1, -2, 0, 0], [3, 0, -1, 0]], np.float32)}
  assert float(sign_dis(three)) == 0.5
  # The denominator spans all leaves: 1 conflict in 4 + 1 conflict in 2 -> 2 / 6.
  two_leaves = {"a": pair["w"], "b": np.array([[1.0, 1.0], [-1.0, 1.0]], np.float32)}
  assert float(sign_dis(two_leaves)) == pytest.approx(3 / 6)
  assert float(sign_dis({"w": pair["w"][:1]})) == 0.0


def test_sign_disagreement_matches_numpy(stacked):
  leaves = [x.reshape(3, -1) for x in jax.tree.leaves(stacked)]
  flat = np.concatenate(leaves, axis=1)
  ref = np.mean((flat > 0).any(0) & (flat < 0).any(0))
  assert float(sign_dis(stacked)) == pytest.approx(ref, abs=1e-7)


def test_pairwise_sign_disagreement(stacked):
  got = np.asarray(pairwise(stacked))
  assert got.shape == (3, 3) and got.dtype == np.float32
  np.testing.assert_array_equal(got, got.T)
  np.testing.assert_array_equal(np.diag(got), 0.0)
  for i in range(3):
    for j in range(3):
      if i != j:
        pair = jax.tree.map(lambda x, i=i, j=j: x[np.array([i, j])], stacked)
        assert got[i, j] == pytest.approx(float(sign_dis(pair)), abs=1e-7)
  hand = {"w": np.array([[1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 0.0, -2.0]], np.float32)}
  np.testing.assert_array_equal(pairwise(hand), [[0.0, 0.5], [0.5, 0.0]])


def test_magnitude_prune_keeps_the_largest():
  x = np.array([3.0, -1.0, 2.0, -3.0, 0.5, 3.0], np.float32)
  np.testing.assert_array_equal(prune(x, density=0.5), [3.0, 0, 0, -3.0, 0, 3.0])
  # Three entries tie at |3| for two places: the lowest indices win.
  np.testing.assert_array_equal(prune(x, density=2 / 6), [3.0, 0, 0, -3.0, 0, 0])
  np.testing.assert_array_equal(prune(x, density=0.0), np.zeros(6))
  np.testing.assert_array_equal(prune(x, density=1.0), x)
  # At least one entry survives any positive density.
  np.testing.assert_array_equal(prune(x, density=0.01), [3.0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 0.9])
def test_magnitude_prune_matches_numpy(stacked, density):
  got = prune(stacked, density=density)
  for g, leaf in zip(jax.tree.leaves(got), jax.tree.leaves(stacked)):
    ref = np_prune(leaf, density)
    np.testing.assert_array_equal(g, ref)
    assert np.count_nonzero(g) == max(1, round(density * leaf.size))


def test_magnitude_prune_ties_and_bfloat16(stacked):
  # Same tree shapes as `stacked` (one compilation); coarse values give many ties,
  # including nonzero ones across the threshold.
  rng = np.random.default_rng(2)
  coarse = jax.tree.map(lambda x: rng.integers(-3, 4, size=x.shape).astype(np.float32), stacked)
  for density in (0.2, 0.5, 0.8):
    got = prune(coarse, density=density)
    for g, leaf in zip(jax.tree.leaves(got), jax.tree.leaves(coarse)):
      np.testing.assert_array_equal(g, np_prune(leaf, density))
  tree16 = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), stacked)
  got = prune(tree16, density=0.3)
  for g, leaf in zip(jax.tree.leaves(got), jax.tree.leaves(tree16)):
    assert g.dtype == jnp.bfloat16
    ref = np_prune(np.asarray(leaf, np.float32), 0.3)
    np.testing.assert_array_equal(np.asarray(g, np.float32), ref)


def test_radix_search_with_4_bit_digits():
  # Accelerators use 4-bit digits (CPU: 1 bit); check them on CPU too, ties included.
  rng = np.random.default_rng(4)
  rows = rng.integers(-4, 5, size=(3, 40)).astype(np.float32) * 0.75
  rows[2] = rng.normal(size=40)
  for keep in (13, 1, 39):
    (got,) = merging._prune_rows([rows], [np.int32(keep)], digit_bits=4)
    ref = np.stack([np_prune(r, keep / r.size) for r in rows])
    np.testing.assert_array_equal(got, ref)


def test_ties_merge_hand_computed():
  # Trim to 2 of 3 entries per member; then elect and take the disjoint mean.
  tau = np.array([[1.0, -2.0, 0.5], [3.0, 1.0, -4.0], [-2.0, 0.1, -1.0]], np.float32)
  # Trimmed: [1,-2,0], [3,0,-4], [-2,0,-1]; sums [2,-2,-5] -> signs [+,-,-].
  # Agreeing: col0 {1,3} -> 2; col1 {-2} -> -2; col2 {-4,-1} -> -2.5.
  np.testing.assert_allclose(ties({"w": tau}, density=2 / 3)["w"], [2.0, -2.0, -2.5])
  np.testing.assert_allclose(ties({"w": tau}, density=2 / 3, scale=0.5)["w"], [1.0, -1.0, -1.25])
  # Trimmed: [2, .1, 0] (the tie at .1 goes to the lower index), [-2, .1, 0], [0, 0, 0];
  # sums [0, .2, 0]: the cancelled position merges to 0, the agreeing one to their mean.
  cancel = np.array([[2.0, 0.1, 0.1], [-2.0, 0.1, 0.1], [0.0, 0.0, 0.0]], np.float32)
  np.testing.assert_allclose(ties({"w": cancel}, density=2 / 3)["w"], [0.0, 0.1, 0.0])


@pytest.mark.parametrize("density", [0.2, 0.6, 1.0])
def test_ties_merge_matches_numpy(stacked, density):
  got = ties(stacked, density=density, scale=1.5)
  for g, leaf in zip(jax.tree.leaves(got), jax.tree.leaves(stacked)):
    assert g.shape == leaf.shape[1:] and g.dtype == jnp.float32
    np.testing.assert_allclose(g, np_ties(leaf, density, 1.5), rtol=1e-6, atol=1e-7)


def test_ties_merge_identical_members_and_bfloat16(stacked):
  same = jax.tree.map(lambda x: np.stack([x[0]] * 3), stacked)
  for g, leaf in zip(jax.tree.leaves(ties(same, density=1.0)), jax.tree.leaves(same)):
    np.testing.assert_allclose(g, leaf[0], rtol=1e-6)
  for g, leaf in zip(jax.tree.leaves(ties(same, density=0.5)), jax.tree.leaves(same)):
    np.testing.assert_allclose(g, np_prune(leaf[0], 0.5), rtol=1e-6)
  same16 = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), same)
  for g, leaf in zip(jax.tree.leaves(ties(same16, density=0.5)), jax.tree.leaves(same16)):
    assert g.dtype == jnp.bfloat16
    ref = np_prune(np.asarray(leaf[0], np.float32), 0.5)
    np.testing.assert_array_equal(np.asarray(g, np.float32), ref)


def test_ravel_stacked_round_trip_and_flat_merges(stacked):
  mixed = {**stacked, "half": np.arange(6, dtype=np.float32).reshape(3, 2).astype(jnp.bfloat16)}
  flat, unravel = merging.ravel_stacked(mixed)
  leaves = jax.tree.leaves(mixed)
  assert flat.shape == (3, sum(leaf[0].size for leaf in leaves)) and flat.dtype == jnp.float32
  for k in range(3):
    member = unravel(flat[k])
    for got, leaf in zip(jax.tree.leaves(member), leaves):
      assert got.dtype == leaf.dtype and got.shape == leaf.shape[1:]
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(leaf[k], np.float32))
  # The same merges on the raveled buffer: averaging per position and the sign statistics
  # over all positions do not depend on how the positions are grouped into leaves.
  flat, unravel = merging.ravel_stacked(stacked)
  weights = np.array([0.5, 2.0, 1.0], np.float32)
  for got, ref in zip(
    jax.tree.leaves(unravel(average(flat, weights))),
    jax.tree.leaves(average(stacked, weights)),
  ):
    np.testing.assert_allclose(got, ref, rtol=1e-6)
  assert sign_dis(flat) == sign_dis(stacked)
  np.testing.assert_array_equal(pairwise(flat), pairwise(stacked))
  # The trim of a raveled buffer ranks each member's whole vector (TIES' reference code).
  whole = np.asarray(flat)
  np.testing.assert_allclose(ties(flat, density=0.3), np_ties(whole, 0.3), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="floating-point"):
    merging.ravel_stacked({"w": np.zeros((2, 3), np.int32)})
  with pytest.raises(ValueError, match=r"leading axes \[2, 3\]"):
    merging.ravel_stacked({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))})


def test_jit_compatible():
  # Every function also runs inside a caller's jit (density static), with equal results.
  tau = {"w": np.array([[1.0, -2.0, 0.5], [3.0, 1.0, -4.0], [-2.0, 0.1, -1.0]], np.float32)}

  @jax.jit
  def all_of_them(tree, weights):
    return (
      merging.weighted_average(tree, weights),
      merging.sign_disagreement(tree),
      merging.pairwise_sign_disagreement(tree),
      merging.magnitude_prune(tree, 0.5),
      merging.ties_merge(tree, density=2 / 3, scale=2.0),
    )

  weights = np.array([1.0, 2.0, 1.0], np.float32)
  jitted = all_of_them(tau, weights)
  eager = (
    merging.weighted_average(tau, weights),
    merging.sign_disagreement(tau),
    merging.pairwise_sign_disagreement(tau),
    merging.magnitude_prune(tau, 0.5),
    merging.ties_merge(tau, density=2 / 3, scale=2.0),
  )
  for got, ref in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_allclose(jitted[4]["w"], [4.0, -4.0, -5.0])


def test_errors():
  good = {"w": np.zeros((2, 3), np.float32)}
  with pytest.raises(ValueError, match=r"leading axes \[2, 3\]"):
    merging.weighted_average({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))})
  with pytest.raises(ValueError, match=r"weights has shape \(3,\); accepted: \(2,\)"):
    merging.weighted_average(good, np.ones(3))
  with pytest.raises(ValueError, match="stacked has no leaves"):
    merging.sign_disagreement({})
  with pytest.raises(ValueError, match=r"stacked\['w'\] is a scalar"):
    merging.pairwise_sign_disagreement({"w": np.float32(1.0)})
  with pytest.raises(ValueError, match=r"density=1.5 is invalid; accepted: .*\[0, 1\]"):
    merging.magnitude_prune(good, 1.5)
  with pytest.raises(ValueError, match=r"density=-0\.1"):
    merging.ties_merge(good, density=-0.1)
  with pytest.raises(ValueError, match=r"tree\['w'\] has dtype int32"):
    merging.magnitude_prune({"w": np.zeros(3, np.int32)}, 0.5)
  with pytest.raises(ValueError, match="floating-point"):
    merging.weighted_average({"w": np.zeros((2, 3), np.int32)})


# ------------------------------------------------- definitional choices: each reference's rule


def cancelling_members(seed, shapes):
  """K = 2 members with distinct magnitudes within each member, cancelling at ~half the places.

  Integers and half-integers, so every sum is exact in float32.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in shapes.items():
    n = int(np.prod(shape))
    first = rng.permutation(n) + 1.0
    first *= rng.choice([-1.0, 1.0], n)
    second = (rng.permutation(n) + 1.5) * rng.choice([-1.0, 1.0], n)
    cancel = rng.uniform(size=n) < 0.5
    second[cancel] = -first[cancel]
    out[name] = np.stack([first, second]).reshape(2, *shape).astype(np.float32)
  return out


def np_top(row, k):
  """Mask of the k largest |row| (magnitudes within the row are distinct here)."""
  mask = np.zeros(row.size, bool)
  mask[np.argsort(-np.abs(row), kind="stable")[:k]] = True
  return mask


def np_disjoint_mean(trimmed, elected):
  """PEFT's `disjoint_merge`, mergekit's normalised merge: mean of the elected-sign entries."""
  agree = np.sign(trimmed) == elected
  return (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)


def np_peft_or_mergekit_ties(leaf, density, keep):
  """PEFT `ties` and mergekit `ties` (unit weights): per-tensor top-k, sum >= 0 elects +1."""
  rows = leaf.reshape(leaf.shape[0], -1).astype(np.float64)
  trimmed = np.stack([np.where(np_top(r, keep(density, r.size)), r, 0) for r in rows])
  elected = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
  return np_disjoint_mean(trimmed, elected).reshape(leaf.shape[1:])


def np_ties_code(tree, density):
  """The TIES reference code on each member's flattened vector (`topk_values_mask` keeps
  |x| >= the (P - int(d·P))-th smallest; zero sums take the sign of the summed signs)."""
  leaves = jax.tree.leaves(tree)
  flat = np.concatenate([x.reshape(x.shape[0], -1) for x in leaves], 1).astype(np.float64)
  p = flat.shape[1]
  kth = np.sort(np.abs(flat), axis=1)[:, p - int(density * p) - 1 : p - int(density * p)]
  trimmed = np.where(np.abs(flat) >= kth, flat, 0)
  elected = np.sign(trimmed.sum(0))
  elected[elected == 0] = np.sign(elected.sum())
  keep = np.where(elected > 0, trimmed > 0, trimmed < 0)
  merged = (trimmed * keep).sum(0) / np.maximum(keep.sum(0), 1)
  sizes = np.cumsum([x[0].size for x in leaves])[:-1]
  return [m.reshape(x.shape[1:]) for m, x in zip(np.split(merged, sizes), leaves)]


OPTION_SHAPES = {"a": (6, 5), "b": (7,)}


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.77])
def test_ties_merge_reproduces_peft_and_mergekit(density):
  tree = cancelling_members(int(density * 100), OPTION_SHAPES)
  peft = ties(tree, density=density, keep_rule="floor", zero_sign="positive")
  mergekit = ties(tree, density=density, keep_rule="floor_min1", zero_sign="positive")
  for got_p, got_m, leaf in zip(jax.tree.leaves(peft), jax.tree.leaves(mergekit), tree.values()):
    ref_p = np_peft_or_mergekit_ties(leaf, density, lambda d, n: int(d * n))
    ref_m = np_peft_or_mergekit_ties(leaf, density, lambda d, n: max(1, int(d * n)))
    np.testing.assert_allclose(got_p, ref_p, rtol=1e-6)
    np.testing.assert_allclose(got_m, ref_m, rtol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.77])
def test_ties_merge_reproduces_the_ties_code(density):
  tree = cancelling_members(7 + int(density * 100), OPTION_SHAPES)
  got = ties(tree, density=density, keep_rule="floor_plus1", zero_sign="majority", trim="member")
  for g, ref in zip(jax.tree.leaves(got), np_ties_code(tree, density)):
    np.testing.assert_allclose(g, ref, rtol=1e-6)


def test_keep_rules_and_zero_signs():
  x = np.array([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.25], np.float32)
  for rule, kept in (("round", 4), ("floor", 3), ("floor_min1", 3), ("floor_plus1", 4)):
    assert np.count_nonzero(prune(x, 0.5, keep_rule=rule)) == kept  # 0.5 · 7 = 3.5
  assert np.count_nonzero(prune(x, 0.1, keep_rule="floor")) == 0
  assert np.count_nonzero(prune(x, 0.1, keep_rule="floor_min1")) == 1
  assert np.count_nonzero(prune(x, 1.0, keep_rule="floor_plus1")) == 7
  # The cancelled position: 0 by default, the positive member under PEFT's and mergekit's rule.
  pair = {"w": np.array([[2.0, 1.0], [-2.0, 1.0]], np.float32)}
  np.testing.assert_array_equal(ties(pair, density=1.0)["w"], [0.0, 1.0])
  np.testing.assert_array_equal(ties(pair, density=1.0, zero_sign="positive")["w"], [2.0, 1.0])
  np.testing.assert_array_equal(ties(pair, density=1.0, zero_sign="majority")["w"], [2.0, 1.0])
  with pytest.raises(ValueError, match=r"keep_rule='ceil' is invalid; accepted: round, floor"):
    ties(pair, density=0.5, keep_rule="ceil")
  with pytest.raises(ValueError, match=r"zero_sign=1 is invalid; accepted: zero, positive"):
    ties(pair, density=0.5, zero_sign=1)
  with pytest.raises(ValueError, match=r"trim='tensor' is invalid; accepted: leaf, member"):
    ties(pair, density=0.5, trim="tensor")
