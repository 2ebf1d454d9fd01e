"""Second-order meta-gradient: `core.meta` custom VJP vs `jax.grad` of `jax.grad`.

Workload (the Meta-DMoE student step of `reference/performance_notes.md` §1): a small CNN
student (conv 3×3 1→32, 32→64 stride 2, 64→64 stride 2, ReLU, global average pool → 64-d
feature; linear head → classes), a distillation target made by a context-parameterised
linear map (φ = W [D, D], b [D]) of fixed random expert features [S, E, D] averaged over
experts, one inner SGD step on the feature MSE over the support set, outer cross-entropy on
the query set. The meta-gradient is taken w.r.t. the student θ and the context φ:
  (a) `meta_value_and_grad(..., context=φ)` (custom VJP per inner step, forward-over-reverse),
  (b) `jax.value_and_grad` of `outer(θ − lr·∇θ inner(θ, φ))` (reverse-over-reverse).
  (c) as (a) with `remat=True` (recompute instead of keeping inner activations).
All are jitted; we report lower+compile time, XLA's temp buffer size (peak scratch memory),
the median / min of `--repeats` timed calls after one warm-up call, the speed ratio (b)/(a)
and the largest relative gradient differences.

Run (prints one JSON object to stdout; about 40 s on 2 idle CPU cores):
  python benchmarks/meta_grad.py --repeats=20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.core import meta

_DN = ("NHWC", "HWIO", "NHWC")
# (in, out, stride) of the three 3×3 convolutions.
_CONVS = ((1, 32, 1), (32, 64, 2), (64, 64, 2))


def init_student(key: jax.Array, num_classes: int) -> dict[str, Any]:
  """He-initialised CNN params; feature width = 64."""
  keys = jax.random.split(key, len(_CONVS) + 1)
  params = {}
  for i, ((cin, cout, _), k) in enumerate(zip(_CONVS, keys)):
    std = np.sqrt(2.0 / (9 * cin))
    params[f"conv{i}"] = {
      "w": std * jax.random.normal(k, (3, 3, cin, cout), jnp.float32),
      "b": jnp.zeros((cout,), jnp.float32),
    }
  feat = _CONVS[-1][1]
  params["head"] = {
    "w": jax.random.normal(keys[-1], (feat, num_classes), jnp.float32) / np.sqrt(feat),
    "b": jnp.zeros((num_classes,), jnp.float32),
  }
  return params


def features(params: dict[str, Any], images: jax.Array) -> jax.Array:
  """[B, H, W, 1] -> [B, 64]."""
  h = images
  for i, (_, _, stride) in enumerate(_CONVS):
    conv = params[f"conv{i}"]
    h = jax.lax.conv_general_dilated(
      h, conv["w"], window_strides=(stride, stride), padding="SAME", dimension_numbers=_DN
    )
    h = jax.nn.relu(h + conv["b"])
  return h.mean(axis=(1, 2))


def target(context: dict[str, jax.Array], expert_feats: jax.Array) -> jax.Array:
  """[B, E, D] expert features -> [B, D] distillation target (mean over experts)."""
  return (expert_feats @ context["w"] + context["b"]).mean(axis=1)


def inner_loss(params, batch, context) -> jax.Array:
  """Feature MSE between the student and the context's target on the support set."""
  diff = features(params, batch["images"]) - target(context, batch["expert_feats"])
  return jnp.mean(jnp.mean(diff**2, axis=-1))


def outer_loss(params, batch, context) -> jax.Array:
  """Cross-entropy of the adapted student on the query set (does not use the context)."""
  del context
  logits = features(params, batch["images"]) @ params["head"]["w"] + params["head"]["b"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, None], axis=1))


def nested_value_and_grad(params, context, support, query, *, lr: float, steps: int):
  """The obvious implementation: `jax.grad` through a function that contains `jax.grad`."""

  def objective(theta, ctx):
    for _ in range(steps):
      grads = jax.grad(inner_loss)(theta, support, ctx)
      theta = jax.tree.map(lambda t, g: t - lr * g, theta, grads)
    return outer_loss(theta, query, ctx)

  return jax.value_and_grad(objective, argnums=(0, 1))(params, context)


