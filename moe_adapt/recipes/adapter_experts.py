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
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from moe_adapt import models
from moe_adapt.core import merging
from moe_adapt.methods import _checks, meta_dmoe
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.methods import adapter_soup as soup_lib
from moe_adapt.models import adapters as adapters_lib
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


def harness_config(config) -> ml_collections.ConfigDict:
  """The fields `finetune`'s harness reads (ViT, adapters, optimiser), from the recipe's."""
  return ml_collections.ConfigDict(
    {
      "seed": config.seed,
      "model": {"kind": "vit", "dropout": config.vit.dropout, "options": config.vit.options},
      "adapter": config.adapter.to_dict(),
      "train": config.train.to_dict(),
      "pretrain": config.pretrain.to_dict(),
      "eval_batch_size": config.eval_batch_size,
      "checkpoint_every": config.checkpoint_every,
      "log_every": config.log_every,
      "num_devices": config.num_devices,
      "stage_cache": "",
    }
  )


# ----------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
  """Meta-DMoE's setup (data, super-domains, student) and the adapter harness's over it."""

  meta: meta_dmoe.Setup
  harness: ft.Setup

  @property
  def num_experts(self) -> int:
    return self.meta.num_experts


def _task(meta: meta_dmoe.Setup) -> ft.Task:
  """Meta-DMoE's splits as the harness's `Task` (the same arrays, no copy of the data)."""

  def examples(split) -> ft.Examples:
    return ft.Examples((split.x.astype(np.float32),), split.y.astype(np.int32))

  domains = tuple(meta.benchmark.domains)
  parts = {
    name: {d: examples(getattr(meta.splits[d], name)) for d in domains}
    for name in ("train", "val", "test")
  }
  return ft.Task(
    benchmark=meta.config.data.benchmark,
    modality="image",
    domains=domains,
    class_names=tuple(meta.benchmark.class_names),
    default_targets=meta.targets,
    **parts,
  )


def make_setup(config) -> Setup:
  """Loads the data (as meta_dmoe does) and checks the ViT against the student."""
  meta = meta_dmoe.make_setup(config)
  sample = jnp.zeros((1, *meta.benchmark.input_shape), jnp.float32)
  student = jax.eval_shape(lambda: meta.model.init(jax.random.key(0), sample, train=False))
  student_dim = jax.eval_shape(
    lambda v: meta.model.apply(v, sample, method=models.Classifier.features), student
  ).shape[-1]
  hidden = config.vit.options.hidden_size
  if hidden != student_dim:
    # The student distils the aggregated expert feature: both live in one space.
    raise ValueError(
      f"vit.options.hidden_size={hidden} must equal the student's feature size "
      f"({student_dim}, model.options); accepted: {student_dim}"
    )
  harness = ft.Setup(
    config=harness_config(config),
    task=_task(meta),
    mesh=meta.mesh,
    backbone_config=dict(config.vit.options.to_dict()),
    pretrained=None,
  )
  return Setup(meta=meta, harness=harness)


# ----------------------------------------------------------------------------
# Adapter experts
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdapterExperts:
  """N adapter sets (+ heads) on one frozen backbone.

  Attributes:
    model: the ViT classifier with adapters; `model_plain` the one without.
    base: the backbone's params without adapters and head, shared by every expert.
    stacked: [N, ...] adapters + head trees (`adapters.split_params(include_head=True)`).
    init: the shared initial adapters + head tree (TIES merges deltas from it).
    plain_params: params of `model_plain` (the backbone, an unused random head).
    step_time_s: stage name -> seconds per training step.
  """

  model: Any
  model_plain: Any
  base: PyTree
  stacked: PyTree
  init: PyTree
  plain_params: PyTree
  step_time_s: dict[str, float]

  def params(self, tree: PyTree) -> PyTree:
    """Full params of the classifier: the backbone plus an adapters + head tree."""
    return adapters_lib.merge_params(self.base, tree)


