"""Co-Tuning: collaborative fine-tuning through a calibrated category relationship.

You, Kou, Long, Wang. "Co-Tuning for Transfer Learning", NeurIPS 2020.

A pre-trained source model (backbone F + source head G over C_s source classes) is
transferred to a target task with another label set (C_t classes). Instead of discarding
G, Co-Tuning translates every target label y_t into a distribution over the source classes,
R[y_t] = p(y_s | y_t), and fine-tunes F, G and a new target head H together with

  L = CE(H(F(x)), y_t) + λ · soft-CE(G(F(x)), R[y_t]);

prediction uses H only. Stages and steps (each training stage checkpointed under
`<workdir>/checkpoints/<stage>` and skipped when finished):

1. `source`: the source model, pre-trained by ERM on the source training split, or loaded
   from `model.source_checkpoint`: a Hugging Face / timm ResNet checkpoint directory
   (config.json + safetensors, read by `models.checkpoints`; its linear classification head
   is the source head, its images are normalised as its preprocessing says) or a file in
   this project's layout (`save_source_checkpoint`). A trained source depends only on the
   source data, model and `source` fields, so every run of a sweep reuses it through the
   stage cache.
2. Calibration: a temperature T of the source head fitted on the source val split; the
   source head's ECE before and after is measured on the source test split. A checkpoint
   needs no source training data: with `data.source_domain` set, only that domain's val and
   test splits are used (T fitted there); without any source data, T =
   `calibration.temperature` (> 0; the official code hard-codes T for its ImageNet
   ResNet-50). Target data cannot fit T: its labels are not source classes.
   The target data: the benchmark's target train and val splits form a pool, of which
   `data.val_fraction` (20 %) of each class is held out once per seed as the validation
   set (the same at every sampling rate, as in the paper); `data.sampling_rate` of the rest
   is the training set.
3. Relationships from the calibrated source probabilities softmax(G(F(x)) / T): `direct`
   (per-class means over train + validation pooled, as the official code) and/or `reverse`
   (the paper's Algorithm 1, fitted on train; its L2 strength C and its temperature chosen
   on validation and logged under `selection`). Diagnostics (the source head's accuracy
   through the relationship, the rows' peakedness) use validation, never test.
4. Fine-tuning, all from the same pre-trained weights and the same new head initialisation,
   with the official recipe (SGD, Nesterov momentum 0.9, weight decay 5e-4, lr for F and
   G and 10× lr for H, a step decay). Each variant is trained once per candidate of the
   same grid (`selection.lr_grid`, crossed with `selection.trade_off_grid` for Co-Tuning
   and `selection.alpha_grid` for L2-SP); the candidate with the best validation accuracy
   is reported and its choice logged under `selection`:

   - `fine_tune`: CE on H (G unused);
   - `l2_sp`: CE + α/2·||θ_F − θ_F⁰||² + β/2·||θ_H||² instead of weight decay
     (Li, Grandvalet, Davoine, ICML 2018);
   - `co_tuning_direct`, `co_tuning_reverse`: the Co-Tuning loss with that relationship.

   All variants run one compiled step: the relationship, the pre-trained anchor and the
   loss coefficients are arguments, the weight decay an optimiser hyperparameter.
5. Evaluation of H on the target test split (accuracy, ECE, per-example outcomes).

This module chains the stages; the pieces live beside it and are re-exported here:
`co_tuning_relationship` (calibration, both relationships and their diagnostics),
`co_tuning_finetune` (the variants, their loss and shared step), `co_tuning_data` (the
tasks, the validation hold-out, `Setup`), `co_tuning_source` (source checkpoints) and
`co_tuning_checks` (the config fields).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from moe_adapt import core
from moe_adapt.methods.co_tuning_checks import BASELINE as BASELINE
from moe_adapt.methods.co_tuning_checks import RELATIONSHIPS, validate_config
from moe_adapt.methods.co_tuning_checks import VARIANTS as VARIANTS
from moe_adapt.methods.co_tuning_data import Setup, make_setup
from moe_adapt.methods.co_tuning_data import Task as Task
from moe_adapt.methods.co_tuning_finetune import (
  candidate_stage,
  candidates,
  evaluate_target_outcomes,
  finetune_kwargs,
  finetune_variant,
  make_optimizer,
  make_target_predict,
  validation_accuracy,
)
from moe_adapt.methods.co_tuning_finetune import finetune_start as finetune_start
from moe_adapt.methods.co_tuning_finetune import make_finetune_step as make_finetune_step
from moe_adapt.methods.co_tuning_finetune import set_weight_decay as set_weight_decay
from moe_adapt.methods.co_tuning_relationship import (
  calibrate,
  calibrated_probs,
  compute_relationship,
  make_logits_fn,
  relationship_accuracy,
  relationship_peakedness,
  save_heatmap,
)
from moe_adapt.methods.co_tuning_source import load_source_checkpoint
from moe_adapt.methods.co_tuning_source import save_source_checkpoint as save_source_checkpoint
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import stages, steps
from moe_adapt.train import workdir as workdir_lib

PyTree = Any

# The config fields each reusable stage depends on (see train/stage_cache.py). The source
# model does not depend on the run's seed or on anything about the target task.
STAGE_FIELDS = {
  "source": (
    "data.benchmark",
    "data.options",
    "data.benchmark_seed",
    "data.source_domain",
    "data.source_classes",
    "model.backbone",
    "model.options",
    "source",
    "num_devices",
  ),
}


# ----------------------------------------------------------------------------
# Stage 1: the source model
# ----------------------------------------------------------------------------


def init_source(setup: Setup, tx: optax.GradientTransformation) -> PyTree:
  """The source model's variables at initialisation and its optimiser state."""
  sample = jnp.zeros((1, *setup.task.input_shape), jnp.float32)
  variables = setup.source_model.init(setup.key("source"), sample, train=False)
  params = variables["params"]
  return {
    "params": params,
    "batch_stats": variables.get("batch_stats", {}),
    "opt_state": tx.init(params),
  }


