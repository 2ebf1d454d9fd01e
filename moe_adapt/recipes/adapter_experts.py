"""Adapter experts for Meta-DMoE, and weight-space vs output-space combination (issue #11).

Recipe 1: the N per-super-domain experts of Meta-DMoE are adapter sets (+ a linear head
each) on ONE shared frozen ViT instead of N full networks. Recipe 2: the same N experts are
combined on each held-out domain in weight space (uniform soup, TIES, FSD-greedy soups)
and in output space (Meta-DMoE's aggregator with test-time adaptation, the average of the
experts' softmax outputs).

Stages (checkpointed under `<workdir>/checkpoints/<stage>`, skipped when finished):

1. `backbone`: the ViT classifier pre-trained on the pooled source training images (all
   parameters, the harness's AdamW schedule).
2. `adapter_<k>`, k < N: adapters (`adapter.kind`) + a new head trained on super-domain k
   with the backbone frozen; every expert starts from the SAME initialisation (so their
   weights can be averaged and their deltas TIES-merged). Stored stacked [N, ...].
3. Expert features: the N adapter-experts' pooled features of every source training image,
   by a compiled `lax.map` over the stacked adapters, in batches: [N, N_src, D], the cache
   meta_dmoe's later stages take (D = the CNN student's feature size).
4. Meta-DMoE stages 2-5 (`meta_dmoe.train_from_features`, `meta_dmoe.evaluate_with`)
   unchanged: aggregator pretraining, ERM student, meta-training, test-time adaptation and
   the variants erm, expert_average (here the mean of the adapter-experts' softmax outputs),
   aggregator_head, aggregator_pretrained, meta_unadapted, meta_dmoe.
5. Weight space, on each held-out domain (accuracy on all of its images, as Meta-DMoE):
   `soup_uniform` (all N adapter sets and heads averaged), `soup_ties_<d>` (TIES on the
   deltas from the shared initialisation at density d, heads averaged), `soup_greedy_<l>`
   (FSD-greedy soups of l members, below), `expert_<k>` (each expert alone),
   `best_single_oracle` (the best expert on the domain's LABELS: an oracle), and the merge
   family `soup_<method>` (`merge.methods`: task arithmetic, TIES with per-tensor or
   whole-vector trim, DARE, DARE-TIES, Breadcrumbs; heads averaged) with λ and density
   chosen on the pooled source validation images (`merge_family`; results.json
   `selection`).

FSD-greedy soups use no target label and the same information as Meta-DMoE's adaptation:
the k = `adapt.support_size` unlabeled target images of each of the `adapt.repeats` draws
(the very same draws). The first member is the expert whose super-domain's images are most
similar to them (mean cosine of the backbone's features without adapters, AdapterSoup's
`select_by_similarity`); then, while the soup has fewer than l members, the expert whose
adapter weights have the lowest fraction of sign difference (FSD) to the current soup's
averaged adapter weights is added. The stopping rule is label-free: fixed sizes
(`soup.greedy_sizes`), each reported.

Modules: this one holds the config check, the run and its cost figures;
`adapter_experts_train` the setup and stages 1-3 (the adapter experts and their stacked
forward pass); `adapter_experts_soups` the weight space (stage 5).
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from moe_adapt import models
from moe_adapt.methods import _checks, meta_dmoe
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.methods import adapter_soup as soup_lib
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.recipes.adapter_experts_soups import greedy_members as greedy_members
from moe_adapt.recipes.adapter_experts_soups import weight_space
from moe_adapt.recipes.adapter_experts_train import (
  AdapterExperts,
  Setup,
  expert_outputs,
  make_stacked_apply,
  train_experts,
)
from moe_adapt.recipes.adapter_experts_train import make_setup as make_setup
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib

PyTree = Any

ADAPTER_KINDS = ("pfeiffer", "houlsby", "lora")
BEST_SINGLE_NOTE = (
  "best_single_oracle is an ORACLE: the adapter expert with the best accuracy on the "
  "held-out domain's labels"
)
# Stage-cache fields: the aggregator's inputs are the adapter-experts' features, so its key
# holds everything they depend on; the ERM student is independent of the experts and keeps
# meta_dmoe's key (a full-network run's finished student stage can be reused).
STAGE_FIELDS = {
  "aggregator": (*meta_dmoe.STAGE_FIELDS["aggregator"], "vit", "pretrain", "adapter", "train"),
  "student": meta_dmoe.STAGE_FIELDS["student"],
}


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


def validate_config(config) -> None:
  """Checks every field of the recipe; raises one ValueError naming the field."""
  meta_dmoe.validate_config(config)
  _checks.choice(config, "adapter.kind", ADAPTER_KINDS)
  try:
    ft.adapter_config(config, config.adapter.kind)
  except (TypeError, ValueError) as e:
    raise ValueError(f"adapter: {e}") from None
  options = config.vit.options.to_dict()
  try:
    models.vit.ViT(**options)
  except (TypeError, ValueError) as e:
    raise ValueError(f"vit.options={options!r} is invalid: {e}") from None
  _checks.number(config, "vit.dropout", low=0.0, high=1.0, low_open=False)
  _checks.integer(config, "pretrain.steps", 1)
  _checks.integer(config, "pretrain.batch_size", 1)
  _checks.number(config, "pretrain.lr", low=0.0)
  _checks.number(config, "train.warmup_fraction", low=0.0, high=1.0, low_open=False)
  _checks.number(config, "train.weight_decay", low=0.0, low_open=False)
  _checks.integer(config, "soup.num_samples", 1)
  _checks.number(config, "soup.ties_scale", low=0.0)
  _checks.integer(config, "timing_steps", 1)
  _checks.integer(config, "soup.max_val_examples", 0)
  _checks.names(config, "merge.methods", soup_lib.MERGE_METHODS, allow_empty=True)
  for name in ("merge.sum_lambdas", "merge.ties_lambdas"):
    soup_lib.number_tuple(config, name, "> 0", lambda v: v > 0, non_empty=True)
  soup_lib.number_tuple(
    config, "merge.densities", "in (0, 1]", lambda v: 0 < v <= 1, non_empty=True
  )
  densities = config.soup.ties_densities
  ok = not isinstance(densities, str) and isinstance(densities, Sequence)
  ok = ok and all(
    isinstance(d, int | float) and not isinstance(d, bool) and 0.0 < d <= 1.0 for d in densities
  )
  if not ok or len(set(densities)) != len(densities):
    raise ValueError(
      f"soup.ties_densities={densities!r} is invalid; accepted: a tuple of distinct numbers "
      "in (0, 1]"
    )
  sizes, n = config.soup.greedy_sizes, config.experts.num_experts
  ok = not isinstance(sizes, str) and isinstance(sizes, Sequence)
  ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= n for s in sizes)
  if not ok or len(set(sizes)) != len(sizes):
    raise ValueError(
      f"soup.greedy_sizes={sizes!r} is invalid; accepted: a tuple of distinct integers in "
      f"[1, experts.num_experts={n}]"
    )


# ----------------------------------------------------------------------------
# Parameters and step cost
# ----------------------------------------------------------------------------


def param_counts(setup: Setup, experts: AdapterExperts) -> dict:
  """Expert parameters: adapter experts (backbone once + N adapter sets + heads) vs N CNNs."""
  n = setup.num_experts
  count = adapters_lib.count_params
  adapters = soup_lib.without_head(experts.stacked)
  heads = experts.stacked[adapters_lib.HEAD_KEY]
  sample = jnp.zeros((1, *setup.meta.benchmark.input_shape), jnp.float32)
  cnn = jax.eval_shape(lambda: setup.meta.model.init(jax.random.key(0), sample, train=False))
  adapter_total = count(experts.base) + count(experts.stacked)
  cnn_params = n * count(cnn["params"])
  return {
    "adapter_experts": {
      "total": adapter_total,
      "backbone": count(experts.base),
      "adapters_per_expert": count(adapters) // n,
      "head_per_expert": count(heads) // n,
    },
    "full_network_experts": {
      "total": cnn_params,
      "per_expert": cnn_params // n,
      "batch_stats_total": n * count(cnn.get("batch_stats", {})),
    },
    "ratio_adapter_to_full": adapter_total / cnn_params,
  }


def time_meta_step(setup: Setup, meta_state: PyTree, feats: jax.Array) -> dict:
  """Median milliseconds of the compiled meta-step (on cached features) over timed steps."""
  cfg = setup.meta.config
  tx_s, tx_a = optax.adam(cfg.meta.student_lr), optax.adam(cfg.meta.aggregator_lr)
  step = meta_dmoe.make_meta_step(setup.meta, tx_s, tx_a, feats)
  state = jax.tree.map(jnp.copy, meta_state)  # the step donates its state
  state, _ = step(state, jnp.int32(0))  # compile (or fetch from the compilation cache)
  jax.block_until_ready(state)
  times = []
  for i in range(cfg.timing_steps):
    start = time.perf_counter()
    state, _ = step(state, jnp.int32(i + 1))
    jax.block_until_ready(state)
    times.append(1e3 * (time.perf_counter() - start))
  return {"median": statistics.median(times), "steps": len(times)}


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def _expert_stages(
  config, workdir: str, setup: Setup
) -> tuple[AdapterExperts, jax.Array, float, meta_dmoe.Trained, Callable]:
  """The experts, their features of every source image [N, N_src, D] (and the seconds that
  took), Meta-DMoE's later stages trained on them, and the experts' stacked forward pass."""
  writer = metrics_lib.MetricWriter(workdir)
  experts = train_experts(setup, workdir, writer)
  apply = make_stacked_apply(experts.model)
  start = time.perf_counter()
  feats, _ = expert_outputs(
    experts, np.asarray(setup.meta.x), batch_size=config.eval_batch_size, apply=apply
  )
  feats = jax.block_until_ready(feats)  # [N, N_src, D], cached for every later stage
  feature_time = time.perf_counter() - start
  trained = meta_dmoe.train_from_features(
    config, workdir, setup.meta, feats, writer=writer, stage_fields=STAGE_FIELDS
  )
  writer.close()
  return experts, feats, feature_time, trained, apply


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md."""
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  meta = setup.meta
  logging.info("adapter_experts: super-domains %s", meta.super_domains)
  experts, feats, feature_time, trained, apply = _expert_stages(config, workdir, setup)
  memo: dict[str, tuple[jax.Array, jax.Array]] = {}

  def outputs(x: np.ndarray) -> tuple[jax.Array, jax.Array]:
    # Each held-out domain's expert outputs serve both recipes: computed once.
    key = hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
    if key not in memo:
      memo[key] = expert_outputs(experts, x, batch_size=config.eval_batch_size, apply=apply)
    return memo[key]

  metrics = meta_dmoe.evaluate_with(
    meta, outputs, trained.aggregator["params"], trained.student, trained.meta
  )
  soups, selections, per_example, selection = weight_space(setup, experts, outputs=outputs)
  metrics.update(soups)
  return {
    "method": "adapter_experts",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "source_domains": list(meta.sources),
    "target_domains": list(meta.targets),
    "super_domains": [list(g) for g in meta.super_domains],
    "adapter_kind": config.adapter.kind,
    "metrics": metrics,
    results_lib.PER_EXAMPLE: per_example,
    "params": param_counts(setup, experts),
    "meta_step_ms": time_meta_step(setup, trained.meta, feats),
    "feature_cache_s": round(feature_time, 2),
    "step_time_s": experts.step_time_s,
    "selections": selections,
    # The merge family's hyper-parameters, chosen on the source validation images.
    "selection": selection,
    "notes": {
      "best_single_oracle": BEST_SINGLE_NOTE,
      "soup_greedy": "label-free: first member by similarity to the k unlabeled support "
      "images of each adaptation draw, then lowest FSD to the current soup; accuracy averaged "
      "over the draws",
      "soup_ties": "TIES on the adapters' deltas from their shared initialisation; heads "
      "averaged densely",
    },
  }