def train_experts(setup: Setup, workdir: str, writer, *, time_steps: bool = True) -> AdapterExperts:
  """Stages `backbone` and `adapter_<k>`: the shared ViT, then one adapter set per expert.

  With `time_steps=False` no step is timed (NaN), so restoring finished stages compiles
  nothing.
  """
  cfg, h, meta = setup.meta.config, setup.harness, setup.meta
  plain = ft.build_model(h, adapters_lib.AdapterConfig())
  sources = h.task.pooled("train", meta.sources)
  pretrained = ft.train(
    h,
    workdir,
    writer,
    stage="backbone",
    model=plain,
    params=ft.init_params(h, plain, h.key("backbone_init"), None),
    train_mode="all",
    examples=sources,
    steps=cfg.pretrain.steps,
    lr=cfg.pretrain.lr,
    batch_size=cfg.pretrain.batch_size,
    time_steps=time_steps,
  )
  backbone = ft.backbone_of(h, pretrained.params)
  step_time = {"backbone": pretrained.step_time_s}

  model = ft.build_model(h, ft.adapter_config(cfg, cfg.adapter.kind))
  init = ft.init_params(h, model, h.key("adapter_init"), backbone)
  base, init_tree = adapters_lib.split_params(init, include_head=True)
  trees = []
  for k, group in enumerate(meta.super_domains):
    stage = f"adapter_{k}"
    result = ft.train(
      h,
      workdir,
      writer,
      stage=stage,
      model=model,
      params=init,
      train_mode="adapters",
      examples=h.task.pooled("train", group),
      steps=cfg.experts.steps,
      lr=cfg.experts.lr,
      batch_size=cfg.experts.batch_size,
      time_steps=time_steps,
    )
    trees.append(adapters_lib.split_params(result.params, include_head=True)[1])
    step_time[stage] = result.step_time_s
  return AdapterExperts(
    model=model,
    model_plain=plain,
    base=base,
    stacked=soup_lib.stack_trees(trees),
    init=init_tree,
    plain_params=ft.init_params(h, plain, h.key("backbone_init"), backbone),
    step_time_s=step_time,
  )


def make_stacked_apply(model) -> Callable:
  """`jitted(base, stacked, x) -> (features [N, B, D], logits [N, B, C])` of N experts.

  A compiled `lax.map` over the leading axis of `stacked` (adapters + head trees): each
  expert is the frozen `base` with its adapters merged in. `base` and `stacked` are
  arguments, not constants, so one program serves every call.
  """

  @jax.jit
  def apply(base: PyTree, stacked: PyTree, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    def one(tree):
      params = adapters_lib.merge_params(base, tree)
      feats = model.apply({"params": params}, x, train=False, method=models.Classifier.features)
      logits = model.apply(
        {"params": {adapters_lib.HEAD_KEY: tree[adapters_lib.HEAD_KEY]}},
        feats,
        method=models.Classifier.classify,
      )
      return feats, logits

    return jax.lax.map(one, stacked)

  return apply


def expert_outputs(
  experts: AdapterExperts, x: np.ndarray, *, batch_size: int, apply: Callable | None = None
) -> tuple[jax.Array, jax.Array]:
  """(features [N, M, D], logits [N, M, C]) of the N experts on images x [M, H, W, C].

  Computed in fixed-size batches (the last one padded) so that it compiles once.
  """
  apply = apply or make_stacked_apply(experts.model)
  feats, logits = [], []
  for start in range(0, len(x), batch_size):
    xb = np.asarray(x[start : start + batch_size], np.float32)
    if len(xb) < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - len(xb), *xb.shape[1:]), xb.dtype)])
    f, lg = apply(experts.base, experts.stacked, xb)
    feats.append(f)
    logits.append(lg)
  n = len(x)
  return jnp.concatenate(feats, axis=1)[:, :n], jnp.concatenate(logits, axis=1)[:, :n]


