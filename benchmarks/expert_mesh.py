r"""Memory per device of N stacked experts trained on a (data, expert) mesh.

The experts are the pipeline's (`models.Classifier` over a ConvNet or a ResNet, stacked on
a leading expert axis as `meta_dmoe.init_experts` stores them) with Adam state, trained by
`train.mesh.make_stacked_step` (each expert on its own batch [N, B, H, W, C]; the experts
mapped by `jax.vmap`, or with `--stack_map=unrolled` by the unrolled scan that meta_dmoe
uses on CPU). For each mesh
shape `(data, expert)`, one row: the bytes every device holds of the state (params,
BatchNorm statistics, optimiser state; from `jax.Array.addressable_shards`), the compiled
step's per-device argument / output / temp sizes (XLA's memory analysis), the state's
bytes on one device without an expert axis, and the max |difference| of the step's losses
from the (1, 1) mesh's (a check that every layout computes the same).

Runs on fake CPU devices by default (`--devices`, set before JAX starts); on an
accelerator host pass `--devices=0` to use the real ones. Prints one JSON object:

  python benchmarks/expert_mesh.py --experts=8 --shapes=1x1,8x1,4x2,2x4,1x8
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--experts", type=int, default=8, help="stacked experts N")
  parser.add_argument("--shapes", default="1x1,8x1,4x2,2x4,1x8", help="data x expert, ...")
  parser.add_argument("--backbone", default="convnet", help="convnet or resnet18/34/50")
  parser.add_argument("--batch", type=int, default=16, help="images per expert")
  parser.add_argument("--size", type=int, default=32, help="square image side")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument(
    "--stack_map", default="vmap", choices=("vmap", "unrolled"), help="map over the experts"
  )
  parser.add_argument(
    "--devices", type=int, default=8, help="fake CPU devices (0: the real devices)"
  )
  args = parser.parse_args()
  for field in ("experts", "batch", "size", "classes"):
    if getattr(args, field) < 1:
      parser.error(f"--{field}={getattr(args, field)} is invalid; accepted: an integer >= 1")
  try:
    args.shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
  except ValueError:
    parser.error(f"--shapes={args.shapes!r} is invalid; accepted: e.g. 1x1,4x2,2x4")
  return args


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices:
  # Before JAX initialises its backend.
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"

import common  # noqa: E402 (after the device flags)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from moe_adapt import core, models  # noqa: E402
from moe_adapt.train import mesh as mesh_lib  # noqa: E402

MB = 1e6


def main(args: argparse.Namespace) -> None:
  t_start = time.perf_counter()
  options = {"width": 32, "feature_dim": 128} if args.backbone == "convnet" else {}
  if args.backbone.startswith("resnet"):
    options = {"small_input": True}
  model = models.Classifier(
    backbone=models.get_backbone(args.backbone, **options), num_classes=args.classes
  )
  shape = (args.size, args.size, 3)
  tx = optax.adam(1e-3)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *shape)), train=False))
  experts = [init(k) for k in jax.random.split(jax.random.key(0), args.experts)]
  variables = jax.tree.map(lambda *leaves: np.stack(leaves), *experts)
  params = variables["params"]
  state = jax.device_get(
    {"params": params, "batch_stats": variables["batch_stats"], "opt_state": tx.init(params)}
  )
  rng = np.random.default_rng(0)
  batch = {
    "x": rng.uniform(size=(args.experts, args.batch, *shape)).astype(np.float32),
    "y": rng.integers(0, args.classes, (args.experts, args.batch)).astype(np.int32),
  }

  def loss_one(params, stats, b):
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats}, b["x"], train=True, mutable=["batch_stats"]
    )
    return core.losses.cross_entropy(logits, b["y"]).mean(), updates["batch_stats"]

  state_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(state))
  rows, reference = [], None
  for data, expert in args.shapes:
    try:
      mesh = mesh_lib.make_expert_mesh((data, expert), num_experts=args.experts)
    except ValueError as e:
      common.log(f"skip {data}x{expert}: {e}")
      continue
    placed = mesh_lib.shard_stacked(state, mesh, num_experts=args.experts)
    stack_map = mesh_lib.vmap_stack if args.stack_map == "vmap" else common.stack_map("unrolled")
    step = mesh_lib.make_stacked_step(loss_one, tx, mesh, placed, batch, stack_map=stack_map)
    held = mesh_lib.per_device_bytes(placed)
    compiled, timing = common.lower_and_compile(step, placed, batch)
    _, losses = compiled(placed, batch)
    losses = np.asarray(losses)
    reference = losses if reference is None else reference
    rows.append(
      {
        "mesh": [data, expert],
        "devices": data * expert,
        "state_mb_per_device": round(max(held.values()) / MB, 3),
        "state_mb_one_device": round(state_bytes / MB, 3),
        "step_memory_per_device": common.memory_analysis(compiled),
        "max_abs_loss_diff_vs_first": float(np.max(np.abs(losses - reference))),
        **timing,
      }
    )
    common.log(f"{data}x{expert}: {rows[-1]['state_mb_per_device']} MB of state per device")
  common.emit(
    {
      "benchmark": "expert_mesh",
      "environment": common.environment(),
      "config": {
        "experts": args.experts,
        "backbone": args.backbone,
        "batch": args.batch,
        "image": list(shape),
        "classes": args.classes,
        "stack_map": args.stack_map,
      },
      "rows": rows,
      "wall_s": round(time.perf_counter() - t_start, 1),
    }
  )


if __name__ == "__main__":
  if ARGS is None:
    sys.exit(2)
  main(ARGS)
