r"""Time of one Meta-DMoE meta-step and one test-time adaptation, built by the real pipeline.

Workload: `configs/meta_dmoe.py:fmnist_rot` (Fashion-MNIST, 28×28×1, 10 classes, 5 source
domains) with overrides matching the PyTorch peer (`/work/shared/tools/peer_meta_step_torch.py`):
5 experts, support 64 + query 64, ConvNet width 32 with feature_dim 0 (pooled 64-d conv
features), a 1-layer 4-head transformer aggregator, 1 inner SGD step. The models are the
pipeline's: `make_setup(cfg)`, `init_experts` (random expert weights: the timing does not
depend on them), `expert_features`, `make_meta_step`, `make_adapt_fn`. Differences from the
peer: our ConvNet has BatchNorm (eval mode: frozen running statistics, one per-channel
affine), the peer's has conv biases; our step samples its episode on device (the peer
reuses fixed tensors); our aggregator sees 5 tokens with the in-domain one masked, the
peer's gets the 4 others.

Measured (each: AOT compile time, XLA temp memory, median / min of `--repeats` calls):
- `meta_step/cached_features/*`: the pipeline's `make_meta_step` (the frozen experts'
  features on all source data are computed once by `expert_features`; the step gathers the
  support's rows): second order (`meta.first_order=False`), first order, and
  `meta.remat=True`.
- `meta_step/experts_in_step/*`: the same step, but re-running the 5 experts on the support
  images inside the step (`_stack_map(setup)`), as the official code and the peer do:
  apples to apples with the peer.
- `adapt`: `make_adapt_fn` (one inner step on the unlabeled support, tokens given), and
  `adapt_with_expert_features` (the experts' features of the support computed first).
- `stacked_forward`: the 5 experts' features of one support batch with each way of running
  stacked experts (vmap, rolled lax.map, the pipeline's unrolled scan, a Python loop).
- `--peer`: the PyTorch peer in a subprocess, alternating 3 times with our two second-order
  steps; medians of the per-round medians and the speed ratios torch / jax.

`--sizes=config` keeps instead the sizes of the `--benchmark` preset itself (digits_rot 16×16,
fmnist_rot, fmnist_shift: 5 experts, support 32 + query 32, ConvNet width 32 with feature_dim
128, the preset's aggregator); any size flag given explicitly overrides either choice.

Run (prints one JSON object on stdout, logs on stderr):

  python benchmarks/meta_step.py --repeats=20
  python benchmarks/meta_step.py --benchmark=digits_rot --sizes=config --repeats=20
  python benchmarks/meta_step.py --repeats=20 --peer   # needs /work/torchvenv (README.md)

The PyTorch venv (CPU build, pinned): python3 -m venv /work/torchvenv &&
/work/torchvenv/bin/pip install torch==2.13.0 numpy
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_adapt import core, data, models
from moe_adapt.methods import meta_dmoe
from moe_adapt.train import mesh as mesh_lib

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER = "/work/shared/tools/peer_meta_step_torch.py"
DEFAULT_TORCH_PYTHON = "/work/torchvenv/bin/python"
TORCH_HINT = (
  "create it once with: python3 -m venv /work/torchvenv && "
  "/work/torchvenv/bin/pip install torch==2.13.0 numpy"
)
# Kinds of meta-step: (name, meta.first_order, meta.remat).
ORDERS = (("second_order", False, False), ("first_order", True, False), ("remat", False, True))
VARIANTS = tuple(f"{f}/{o}" for f in ("cached_features", "experts_in_step") for o, _, _ in ORDERS)
BENCHMARKS = ("digits_rot", "fmnist_rot", "fmnist_shift")
# --sizes=peer: the PyTorch peer's sizes (flag -> value); --sizes=config takes the preset's.
PEER_SIZES = {
  "experts": 5,
  "support": 64,
  "query": 64,
  "adapt_support": 64,
  "width": 32,
  "feature_dim": 0,
  "inner_steps": 1,
}
# flag -> (config group, field) it overrides.
SIZE_FIELDS = {
  "experts": ("experts", "num_experts"),
  "support": ("meta", "support_size"),
  "query": ("meta", "query_size"),
  "adapt_support": ("adapt", "support_size"),
  "width": ("model.options", "width"),
  "feature_dim": ("model.options", "feature_dim"),
  "inner_steps": ("meta", "inner_steps"),
}


def load_config(args: argparse.Namespace):
  """`configs/meta_dmoe.py:<benchmark>` with the peer's (or the preset's) sizes.

  Also sets every size flag left unset on `args` to the value used, for the peer and the
  output.
  """
  path = REPO / "configs" / "meta_dmoe.py"
  spec = importlib.util.spec_from_file_location("meta_dmoe_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(args.benchmark)
  if "max_per_domain" in cfg.data.options:  # digits_rot is small and has no such option
    cfg.data.options.max_per_domain = args.max_per_domain
  for flag, (group, field) in SIZE_FIELDS.items():
    node = cfg
    for name in group.split("."):
      node = node[name]
    value = getattr(args, flag)
    if value is None:
      value = PEER_SIZES[flag] if args.sizes == "peer" else node[field]
    node[field] = value
    setattr(args, flag, value)
  cfg.experts.stack_map = args.stack_map
  if args.sizes == "peer":
    cfg.aggregator.kind = "transformer"
    cfg.aggregator.depth = 1
    cfg.aggregator.num_heads = 4
  cfg.num_devices = args.num_devices
  meta_dmoe.validate_config(cfg)
  return cfg


def with_meta(setup: meta_dmoe.Setup, *, first_order: bool, remat: bool) -> meta_dmoe.Setup:
  """The same setup (same device data) with other meta.first_order / meta.remat."""
  cfg = setup.config.copy_and_resolve_references()
  cfg.meta.first_order = first_order
  cfg.meta.remat = remat
  return dataclasses.replace(setup, config=cfg)


def init_meta_state(setup: meta_dmoe.Setup, tx_s, tx_a, feature_dim: int) -> dict:
  """A fresh meta-training state as in `meta_dmoe.run` (random student and aggregator)."""
  sample = jnp.zeros((1, *setup.benchmark.input_shape), jnp.float32)
  variables = setup.model.init(jax.random.fold_in(setup.key("init"), 1), sample, train=False)
  tokens = jnp.zeros((1, setup.num_experts, feature_dim), jnp.float32)
  agg = setup.agg_model.init(setup.key("init"), tokens)["params"]
  state = {
    "student": variables["params"],
    "aggregator": agg,
    "batch_stats": variables["batch_stats"],
    "opt_student": tx_s.init(variables["params"]),
    "opt_aggregator": tx_a.init(agg),
  }
  return mesh_lib.replicate(state, setup.mesh)


def expert_tokens(setup: meta_dmoe.Setup, experts: dict, x: jax.Array) -> jax.Array:
  """The frozen experts' features of `x` [B, H, W, C] as aggregator tokens [B, E, D]."""

  def one(expert):
    params, stats = expert
    return setup.model.apply(
      {"params": params, "batch_stats": stats}, x, train=False, method=models.Classifier.features
    )

  feats = meta_dmoe._stack_map(setup)(one, (experts["params"], experts["batch_stats"]))
  return jax.lax.stop_gradient(jnp.swapaxes(feats, 0, 1))