# ----------------------------------------------------------------------------
# Weight space: soups on the held-out domains
# ----------------------------------------------------------------------------


def greedy_members(
  target_emb: np.ndarray,
  candidate_emb: Sequence[np.ndarray],
  adapters: PyTree,
  *,
  max_size: int,
) -> tuple[list[int], list[float]]:
  """Label-free FSD-greedy soup order from unlabeled target embeddings.

  Args:
    target_emb: [k, D] embeddings of the unlabeled target images.
    candidate_emb: per expert, [M_i, D] embeddings of its super-domain's images.
    adapters: [N, ...] stacked adapter weights (no head) the FSD is computed on.
    max_size: members to choose, 1..N.

  Returns:
    (member indices in the order added: the most similar expert first, then each time the
    one of lowest FSD to the current soup's average; ties by index), (the similarity score
    of every expert).
  """
  n = len(candidate_emb)
  if not 1 <= max_size <= n:
    raise ValueError(f"max_size={max_size!r} is invalid; accepted: an integer in [1, {n}]")
  names = [str(i) for i in range(n)]
  sel = soup_lib.select_by_similarity(
    target_emb, dict(zip(names, candidate_emb)), top_k=1, threshold=-1.0
  )
  members = [int(sel.selected[0])]
  while len(members) < max_size:
    weights = np.zeros(n, np.float32)
    weights[members] = 1.0
    soup = merging.weighted_average(adapters, jnp.asarray(weights))
    fsd = {j: float(_fsd_to(soup, _member(adapters, j))) for j in range(n) if j not in members}
    members.append(min(fsd, key=lambda j: (fsd[j], j)))
  return members, [sel.scores[name] for name in names]


@jax.jit
def _take(stacked: PyTree, i: jax.Array) -> PyTree:
  return jax.tree.map(lambda x: x[i], stacked)


def _member(stacked: PyTree, i: int) -> PyTree:
  """Slice i of a stacked tree (one compiled gather for every i)."""
  return _take(stacked, jnp.int32(i))


@jax.jit
def _fsd_to(a: PyTree, b: PyTree) -> jax.Array:
  """FSD of two trees (share of positions of opposite strict sign)."""
  return merging.sign_disagreement(soup_lib.stack_trees([a, b]))


def support_draws(setup: Setup, d_idx: int, pool_size: int) -> list[np.ndarray]:
  """The unlabeled support indices of each adaptation draw: exactly Meta-DMoE's draws."""
  cfg = setup.meta.config
  draws = []
  for r in range(cfg.adapt.repeats):
    key = jax.random.fold_in(jax.random.fold_in(setup.meta.key("adapt"), d_idx), r)
    draws.append(np.asarray(jax.random.permutation(key, pool_size)[: cfg.adapt.support_size]))
  return draws


def source_samples(setup: Setup) -> list[np.ndarray]:
  """Per expert, `soup.num_samples` training images of its super-domain (seeded)."""
  cfg = setup.meta.config
  out = []
  for k, group in enumerate(setup.meta.super_domains):
    x = setup.harness.task.pooled("train", group).inputs[0]
    rng = np.random.default_rng([cfg.seed, zlib.crc32(f"soup_{k}".encode())])
    n = min(cfg.soup.num_samples, len(x))
    out.append(x[np.sort(rng.choice(len(x), n, replace=False))])
  return out


