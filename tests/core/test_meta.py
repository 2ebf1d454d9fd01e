"""Tests for moe_adapt.core.meta: inner SGD adaptation and second-order meta-gradients.

References are written independently of the module: a hand-written SGD loop, and the
"obvious" meta-gradient `jax.grad` of a function that contains `jax.grad`
(reverse-over-reverse), plus central finite differences in float64.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.core import meta

LR = 0.1
N_IN, N_HID, N_OUT, BATCH = 4, 8, 3, 6


# ----------------------------------------------------------------------------- tiny models


def _normal(rng, shape, scale=1.0):
  return scale * rng.standard_normal(shape)


def init_params(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
    "w1": jnp.asarray(_normal(rng, (N_IN, N_HID), 1 / np.sqrt(N_IN)), dtype),
    "b1": jnp.asarray(_normal(rng, (N_HID,), 0.1), dtype),
    "w2": jnp.asarray(_normal(rng, (N_HID, N_OUT), 1 / np.sqrt(N_HID)), dtype),
    "b2": jnp.zeros((N_OUT,), dtype),
  }


def init_context(seed, dtype=jnp.float32):
  """Parameters of the target network (the 'aggregator'); never adapted in the inner loop."""
  rng = np.random.default_rng(seed)
  return {
    "a": jnp.asarray(_normal(rng, (N_IN, N_HID), 1 / np.sqrt(N_IN)), dtype),
    "c": jnp.asarray(_normal(rng, (N_HID, N_OUT), 1 / np.sqrt(N_HID)), dtype),
  }


def mlp(params, x):
  """[B, N_IN] -> [B, N_OUT]."""
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def target_fn(context, x):
  """Context-parameterised distillation target, [B, N_IN] -> [B, N_OUT]."""
  return jnp.tanh(x @ context["a"]) @ context["c"]


def inner_mse(params, batch, context):
  """Feature MSE against the context's target (uses only batch['x'])."""
  return jnp.mean((mlp(params, batch["x"]) - target_fn(context, batch["x"])) ** 2)


def inner_mse_no_ctx(params, batch):
  return jnp.mean((mlp(params, batch["x"]) - batch["t"]) ** 2)


def outer_ce(params, batch, context=None):
  """Cross-entropy on integer labels; does not use the context (as in Meta-DMoE)."""
  del context
  logp = jax.nn.log_softmax(mlp(params, batch["x"]))
  return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def outer_with_ctx(params, batch, context):
  """An outer loss that also uses the context directly."""
  return outer_ce(params, batch) + 0.5 * jnp.mean(target_fn(context, batch["x"]) ** 2)


def make_batch(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
    "x": jnp.asarray(_normal(rng, (BATCH, N_IN)), dtype),
    "y": jnp.asarray(rng.integers(0, N_OUT, BATCH), jnp.int32),  # integer leaf: float0 path
    "t": jnp.asarray(_normal(rng, (BATCH, N_OUT)), dtype),
  }


# ------------------------------------------------------------------------- references


@functools.partial(jax.jit, static_argnames=("loss_fn", "steps"))
def sgd_loop(loss_fn, params, batch, lr, steps, context=None):
  """Hand-written SGD; differentiable by plain reverse-over-reverse autodiff."""
  args = () if context is None else (context,)
  for _ in range(steps):
    grads = jax.grad(loss_fn)(params, batch, *args)
    params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  return params


@functools.partial(jax.jit, static_argnames=("outer", "inner", "lr", "steps"))
def nested_meta_grad(outer, inner, params, support, query, lr, steps, context=None):
  """The obvious implementation: jax.grad of a function containing jax.grad."""
  if context is None:
    f = lambda p: outer(sgd_loop(inner, p, support, lr, steps), query)
    return jax.value_and_grad(f)(params)
  f = lambda p, c: outer(sgd_loop(inner, p, support, lr, steps, c), query, c)
  return jax.value_and_grad(f, argnums=(0, 1))(params, context)


def tree_rel_err(a, b):
  """Max over leaves of ||a - b|| / ||b||."""
  err = lambda x, y: np.linalg.norm(x - y) / (np.linalg.norm(y) + 1e-30)
  a, b = (jax.tree.map(lambda t: np.asarray(t, np.float64), t) for t in (a, b))
  return max(jax.tree.leaves(jax.tree.map(err, a, b)))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def problem():
  return {
    "params": init_params(0),
    "context": init_context(1),
    "support": make_batch(2),
    "query": make_batch(3),
  }


