"""The adapter experts of the `adapter_experts` recipe: its setup and their training stages.

The recipe's `Setup` (Meta-DMoE's data, super-domains and student, and the adapter
harness over the same arrays), the stages `backbone` (the ViT pre-trained on the pooled
source images) and `adapter_<k>` (one adapter set + head per super-domain, every expert
from the same initialisation), and the experts' stacked forward pass: features [N, M, D]
and logits [N, M, C] of the N experts in one compiled `lax.map`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_adapt import models
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.methods import adapter_soup as soup_lib
from moe_adapt.methods import meta_dmoe
from moe_adapt.models import adapters as adapters_lib

PyTree = Any


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
