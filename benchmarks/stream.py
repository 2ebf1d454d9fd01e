r"""Images per second of the streaming input pipeline (`moe_adapt.data.streaming`).

Writes a mock DomainNet (`tfds_builders.prepare_mock`: uint8 photos of `--sides` pixels,
zlib-compressed Tensors in array_record) into a temporary folder, then times the training
pipeline of the accelerator presets: random resized crop to `--image_size`, horizontal
flip, ImageNet normalisation, batches of `--batch` (64 = `configs/meta_dmoe.py:tfds`'s
per-expert batch; `configs/co_tuning.py:cub` uses 48). One row per `--read_threads` value:
images/s over `--batches` batches after `--warmup` batches, and the single-threaded cost
of one image's read + decode + augmentation (ms), from which the cores an input rate needs
follow. With `--step_ms` (a training step's time on the target accelerator), each row also
says whether that step would wait for input at this rate.

Real DomainNet images are JPEG files; decoding a ~400 px JPEG costs a few ms more per image
than the zlib-compressed arrays used here.

`--meta_step=N` adds Meta-DMoE's streamed meta step (`methods/meta_dmoe_stream.py`, the
`configs/meta_dmoe.py:tfds,tiny` preset with `data.streaming=True` at `--image_size`, its
`model.*` sizes overridable with `--meta_filters`): N timed steps of the whole step (read
the episode of S + Q images + the frozen experts' tokens + second-order meta-step), of the
input alone and of the jitted compute alone on one episode, in steps/s; `input_bound` says
whether reading an episode takes longer than computing on it.

  nice -n 5 python benchmarks/stream.py --batch=64 --batches=10 --read_threads=1,2
  nice -n 5 python benchmarks/stream.py --read_threads=2 --batches=4 --image_size=64 \
      --meta_step=6
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import pathlib
import shutil
import sys
import tempfile
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_adapt.data import streaming, tfds_builders
from moe_adapt.methods import meta_dmoe, meta_dmoe_stream

REPO = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64, help="images per batch")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--sides", type=common.int_list, default=[300, 500], help="min,max px")
  parser.add_argument("--per_class", type=int, default=16, help="images per class and domain")
  parser.add_argument("--batches", type=int, default=10, help="timed batches per row")
  parser.add_argument("--warmup", type=int, default=2, help="untimed batches per row")
  parser.add_argument("--read_threads", type=common.int_list, default=[1, 2])
  parser.add_argument("--worker_count", type=int, default=0, help="grain worker processes")
  parser.add_argument("--step_ms", type=float, default=None, help="a training step's time")
  parser.add_argument("--meta_step", type=int, default=0, help="time N streamed meta steps")
  parser.add_argument("--meta_filters", type=int, default=8, help="ResNet-50 num_filters")
  args = parser.parse_args()
  common.check_positive(parser, args, ("batch", "image_size", "per_class", "batches"))
  if len(args.sides) != 2 or not 1 <= args.sides[0] <= args.sides[1]:
    parser.error(f"--sides={args.sides} is invalid; accepted: min,max with 1 <= min <= max")

  t_start = time.perf_counter()
  tmp = tempfile.mkdtemp(prefix="stream_bench_")
  try:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is the JSON.
      builder = tfds_builders.prepare_mock(
        "domainnet",
        tmp,
        num_classes=3,
        per_class={"train": args.per_class, "test": 1},
        image_sides=tuple(args.sides),
      )
    prepare_s = time.perf_counter() - t0
    name = f"{builder.name}/{builder.builder_config.name}"
    source = streaming.open_split(name, split="train", data_dir=tmp, domain_key="domain")
    transform = streaming.image_transform(image_size=args.image_size, domain_key="domain")
    common.log(f"{len(source.indices)} images prepared in {prepare_s:.1f} s")

    # One image's read + decode + augmentation on one thread.
    rng = np.random.default_rng(0)
    costs = []
    for i in source.indices[:64]:
      t0 = time.perf_counter()
      transform(source.data[int(i)], rng)
      costs.append(time.perf_counter() - t0)
    per_image_ms = 1e3 * float(np.median(costs))

    rows = []
    for threads in args.read_threads:
      batches = streaming.train_batches(
        source,
        transform,
        batch_size=args.batch,
        seed=0,
        read_threads=threads,
        worker_count=args.worker_count,
      )
      iterator = iter(batches)
      for _ in range(args.warmup):
        next(iterator)
      t0 = time.perf_counter()
      for _ in range(args.batches):
        batch = next(iterator)
      elapsed = time.perf_counter() - t0
      assert batch["image"].shape == (args.batch, args.image_size, args.image_size, 3)
      rate = args.batch * args.batches / elapsed
      row = {
        "read_threads": threads,
        "worker_count": args.worker_count,
        "images_per_s": round(rate, 1),
        "batch_ms": round(1e3 * elapsed / args.batches, 1),
      }
      if args.step_ms is not None:
        row["input_bound_at_step_ms"] = row["batch_ms"] > args.step_ms
      rows.append(row)
      common.log(f"read_threads={threads}: {row['images_per_s']} images/s")
    meta = meta_step_row(name, tmp, args) if args.meta_step else None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  common.emit(
    {
      "benchmark": "stream",
      "environment": common.environment(),
      "config": {
        "batch": args.batch,
        "image_size": args.image_size,
        "source_sides": list(args.sides),
        "images": len(source.indices),
        "augment": ["random_resized_crop", "flip"],
        "normalize": "imagenet",
        "batches": args.batches,
        "warmup": args.warmup,
        "step_ms": args.step_ms,
      },
      "per_image_ms_one_thread": round(per_image_ms, 2),
      "rows": rows,
      **({"meta_step": meta} if meta else {}),
      "wall_s": round(time.perf_counter() - t_start, 1),
    }
  )


def meta_step_row(name: str, data_dir: str, args: argparse.Namespace) -> dict:
  """Steps/s of Meta-DMoE's streamed meta step: whole, input alone, compute alone."""
  spec = importlib.util.spec_from_file_location("meta_dmoe_config", REPO / "configs/meta_dmoe.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tfds,tiny")
  config.data.streaming = True
  config.data.options.tfds_name = name
  config.data.options.data_dir = data_dir
  config.data.options.image_size = args.image_size
  config.model.options.num_filters = args.meta_filters
  config.meta.steps = 2 * (args.meta_step + 1)
  setup = meta_dmoe_stream.make_setup(config)
  tx = optax.adam(1e-4)
  experts = meta_dmoe.init_experts(setup, tx, None)
  experts = {"params": experts["params"], "batch_stats": experts["batch_stats"]}
  student = meta_dmoe.init_model(setup, jax.random.key(1))
  tokens = jnp.zeros((1, setup.num_experts, experts["params"]["head"]["kernel"].shape[-2]))
  aggregator = jax.jit(setup.agg_model.init)(jax.random.key(2), tokens)["params"]
  state = {
    "student": student["params"],
    "aggregator": aggregator,
    "batch_stats": student["batch_stats"],
    "opt_student": tx.init(student["params"]),
    "opt_aggregator": tx.init(aggregator),
  }
  step = meta_dmoe_stream.make_meta_step(setup, tx, tx, experts)
  n = args.meta_step
  whole, state = common.time_stateful(step, state, repeats=n, warmup=1)
  # Input alone: the next n episodes of a fresh reader (its threads start cold, as a
  # resumed stage's do).
  reader = meta_dmoe_stream.make_meta_step(setup, tx, tx, experts).read
  read_times = []
  for i in range(n + 1, 2 * n + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(reader(jnp.int32(i)))
    read_times.append(time.perf_counter() - t0)
  episode = step.read(jnp.int32(0))
  compute, state = common.time_stateful(
    lambda st, i: step.compute(st, i, *episode), state, repeats=n, warmup=1
  )
  whole_ms, read_ms, compute_ms = (1e3 * float(np.median(t)) for t in (whole, read_times, compute))
  row = {
    "episode_images": config.meta.support_size + config.meta.query_size,
    "num_experts": setup.num_experts,
    "num_filters": args.meta_filters,
    "steps_per_s": round(1e3 / whole_ms, 2),
    "step_ms": round(whole_ms, 1),
    "input_ms": round(read_ms, 1),
    "compute_ms": round(compute_ms, 1),
    "input_bound": read_ms > compute_ms,
  }
  common.log(f"meta step: {row}")
  return row


if __name__ == "__main__":
  main()