@pytest.fixture(scope="module")
def meta_fns():
  """Jitted meta-gradients with context (steps/first_order/remat static), compiled once each."""
  cache = {}

  def get(steps, first_order=False, remat=False, outer=outer_ce):
    key = (steps, first_order, remat, outer)
    if key not in cache:
      cache[key] = jax.jit(
        lambda p, s, q, c: meta.meta_value_and_grad(
          outer,
          inner_mse,
          p,
          s,
          q,
          lr=LR,
          steps=steps,
          first_order=first_order,
          context=c,
          remat=remat,
        )
      )
    return cache[key]

  return get


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("steps", [1, 3])
def test_inner_adapt_matches_sgd_loop(problem, steps):
  p, s = problem["params"], problem["support"]
  got = jax.jit(lambda p, s: meta.inner_adapt(inner_mse_no_ctx, p, s, lr=LR, steps=steps))(p, s)
  want = sgd_loop(inner_mse_no_ctx, p, s, LR, steps)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  # With context; and first_order leaves the forward value unchanged.
  c = problem["context"]
  got_ctx = jax.jit(
    lambda p, c: meta.inner_adapt(inner_mse, p, s, lr=LR, steps=steps, context=c, first_order=True)
  )(p, c)
  chex.assert_trees_all_close(
    got_ctx, sgd_loop(inner_mse, p, s, LR, steps, c), rtol=1e-6, atol=1e-7
  )
  # Really moved: each step lowers the inner loss on this smooth problem.
  loss = jax.jit(inner_mse_no_ctx)
  assert float(loss(got, s)) < float(loss(p, s))


@pytest.mark.parametrize(
  "steps, outer", [(1, outer_ce), (3, outer_ce), (1, outer_with_ctx)], ids=["1", "3", "1-ctx"]
)
def test_second_order_matches_nested_grad_with_context(problem, meta_fns, steps, outer):
  p, c, s, q = problem["params"], problem["context"], problem["support"], problem["query"]
  value, (gp, gc) = meta_fns(steps, outer=outer)(p, s, q, c)
  ref_value, (rp, rc) = nested_meta_grad(outer, inner_mse, p, s, q, LR, steps, c)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  assert tree_rel_err(gp, rp) < 1e-5
  assert tree_rel_err(gc, rc) < 1e-5
  # The context really gets a non-trivial gradient (for outer_ce purely second order).
  assert min(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(gc)) > 1e-4


def test_second_order_without_context_matches_nested_grad(problem):
  p, s, q = problem["params"], problem["support"], problem["query"]
  value, grads = jax.jit(
    lambda p: meta.meta_value_and_grad(outer_ce, inner_mse_no_ctx, p, s, q, lr=LR, steps=2)
  )(p)
  ref_value, ref = nested_meta_grad(outer_ce, inner_mse_no_ctx, p, s, q, LR, 2)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  chex.assert_trees_all_equal_structs(grads, p)
  assert tree_rel_err(grads, ref) < 1e-5


def test_lr_gradient_matches_nested_grad(problem):
  """The custom backward also returns the exact d/d(lr) (useful for learned step sizes)."""
  p, c, s, q = problem["params"], problem["context"], problem["support"], problem["query"]
  f = lambda lr: outer_ce(meta.inner_adapt(inner_mse, p, s, lr=lr, steps=2, context=c), q)
  g = lambda lr: outer_ce(sgd_loop(inner_mse, p, s, lr, 2, c), q)
  got, want = jax.jit(jax.grad(f))(jnp.float32(LR)), jax.jit(jax.grad(g))(jnp.float32(LR))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(want)) > 1e-3


def test_second_order_matches_finite_differences_float64():
  with jax.enable_x64(True):
    p, c = init_params(10, jnp.float64), init_context(11, jnp.float64)
    s, q = make_batch(12, jnp.float64), make_batch(13, jnp.float64)
    steps = 2

    def objective(p, c):
      adapted = meta.inner_adapt(inner_mse, p, s, lr=LR, steps=steps, context=c)
      return outer_ce(adapted, q)

    _, (gp, gc) = jax.jit(
      lambda p, c: meta.meta_value_and_grad(
        outer_ce, inner_mse, p, s, q, lr=LR, steps=steps, context=c
      )
    )(p, c)
    assert gp["w1"].dtype == jnp.float64
    eps = 1e-5
    objective = jax.jit(objective)
    rng = np.random.default_rng(14)
    shift = lambda t, d, h: jax.tree.map(lambda a, b: np.asarray(a) + h * b, t, d)
    for _ in range(3):  # random directions in (params, context) space
      dp, dc = (jax.tree.map(lambda a: rng.standard_normal(a.shape), t) for t in (p, c))
      plus = objective(shift(p, dp, eps), shift(c, dc, eps))
      minus = objective(shift(p, dp, -eps), shift(c, dc, -eps))
      fd = float(plus - minus) / (2 * eps)
      analytic = sum(
        float(np.vdot(a, b)) for a, b in zip(jax.tree.leaves((gp, gc)), jax.tree.leaves((dp, dc)))
      )
      assert abs(analytic - fd) / abs(fd) < 1e-4, (analytic, fd)