def time_fn(fn: Callable, args: tuple, repeats: int) -> dict[str, float]:
  """Compile time, XLA temp memory, then median/min wall time of `repeats` calls after warm-up."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  temp_mb = None if memory is None else round(memory.temp_size_in_bytes / 1e6, 1)
  out = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return {
    "compile_s": round(compile_s, 3),
    "temp_mb": temp_mb,
    "median_ms": round(1e3 * statistics.median(times), 2),
    "min_ms": round(1e3 * min(times), 2),
  }, out


def max_rel_diff(a: Any, b: Any) -> float:
  """Max over leaves of max|a − b| / max|b|."""
  diffs = jax.tree.map(
    lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(y))), a, b
  )
  return max(jax.tree.leaves(diffs))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--support", type=int, default=64, help="support images per task")
  parser.add_argument("--query", type=int, default=64, help="query images per task")
  parser.add_argument("--image-size", type=int, default=28, help="square image side")
  parser.add_argument("--experts", type=int, default=5, help="number of expert features E")
  parser.add_argument("--classes", type=int, default=10, help="number of classes")
  parser.add_argument("--steps", type=int, default=1, help="inner SGD steps")
  parser.add_argument("--lr", type=float, default=0.01, help="inner learning rate")
  parser.add_argument("--repeats", type=int, default=20, help="timed calls per variant")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  for name in ("support", "query", "image_size", "experts", "classes", "steps", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")

  feat = _CONVS[-1][1]
  keys = jax.random.split(jax.random.PRNGKey(args.seed), 7)
  params = init_student(keys[0], args.classes)
  context = {
    "w": jax.random.normal(keys[1], (feat, feat), jnp.float32) / np.sqrt(feat),
    "b": 0.1 * jax.random.normal(keys[2], (feat,), jnp.float32),
  }
  hw = (args.image_size, args.image_size, 1)
  support = {
    "images": jax.random.normal(keys[3], (args.support, *hw), jnp.float32),
    "expert_feats": jax.random.normal(keys[4], (args.support, args.experts, feat), jnp.float32),
  }
  query = {
    "images": jax.random.normal(keys[5], (args.query, *hw), jnp.float32),
    "labels": jax.random.randint(keys[6], (args.query,), 0, args.classes),
  }

  def custom(p, c, s, q, remat=False):
    return meta.meta_value_and_grad(
      outer_loss, inner_loss, p, s, q, lr=args.lr, steps=args.steps, context=c, remat=remat
    )

  def nested(p, c, s, q):
    return nested_value_and_grad(p, c, s, q, lr=args.lr, steps=args.steps)

  inputs = (params, context, support, query)
  custom_t, (custom_v, custom_g) = time_fn(custom, inputs, args.repeats)
  nested_t, (nested_v, nested_g) = time_fn(nested, inputs, args.repeats)
  remat_t, (_, remat_g) = time_fn(
    lambda p, c, s, q: custom(p, c, s, q, remat=True), inputs, args.repeats
  )

  result = {
    "benchmark": "meta_grad",
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "machine": platform.machine(),
    "config": vars(args),
    "custom_vjp": custom_t,
    "nested_grad": nested_t,
    "custom_vjp_remat": remat_t,
    "speedup_median": round(nested_t["median_ms"] / custom_t["median_ms"], 2),
    "max_rel_diff_grads": max_rel_diff(custom_g, nested_g),
    "max_rel_diff_params_grads": max_rel_diff(custom_g[0], nested_g[0]),
    "max_rel_diff_context_grads": max_rel_diff(custom_g[1], nested_g[1]),
    "max_rel_diff_remat_grads": max_rel_diff(remat_g, custom_g),
    "value_abs_diff": float(abs(custom_v - nested_v)),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