def make_meta_step_experts_in_step(
  setup: meta_dmoe.Setup, tx_student, tx_agg, experts: dict
) -> tuple[Callable, tuple]:
  """`meta_dmoe.make_meta_step` re-running the experts on the support inside the step.

  The body is the pipeline's, except that the support's tokens come from the experts
  (`expert_tokens`) instead of the cached feature table. Returns (jitted, arrays): call
  `jitted(state, step, *arrays)`; the state is donated.
  """
  cfg = setup.config.meta
  inner_loss, outer_loss = meta_dmoe.make_losses(setup)
  expert_ids = jnp.arange(setup.num_experts)

  def step(state, step, x, y, experts, offsets, sizes, expert_of_domain):
    key = jax.random.fold_in(setup.key("meta"), step)
    index = setup.index._replace(offsets=offsets, sizes=sizes)
    ep = data.sample_episode(key, index, support_size=cfg.support_size, query_size=cfg.query_size)
    if cfg.mask_in_domain_expert:
      mask = expert_ids != expert_of_domain[ep.domain]
    else:
      mask = jnp.ones_like(expert_ids, dtype=bool)
    stats = state["batch_stats"]
    xs = setup.constrain(x[ep.support_idx])
    support = {
      "x": xs,
      "tokens": setup.constrain(expert_tokens(setup, experts, xs)),
      "mask": mask,
      "batch_stats": stats,
    }
    query = {"x": setup.constrain(x[ep.query_idx]), "y": y[ep.query_idx], "batch_stats": stats}
    loss, (g_student, g_agg) = core.meta.meta_value_and_grad(
      outer_loss,
      inner_loss,
      state["student"],
      support,
      query,
      lr=cfg.inner_lr,
      steps=cfg.inner_steps,
      first_order=cfg.first_order,
      context=state["aggregator"],
      remat=cfg.remat,
    )
    upd_s, opt_s = tx_student.update(g_student, state["opt_student"], state["student"])
    upd_a, opt_a = tx_agg.update(g_agg, state["opt_aggregator"], state["aggregator"])
    new = {
      "student": optax.apply_updates(state["student"], upd_s),
      "aggregator": optax.apply_updates(state["aggregator"], upd_a),
      "batch_stats": stats,
      "opt_student": opt_s,
      "opt_aggregator": opt_a,
    }
    return new, {"loss": loss}

  expert_vars = {"params": experts["params"], "batch_stats": experts["batch_stats"]}
  arrays = (
    setup.x,
    setup.y,
    expert_vars,
    setup.index.offsets,
    setup.index.sizes,
    setup.expert_of_domain,
  )
  return jax.jit(step, donate_argnums=0), arrays


