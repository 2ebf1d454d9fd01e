"""AdaMix: a mixture of adaptation modules per layer, stochastic routing, merged inference.

Wang, Agarwal, Mukherjee, Liu, Gao, Awadallah, Gao. "AdaMix: Mixture-of-Adaptations for
Parameter-efficient Model Tuning" (EMNLP 2022). The modules are `models.adamix` (kinds
'adamix' and 'adamix_lora'); training and evaluation use the fine-tuning harness
(`methods.adapter_harness`). One run trains, on the same data and from the same backbone,
with the same batches in the same order, the same head initialisation and the same dropout
and routing key streams (`adapter_harness.variant_key`; variants differ only by their
definition):

- `adapter`: one bottleneck adapter per block at AdaMix's place (after the FFN output,
  Pfeiffer's) with the same bottleneck — the single module AdaMix is compared with;
- `adamix`: M experts per block, random routing, up-projection shared, consistency
  regularisation (CE on pass 1 + w · symmetric KL between two routed passes, stop-gradient
  targets, as the official RoBERTa code);
- `adamix_no_consistency` (w = 0) and `adamix_no_sharing` (up-projections routed too);
- `lora` and `adamix_lora` (M routed LoRA A matrices, one shared B, consistency);
- `full`: full fine-tuning.

Every variant is evaluated as deployed (`v`; for mixtures: merged = the uniform weight
average, one module's cost — AdaMix's inference). The mixture variants listed in
`eval.routing_variants` (default: `adamix`) are also evaluated as `v_random` =
the mean accuracy of `eval.routing_samples` single random routing choices (each a fixed
random sub-model: one expert per layer and projection, drawn once), `v_fixed` = expert 0
everywhere. `routing_spread[v]` lists the single choices' mean accuracies (the paper's
Figure 5), plotted with the merged model in `<workdir>/plots/routing_spread.png`.

Results also carry trainable and inference parameter counts (without the head) and the
seconds per training step of each variant. Each variant's training, parameter counts and
evaluations are cached in `<workdir>/adamix_eval.json` (`train.artifacts.JsonCache`): a
resumed run neither retrains nor re-evaluates.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moe_adapt import core, models
from moe_adapt.data.examples import Examples
from moe_adapt.methods import _checks
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.models import adapted
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import artifacts, finetuning
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import workdir as workdir_lib


class Variant(NamedTuple):
  """How one compared model is built and trained."""

  kind: str  # adapter kind
  train_mode: str  # 'adapters' or 'all'
  overrides: Mapping[str, Any]  # AdapterConfig fields on top of config.adapter
  consistency: bool  # AdaMix's consistency regulariser on


VARIANTS: dict[str, Variant] = {
  "adapter": Variant("pfeiffer", "adapters", {}, False),
  "adamix": Variant("adamix", "adapters", {}, True),
  "adamix_no_consistency": Variant("adamix", "adapters", {}, False),
  "adamix_no_sharing": Variant("adamix", "adapters", {"share": "none"}, True),
  "lora": Variant("lora", "adapters", {}, False),
  "adamix_lora": Variant("adamix_lora", "adapters", {}, True),
  "full": Variant("none", "all", {}, False),
}
MIXTURES = models.adamix.MIXTURE_KINDS
SPREAD_PLOT = "plots/routing_spread.png"
EVAL_CACHE = "adamix_eval.json"


def validate_config(config) -> None:
  """Checks every field this method reads; raises ValueError naming the field."""
  ft.validate_harness_config(config)
  _checks.names(config, "variants", tuple(VARIANTS))
  _checks.runs_baseline(config, "variants", "adapter")  # launch.collect.BASELINES["adamix"]
  _checks.integer(config, "adamix.num_experts", 1)
  _checks.integer(config, "eval.routing_samples", 1)
  _checks.number(config, "adamix.consistency_weight", low=0.0, low_open=False)
  _checks.choice(config, "adamix.share", adapters_lib.SHARES)
  mixtures = tuple(n for n, v in VARIANTS.items() if v.kind in MIXTURES)
  _checks.names(config, "eval.routing_variants", mixtures, allow_empty=True)


make_setup = ft.make_setup


def variant_adapter(config, name: str) -> adapters_lib.AdapterConfig:
  """The AdapterConfig of variant `name` (mixture fields from `config.adamix`)."""
  v = VARIANTS[name]
  fields = {}
  if v.kind in MIXTURES:
    fields = {"num_experts": config.adamix.num_experts, "share": config.adamix.share}
  fields.update(v.overrides)
  return ft.adapter_config(config, v.kind, **fields)


def inference_params(params: Any, adapter: adapters_lib.AdapterConfig) -> Any:
  """What a deployed model holds: mixtures merged, LoRA folded into the kernels."""
  if adapter.kind in MIXTURES:
    params, adapter = models.adamix.merge_mixture_params(params, adapter)
  if adapter.kind == "lora":
    params = adapters_lib.merge_lora(params, adapter)
  return params


def consistency_loss(weight: float, *, log: bool = False) -> finetuning.Loss:
  """AdaMix's training loss (`train.finetuning.Loss`): CE on routed pass 1 + `weight` ·
  the batch mean of `core.losses.symmetric_kl` between passes 1 and 2 with stop-gradient
  targets (as the official code); pass 2 draws fresh dropout and routing.

  Metrics {'ce', 'consistency'}; with weight 0 the second pass runs only when `log`, and
  its KL is logged without a gradient.
  """

  def loss(forward, labels):
    logits = forward(0)
    ce = jnp.mean(core.losses.cross_entropy(logits, labels))
    if not weight and not log:
      return ce, {"ce": ce}
    reg = jnp.mean(core.losses.symmetric_kl(logits, forward(1), stop_gradient_targets=True))
    if not weight:  # logged only: no gradient through the second pass
      return ce, {"ce": ce, "consistency": jax.lax.stop_gradient(reg)}
    return ce + weight * reg, {"ce": ce, "consistency": reg}

  return loss


def evaluate_mixture(
  setup: ft.Setup,
  adapter: adapters_lib.AdapterConfig,
  params: Any,
  domains: Sequence[str],
  *,
  key: jax.Array,
) -> dict[str, Any]:
  """Merged, fixed-expert and single-random-choice evaluations of a trained mixture.

  Returns {'merged', 'fixed', 'random': metrics, 'spread': [mean accuracy per random
  choice], 'per_example': {'merged', 'fixed': {domain: outcomes}}} (the random choices
  are averaged, so they have no per-example 0/1 outcome).
  """
  n = setup.config.eval.routing_samples

  def model(mode: str):
    return ft.build_model(setup, dataclasses.replace(adapter, mixture_inference=mode))

  def mean_of(runs: list[dict]) -> dict:
    return {
      d: {"accuracy": float(np.mean([r[d]["accuracy"] for r in runs]))} for d in (*domains, "mean")
    }

  random_model, example_model = model("random"), model("random_example")
  choices = [
    ft.evaluate(setup, random_model, params, domains, routing_key=jax.random.fold_in(key, r))
    for r in range(n)
  ]
  # Fresh draws per example and forward: each repetition r routes batch b with its own key.
  example_key = jax.random.fold_in(key, n)
  fresh = [
    ft.evaluate(
      setup,
      example_model,
      params,
      domains,
      routing_key=jax.random.fold_in(example_key, r),
      fresh_keys=True,
    )
    for r in range(n)
  ]
  merged, merged_outcomes = ft.evaluate_outcomes(setup, model("merged"), params, domains)
  fixed, fixed_outcomes = ft.evaluate_outcomes(setup, model("fixed"), params, domains)
  return {
    "merged": merged,
    "fixed": fixed,
    "random": mean_of(choices),
    "random_example": mean_of(fresh),
    "spread": [c["mean"]["accuracy"] for c in choices],
    "spread_example": [c["mean"]["accuracy"] for c in fresh],
    "per_example": {"merged": merged_outcomes, "fixed": fixed_outcomes},
  }


def expert_spread(params: Any, adapter: adapters_lib.AdapterConfig) -> float | None:
  """How far a mixture's experts lie apart: mean over routed leaves of
  mean_i ||W_i − mean(W)|| / ||mean(W)|| (Frobenius; kernels and LoRA factors, [M, ...]).

  Near 0: the experts coincide and merging equals any one of them; large: the merged
  weights are far from every expert trained. None for a single module.
  """
  if adapter.kind not in MIXTURES or adapter.num_experts < 2:
    return None
  m, ratios = adapter.num_experts, []

  def visit(path, leaf):
    name = str(path[-1].key)
    if name in ("kernel", "lora_a", "lora_b") and leaf.ndim == 3 and leaf.shape[0] == m:
      mean = np.mean(np.asarray(leaf), axis=0)
      dist = np.mean([np.linalg.norm(np.asarray(leaf[i]) - mean) for i in range(m)])
      ratios.append(dist / max(np.linalg.norm(mean), 1e-12))

  _, mixtures = adapters_lib.split_params(params)
  jax.tree_util.tree_map_with_path(visit, mixtures)
  return float(np.mean(ratios)) if ratios else None


def consistency_curve(workdir: str, stage: str) -> list[float]:
  """The logged consistency KL of `stage` (its epochs' stages too), in step order."""
  rows = metrics_lib.read_metrics(workdir)
  return [
    float(r["consistency"])
    for r in rows
    if (r["stage"] == stage or r["stage"].startswith(f"{stage}/")) and "consistency" in r
  ]


def train_and_evaluate(
  setup: ft.Setup, workdir: str, writer, name: str, backbone: Any, train_set: Examples
) -> dict[str, Any]:
  """Variant `name` trained (stage `name`) and evaluated: its entry of `EVAL_CACHE`,
  {'params', 'step_time_s', 'expert_spread', 'consistency_kl', 'eval' (`evaluate_mixture`'s
  for `eval.routing_variants`, else 'merged' only)[, 'selection', 'dev_accuracy']}."""
  config, v = setup.config, VARIANTS[name]
  sources, targets = ft.protocol_domains(setup)
  adapter = variant_adapter(config, name)
  model = ft.build_model(setup, adapter)
  weight = config.adamix.consistency_weight if v.consistency else 0.0
  trained = ft.train(
    setup,
    workdir,
    writer,
    stage=name,
    model=model,
    params=ft.init_params(setup, model, setup.key("init"), backbone),
    train_mode=v.train_mode,
    examples=train_set,
    steps=config.train.steps,
    lr=ft.variant_lr(config, v.train_mode),
    batch_size=config.train.batch_size,
    # Mixtures log the KL between two routed passes even when it is not trained on.
    loss=consistency_loss(weight, log=adapter.kind in MIXTURES),
    key=ft.variant_key(setup),
    epochs=config.train.get("epochs", 0),
    select=ft.dev_selector(setup, model, sources),
  )
  writer.flush()
  entry = {
    "params": adapted.param_counts(
      trained.params,
      train_mode=v.train_mode,
      inference_params=inference_params(trained.params, adapter),
    ),
    "step_time_s": trained.step_time_s,
    "expert_spread": expert_spread(trained.params, adapter),
    "consistency_kl": consistency_curve(workdir, name),
  }
  if trained.selection is not None:
    entry["selection"] = ft.selection_entry(trained, len(train_set), config.train.batch_size)
    entry["dev_accuracy"] = trained.selection["dev_accuracy"]
  if name in config.eval.routing_variants:
    key = setup.key("routing_eval")
    entry["eval"] = evaluate_mixture(setup, adapter, trained.params, targets, key=key)
  else:
    merged, outcomes = ft.evaluate_outcomes(setup, model, trained.params, targets)
    entry["eval"] = {"merged": merged, "per_example": {"merged": outcomes}}
  return entry


def reported_metrics(cache: Mapping[str, Any], variants: Sequence[str]) -> tuple[dict, ...]:
  """(metrics, routing spread, per-example outcomes) of `variants` from their cache entries:
  `v` (merged), and for routing variants `v_random`, `v_random_example`, `v_fixed`."""
  metrics, spread, per_example = {}, {}, {}
  for name in variants:
    evals = cache[name]["eval"]
    metrics[name] = evals["merged"]
    # Caches written before per-example outcomes existed have none: reported without.
    outcomes = evals.get("per_example", {})
    if "merged" in outcomes:
      per_example[name] = outcomes["merged"]
    if "random" in evals:
      metrics[f"{name}_random"] = evals["random"]
      if "random_example" in evals:
        metrics[f"{name}_random_example"] = evals["random_example"]
      metrics[f"{name}_fixed"] = evals["fixed"]
      spread[name] = evals["spread"]
      if "fixed" in outcomes:
        per_example[f"{name}_fixed"] = outcomes["fixed"]
  return metrics, spread, per_example


def run(config, workdir: str, *, setup: ft.Setup | None = None) -> dict:
  """Runs (or resumes) every variant and returns the results dict of DESIGN.md."""
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  sources, targets = ft.protocol_domains(setup)
  train_set = setup.task.pooled("train", sources)
  logging.info("adamix: %d training examples from %s", len(train_set), sources)
  writer = metrics_lib.MetricWriter(workdir)
  backbone = ft.pretrained_backbone(setup, workdir, writer)
  cache = artifacts.JsonCache(workdir, EVAL_CACHE)
  entries = {
    n: cache.get(n, lambda n=n: train_and_evaluate(setup, workdir, writer, n, backbone, train_set))
    for n in config.variants
  }
  cache.flush()
  writer.close()
  metrics, spread, per_example = reported_metrics(entries, config.variants)
  results = {
    "method": "adamix",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "protocol": config.data.protocol,
    "source_domains": list(sources),
    "target_domains": list(targets),
    "num_examples": {
      "train": len(train_set),
      **({"dev": len(setup.task.pooled("val", sources))} if config.train.get("epochs") else {}),
    },
    "params": {n: e["params"] for n, e in entries.items()},
    "step_time_s": {n: e["step_time_s"] for n, e in entries.items()},
    "routing_spread": spread,
    "metrics": metrics,
    results_lib.PER_EXAMPLE: per_example,
    # Measurements that explain merged vs single: the experts' relative distance from their
    # mean, and the consistency KL between two routed passes as logged over training.
    "expert_spread": {n: e.get("expert_spread") for n, e in entries.items()},
    "consistency_kl": {n: e.get("consistency_kl", []) for n, e in entries.items()},
  }
  selection = {n: e["selection"] for n, e in entries.items() if "selection" in e}
  if selection:  # epoch training: the selected epochs and the dev curves they come from
    results["selection"] = selection
    results["dev_accuracy"] = {n: entries[n]["dev_accuracy"] for n in selection}
  if spread and jax.process_index() == 0:
    plot_routing_spread([results], workdir_lib.as_path(workdir) / SPREAD_PLOT)
  return results


def plot_routing_spread(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
  """Violin + strip plot of single random-routing choices, merged models as red dots.

  Args:
    runs: results dicts of `run` (e.g. several seeds); each contributes its choices and
      its merged accuracy per mixture variant.
    path: where the PNG goes (folders created), local or remote (`gs://...`); the file
      is replaced in one step.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(runs[0]["routing_spread"])
  # Wider than the violins need: the legend sits to the right of the axes.
  fig, ax = plt.subplots(figsize=(max(4.5, 1.8 + 1.6 * len(names)) + 2.4, 3.8))
  for i, name in enumerate(names):
    points = [100 * a for r in runs for a in r["routing_spread"][name]]
    merged = [100 * r["metrics"][name]["mean"]["accuracy"] for r in runs]
    if len(points) > 1:
      ax.violinplot([points], positions=[i], showextrema=False)
    jitter = np.random.default_rng(i).uniform(-0.08, 0.08, len(points))
    first = i == 0
    ax.scatter(
      i + jitter,
      points,
      s=10,
      color="tab:blue",
      alpha=0.7,
      label="single random routing choice" if first else None,
    )
    ax.scatter(
      [i] * len(merged), merged, s=40, color="tab:red", zorder=3, label="merged" if first else None
    )
  single = [
    100 * r["metrics"]["adapter"]["mean"]["accuracy"] for r in runs if "adapter" in r["metrics"]
  ]
  if single:
    ax.axhline(np.mean(single), color="gray", ls="--", lw=1, label="single adapter (mean)")
  ax.set_xticks(range(len(names)), names, rotation=15)
  ax.set_ylabel("accuracy (%)")
  ax.set_title(f"{runs[0]['benchmark']}, {len(runs)} run(s): routing choices vs merged", fontsize=9)
  # Outside the axes, to the right: inside, it can cover a merged model's dot.
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  path = workdir_lib.as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_bytes_atomic(path, buffer.getvalue())
