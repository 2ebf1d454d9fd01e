r"""Experts-in-step cost of recipe 1: N adapter experts vs N full CNN experts on one batch.

Meta-DMoE's meta-step in this library runs on cached expert features, so its cost does not
depend on the kind of expert (`meta_step_ms` in a run's results.json is the same program for
both). What the kind of expert changes is the cost of running the experts themselves, e.g.
in a step that re-runs them on every episode (the official code) or at test time. This
script times that: the features [N, B, D] of the N experts of a recipe config on ONE
support batch [B, H, W, C] (B = meta.support_size), eval mode, for
- `adapter`: the shared frozen ViT with each expert's adapters merged in, by a compiled
  map over the stacked adapter sets (`adapter_experts.make_stacked_apply` without the head);
- `cnn`: meta_dmoe's stacked ConvNet experts (`model` of the config).
Each by `map` (rolled `lax.map`, the recipe's choice) and `unrolled` (meta_dmoe's CPU
choice). Weights are random (the cost does not depend on them); parameter counts come from
the same trees.

  python benchmarks/recipe_adapter_experts.py --config_arg=fmnist_shift --repeats=20
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib

import common
import jax
import jax.numpy as jnp

from moe_adapt import data, models
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.models import adapters as adapters_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ("map", "unrolled")


def load_config(arg: str):
  path = REPO / "configs" / "recipes" / "adapter_experts.py"
  spec = importlib.util.spec_from_file_location("_adapter_experts_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def build(config):
  """(cnn model, stacked CNN variables, vit model, base params, stacked adapter trees, x)."""
  options = {k: v for k, v in config.data.options.to_dict().items() if v != ""}
  bench = data.get_benchmark(config.data.benchmark, **options)
  n = config.experts.num_experts
  x = jnp.zeros((config.meta.support_size, *bench.input_shape), jnp.float32)
  keys = jax.random.split(jax.random.key(0), n)

  cnn = models.Classifier(
    models.get_backbone(config.model.backbone, **config.model.options.to_dict()),
    bench.num_classes,
  )
  cnn_vars = jax.vmap(lambda k: cnn.init(k, x[:1], train=False))(keys)

  adapter = ft.adapter_config(config, config.adapter.kind)
  vit = models.vit.vit_classifier(
    bench.num_classes, adapter=adapter, dropout_rate=config.vit.dropout, **config.vit.options
  )
  params = jax.vmap(lambda k: vit.init(k, x[:1])["params"])(keys)
  base, stacked = adapters_lib.split_params(params, include_head=True)
  base = jax.tree.map(lambda a: a[0], base)  # one shared backbone
  return cnn, cnn_vars, vit, base, stacked, x


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config_arg", default="fmnist_shift", help="recipe preset[,tiny]")
  parser.add_argument("--repeats", type=int, default=20, help="timed calls per row")
  args = parser.parse_args()
  common.check_positive(parser, args, ["repeats"])
  config = load_config(args.config_arg)
  cnn, cnn_vars, vit, base, stacked, x = build(config)

  def cnn_forward(stack):
    @jax.jit
    def fn(variables, x):
      return stack(
        lambda v: cnn.apply(v, x, train=False, method=models.Classifier.features), variables
      )

    return fn

  def adapter_forward(stack):
    @jax.jit
    def fn(base, stacked, x):
      def one(tree):
        params = adapters_lib.merge_params(base, tree)
        return vit.apply({"params": params}, x, train=False, method=models.Classifier.features)

      return stack(one, stacked)

    return fn

  rows = []
  for mode in MODES:
    stack = common.stack_map(mode)
    for kind, fn, fn_args in (
      ("adapter", adapter_forward(stack), (base, stacked, x)),
      ("cnn", cnn_forward(stack), (cnn_vars, x)),
    ):
      common.log(f"{kind} {mode}")
      compiled, compile_times = common.lower_and_compile(fn, *fn_args)
      times, out = common.time_calls(compiled, *fn_args, repeats=args.repeats)
      rows.append(
        {
          "experts": kind,
          "mode": mode,
          "output_shape": list(out.shape),
          **common.summarize(times),
          **compile_times,
        }
      )
  count = adapters_lib.count_params
  n = config.experts.num_experts
  common.emit(
    {
      "benchmark": "recipe_adapter_experts",
      "config": args.config_arg,
      "num_experts": n,
      "support_batch": int(x.shape[0]),
      "params": {
        "adapter_experts_total": count(base) + count(stacked),
        "shared_backbone": count(base),
        "full_network_experts_total": count(cnn_vars["params"]),
      },
      "rows": rows,
      "environment": common.environment(),
    }
  )


if __name__ == "__main__":
  main()