def make_source_step(setup: Setup, tx: optax.GradientTransformation) -> Callable:
  """ERM on the source training split (BatchNorm in training mode)."""
  cfg = setup.config.source

  def step(state, step, x, y):
    key = jax.random.fold_in(setup.key("source"), step + 1)
    idx = jax.random.randint(key, (cfg.batch_size,), 0, y.shape[0])
    xb = mesh_lib.constrain_batch(x[idx], setup.mesh)

    def loss(logits):
      return core.losses.cross_entropy(logits, y[idx]).mean()

    state, value = steps.supervised_update(state, setup.source_model, tx, xb, loss, train=True)
    return state, {"loss": value}

  return stages.bind(jax.jit(step, donate_argnums=0), setup.x_source, setup.y_source)


def pretrained_source(setup: Setup, workdir: str, writer) -> dict:
  """The source model's {'params', 'batch_stats'}: trained (stage `source`) or loaded."""
  config = setup.config
  if setup.source_variables is not None:
    return mesh_lib.replicate(setup.source_variables, setup.mesh)
  tx = optax.adam(config.source.lr)
  state = init_source(setup, tx)
  if config.model.source_checkpoint:
    template = {"params": state["params"], "batch_stats": state["batch_stats"]}
    variables = load_source_checkpoint(config.model.source_checkpoint, template)
    return mesh_lib.replicate(variables, setup.mesh)
  state = mesh_lib.replicate(state, setup.mesh)
  state = stages.run_stage(
    setup.config,
    workdir,
    "source",
    make_source_step(setup, tx),
    state,
    config.source.steps,
    writer=writer,
    stage_fields=STAGE_FIELDS,
  )
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


# ----------------------------------------------------------------------------
# Stage 2: the relationships (after calibration)
# ----------------------------------------------------------------------------


def relationships_stage(
  setup: Setup, workdir: str, probs_train: np.ndarray, probs_val: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, dict], dict[str, dict]]:
  """The relationships the variants use, from calibrated source probabilities on target data.

  Args:
    setup: the run's Setup.
    workdir: where the heat maps go (`relationship_<kind>.png`).
    probs_train: [N_t, C_s] calibrated source probabilities of the target training subset.
    probs_val: [N_v, C_s] the same on the target validation split.

  Returns:
    (kind -> [C_t, C_s] relationship, kind -> its results.json entry (matrix, heat map,
    diagnostics on validation), the reverse approach's choices under `selection`).
  """
  config, task = setup.config, setup.task
  # Diagnostics use the validation split only (the test split is for the final numbers).
  labels_pool = np.concatenate([task.target_train.y, task.target_val.y])
  prior = np.bincount(labels_pool, minlength=setup.num_target_classes) / len(labels_pool)
  kinds = [k for k in RELATIONSHIPS if f"co_tuning_{k}" in config.variants]
  relationships, info, selection = {}, {}, {}
  for kind in kinds:
    r, chosen = compute_relationship(
      kind,
      probs_train,
      task.target_train.y,
      probs_val,
      task.target_val.y,
      setup.num_target_classes,
      max_iter=config.co_tuning.reverse_max_iter,
    )
    relationships[kind] = r
    if chosen:
      selection[f"relationship_{kind}"] = chosen
    heatmap = f"relationship_{kind}.png"
    if jax.process_index() == 0:
      save_heatmap(
        workdir_lib.as_path(workdir) / heatmap,
        r,
        task.target_names,
        task.source_names,
        title=f"p(y_s | y_t), {kind} (rate {config.data.sampling_rate:g}, seed {config.seed})",
      )
    info[kind] = {
      "matrix": np.round(r, 6).tolist(),
      "heatmap": heatmap,
      "source_head_accuracy_on_target_val": relationship_accuracy(
        r, probs_val, task.target_val.y, prior
      ),
      **relationship_peakedness(r),
    }
  return relationships, info, selection


