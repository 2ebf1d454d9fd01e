r"""N stacked ConvNet experts: forward and training gradient by each way of mapping the stack.

The experts are the pipeline's (`models.Classifier` over the `convnet` backbone of
`configs/meta_dmoe.py`: width 32, feature_dim 128 by default), stored stacked on a leading
expert axis as `meta_dmoe.init_experts` does. Ops:

- `forward`: every expert's features of ONE shared batch [B, 28, 28, 1] in eval mode ->
  [N, B, D] (what `meta_dmoe.expert_features` and a step re-running the experts do);
- `grad`: the experts' training-step gradient as in `meta_dmoe.make_expert_step`: each
  expert has its own batch [N, B, 28, 28, 1], BatchNorm in training mode (batch statistics,
  updated running averages returned), `value_and_grad` of the summed cross-entropies
  w.r.t. all stacked parameters (no optimiser update: it is the same for every mode).

Modes (see `common.stack_map`): `vmap` (jax.vmap: convolutions over a stacked kernel become
grouped convolutions), `map` (rolled jax.lax.map, a while loop), `unrolled` (the pipeline's
unrolled scan, `meta_dmoe._stack_map` with 'unrolled') and `loop` (a Python loop over expert
slices inside one jit). Each row: N, mode, op, median / min ms of `--repeats` calls after
one warm-up (fewer, but at least 3, once a row's calls took `--row_budget_s`), AOT
compile time, XLA temp memory, the slowdown against the unrolled scan, and the max
|difference| of the outputs from the loop's (a check that all modes compute the same).

Run (prints one JSON object on stdout, logs on stderr):

  python benchmarks/stacked_experts.py --experts=2,5,10 --repeats=10
"""

from __future__ import annotations

import argparse
import time

import common
import jax
import jax.numpy as jnp

from moe_adapt import core, models

OPS = ("forward", "grad")


def make_ops(model: models.Classifier, mode: str) -> dict:
  """{'forward': fn(params, stats, x [B,...]), 'grad': fn(params, stats, x [N,B,...], y [N,B])}."""
  stack = common.stack_map(mode)

  def forward(params, stats, x):
    def one(expert):
      p, s = expert
      return model.apply(
        {"params": p, "batch_stats": s}, x, train=False, method=models.Classifier.features
      )

    return stack(one, (params, stats))

  def loss_one(expert):
    p, s, xb, yb = expert
    logits, updates = model.apply(
      {"params": p, "batch_stats": s}, xb, train=True, mutable=["batch_stats"]
    )
    return core.losses.cross_entropy(logits, yb).mean(), updates["batch_stats"]

  def grad(params, stats, x, y):
    def total(params):
      losses, new_stats = stack(loss_one, (params, stats, x, y))
      return losses.sum(), new_stats

    (loss, new_stats), grads = jax.value_and_grad(total, has_aux=True)(params)
    return loss, grads, new_stats

  return {"forward": jax.jit(forward), "grad": jax.jit(grad)}


def max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b)
  return float(max(jax.tree.leaves(diffs)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--experts", type=common.int_list, default=[2, 5, 10], help="e.g. 2,5,10")
  parser.add_argument("--batch", type=int, default=64, help="images per expert")
  parser.add_argument("--size", type=int, default=28, help="square image side")
  parser.add_argument("--width", type=int, default=32, help="ConvNet width")
  parser.add_argument("--feature_dim", type=int, default=128, help="0 = pooled conv features")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per row")
  parser.add_argument(
    "--row_budget_s", type=float, default=30.0, help="stop a row's timing after this (>= 3 calls)"
  )
  parser.add_argument(
    "--modes", default=",".join(common.STACK_MODES), help="subset of vmap,map,unrolled,loop"
  )
  parser.add_argument("--ops", default=",".join(OPS), help="subset of forward,grad")
  args = parser.parse_args()
  common.check_positive(parser, args, ("experts", "batch", "size", "width", "classes", "repeats"))
  if args.feature_dim < 0:
    parser.error(f"--feature_dim={args.feature_dim} is invalid; accepted: an integer >= 0")
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  ops = [o.strip() for o in args.ops.split(",") if o.strip()]
  if not modes or set(modes) - set(common.STACK_MODES):
    parser.error(f"--modes={args.modes} is invalid; accepted: {', '.join(common.STACK_MODES)}")
  if not ops or set(ops) - set(OPS):
    parser.error(f"--ops={args.ops} is invalid; accepted: {', '.join(OPS)}")
  if "loop" not in modes:
    modes.append("loop")  # the reference for the output check

  t_start = time.perf_counter()
  backbone = models.get_backbone("convnet", width=args.width, feature_dim=args.feature_dim)
  model = models.Classifier(backbone=backbone, num_classes=args.classes)
  shape = (args.size, args.size, 1)
  sample = jnp.zeros((1, *shape), jnp.float32)
  rows = []
  for n in args.experts:
    keys = jax.random.split(jax.random.key(n), 4)
    variables = jax.vmap(lambda k: model.init(k, sample, train=False))(jax.random.split(keys[0], n))
    params, stats = variables["params"], variables["batch_stats"]
    inputs = {
      "forward": (params, stats, jax.random.uniform(keys[1], (args.batch, *shape))),
      "grad": (
        params,
        stats,
        jax.random.uniform(keys[2], (n, args.batch, *shape)),
        jax.random.randint(keys[3], (n, args.batch), 0, args.classes),
      ),
    }
    fns = {mode: make_ops(model, mode) for mode in modes}
    for op in ops:
      outs, op_rows = {}, {}
      for mode in modes:
        compiled, timing = common.lower_and_compile(fns[mode][op], *inputs[op])
        times, outs[mode] = common.time_calls(
          compiled, *inputs[op], repeats=args.repeats, budget_s=args.row_budget_s
        )
        op_rows[mode] = {
          "n": n,
          "mode": mode,
          "op": op,
          **common.summarize(times),
          **timing,
          "temp_mb": (common.memory_analysis(compiled) or {}).get("temp_mb"),
        }
        common.log(f"n={n} {op} {mode}: {op_rows[mode]['median_ms']} ms")
      for mode in modes:
        op_rows[mode]["max_abs_diff_vs_loop"] = max_abs_diff(outs[mode], outs["loop"])
        op_rows[mode]["slowdown_vs_unrolled"] = (
          round(op_rows[mode]["median_ms"] / op_rows["unrolled"]["median_ms"], 2)
          if "unrolled" in op_rows
          else None
        )
        rows.append(op_rows[mode])

  common.emit(
    {
      "benchmark": "stacked_experts",
      "environment": common.environment(),
      "config": {
        "experts": args.experts,
        "batch": args.batch,
        "image": list(shape),
        "width": args.width,
        "feature_dim": args.feature_dim,
        "classes": args.classes,
        "repeats": args.repeats,
      },
      "rows": rows,
      "peak_rss_mb": common.peak_rss_mb(),
      "device_memory": common.device_memory(),
      "wall_s": round(time.perf_counter() - t_start, 1),
    }
  )


if __name__ == "__main__":
  main()