def test_first_order_matches_definition_and_differs(problem, meta_fns):
  p, c, s, q = problem["params"], problem["context"], problem["support"], problem["query"]
  steps = 3
  value, (gp, gc) = meta_fns(steps, first_order=True)(p, s, q, c)
  adapted = sgd_loop(inner_mse, p, s, LR, steps, c)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(outer_ce))(adapted, q)  # dθ'/dθ = I
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  chex.assert_trees_all_close(gp, ref_grads, rtol=1e-5, atol=1e-7)
  # The outer loss does not use the context: first order gives it exactly zero gradient.
  for leaf in jax.tree.leaves(gc):
    np.testing.assert_array_equal(leaf, 0.0)
  # Second order differs (the Hessian terms are present).
  _, (gp2, gc2) = meta_fns(steps)(p, s, q, c)
  assert tree_rel_err(gp, gp2) > 1e-3
  assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(gc2))
  # If the outer loss uses the context directly, first order gives exactly that direct term.
  _, (_, gc_direct) = meta_fns(steps, first_order=True, outer=outer_with_ctx)(p, s, q, c)
  ref_direct = jax.jit(jax.grad(outer_with_ctx, argnums=2))(adapted, q, c)
  chex.assert_trees_all_close(gc_direct, ref_direct, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("first_order", [False, True])
def test_remat_gives_same_gradients(problem, meta_fns, first_order):
  p, c, s, q = problem["params"], problem["context"], problem["support"], problem["query"]
  v1, g1 = meta_fns(3, first_order=first_order)(p, s, q, c)
  v2, g2 = meta_fns(3, first_order=first_order, remat=True)(p, s, q, c)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_remat_bounds_memory_in_steps():
  """remat=True keeps compiled scratch memory ~flat in `steps` (activations recomputed)."""
  rng = np.random.default_rng(5)
  width, batch = 128, 256  # activations [256, 128] dominate the parameters
  p = {
    "w1": jnp.asarray(rng.standard_normal((N_IN, width)) / 2, jnp.float32),
    "w2": jnp.asarray(rng.standard_normal((width, N_OUT)) / 11, jnp.float32),
  }
  x = jnp.asarray(rng.standard_normal((batch, N_IN)), jnp.float32)
  f = lambda p, x: jnp.tanh(jnp.tanh(x @ p["w1"]) * 2.0) @ p["w2"]
  inner = lambda p, b: jnp.mean(f(p, b) ** 2)
  outer = lambda p, b: jnp.mean(jnp.sin(f(p, b)))

  def temp_bytes(steps, remat):
    fn = jax.jit(
      lambda p: meta.meta_value_and_grad(outer, inner, p, x, x, lr=LR, steps=steps, remat=remat)
    )
    memory = fn.lower(p).compile().memory_analysis()
    if memory is None:
      pytest.skip("backend reports no memory analysis")
    return memory.temp_size_in_bytes

  act = batch * width * 4
  plain, remat = temp_bytes(4, False), temp_bytes(4, True)
  assert remat < plain - 2 * act, (remat, plain)
  assert remat < temp_bytes(1, True) + 2 * act  # ~independent of steps


def test_jit_traces_once(problem):
  p, c = problem["params"], problem["context"]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def meta_step(p, c, s, q):
    value, (gp, gc) = meta.meta_value_and_grad(
      outer_ce, inner_mse, p, s, q, lr=LR, steps=2, context=c
    )
    sgd = lambda t, g: jax.tree.map(lambda a, b: a - 0.01 * b, t, g)
    return value, sgd(p, gp), sgd(c, gc)

  chex.clear_trace_counter()
  values = []
  for i in range(3):  # new values, same shapes: no retrace
    value, p, c = meta_step(p, c, make_batch(20 + i), make_batch(30 + i))
    values.append(float(value))
  assert len(set(values)) == 3 and all(np.isfinite(values))


def test_vmap_over_tasks_matches_loop(problem, meta_fns):
  p, c = problem["params"], problem["context"]
  supports = [make_batch(40 + i) for i in range(3)]
  queries = [make_batch(50 + i) for i in range(3)]
  stack = lambda bs: jax.tree.map(lambda *a: np.stack(a), *bs)
  fn = meta_fns(3)  # outer_ce, second order, reused from other tests
  values, grads = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, None)))(
    p, stack(supports), stack(queries), c
  )
  for i, (s, q) in enumerate(zip(supports, queries)):
    v_i, grads_i = fn(p, s, q, c)
    np.testing.assert_allclose(values[i], v_i, rtol=1e-6)
    chex.assert_trees_all_close(
      jax.tree.map(lambda a, i=i: a[i], grads), grads_i, rtol=1e-5, atol=1e-7
    )