@dataclasses.dataclass
class CompiledStep:
  """A compiled meta-step, its bound arrays and its live (donated-through) state."""

  call: Callable  # (state, step) -> (state, metrics)
  state: dict
  next_index: int = 0

  def time(self, repeats: int, warmup: int = 1) -> list[float]:
    times, self.state = common.time_stateful(
      self.call, self.state, repeats=repeats, warmup=warmup, start=self.next_index
    )
    self.next_index += repeats + warmup
    return times


def compile_step(jitted: Callable, arrays: tuple, state: dict) -> tuple[CompiledStep, dict]:
  compiled, timing = common.lower_and_compile(jitted, state, jnp.int32(0), *arrays)
  info = {**timing, "memory": common.memory_analysis(compiled)}
  call = lambda s, i: compiled(s, i, *arrays)
  return CompiledStep(call, state), info


def bench_stacked_forward(setup, experts, x: jax.Array, repeats: int) -> dict:
  """The experts' features of one batch by each stacked mode; also max |diff| vs the loop."""
  results, outs = {}, {}
  for mode in common.STACK_MODES:
    stack = common.stack_map(mode)

    def features(params, stats, xb, stack=stack):
      def one(expert):
        p, s = expert
        return setup.model.apply(
          {"params": p, "batch_stats": s}, xb, train=False, method=models.Classifier.features
        )

      return stack(one, (params, stats))

    args = (experts["params"], experts["batch_stats"], x)
    compiled, timing = common.lower_and_compile(jax.jit(features), *args)
    times, outs[mode] = common.time_calls(compiled, *args, repeats=repeats)
    results[mode] = {**common.summarize(times), **timing}
    common.log(f"stacked forward {mode}: {results[mode]['median_ms']} ms")
  for mode in common.STACK_MODES:
    results[mode]["max_abs_diff_vs_loop"] = float(jnp.max(jnp.abs(outs[mode] - outs["loop"])))
  return results


