r"""MUKA's MC-dropout teacher scoring: S vmapped dropout passes vs S jitted calls in a loop.

The teacher is MUKA's (`configs/muka.py:fmnist`, `methods/muka.py`): a `DropoutClassifier`
(the config's ConvNet backbone, width 16 and feature_dim 128; dropout 0.1 on the features; a
head over one teacher's ⌊10 / K⌋ = 5 classes with K = 2 teachers) on Fashion-MNIST images
28×28×1, at the scoring batch size `eval_batch_size` (500). Random weights: the time does not
depend on them. For each S (default 1, 5, 10, 20), each mode's call returns the mean of the
S softmaxes [B, C]:

- `vmapped`: the library's way, `muka._score_batch`: the backbone once, then the S dropout
  passes over the head as ONE vmapped call (`core.routing.mc_dropout_probs`), one jit;
- `loop`: the backbone by one jitted call, then S separate calls of a jitted one-pass head
  (the same keys, `jax.random.split(key, S)`) from a Python loop, averaged on the device;
- `full_vmapped` / `full_loop`: the same with dropout applied to the WHOLE model per pass
  (`mc_dropout_probs` over backbone + head, vs S jitted full passes). With the dropout after
  the backbone, `jax.vmap` leaves the key-independent backbone unbatched, so `full_vmapped`
  costs what `vmapped` costs while `full_loop` runs the backbone S times; with dropout inside
  the network (MUKI's transformer teachers) nothing could be shared.

Each row: median / min ms per batch of `--repeats` calls after a warm-up (the loop's time is
the whole loop), AOT compile time of the jitted function(s), XLA temp memory, the speed-up of
the vmapped call over its loop, and max |difference| of the mean probabilities from the
loop's (the same keys give the same samples, so ≈ 0).

Run (prints one JSON object on stdout, logs on stderr):

  python benchmarks/mc_dropout.py                                # ~1 min on 2 CPU cores
  python benchmarks/mc_dropout.py --samples=1,10 --repeats=5     # quick
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt import core, models
from moe_adapt.methods import muka, muka_setup

REPO = Path(__file__).resolve().parents[1]
MODES = ("vmapped", "loop", "full_vmapped", "full_loop")
IMAGE_SHAPE = (28, 28, 1)  # fmnist_rot


def load_config(preset: str):
  """`configs/muka.py:<preset>` (config files are loaded by path, as the CLI does)."""
  spec = importlib.util.spec_from_file_location("muka_config", REPO / "configs" / "muka.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def make_teacher(config, num_classes: int) -> models.DropoutClassifier:
  backbone = models.get_backbone(config.model.backbone, **config.model.options.to_dict())
  return models.DropoutClassifier(
    backbone=backbone, num_classes=num_classes, rate=config.model.dropout
  )


def build_mode(model: models.DropoutClassifier, mode: str, num_samples: int, variables, x, key):
  """AOT-compiles one mode: (call(variables, x, key) -> mean probs [B, C], compile info).

  The loop modes compile each jitted piece once (the one-pass function takes the key array
  and the pass index, so all S calls share one compilation); their compile info sums them.
  """
  cls = models.DropoutClassifier
  s = num_samples

  def full_apply(v, xb, k):
    return model.apply(v, xb, train=False, stochastic=True, rngs={"dropout": k})

  def split(k):
    return jax.random.split(k, s)

  def mean(probs):
    return jnp.mean(jnp.stack(probs), axis=0)

  if mode == "vmapped":
    score = jax.jit(lambda v, xb, k: muka._score_batch(model, s, v, xb, k)[1])
    compiled, info = common.lower_and_compile(score, variables, x, key)
    info["temp_mb"] = (common.memory_analysis(compiled) or {}).get("temp_mb")
    return compiled, info
  if mode == "full_vmapped":

    def full_vmapped(v, xb, k):
      return core.routing.mc_dropout_probs(full_apply, v, xb, k, num_samples=s).mean(axis=0)

    compiled, info = common.lower_and_compile(jax.jit(full_vmapped), variables, x, key)
    info["temp_mb"] = (common.memory_analysis(compiled) or {}).get("temp_mb")
    return compiled, info

  def features(v, xb):
    return model.apply(v, xb, train=False, method=cls.features)

  def head_pass(v, feats, keys, i):
    head = {"params": {"head": v["params"]["head"]}}
    logits = model.apply(
      head, feats, stochastic=True, rngs={"dropout": keys[i]}, method=cls.classify
    )
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  def full_pass(v, xb, keys, i):
    return jax.nn.softmax(full_apply(v, xb, keys[i]).astype(jnp.float32), axis=-1)

  keys = jax.random.split(key, s)
  index = jnp.int32(0)
  infos = []
  c_split, info = common.lower_and_compile(jax.jit(split), key)
  infos.append(info)
  if mode == "loop":
    feats = jax.eval_shape(features, variables, x)
    c_features, info = common.lower_and_compile(jax.jit(features), variables, x)
    infos.append(info)
    c_pass, info = common.lower_and_compile(jax.jit(head_pass), variables, feats, keys, index)
  else:
    c_features = None
    c_pass, info = common.lower_and_compile(jax.jit(full_pass), variables, x, keys, index)
  infos.append(info)
  probs = jax.ShapeDtypeStruct((x.shape[0], model.num_classes), jnp.float32)
  c_mean, info = common.lower_and_compile(jax.jit(mean), [probs] * s)
  infos.append(info)
  indices = [jnp.int32(i) for i in range(s)]

  def call(v, xb, k):
    ks = c_split(k)
    inputs = c_features(v, xb) if c_features is not None else xb
    return c_mean([c_pass(v, inputs, ks, i) for i in indices])

  total = {name: round(sum(i[name] for i in infos), 3) for name in ("lower_s", "compile_s")}
  total["temp_mb"] = (common.memory_analysis(c_pass) or {}).get("temp_mb")
  return call, total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="fmnist", help="argument of configs/muka.py")
  parser.add_argument("--samples", type=common.int_list, default=[1, 5, 10, 20], help="S values")
  parser.add_argument("--batch", type=int, default=0, help="0 = the config's eval_batch_size")
  parser.add_argument("--teachers", type=int, default=0, help="0 = teachers.num_teachers")
  parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {', '.join(MODES)}")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per row")
  args = parser.parse_args()
  common.check_positive(parser, args, ("samples", "repeats"))
  for name in ("batch", "teachers"):
    if getattr(args, name) < 0:
      parser.error(f"--{name}={getattr(args, name)} is invalid; accepted: an integer >= 0")
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  if not modes or set(modes) - set(MODES):
    parser.error(f"--modes={args.modes} is invalid; accepted: {', '.join(MODES)}")

  t_start = time.perf_counter()
  config = load_config(args.preset)
  teachers = args.teachers or config.teachers.num_teachers
  num_classes = len(muka_setup.label_chunks(10, teachers)[0])
  batch = args.batch or config.eval_batch_size
  model = make_teacher(config, num_classes)
  key = jax.random.key(0)
  variables = model.init(key, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False)
  x = jax.random.uniform(jax.random.key(1), (batch, *IMAGE_SHAPE))
  score_key = jax.random.key(2)

  rows = []
  for s in args.samples:
    outs, by_mode = {}, {}
    for mode in modes:
      call, info = build_mode(model, mode, s, variables, x, score_key)
      times, outs[mode] = common.time_calls(call, variables, x, score_key, repeats=args.repeats)
      by_mode[mode] = {"samples": s, "mode": mode, **common.summarize(times), **info}
      common.log(f"S={s} {mode}: {by_mode[mode]['median_ms']} ms")
    for mode, row in by_mode.items():
      ref = "full_loop" if mode.startswith("full") else "loop"
      if ref in outs:
        row["max_abs_diff_vs_loop"] = float(np.max(np.abs(outs[mode] - outs[ref])))
      if mode.endswith("vmapped") and ref in by_mode:
        row["speedup_vs_loop"] = round(by_mode[ref]["median_ms"] / row["median_ms"], 2)
      rows.append(row)

  common.emit(
    {
      "benchmark": "mc_dropout",
      "environment": common.environment(),
      "config": {
        "preset": args.preset,
        "backbone": config.model.backbone,
        "model": config.model.options.to_dict(),
        "dropout": config.model.dropout,
        "classes": num_classes,
        "image": list(IMAGE_SHAPE),
        "batch": batch,
        "samples": args.samples,
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