def test_bfloat16_and_mixed_dtypes_run_and_stay_finite(problem, meta_fns):
  p32 = problem["params"]
  # Mixed: hidden layer in bfloat16, output layer in float32.
  p = {**p32, "w1": p32["w1"].astype(jnp.bfloat16), "b1": p32["b1"].astype(jnp.bfloat16)}
  c = jax.tree.map(lambda a: a.astype(jnp.bfloat16), problem["context"])
  s, q = problem["support"], problem["query"]
  adapted = jax.jit(lambda p, c: meta.inner_adapt(inner_mse, p, s, lr=LR, steps=3, context=c))(p, c)
  chex.assert_trees_all_equal_dtypes(adapted, p)
  value, (gp, gc) = meta_fns(3)(p, s, q, c)
  chex.assert_trees_all_equal_dtypes(gp, p)
  chex.assert_trees_all_equal_dtypes(gc, c)
  chex.assert_tree_all_finite((value, gp, gc))
  # Close to the float32 result at bfloat16 precision.
  _, (gp32, _) = meta_fns(3)(p32, s, q, problem["context"])
  assert tree_rel_err(jax.tree.map(lambda a: a.astype(jnp.float32), gp), gp32) < 0.1
  # All-bfloat16 also runs.
  pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32)
  _, gb = jax.jit(lambda p: meta.meta_value_and_grad(outer_ce, inner_mse_no_ctx, p, s, q, lr=LR))(
    pb
  )
  chex.assert_trees_all_equal_dtypes(gb, pb)
  chex.assert_tree_all_finite(gb)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "2", None])
def test_bad_steps_raise(problem, steps):
  p, s = problem["params"], problem["support"]
  with pytest.raises(ValueError, match=r"steps=.*accepted"):
    meta.inner_adapt(inner_mse_no_ctx, p, s, lr=LR, steps=steps)
  with pytest.raises(ValueError, match=r"steps="):
    meta.meta_value_and_grad(outer_ce, inner_mse_no_ctx, p, s, s, lr=LR, steps=steps)


@pytest.mark.parametrize(
  "lr",
  [
    float("nan"),
    float("inf"),
    "0.1",
    None,
    True,
    np.ones(2, np.float32),
    np.float32(np.nan),
    jnp.array(1, jnp.int32),
  ],
)
def test_bad_lr_raise(problem, lr):
  p, s = problem["params"], problem["support"]
  with pytest.raises(ValueError, match=r"lr="):
    meta.inner_adapt(inner_mse_no_ctx, p, s, lr=lr)
  with pytest.raises(ValueError, match=r"lr="):
    meta.meta_value_and_grad(outer_ce, inner_mse_no_ctx, p, s, s, lr=lr)


def test_bad_flags_and_params_raise(problem):
  p, s = problem["params"], problem["support"]
  with pytest.raises(ValueError, match=r"first_order="):
    meta.inner_adapt(inner_mse_no_ctx, p, s, lr=LR, first_order="yes")
  with pytest.raises(ValueError, match=r"remat="):
    meta.inner_adapt(inner_mse_no_ctx, p, s, lr=LR, remat=1)
  with pytest.raises(ValueError, match=r"params leaf \['w1'\]"):
    meta.inner_adapt(inner_mse_no_ctx, {**p, "w1": jnp.ones((N_IN, N_HID), jnp.int32)}, s, lr=LR)
  with pytest.raises(ValueError, match=r"params"):
    meta.inner_adapt(inner_mse_no_ctx, {}, s, lr=LR)


def test_lr_accepts_scalar_arrays_and_traced_values(problem):
  p, s = problem["params"], problem["support"]
  want = sgd_loop(inner_mse_no_ctx, p, s, LR, 1)
  got = meta.inner_adapt(inner_mse_no_ctx, p, s, lr=np.float32(LR))
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  got = jax.jit(lambda lr: meta.inner_adapt(inner_mse_no_ctx, p, s, lr=lr))(jnp.float32(LR))
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
