r"""One training step of each adapter variant (finetune + AdaMix) on the real harness.

Builds the workload with the pipeline itself: `configs/adamix.py:<preset>` (default `vader`:
MiniLM, batch 32 × 48 tokens; `digits`, the ViT, needs no downloads; every text preset,
`tiny` too, needs VADER and MiniLM fetched), `adapter_harness.make_setup`, and for every variant
the model, the trainable/frozen split and `train.finetuning.make_train_step` exactly
as `train.finetuning.train` does. Each row: variant, median / min ms of `--repeats` steps after a
warm-up (the step donates its state; the returned state is fed back), AOT compile time, XLA
temp memory, trainable parameters, and the ratio to the `adapter` step. AdaMix variants with
consistency run two forward passes per step, which is most of their extra cost.

Inference (`inference` rows; skipped with `--inference_variant=''`): the eval-mode forward
of one batch of `eval_batch_size` examples (logits [B, C], as `adapter_harness.predict_logits`) of

- `adapter`: one Pfeiffer adapter (the `adapter` variant's model);
- `<mixture>_merged`: the mixture (`--inference_variant`, default `adamix`) after
  `models.adamix.merge_mixture_params`: one adapter per layer, the deployed model;
- `<mixture>_merged_in_forward`: the unmerged mixture with `mixture_inference='merged'`
  (the experts' weights are averaged inside every forward call);
- `<mixture>_random`: the unmerged mixture with random routing (one expert per module drawn
  per call, as in training).

Each: median / min ms per batch of `--repeats` calls after a warm-up, AOT compile time, XLA
temp memory, and the ratio to the adapter's forward. Weights are random (the adapter and
mixture are freshly initialised): the time does not depend on them.

  python benchmarks/adapter_step.py --repeats=10                 # ~3 min on 2 CPU cores
  python benchmarks/adapter_step.py --preset=digits,tiny --repeats=3  # smoke, no downloads
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import common
import jax
import jax.numpy as jnp

from moe_adapt import models
from moe_adapt.methods import adamix
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.models import adapted
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import finetuning

REPO = Path(__file__).resolve().parents[1]


def load_config(preset: str):
  """`configs/adamix.py:<preset>` (config files are loaded by path, as the CLI does)."""
  spec = importlib.util.spec_from_file_location("adamix_config", REPO / "configs" / "adamix.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="vader", help="argument of configs/adamix.py")
  p.add_argument("--variants", default=",".join(adamix.VARIANTS), help="comma-separated")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument(
    "--inference_variant",
    default="adamix",
    help="mixture variant whose merged / random-routing inference is timed ('' = skip)",
  )
  p.add_argument(
    "--inference_batch", type=int, default=0, help="examples per forward (0 = eval_batch_size)"
  )
  return p


def time_inference(
  setup: ft.Setup, mixture: str, repeats: int, backbone, batch: int = 0
) -> list[dict]:
  """Eval-mode forward ms per batch: adapter, merged mixture, merged in forward, random."""
  config = setup.config
  batch = batch or config.eval_batch_size
  examples = setup.task.pooled("train", setup.task.domains)
  reps = -(-batch // len(examples))  # tiny data sets: repeat the examples to fill a batch
  inputs = [
    jnp.asarray(jnp.tile(a, (reps,) + (1,) * (a.ndim - 1))[:batch]) for a in examples.inputs
  ]
  mix_adapter = adamix.variant_adapter(config, mixture)
  mix_model = ft.build_model(setup, mix_adapter)
  mix_params = ft.init_params(setup, mix_model, setup.key("init"), backbone)
  merged_params, merged_adapter = models.adamix.merge_mixture_params(mix_params, mix_adapter)
  single_adapter = adamix.variant_adapter(config, "adapter")
  single_model = ft.build_model(setup, single_adapter)
  cases = (
    ("adapter", single_model, ft.init_params(setup, single_model, setup.key("init"), backbone)),
    (f"{mixture}_merged", ft.build_model(setup, merged_adapter), merged_params),
    (
      f"{mixture}_merged_in_forward",
      ft.build_model(setup, dataclasses.replace(mix_adapter, mixture_inference="merged")),
      mix_params,
    ),
    (
      f"{mixture}_random",
      ft.build_model(setup, dataclasses.replace(mix_adapter, mixture_inference="random")),
      mix_params,
    ),
  )
  key = jax.random.key(0)
  rows = []
  for name, model, params in cases:

    def forward(params, key, *inputs, model=model):
      return model.apply({"params": params}, *inputs, train=False, rngs={"routing": key})

    compiled, compile_info = common.lower_and_compile(jax.jit(forward), params, key, *inputs)
    times, _ = common.time_calls(compiled, params, key, *inputs, repeats=repeats)
    rows.append(
      {
        "variant": name,
        "batch": batch,
        **common.summarize(times),
        **compile_info,
        "memory": common.memory_analysis(compiled),
        "params": adapters_lib.count_params(params),
      }
    )
    common.log(f"inference {name}: {rows[-1]['median_ms']} ms per batch of {batch}")
  base = rows[0]["median_ms"]
  for r in rows:
    r["vs_adapter"] = round(r["median_ms"] / base, 2)
  return rows


def time_variant(setup: ft.Setup, name: str, repeats: int, backbone) -> dict:
  """Compiles and times one variant's training step."""
  config = setup.config
  v = adamix.VARIANTS[name]
  adapter = adamix.variant_adapter(config, name)
  model = ft.build_model(setup, adapter)
  params = ft.init_params(setup, model, setup.key("init"), backbone)
  frozen, trainable = adapted.split_trainable(params, v.train_mode)
  trainable = jax.tree.map(jnp.copy, trainable)
  steps = config.train.steps
  tx = finetuning.make_optimizer(
    steps, config.train.lr, warmup_fraction=0.5, weight_decay=config.train.weight_decay
  )
  examples = setup.task.pooled("train", setup.task.domains)
  state = {"params": trainable, "opt_state": tx.init(trainable)}
  weight = config.adamix.consistency_weight if v.consistency else 0.0
  step = finetuning.make_train_step(
    model,
    tx,
    batch_size=config.train.batch_size,
    mesh=setup.mesh,
    loss=adamix.consistency_loss(weight),
  )
  args = (
    setup.key(name),
    frozen,
    *(jnp.asarray(a) for a in examples.inputs),
    jnp.asarray(examples.labels),
  )
  compiled, compile_info = common.lower_and_compile(step, state, jnp.int32(0), *args)
  state, _ = compiled(state, jnp.int32(0), *args)
  jax.block_until_ready(state)
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, jnp.int32(i + 1), *args)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  common.log(f"{name}: {1e3 * statistics.median(times):.1f} ms")
  return {
    "variant": name,
    "median_ms": round(1e3 * statistics.median(times), 2),
    "min_ms": round(1e3 * min(times), 2),
    **compile_info,
    "memory": common.memory_analysis(compiled),
    "trainable_params": adapters_lib.count_params(trainable),
    "consistency_passes": 2 if v.consistency else 1,
  }


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.repeats < 1:
    raise SystemExit(f"--repeats={args.repeats} is invalid; accepted: an integer >= 1")
  if args.inference_batch < 0:
    raise SystemExit(
      f"--inference_batch={args.inference_batch} is invalid; accepted: 0 (eval_batch_size) or "
      "an integer >= 1"
    )
  names = [n.strip() for n in args.variants.split(",") if n.strip()]
  unknown = [n for n in names if n not in adamix.VARIANTS]
  if unknown:
    raise SystemExit(f"--variants has unknown {unknown}; accepted: {', '.join(adamix.VARIANTS)}")
  mixtures = [n for n, v in adamix.VARIANTS.items() if v.kind in adamix.MIXTURES]
  if args.inference_variant and args.inference_variant not in mixtures:
    raise SystemExit(
      f"--inference_variant={args.inference_variant!r} is unknown; accepted: '' (skip), "
      + ", ".join(mixtures)
    )
  config = load_config(args.preset)
  setup = ft.make_setup(config)
  # MiniLM's weights for text; a random ViT otherwise (step times do not depend on them).
  backbone = setup.pretrained
  rows = [time_variant(setup, n, args.repeats, backbone) for n in names]
  base = next((r["median_ms"] for r in rows if r["variant"] == "adapter"), None)
  for r in rows:
    r["vs_adapter"] = round(r["median_ms"] / base, 2) if base else None
  inference = None
  if args.inference_variant:
    inference = time_inference(
      setup, args.inference_variant, args.repeats, backbone, args.inference_batch
    )
  common.emit(
    {
      "benchmark": "adapter_step",
      "preset": args.preset,
      "batch_size": config.train.batch_size,
      "eval_batch_size": config.eval_batch_size,
      "environment": common.environment(),
      "rows": rows,
      "inference": inference,
      "peak_rss_mb": common.peak_rss_mb(),
      "device_memory": common.device_memory(),
    }
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