# ----------------------------------------------------------------------------
# Stage 3: fine-tuning, each variant selected on the target validation split
# ----------------------------------------------------------------------------


def select_variant(
  setup: Setup, workdir: str, variant: str, *, predict: Callable, **finetune_kwargs
) -> tuple[PyTree, dict, list[dict]]:
  """Fine-tunes `variant` once per candidate of its grid; keeps the best on validation.

  Args:
    setup: the run's Setup.
    workdir: the run's directory.
    variant: one of VARIANTS.
    predict: `make_target_predict(setup)`.
    **finetune_kwargs: `finetune_variant`'s source, start, relationships, step_fn, tx, writer.

  Returns:
    (the chosen candidate's state, its choice {hyper-parameters, 'val_accuracy'}, every
    candidate's choice in grid order). Ties go to the earlier candidate.
  """
  grid = candidates(setup.config, variant)
  best_state, tried = None, []
  for i, candidate in enumerate(grid):
    stage = variant if len(grid) == 1 else candidate_stage(variant, candidate)
    state = finetune_variant(
      setup, workdir, variant, stage=stage, candidate=candidate, **finetune_kwargs
    )
    tried.append({**candidate, "val_accuracy": validation_accuracy(setup, predict, state)})
    # Only the best state so far is kept (a grid of large models need not fit in memory).
    if stages.choose({j: t["val_accuracy"] for j, t in enumerate(tried)}) == i:
      best_state = state
  best = stages.choose({i: t["val_accuracy"] for i, t in enumerate(tried)})
  return best_state, dict(tried[best]), tried


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md.

  `setup` (from `make_setup(config)`) may be passed when the caller already
  built it to check the inputs.
  """
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  task = setup.task
  _log_task(task)
  writer = metrics_lib.MetricWriter(workdir)

  # 1. The source model; 2. its calibration on held-out source data, the relationships.
  source = pretrained_source(setup, workdir, writer)
  logits_fn = make_logits_fn(setup)
  calibration = calibrate(setup, logits_fn, source)
  t = calibration["temperature"]
  relationships, relationship_info, selection = relationships_stage(
    setup,
    workdir,
    calibrated_probs(logits_fn, source, task.target_train.x, t),
    calibrated_probs(logits_fn, source, task.target_val.x, t),
  )

  # 3. Fine-tuning: every variant from the same starting point, once per candidate.
  tx = make_optimizer(config)
  kwargs = finetune_kwargs(setup, source, relationships, tx, writer)
  predict = make_target_predict(setup)
  metrics, per_example, tried = {}, {}, {}
  for variant in config.variants:
    state, selection[variant], tried[variant] = select_variant(
      setup, workdir, variant, predict=predict, **kwargs
    )
    # 4. Evaluation of the chosen candidate on the target test split.
    result, outcomes = evaluate_target_outcomes(setup, predict, state)
    metrics[variant] = {task.target_domain: result, "mean": {"accuracy": result["accuracy"]}}
    per_example[variant] = {task.target_domain: outcomes}
  writer.close()
  return {
    **_run_header(setup),
    "source_calibration": calibration,
    "relationships": relationship_info,
    "metrics": metrics,
    "selection": selection,
    "selection_candidates": tried,
    results_lib.PER_EXAMPLE: per_example,
  }


def _log_task(task: Task) -> None:
  logging.info(
    "co_tuning: source %s %s, target %s %s: %d train / %d val / %d test",
    task.source_domain or "(checkpoint)",
    task.source_names,
    task.target_domain,
    task.target_names,
    len(task.target_train.y),
    len(task.target_val.y),
    len(task.target_test.y),
  )


def _run_header(setup: Setup) -> dict:
  """The results' description of the run: method, data, class names, example counts."""
  config, task = setup.config, setup.task
  return {
    "method": "co_tuning",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "source_domains": [task.source_domain] if task.source_domain else [],
    "target_domains": [task.target_domain],
    "source_classes": list(task.source_names),
    "target_classes": list(task.target_names),
    "sampling_rate": float(config.data.sampling_rate),
    "num_examples": {
      "source_train": 0 if task.source_train is None else len(task.source_train.y),
      "target_train": len(task.target_train.y),
      "target_val": len(task.target_val.y),
      "target_test": len(task.target_test.y),
    },
    "source_model": setup.source_info or {"checkpoint": config.model.source_checkpoint},
  }