def check_torch(torch_python: str) -> str:
  """torch.__version__ of `torch_python`; raises ValueError with the setup hint if unusable."""
  if not os.path.exists(torch_python):
    raise ValueError(f"--torch_python={torch_python} does not exist; {TORCH_HINT}")
  proc = subprocess.run(
    [torch_python, "-c", "import torch; print(torch.__version__)"],
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode:
    raise ValueError(
      f"--torch_python={torch_python} cannot import torch ({proc.stderr.strip()[-300:]}); "
      f"{TORCH_HINT}"
    )
  return proc.stdout.strip()


def run_peer(args: argparse.Namespace, num_classes: int, image_size: int) -> dict:
  """One run of the PyTorch peer with our sizes; its JSON line.

  With `--peer_device=cuda` the unchanged peer script runs with torch's default device set
  to the GPU (its modules and tensors are created there; its `loss.item()` synchronises
  every step, so its wall-clock step times are complete).
  """
  if args.peer_device == "cpu":
    cmd = [args.torch_python, args.peer_script]
  else:
    launcher = (
      "import runpy, sys, torch; torch.set_default_device(sys.argv[1]); "
      "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    cmd = [args.torch_python, "-c", launcher, args.peer_device, args.peer_script]
  for flag, value in (
    ("experts", args.experts),
    ("support", args.support),
    ("query", args.query),
    ("width", args.width),
    ("size", image_size),
    ("classes", num_classes),
    ("inner_steps", args.inner_steps),
    ("steps", args.repeats),
    ("threads", args.threads),
  ):
    cmd += [f"--{flag}", str(value)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"peer failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--benchmark", default="fmnist_rot", choices=BENCHMARKS, help="preset")
  parser.add_argument(
    "--sizes",
    default="peer",
    choices=("peer", "config"),
    help="unset size flags: the PyTorch peer's sizes, or the preset's own",
  )
  parser.add_argument("--max_per_domain", type=int, default=300, help="images per domain")
  size_help = "default: per --sizes"
  parser.add_argument("--experts", type=int, default=None, help=size_help)
  parser.add_argument("--support", type=int, default=None, help=size_help)
  parser.add_argument("--query", type=int, default=None, help=size_help)
  parser.add_argument("--adapt_support", type=int, default=None, help="test-time support size")
  parser.add_argument("--width", type=int, default=None, help="ConvNet width")
  parser.add_argument(
    "--feature_dim", type=int, default=None, help="0 = pooled conv features; " + size_help
  )
  parser.add_argument("--inner_steps", type=int, default=None, help=size_help)
  parser.add_argument(
    "--stack_map", default="auto", choices=("auto", "unrolled", "map", "vmap"), help="experts"
  )
  parser.add_argument("--num_devices", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
  parser.add_argument(
    "--variants",
    default=",".join(VARIANTS),
    help=f"comma-separated subset of {', '.join(VARIANTS)}",
  )
  parser.add_argument("--skip_stacked", action="store_true", help="skip the stacked forward")
  parser.add_argument("--peer", action="store_true", help="alternate with the PyTorch peer")
  parser.add_argument("--rounds", type=int, default=3, help="alternations with --peer")
  parser.add_argument("--threads", type=int, default=2, help="torch threads of the peer")
  parser.add_argument("--torch_python", default=DEFAULT_TORCH_PYTHON)
  parser.add_argument("--peer_script", default=DEFAULT_PEER)
  parser.add_argument(
    "--peer_device", default="cpu", choices=("cpu", "cuda"), help="torch device of the peer"
  )
  args = parser.parse_args()
  optional = ("experts", "support", "query", "adapt_support", "width", "inner_steps")
  common.check_positive(
    parser,
    args,
    (
      "max_per_domain",
      *(name for name in optional if getattr(args, name) is not None),
      "num_devices",
      "repeats",
      "rounds",
      "threads",
    ),
  )
  if args.feature_dim is not None and args.feature_dim < 0:
    parser.error(f"--feature_dim={args.feature_dim} is invalid; accepted: an integer >= 0")
  args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = sorted(set(args.variants) - set(VARIANTS))
  if unknown or not args.variants:
    parser.error(f"--variants {unknown} unknown; accepted: {', '.join(VARIANTS)}")
  if args.peer:
    if not {"cached_features/second_order", "experts_in_step/second_order"} & set(args.variants):
      parser.error("--peer needs a */second_order variant in --variants")
    try:
      args.torch_version = check_torch(args.torch_python)
    except ValueError as e:
      parser.error(str(e))
    if not os.path.exists(args.peer_script):
      parser.error(f"--peer_script={args.peer_script} does not exist")
  return args


def main() -> None:
  args = parse_args()
  t_start = time.perf_counter()
  cfg = load_config(args)
  t0 = time.perf_counter()
  setup = meta_dmoe.make_setup(cfg)
  common.log(f"setup: {len(setup.y)} source images, {time.perf_counter() - t0:.1f} s")

  tx_e = optax.adam(cfg.experts.lr)
  experts = mesh_lib.replicate(meta_dmoe.init_experts(setup, tx_e), setup.mesh)
  t0 = time.perf_counter()
  feats = jax.block_until_ready(meta_dmoe.expert_features(setup, experts, np.asarray(setup.x)))
  cache_s = time.perf_counter() - t0  # includes compiling the feature function
  feature_dim = feats.shape[-1]
  common.log(f"expert feature cache {tuple(feats.shape)}: {cache_s:.1f} s")

  tx_s, tx_a = optax.adam(cfg.meta.student_lr), optax.adam(cfg.meta.aggregator_lr)
  variants, steps = {}, {}
  for name in args.variants:
    source, order = name.split("/")
    _, first_order, remat = next(o for o in ORDERS if o[0] == order)
    vsetup = with_meta(setup, first_order=first_order, remat=remat)
    if source == "cached_features":
      bound = meta_dmoe.make_meta_step(vsetup, tx_s, tx_a, feats)
      jitted, arrays = bound.jitted, bound.arrays
    else:
      jitted, arrays = make_meta_step_experts_in_step(vsetup, tx_s, tx_a, experts)
    state = init_meta_state(setup, tx_s, tx_a, feature_dim)
    steps[name], info = compile_step(jitted, arrays, state)
    times = steps[name].time(args.repeats)
    variants[name] = {**common.summarize(times), **info}
    common.log(f"{name}: {variants[name]['median_ms']} ms (compile {info['compile_s']} s)")

  # Test-time adaptation: one inner step on `adapt_support` unlabeled images.
  state = init_meta_state(setup, tx_s, tx_a, feature_dim)
  k = cfg.adapt.support_size
  xs, tokens = setup.x[:k], jnp.swapaxes(feats[:, :k], 0, 1)
  adapt = meta_dmoe.make_adapt_fn(setup)
  adapt_args = (state["student"], state["batch_stats"], state["aggregator"], xs, tokens)
  compiled, timing = common.lower_and_compile(adapt, *adapt_args)
  times, _ = common.time_calls(compiled, *adapt_args, repeats=args.repeats)
  adapt_result = {**common.summarize(times), **timing, "memory": common.memory_analysis(compiled)}
  common.log(f"adapt: {adapt_result['median_ms']} ms")

  @jax.jit
  def adapt_from_images(student, stats, aggregator, experts, xs):
    return adapt(student, stats, aggregator, xs, expert_tokens(setup, experts, xs))

  full_args = (*adapt_args[:3], experts, xs)
  compiled, timing = common.lower_and_compile(adapt_from_images, *full_args)
  times, _ = common.time_calls(compiled, *full_args, repeats=args.repeats)
  adapt_full = {**common.summarize(times), **timing, "memory": common.memory_analysis(compiled)}
  common.log(f"adapt with expert features: {adapt_full['median_ms']} ms")

  stacked = None
  if not args.skip_stacked:
    stacked = bench_stacked_forward(setup, experts, setup.x[: cfg.meta.support_size], args.repeats)

  peer = None
  if args.peer:
    ours = [
      n for n in ("cached_features/second_order", "experts_in_step/second_order") if n in steps
    ]
    rounds = {"torch_ms": [], **{f"jax_{n.split('/')[0]}_ms": [] for n in ours}}
    for r in range(args.rounds):
      for n in ours:
        ms = 1e3 * statistics.median(steps[n].time(args.repeats))
        rounds[f"jax_{n.split('/')[0]}_ms"].append(round(ms, 3))
      out = run_peer(args, setup.benchmark.num_classes, setup.benchmark.input_shape[0])
      rounds["torch_ms"].append(round(1e3 * out["median_s"], 3))
      common.log(f"peer round {r}: " + ", ".join(f"{k}={v[-1]}" for k, v in rounds.items()))
    medians = {k: round(statistics.median(v), 3) for k, v in rounds.items()}
    peer = {
      "torch_version": args.torch_version,
      "torch_threads": args.threads,
      "torch_device": args.peer_device,
      "rounds": rounds,
      "median_of_rounds": medians,
      "speedup_torch_over_jax": {
        k[len("jax_") : -len("_ms")]: round(medians["torch_ms"] / v, 2)
        for k, v in medians.items()
        if k.startswith("jax_")
      },
    }

  med = lambda name: variants[name]["median_ms"] if name in variants else None
  comp = lambda name: variants[name]["compile_s"] if name in variants else None
  result = {
    "benchmark": "meta_step",
    "environment": common.environment(),
    "config": {
      "benchmark": cfg.data.benchmark,
      "sizes": args.sizes,
      "max_per_domain": cfg.data.options.get("max_per_domain"),
      "source_images": len(setup.y),
      "experts": cfg.experts.num_experts,
      "stack_map": cfg.experts.stack_map,
      "stack_map_resolved": (
        ("unrolled" if jax.default_backend() == "cpu" else "vmap")
        if cfg.experts.stack_map == "auto"
        else cfg.experts.stack_map
      ),
      "support": cfg.meta.support_size,
      "query": cfg.meta.query_size,
      "adapt_support": cfg.adapt.support_size,
      "model": dict(cfg.model.options),
      "feature_dim": feature_dim,
      "aggregator": {"depth": cfg.aggregator.depth, "num_heads": cfg.aggregator.num_heads},
      "inner_steps": cfg.meta.inner_steps,
      "num_devices": setup.mesh.size,
      "repeats": args.repeats,
    },
    "meta_step_cached_features_ms": med("cached_features/second_order"),
    "meta_step_experts_in_step_ms": med("experts_in_step/second_order"),
    "meta_step_cached_features_first_order_ms": med("cached_features/first_order"),
    "meta_step_experts_in_step_first_order_ms": med("experts_in_step/first_order"),
    "meta_step_cached_features_remat_ms": med("cached_features/remat"),
    "meta_step_experts_in_step_remat_ms": med("experts_in_step/remat"),
    "adapt_ms": adapt_result["median_ms"],
    "adapt_with_expert_features_ms": adapt_full["median_ms"],
    "compile_s": {
      **{name: comp(name) for name in args.variants},
      "adapt": adapt_result["compile_s"],
      "adapt_with_expert_features": adapt_full["compile_s"],
    },
    "feature_cache_s": round(cache_s, 3),
    "meta_step": variants,
    "adapt": adapt_result,
    "adapt_with_expert_features": adapt_full,
    "stacked_forward": stacked,
    "peer": peer,
    "peak_rss_mb": common.peak_rss_mb(),
    "device_memory": common.device_memory(),
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  common.emit(result)


if __name__ == "__main__":
  main()