def weight_space(
  setup: Setup, experts: AdapterExperts, *, outputs: Callable | None = None
) -> tuple[dict, dict, dict]:
  """Accuracy of every weight-space variant on every held-out domain, and the selections.

  Args:
    setup: the recipe's setup.
    experts: the trained adapter experts.
    outputs: images -> (features, logits [N, M, C]) of the experts (`expert_outputs`), e.g.
      memoised by the caller; the single experts' accuracies come from its logits.

  Returns:
    (variant -> {domain: {'accuracy', ...}}, domain -> what the greedy soups chose per draw,
    variant -> {domain: per-example outcomes}, variant -> hyper-parameters chosen on the
    source validation split (`merge_family`)); the greedy soups, averaged over draws, have
    no per-example outcomes.
  """
  cfg, h = setup.meta.config, setup.harness
  bs = cfg.eval_batch_size
  n = setup.num_experts
  outputs = outputs or (lambda x: expert_outputs(experts, x, batch_size=bs))
  heads = {adapters_lib.HEAD_KEY: experts.stacked[adapters_lib.HEAD_KEY]}
  mean_head = merging.weighted_average(heads)
  adapters = soup_lib.without_head(experts.stacked)
  init_adapters = soup_lib.without_head(experts.init)

  def embed(x: np.ndarray) -> np.ndarray:
    ex = ft.Examples((np.asarray(x, np.float32),), np.zeros(len(x), np.int32))
    return ft.embed(h, experts.model_plain, experts.plain_params, ex)

  candidate_emb = [embed(x) for x in source_samples(setup)]
  soups: dict[str, PyTree] = {"soup_uniform": merging.weighted_average(experts.stacked)}
  deltas = jax.tree.map(lambda x, x0: x - x0[None], adapters, init_adapters)
  for density in cfg.soup.ties_densities:
    merged = merging.ties_merge(deltas, density=density, scale=cfg.soup.ties_scale)
    tag = format(100 * density, "g")
    soups[f"soup_ties_{tag}"] = {**jax.tree.map(jnp.add, init_adapters, merged), **mean_head}
  family, selection = merge_family(setup, experts, deltas, init_adapters, mean_head)
  soups.update(family)

  per: dict[str, dict] = {}
  per_example: dict[str, dict] = {}
  selections: dict[str, list] = {}
  max_size = max(cfg.soup.greedy_sizes)
  for d_idx, domain in enumerate(setup.meta.targets):
    x, y = meta_dmoe.whole_domain(setup.meta.splits[domain])
    examples = ft.Examples((x.astype(np.float32),), y.astype(np.int32))

    def soup_outcomes(tree: PyTree, examples=examples) -> dict[str, list[int]]:
      logits = ft.predict_logits(experts.model, experts.params(tree), examples, batch_size=bs)
      return results_lib.outcomes(logits, examples.labels)

    def accuracy(tree: PyTree) -> float:
      return results_lib.accuracy(soup_outcomes(tree))

    def record(name: str, outcomes: dict, domain: str = domain, **extra) -> float:
      acc = results_lib.accuracy(outcomes)
      per.setdefault(name, {})[domain] = {"accuracy": acc, **extra}
      per_example.setdefault(name, {})[domain] = outcomes
      return acc

    for name, tree in soups.items():
      record(name, soup_outcomes(tree))
    single_logits = np.asarray(outputs(x)[1])  # [N, M, C]
    single_outcomes = [results_lib.outcomes(lg, y) for lg in single_logits]
    singles = [record(f"expert_{k}", o) for k, o in enumerate(single_outcomes)]
    best = int(np.argmax(singles))
    record("best_single_oracle", single_outcomes[best], expert=best)

    # Greedy soups from each of Meta-DMoE's unlabeled support draws (images only).
    by_members: dict[tuple[int, ...], float] = {(k,): acc for k, acc in enumerate(singles)}
    accs: dict[int, list[float]] = {s: [] for s in cfg.soup.greedy_sizes}
    chosen = []
    for idx in support_draws(setup, d_idx, len(x)):
      order, scores = greedy_members(embed(x[idx]), candidate_emb, adapters, max_size=max_size)
      chosen.append({"order": order, "similarity": scores})
      for size in cfg.soup.greedy_sizes:
        members = tuple(sorted(order[:size]))
        if members not in by_members:
          weights = np.zeros(n, np.float32)
          weights[list(members)] = 1.0
          by_members[members] = accuracy(
            merging.weighted_average(experts.stacked, jnp.asarray(weights))
          )
        accs[size].append(by_members[members])
    for size, values in accs.items():
      per.setdefault(f"soup_greedy_{size}", {})[domain] = {
        "accuracy": float(np.mean(values)),
        "accuracy_per_draw": values,
      }
    selections[domain] = chosen

  for per_domain in per.values():
    per_domain["mean"] = {
      "accuracy": float(np.mean([per_domain[d]["accuracy"] for d in setup.meta.targets]))
    }
  return per, selections, per_example, selection


