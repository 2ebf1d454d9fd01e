"""Meta-DMoE's training stages after the experts', each from the steps a path builds.

`meta_dmoe.train_stages` lists them; each runs (or resumes, or reuses from the stage cache)
one checkpointed stage with `stages.run_stage`. The steps come in as `StepBuilders`: the
in-memory path's (`meta_dmoe.memory_steps`) or the streaming path's
(`meta_dmoe_stream.stream_steps`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from moe_adapt.methods import meta_dmoe_steps as steps_lib
from moe_adapt.methods.meta_dmoe_setup import Setup
from moe_adapt.models import backbone_io
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import stages

PyTree = Any

# The config fields each reusable stage depends on (see train/stage_cache.py);
# meta-training and its control, the last stages, are what ablations vary and are never shared.
STAGE_FIELDS = {
  "shared_backbone": ("seed", "data", "model", "backbone", "num_devices"),
  "experts": ("seed", "data", "model", "backbone", "experts", "num_devices"),
  "aggregator": (
    "seed",
    "data",
    "model",
    "backbone",
    "experts",
    "aggregator",
    "eval_batch_size",
    "num_devices",
  ),
  "student": ("seed", "data", "model", "backbone", "student", "num_devices"),
}


class StepBuilders(NamedTuple):
  """The steps of the stages after the experts', from their optimisers: what differs
  between the in-memory path (`meta_dmoe.memory_steps`, batches indexed from device arrays
  and the feature cache) and the streaming one (`meta_dmoe_stream`)."""

  backbone: Callable  # tx -> step (the shared-backbone ERM stage)
  aggregator: Callable  # tx -> step
  student: Callable  # tx -> step
  meta: Callable  # (tx_student, tx_aggregator) -> step
  continued: Callable  # tx -> step (the erm_continued control)


class Trained(NamedTuple):
  """The states of stages 2-4 (each as `stages.run_stage` returns it)."""

  aggregator: PyTree  # {'params', 'opt_state'}
  student: PyTree  # the ERM student: {'params', 'batch_stats', 'opt_state'}
  meta: PyTree  # {'student', 'aggregator', 'batch_stats', 'opt_student', 'opt_aggregator'}
  # The evaluation's candidates: {'meta': [(step, state)], 'erm_continued': [(step, state)]}
  candidates: dict | None = None


class StageRun(NamedTuple):
  """Where and how the stages of one run are run (`stages.run_stage`'s shared arguments)."""

  config: Any
  workdir: str
  writer: Any  # metrics_lib.MetricWriter | None
  stage_fields: dict[str, tuple[str, ...]] = STAGE_FIELDS

  def stage(self, name: str, step: Callable, state: PyTree, num_steps: int) -> PyTree:
    return stages.run_stage(
      self.config,
      self.workdir,
      name,
      step,
      state,
      num_steps,
      writer=self.writer,
      stage_fields=self.stage_fields,
    )

  def segments(self, name: str, step: Callable, state: PyTree, keep: tuple[str, ...]):
    """The meta stage's run: (final state, [(step, kept fields)] at the
    `selection.meta_checkpoints` evenly spaced points, for selection)."""
    return stages.run_in_segments(
      self.config,
      self.workdir,
      name,
      step,
      state,
      self.config.meta.steps,
      self.config.selection.meta_checkpoints,
      writer=self.writer,
      stage_fields=self.stage_fields,
      keep=lambda st: {k: st[k] for k in keep},
    )


def meta_schedule(config, lr: float, setup: Setup) -> optax.Schedule:
  """The meta stage's learning rate: ×`meta.lr_decay` after every epoch (official code).

  An epoch is `meta.steps_per_epoch` episodes, or (0) as many as the pooled source
  training set holds: ⌊N_src / (support + query)⌋ (the official epoch is one pass).
  """
  cfg = config.meta
  per_epoch = cfg.steps_per_epoch or max(
    1, setup.num_source_train // (cfg.support_size + cfg.query_size)
  )
  return optax.exponential_decay(lr, per_epoch, cfg.lr_decay, staircase=True)


def train_backbone(
  config,
  workdir: str,
  setup: Setup,
  *,
  writer,
  stage_fields=STAGE_FIELDS,
  step: Callable | None = None,
):
  """The shared starting point of every expert and the student: {'params', 'batch_stats'}.

  Loaded from `backbone.checkpoint` when set (shapes checked), otherwise ERM on the pooled
  source domains (stage 'shared_backbone', the analogue of the paper's ImageNet pre-training),
  written to `<workdir>/backbone.msgpack` for reuse. `step`: `tx -> step` of that stage
  (default: the in-memory `make_student_step(..., stage='backbone')`).
  """
  template = steps_lib.init_model(setup, jax.random.fold_in(setup.key("init"), 2))
  if config.backbone.checkpoint:
    loaded = backbone_io.load_backbone(config.backbone.checkpoint, template)
    return mesh_lib.replicate(loaded, setup.mesh)
  tx = optax.adam(config.backbone.lr)
  state = mesh_lib.replicate({**template, "opt_state": tx.init(template["params"])}, setup.mesh)
  if step is None:
    step = lambda tx: steps_lib.make_student_step(setup, tx, stage="backbone")
  run = StageRun(config, workdir, writer, stage_fields)
  state = run.stage("shared_backbone", step(tx), state, config.backbone.steps)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  if jax.process_index() == 0:
    backbone_io.save_backbone(f"{workdir}/backbone.msgpack", variables)
  return variables


def pretrain_aggregator(run: StageRun, setup: Setup, build: Callable, feature_dim: int) -> PyTree:
  """Stage 2: the aggregator over E tokens of size `feature_dim`, pretrained with CE
  through its temporary head (`build`: tx -> step)."""
  tx = optax.adam(run.config.aggregator.lr)
  tokens = jnp.zeros((1, setup.num_experts, feature_dim), jnp.float32)
  agg_params = jax.jit(setup.agg_model.init)(setup.key("init"), tokens)["params"]
  aggregator = mesh_lib.replicate(
    {"params": agg_params, "opt_state": tx.init(agg_params)}, setup.mesh
  )
  return run.stage("aggregator", build(tx), aggregator, run.config.aggregator.pretrain_steps)


def train_student(run: StageRun, setup: Setup, build: Callable, backbone: PyTree | None):
  """Stage 3: the ERM student from `backbone` (or, as an ablation, from a random
  initialisation), on all source data (`build`: tx -> step)."""
  if backbone is None:
    backbone = steps_lib.init_model(setup, jax.random.fold_in(setup.key("init"), 1))
  tx = optax.adam(run.config.student.lr)
  student = steps_lib.init_student(setup, tx, backbone)
  return run.stage("student", build(tx), student, run.config.student.steps)


def meta_train(run: StageRun, setup: Setup, build: Callable, aggregator, student):
  """Stage 4: bi-level training from the pretrained aggregator and the ERM student, the
  lrs decayed per epoch (`build`: (tx_student, tx_aggregator) -> step).

  Returns:
    (final state, kept candidates, tx_student): the control continues with tx_student.
  """
  config = run.config
  tx_s = optax.adam(meta_schedule(config, config.meta.student_lr, setup))
  tx_a = optax.adam(meta_schedule(config, config.meta.aggregator_lr, setup))
  meta = mesh_lib.replicate(
    {
      "student": student["params"],
      "aggregator": aggregator["params"],
      "batch_stats": student["batch_stats"],
      "opt_student": tx_s.init(student["params"]),
      "opt_aggregator": tx_a.init(aggregator["params"]),
    },
    setup.mesh,
  )
  # The initial state is built from arrays the earlier stages own; copy so that
  # donation inside the meta loop never invalidates them (they are evaluated later).
  meta = jax.tree.map(jnp.copy, meta)
  meta, kept = run.segments(
    "meta", build(tx_s, tx_a), meta, ("student", "aggregator", "batch_stats")
  )
  return meta, kept, tx_s


def continue_erm(run: StageRun, build: Callable, student: PyTree, tx_s) -> list:
  """Stage 4': the erm_continued control from the ERM student: the same query batches, lr
  and schedule (`tx_s`) as meta-training, no inner step (`build`: tx -> step). Returns its
  kept candidates."""
  continued = jax.tree.map(
    jnp.copy,
    {
      "params": student["params"],
      "batch_stats": student["batch_stats"],
      "opt_state": tx_s.init(student["params"]),
    },
  )
  _, kept = run.segments("erm_continued", build(tx_s), continued, ("params", "batch_stats"))
  return kept


def results(config, setup: Setup, alpha: float, metrics: dict, details: dict, **extra) -> dict:
  """The results dict of DESIGN.md (both paths): the run's header, `extra` fields, the
  metrics, and the evaluation's `details` ('selection', 'per_example')."""
  checkpoint = setup.checkpoint_info
  return {
    "method": "meta_dmoe",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "source_domains": list(setup.sources),
    "target_domains": list(setup.targets),
    "super_domains": [list(g) for g in setup.super_domains],
    "inner_lr": alpha,
    **extra,
    "metrics": metrics,
    "selection": details["selection"],
    "per_example": details["per_example"],
    **({"backbone_checkpoint": checkpoint} if checkpoint else {}),
  }
