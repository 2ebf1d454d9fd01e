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

  nice -n 5 python benchmarks/stream.py --batch=64 --batches=10 --read_threads=1,2
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time

import common
import numpy as np

from moe_adapt.data import streaming, tfds_builders


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
      "wall_s": round(time.perf_counter() - t_start, 1),
    }
  )


if __name__ == "__main__":
  main()
