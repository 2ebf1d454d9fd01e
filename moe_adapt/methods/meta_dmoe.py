"""Meta-DMoE: meta-distillation from a mixture of domain experts.

Zhong, Chi, Gu, Wang, Yu, Tang. "Meta-DMoE: Adapting to Domain Shift by
Meta-Distillation from Mixture-of-Experts", NeurIPS 2022.

Stages (each checkpointed under `<workdir>/checkpoints/<stage>` and skipped
when finished):

1. `experts`: N experts, one per super-domain (a seeded random partition of
   the source domains), stored stacked on a leading axis and trained together
   in one compiled step by a map over the expert axis.
2. `aggregator`: the aggregator (a transformer over the N expert feature
   tokens of one example) pretrained with CE through a temporary head.
3. `student`: the student pretrained by ERM on all source data.
4. `meta`: bi-level training on single-domain episodes. The in-domain expert is
   masked; one (or more) inner SGD step(s) on the unlabeled support distil the
   aggregated expert features into the student's feature extractor; the outer
   CE on the labeled query after adaptation is differentiated to second order
   into the student (θ_e, θ_c) and the aggregator φ, which have separate Adam
   optimisers. BatchNorm statistics stay frozen (running averages).
5. Test-time adaptation on k unlabeled samples of each held-out domain, then
   prediction of the domain's test split with the adapted student.

The experts are frozen after stage 1, so their features on all data are
computed once and cached on device: a meta-step runs only the student and the
aggregator (the official code re-runs every expert on every episode). For datasets that do
not fit in memory, `meta_dmoe_stream` (`data.streaming=True`) streams the images and runs
the experts inside the steps, reusing this module's updates.

This module is the algorithm (distillation losses, meta-update, test-time adaptation) and
its list of stages (`run`, `train_stages`); the harness is beside it: `meta_dmoe_checks`,
`meta_dmoe_setup`, `meta_dmoe_experts` (stage 1), `meta_dmoe_steps`, `meta_dmoe_stages`
and `meta_dmoe_eval` (the variants, for in-memory and streamed splits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from moe_adapt import core, models
from moe_adapt.methods import meta_dmoe_eval as eval_lib
from moe_adapt.methods import meta_dmoe_stages as stages_lib
from moe_adapt.methods import meta_dmoe_steps as steps_lib
from moe_adapt.methods.meta_dmoe_checks import check_in_memory
from moe_adapt.methods.meta_dmoe_checks import validate_config as validate_config
from moe_adapt.methods.meta_dmoe_eval import CONTENT_FREE as CONTENT_FREE
from moe_adapt.methods.meta_dmoe_experts import _stack_map as _stack_map
from moe_adapt.methods.meta_dmoe_experts import expert_features as expert_features
from moe_adapt.methods.meta_dmoe_experts import expert_tokens as expert_tokens
from moe_adapt.methods.meta_dmoe_experts import init_experts as init_experts
from moe_adapt.methods.meta_dmoe_experts import make_expert_step as make_expert_step
from moe_adapt.methods.meta_dmoe_experts import place_experts as place_experts
from moe_adapt.methods.meta_dmoe_setup import Setup as Setup
from moe_adapt.methods.meta_dmoe_setup import make_expert_mesh as make_expert_mesh
from moe_adapt.methods.meta_dmoe_setup import make_setup as make_setup
from moe_adapt.methods.meta_dmoe_setup import partition_domains as partition_domains
from moe_adapt.methods.meta_dmoe_setup import whole_domain as whole_domain
from moe_adapt.methods.meta_dmoe_stages import STAGE_FIELDS as STAGE_FIELDS
from moe_adapt.methods.meta_dmoe_stages import StepBuilders as StepBuilders
from moe_adapt.methods.meta_dmoe_stages import Trained as Trained
from moe_adapt.methods.meta_dmoe_stages import train_backbone as train_backbone
from moe_adapt.methods.meta_dmoe_steps import init_model as init_model
from moe_adapt.methods.meta_dmoe_steps import init_student as init_student
from moe_adapt.methods.meta_dmoe_steps import make_aggregator_step as make_aggregator_step
from moe_adapt.methods.meta_dmoe_steps import make_continued_step as make_continued_step
from moe_adapt.methods.meta_dmoe_steps import make_student_step as make_student_step
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib

PyTree = Any


# The algorithm: distillation losses, the meta-update, test-time adaptation ---


def inner_lr(config, feature_dim: int) -> float:
  """The inner step size α for features of size D = `feature_dim`.

  The distillation loss is a mean over the D feature coordinates, so its gradient, and
  the step it makes at a fixed α, shrink as 1/D. `meta.inner_lr` is the step size at
  D = `meta.inner_lr_dim` (the official 3e-4 is for ResNet-50's 2048), and α ∝ D keeps
  the step of each coordinate's squared error the same at any D:
  α = meta.inner_lr · D / meta.inner_lr_dim.
  """
  return config.meta.inner_lr * feature_dim / config.meta.inner_lr_dim


def make_losses(setup: Setup) -> tuple[Callable, Callable]:
  """(inner_loss, outer_loss) in the `core.meta` signature `fn(theta_e, batch, context)`.

  Only the feature extractor θ_e (the student's 'backbone' params) is adapted, in every
  distillation mode (the paper and the official code adapt `student.features`); the
  classifier θ_c and the aggregator φ ride in `context = {'head', 'aggregator'}`, so they
  get the outer gradient (θ_c directly, φ through the inner step) but no inner step.
  inner batch: {'x', 'tokens' [S, E, D], 'mask' [E], 'batch_stats'} and optionally
  'target' [S, D], a distillation target that replaces the aggregated feature (the
  content-free controls); outer batch: {'x', 'y', 'batch_stats'}. BatchNorm statistics
  ride in the batch: they are frozen (not adapted, no gradient).
  """
  model, agg_model = setup.model, setup.agg_model
  distill = setup.config.meta.distill
  w_features = 0.0 if distill == "logits" else 1.0
  w_logits = {"features": 0.0, "logits": 1.0, "both": setup.config.meta.logits_weight}[distill]

  def features(theta_e, batch):
    variables = {"params": {"backbone": theta_e}, "batch_stats": batch["batch_stats"]}
    return model.apply(variables, batch["x"], train=False, method=models.Classifier.features)

  def classify(head, feats):
    return model.apply({"params": {"head": head}}, feats, method=models.Classifier.classify)

  def inner_loss(theta_e, batch, context):
    feats = features(theta_e, batch)
    if "target" in batch:
      target = batch["target"]
    else:
      target = agg_model.apply(
        {"params": context["aggregator"]},
        batch["tokens"],
        batch["mask"],
        method=models.AggregatorClassifier.aggregate,
      )
    loss = 0.0
    if w_features:
      # In float32 also when the models compute in bfloat16 (model.dtype).
      f32 = jnp.float32
      loss += w_features * core.losses.feature_mse(feats.astype(f32), target.astype(f32)).mean()
    if w_logits:
      # The teacher's logits: the aggregator's pretraining head on the target feature.
      teacher = agg_model.apply(
        {"params": context["aggregator"]}, target, method=lambda m, f: m.head(f)
      )
      student = classify(context["head"], feats)
      loss += w_logits * core.losses.kl_divergence(teacher, student).mean()
    return loss

  def outer_loss(theta_e, batch, context):
    logits = classify(context["head"], features(theta_e, batch))
    return core.losses.cross_entropy(logits, batch["y"]).mean()

  return inner_loss, outer_loss


def make_meta_update(setup: Setup, tx_student, tx_agg, feature_dim: int) -> Callable:
  """`update(state, support, query) -> (state, metrics)`: one second-order meta-step.

  support: {'x' [S, ...], 'tokens' [S, E, D], 'mask' [E]}; query: {'x' [Q, ...], 'y' [Q]}
  (one single-domain episode, the in-domain expert masked). BatchNorm statistics are
  frozen. Shared by the in-memory step (`make_meta_step`, tokens from the feature cache)
  and the streaming one (`meta_dmoe_stream`, tokens computed in the step).
  """
  cfg = setup.config.meta
  inner_loss, outer_loss = make_losses(setup)
  alpha = inner_lr(setup.config, feature_dim)

  def update(state, support, query):
    stats = state["batch_stats"]
    support = {**support, "batch_stats": stats}
    query = {**query, "batch_stats": stats}
    student = state["student"]
    loss, (g_backbone, g_context) = core.meta.meta_value_and_grad(
      outer_loss,
      inner_loss,
      student["backbone"],
      support,
      query,
      lr=alpha,
      steps=cfg.inner_steps,
      first_order=cfg.first_order,
      context={"aggregator": state["aggregator"], "head": student["head"]},
      remat=cfg.remat,
    )
    g_student = {"backbone": g_backbone, "head": g_context["head"]}
    g_agg = g_context["aggregator"]
    upd_s, opt_s = tx_student.update(g_student, state["opt_student"], state["student"])
    upd_a, opt_a = tx_agg.update(g_agg, state["opt_aggregator"], state["aggregator"])
    new = {
      "student": optax.apply_updates(state["student"], upd_s),
      "aggregator": optax.apply_updates(state["aggregator"], upd_a),
      "batch_stats": stats,
      "opt_student": opt_s,
      "opt_aggregator": opt_a,
    }
    agg_norm = optax.tree.norm(g_agg) if jax.tree.leaves(g_agg) else jnp.zeros(())
    return new, {"loss": loss, "grad_norm_aggregator": agg_norm}

  return update


def make_meta_step(setup: Setup, tx_student, tx_agg, feats: jax.Array) -> Callable:
  """One second-order meta-step on one single-domain episode (in memory: the support's
  tokens from the feature cache `feats` [E, N_src, D])."""
  update = make_meta_update(setup, tx_student, tx_agg, feats.shape[-1])
  return steps_lib.make_episode_step(setup, update, feats)


def make_adapt_fn(setup: Setup) -> Callable:
  """The test-time adaptation: a function from the student to its adapted params.

  `adapt(student, batch_stats, aggregator, x_support, tokens, mask=, target=, lr_factor=)`
  returns the adapted student params: one adaptation of the feature extractor on the
  unlabeled support x_support [S, ...] with expert tokens [S, E, D]. `mask` [E] (default:
  every expert, as at test time),
  `target` [S, D] replaces the aggregated feature (content-free controls), `lr_factor`
  multiplies the meta-trained step size (source-side selection).
  """
  cfg = setup.config.meta
  inner_loss, _ = make_losses(setup)
  all_experts = jnp.ones((setup.num_experts,), bool)  # no masking at test time

  @jax.jit
  def adapt_jit(student, stats, aggregator, xs, tokens, mask, target, lr_factor):
    batch = {"x": xs, "tokens": tokens, "mask": mask, "batch_stats": stats}
    if target is not None:
      batch["target"] = target
    backbone = core.meta.inner_adapt(
      inner_loss,
      student["backbone"],
      batch,
      lr=inner_lr(setup.config, tokens.shape[-1]) * lr_factor,
      steps=cfg.inner_steps,
      first_order=True,  # no meta-gradient needed at test time
      context={"aggregator": aggregator, "head": student["head"]},
    )
    return {**student, "backbone": backbone}

  def adapt(student, stats, aggregator, xs, tokens, *, mask=None, target=None, lr_factor=1.0):
    mask = all_experts if mask is None else mask
    return adapt_jit(student, stats, aggregator, xs, tokens, mask, target, lr_factor)

  adapt.jitted = adapt_jit  # one compiled function; tests count its traces
  return adapt


# The stages ------------------------------------------------------------------


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md.

  `setup` (from `make_setup(config)`) may be passed when the caller already
  built it to check the inputs.
  """
  validate_config(config)
  check_in_memory(config)
  if setup is None:
    setup = make_setup(config)
  logging.info("super-domains: %s", setup.super_domains)
  writer = metrics_lib.MetricWriter(workdir)
  run_ = stages_lib.StageRun(config, workdir, writer)
  # 0. The shared backbone (unless the independent-initialisation ablation).
  backbone = None
  if config.model.shared_init:
    backbone = train_backbone(config, workdir, setup, writer=writer)
  # 1. Experts, then their features of every source image, cached.
  tx = optax.adam(config.experts.lr)
  experts = place_experts(setup, init_experts(setup, tx, backbone))
  experts = run_.stage("experts", make_expert_step(setup, tx), experts, config.experts.steps)
  if setup.expert_mesh is not None:
    # The later stages run every expert on every device of the data-parallel mesh.
    experts = jax.device_put(experts, mesh_lib.replicated(setup.mesh))
  feats = expert_features(setup, experts, np.asarray(setup.x))  # [E, N_src, D]
  # 2-4. Aggregator, ERM student, meta-training and its control.
  trained = train_from_features(config, workdir, setup, feats, writer=writer, backbone=backbone)
  writer.close()
  # 5. Selection on the sources, adaptation and evaluation.
  details: dict = {}
  metrics = evaluate(
    setup,
    experts,
    trained.aggregator["params"],
    trained.student,
    trained.meta,
    candidates=trained.candidates,
    details=details,
  )
  alpha = inner_lr(config, int(feats.shape[-1]))
  return stages_lib.results(config, setup, alpha, metrics, details)


def train_stages(
  config,
  workdir: str,
  setup: Setup,
  steps: StepBuilders,
  feature_dim: int,
  *,
  writer: metrics_lib.MetricWriter | None,
  stage_fields: dict[str, tuple[str, ...]] = STAGE_FIELDS,
  backbone: PyTree | None = None,
) -> Trained:
  """Stages 2-4 with the given steps (`train_from_features`' arguments; `feature_dim` is D,
  the experts' and the student's feature size)."""
  run_ = stages_lib.StageRun(config, workdir, writer, stage_fields)
  aggregator = stages_lib.pretrain_aggregator(run_, setup, steps.aggregator, feature_dim)
  if backbone is None and config.model.shared_init:
    backbone = train_backbone(
      config, workdir, setup, writer=writer, stage_fields=stage_fields, step=steps.backbone
    )
  student = stages_lib.train_student(run_, setup, steps.student, backbone)
  meta, meta_kept, tx_s = stages_lib.meta_train(run_, setup, steps.meta, aggregator, student)
  continued_kept = stages_lib.continue_erm(run_, steps.continued, student, tx_s)
  candidates = {"meta": meta_kept, "erm_continued": continued_kept}
  return Trained(aggregator, student, meta, candidates)


def memory_steps(setup: Setup, feats: jax.Array | None = None) -> StepBuilders:
  """The in-memory path's steps; `feats` [E, N_src, D] (the frozen experts' features of
  `setup.x`) is needed by the aggregator and meta stages only."""
  return StepBuilders(
    backbone=lambda tx: make_student_step(setup, tx, stage="backbone"),
    aggregator=lambda tx: make_aggregator_step(setup, tx, feats),
    student=lambda tx: make_student_step(setup, tx),
    meta=lambda tx_s, tx_a: make_meta_step(setup, tx_s, tx_a, feats),
    continued=lambda tx: make_continued_step(setup, tx),
  )


def train_from_features(
  config,
  workdir: str,
  setup: Setup,
  feats: jax.Array,
  *,
  writer: metrics_lib.MetricWriter | None,
  stage_fields: dict[str, tuple[str, ...]] = STAGE_FIELDS,
  backbone: PyTree | None = None,
) -> Trained:
  """Stages 2-4 (aggregator, ERM student, meta-training and its control) on cached features.

  Args:
    config: the run's config (the fields `validate_config` checks).
    workdir: the run's directory.
    setup: from `make_setup(config)`.
    feats: [E, N_src, D] the frozen experts' features of every source training image
      (`setup.x`), from any kind of expert; D must be the student's feature size.
    writer: where the stages' metrics go.
    stage_fields: the config fields each shareable stage depends on (stage cache).
    backbone: the shared starting point of the student ({'params', 'batch_stats'}); when
      None and `model.shared_init`, the backbone stage is run (or loaded) here.
  """
  steps, dim = memory_steps(setup, feats), int(feats.shape[-1])
  kwargs = {"writer": writer, "stage_fields": stage_fields, "backbone": backbone}
  return train_stages(config, workdir, setup, steps, dim, **kwargs)


def evaluate(setup: Setup, experts, aggregator_pre, student_erm, meta_state, **kwargs) -> dict:
  """Accuracy of every variant on every target domain (all of its images) of stacked
  experts [E, ...]; `kwargs` go to `evaluate_with` (`candidates`, `details`)."""
  outputs = eval_lib.memory_expert_outputs(setup, experts, expert_features)
  return evaluate_with(setup, outputs, aggregator_pre, student_erm, meta_state, **kwargs)


def evaluate_with(
  setup: Setup,
  expert_outputs: Callable[[np.ndarray], tuple[jax.Array, jax.Array]],
  aggregator_pre,
  student_erm,
  meta_state,
  *,
  candidates: dict | None = None,
  details: dict | None = None,
) -> dict:
  """`evaluate` with the frozen experts given as a function `expert_outputs`: images
  [N, H, W, C] -> (features [E, N, D], logits [E, N, C]) of the E experts (any kind of
  expert: the features feed the aggregator, the logits the `expert_average` variant).

  The other arguments and the result are `meta_dmoe_eval.evaluate_variants`'; `details`,
  when given, receives its 'per_example' and 'selection'.
  """
  variants, found = eval_lib.evaluate_variants(
    setup,
    eval_lib.MemorySource(setup, expert_outputs),
    adapt=make_adapt_fn(setup),
    inner_lr=lambda feature_dim: inner_lr(setup.config, feature_dim),
    aggregator_pre=aggregator_pre,
    student_erm=student_erm,
    meta_state=meta_state,
    candidates=candidates,
  )
  if details is not None:
    details.update(found)
  return variants