def source_val(setup: Setup) -> ft.Examples:
  """At most `soup.max_val_examples` (0 = all) validation images of the source domains,
  pooled: where the merge family's hyper-parameters are chosen (no held-out image)."""
  cfg = setup.meta.config
  val = setup.harness.task.pooled("val", setup.meta.sources)
  cap = cfg.soup.max_val_examples
  if 0 < cap < len(val):
    # A fixed subset (seed 0): the same images for every run seed.
    val = val.take(np.sort(np.random.default_rng(0).permutation(len(val))[:cap]))
  return val


def merge_family(
  setup: Setup, experts: AdapterExperts, deltas: PyTree, init_adapters: PyTree, mean_head: PyTree
) -> tuple[dict[str, PyTree], dict[str, dict]]:
  """The merge family (`merge.methods`: task arithmetic, TIES with per-tensor or whole-vector
  trim, DARE, DARE-TIES, Breadcrumbs) on the experts' deltas, heads averaged.

  Each setting of a method's grid (`adapter_soup.merge_candidates`) is scored on the pooled
  source validation images (`source_val`); the best one is the variant `soup_<method>`.

  Returns:
    (variant -> adapters + head tree, variant -> chosen hyper-parameters with their source
    validation accuracy).
  """
  cfg = setup.meta.config
  val = source_val(setup)
  # DARE's drops: a key of their own, from the run's seed.
  key = jax.random.fold_in(jax.random.key(cfg.seed), zlib.crc32(b"merge_dare") % 2**31)
  bs = cfg.eval_batch_size
  trees, selection = {}, {}
  for name, grid in soup_lib.merge_candidates(cfg).items():
    best = None
    for hp in grid:
      delta = soup_lib.merged_delta(name, deltas, hp, key)
      tree = {**jax.tree.map(jnp.add, init_adapters, delta), **mean_head}
      logits = ft.predict_logits(experts.model, experts.params(tree), val, batch_size=bs)
      acc = results_lib.accuracy(results_lib.outcomes(logits, val.labels))
      if best is None or acc > best[0]:
        best = (acc, hp, tree)
    trees[f"soup_{name}"] = best[2]
    selection[f"soup_{name}"] = {**best[1], "source_val_accuracy": best[0]}
  return trees, selection


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


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md."""
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  meta = setup.meta
  logging.info("adapter_experts: super-domains %s", meta.super_domains)
  writer = metrics_lib.MetricWriter(workdir)
  experts = train_experts(setup, workdir, writer)
  apply = make_stacked_apply(experts.model)
  bs = config.eval_batch_size

  start = time.perf_counter()
  feats, _ = expert_outputs(experts, np.asarray(meta.x), batch_size=bs, apply=apply)
  feats = jax.block_until_ready(feats)  # [N, N_src, D], cached for every later stage
  feature_time = time.perf_counter() - start
  trained = meta_dmoe.train_from_features(
    config, workdir, meta, feats, writer=writer, stage_fields=STAGE_FIELDS
  )
  writer.close()

  memo: dict[str, tuple[jax.Array, jax.Array]] = {}

  def outputs(x: np.ndarray) -> tuple[jax.Array, jax.Array]:
    # Each held-out domain's expert outputs serve both recipes: computed once.
    key = hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
    if key not in memo:
      memo[key] = expert_outputs(experts, x, batch_size=bs, apply=apply)
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
