"""Co-Tuning's fine-tuning: the variants, their loss and the one compiled step they share.

Every variant starts from the pre-trained backbone F and source head G with the same new
target head H and runs the official recipe (SGD, Nesterov momentum, weight decay, lr for F
and G and `head_lr_mult` × lr for H, a step decay); they differ only in the arguments of
the step:

- `fine_tune`: CE(H(F(x)), y_t) (G unused);
- `l2_sp`: CE + α/2·||θ_F − θ_F⁰||² + β/2·||θ_H||² instead of weight decay (Li et al.,
  ICML 2018; `core.losses.l2_sp_penalty`);
- `co_tuning_<kind>`: CE + λ·soft-CE(G(F(x)), R[y_t]) with relationship R of that kind
  (`core.category_mapping.co_tuning_loss`).

A variant's candidates (learning rate, × λ or α) come from `selection`; a learning-rate
candidate scales the update, which with SGD equals scaling every group's learning rate,
so a grid compiles one step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_adapt import core, models
from moe_adapt.methods.co_tuning_checks import relationship_kind
from moe_adapt.methods.co_tuning_data import Setup
from moe_adapt.train import evaluation, stages
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import results as results_lib

PyTree = Any


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and per-group learning rates, as in the official code.

  Groups: the backbone and the source head at `finetune.lr`, the new target head at
  `head_lr_mult` × lr; each × `lr_decay` after `lr_decay_at` × steps. The weight decay
  (added to the gradient before momentum, like PyTorch's SGD) is an injected
  hyperparameter, so variants set it in their optimiser state (`set_weight_decay`)
  without recompiling the step.
  """
  cfg = config.finetune
  boundary = max(1, round(cfg.lr_decay_at * cfg.steps))

  def group(lr: float) -> optax.GradientTransformation:
    schedule = optax.piecewise_constant_schedule(lr, {boundary: cfg.lr_decay})

    def sgd(learning_rate, weight_decay):
      return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
      )

    return optax.inject_hyperparams(sgd)(learning_rate=schedule, weight_decay=cfg.weight_decay)

  def labels(params):
    return {k: "head" if k == "target_head" else "base" for k in params}

  return optax.multi_transform(
    {"base": group(cfg.lr), "head": group(cfg.lr * cfg.head_lr_mult)}, labels
  )


def set_weight_decay(opt_state: PyTree, weight_decay: float) -> PyTree:
  """The optimiser state of `make_optimizer` with another weight decay."""
  return optax.tree_utils.tree_set(opt_state, weight_decay=jnp.float32(weight_decay))


def init_target_head(setup: Setup, feature_dim: int) -> dict:
  """The new target head: weights ~ N(0, head_init_std²), zero bias (official init)."""
  std = setup.config.finetune.head_init_std
  kernel = std * jax.random.normal(
    setup.key("target_head"), (feature_dim, setup.num_target_classes), jnp.float32
  )
  return {"head": {"kernel": kernel, "bias": jnp.zeros((setup.num_target_classes,), jnp.float32)}}


def variant_settings(config, variant: str, candidate: Mapping[str, float] | None = None) -> dict:
  """Loss coefficients, weight decay, lr scale and relationship kind of a variant.

  `candidate` (one of `candidates(config, variant)`) overrides the configured learning
  rate, λ (`trade_off`) or L2-SP's α (`alpha`); `lr_scale` is its lr / `finetune.lr`.
  """
  cfg = config
  candidate = dict(candidate or {})
  settings = {
    "trade_off": 0.0,
    "l2sp_alpha": 0.0,
    "l2sp_beta": 0.0,
    "lr_scale": candidate.get("lr", cfg.finetune.lr) / cfg.finetune.lr,
    "weight_decay": cfg.finetune.weight_decay,
    "relationship": None,
  }
  if variant == "l2_sp":
    # The L2-SP penalty replaces weight decay: α toward θ⁰ on the backbone, β on the head.
    alpha = candidate.get("alpha", cfg.l2_sp.alpha)
    settings.update(l2sp_alpha=alpha, l2sp_beta=cfg.l2_sp.beta, weight_decay=0.0)
  elif relationship_kind(variant):
    settings.update(
      trade_off=candidate.get("trade_off", cfg.co_tuning.trade_off),
      relationship=relationship_kind(variant),
    )
  return settings


def candidates(config, variant: str) -> list[dict[str, float]]:
  """The hyper-parameters a variant is selected from on the target validation split.

  Every variant: each learning rate of `selection.lr_grid` (the same grid for all); crossed
  with `selection.trade_off_grid` for Co-Tuning and `selection.alpha_grid` for L2-SP. An
  empty grid stands for the configured value alone.
  """
  sel = config.selection
  lrs = tuple(float(v) for v in sel.lr_grid) or (float(config.finetune.lr),)
  if variant == "l2_sp":
    name, values = "alpha", tuple(sel.alpha_grid) or (config.l2_sp.alpha,)
  elif relationship_kind(variant):
    name, values = "trade_off", tuple(sel.trade_off_grid) or (config.co_tuning.trade_off,)
  else:
    return [{"lr": lr} for lr in lrs]
  return [{"lr": lr, name: float(v)} for lr in lrs for v in values]


def candidate_stage(variant: str, candidate: Mapping[str, float]) -> str:
  """The stage (checkpoint folder) name of one candidate, e.g. `l2_sp_lr0.01_alpha0.1`."""
  return "_".join([variant, *(f"{k}{v:g}" for k, v in candidate.items())])


def make_finetune_step(setup: Setup, tx: optax.GradientTransformation) -> Callable:
  """`jitted(state, step, x, y, relationship, anchor, coefs)`, shared by every variant.

  state: {'params': {'backbone', 'source_head', 'target_head'}, 'batch_stats', 'opt_state'};
  relationship: [C_t, C_s]; anchor: the pre-trained backbone params (L2-SP's θ⁰);
  coefs: {'trade_off', 'l2sp_alpha', 'l2sp_beta', 'lr_scale'} float32 scalars. The update
  is scaled by lr_scale: with SGD (momentum on the raw gradient, as PyTorch's) that is the
  same as every group's learning rate × lr_scale, so a learning-rate grid compiles once.
  """
  cfg = setup.config.finetune
  src, tgt = setup.source_model, setup.target_model

  def step(state, step, x, y, relationship, anchor, coefs):
    key = jax.random.fold_in(setup.key("finetune"), step)
    idx = jax.random.randint(key, (cfg.batch_size,), 0, y.shape[0])
    xb, yb = mesh_lib.constrain_batch(x[idx], setup.mesh), y[idx]

    def loss_fn(params):
      variables = {"params": {"backbone": params["backbone"]}, "batch_stats": state["batch_stats"]}
      feats, updates = src.apply(
        variables, xb, train=True, mutable=["batch_stats"], method=models.Classifier.features
      )
      classify = models.Classifier.classify
      target_logits = tgt.apply({"params": {"head": params["target_head"]}}, feats, method=classify)
      source_logits = src.apply({"params": {"head": params["source_head"]}}, feats, method=classify)
      per_example = core.category_mapping.co_tuning_loss(
        target_logits, source_logits, yb, relationship, trade_off=coefs["trade_off"]
      )
      # L2-SP: toward the pre-trained backbone, toward 0 on the new head.
      penalty = core.losses.l2_sp_penalty(params["backbone"], anchor, alpha=coefs["l2sp_alpha"])
      penalty += core.losses.l2_sp_penalty(params["target_head"], alpha=coefs["l2sp_beta"])
      ce = core.losses.cross_entropy(target_logits, yb).mean()
      # Backbones without BatchNorm (e.g. the MLP on text embeddings) return no statistics.
      aux = (updates.get("batch_stats", state["batch_stats"]), ce, penalty)
      return per_example.mean() + penalty, aux

    (loss, (stats, ce, penalty)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    updates = jax.tree.map(lambda u: coefs["lr_scale"] * u, updates)
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "batch_stats": stats, "opt_state": opt_state}
    return new, {"loss": loss, "target_ce": ce, "penalty": penalty}

  return jax.jit(step, donate_argnums=0)


def finetune_start(setup: Setup, source: PyTree) -> dict:
  """Where every variant starts: {'backbone', 'source_head'} pre-trained, a new 'target_head'.

  Args:
    setup: the run's Setup (its target model sets the new head's size C_t).
    source: the source model's {'params': {'backbone', 'head'}, 'batch_stats'}.
  """
  feature_dim = setup.source_model.apply(
    source,
    jnp.zeros((1, *setup.task.input_shape), jnp.float32),
    train=False,
    method=models.Classifier.features,
  ).shape[-1]
  return {
    "backbone": source["params"]["backbone"],
    "source_head": source["params"]["head"],
    "target_head": init_target_head(setup, feature_dim)["head"],
  }


def finetune_kwargs(
  setup: Setup, source: PyTree, relationships: Mapping[str, np.ndarray], tx, writer
) -> dict:
  """`finetune_variant`'s keyword arguments shared by every variant of `setup`: the source
  model, the common start (`finetune_start`), the relationships, the step and optimiser
  (`make_finetune_step(setup, tx)`, `tx` of `make_optimizer`) and the metric writer."""
  return {
    "source": source,
    "start": finetune_start(setup, source),
    "relationships": relationships,
    "step_fn": make_finetune_step(setup, tx),
    "tx": tx,
    "writer": writer,
  }


def _step_arguments(
  setup: Setup, settings: Mapping, relationships: Mapping[str, np.ndarray], source: PyTree
) -> tuple:
  """(relationship [C_t, C_s], anchor, coefs) of a variant's step, replicated on the mesh.

  Variants without a relationship get a uniform one (multiplied by λ = 0 in the loss).
  """
  kind = settings["relationship"]
  rep = mesh_lib.replicated(setup.mesh)
  uniform = np.full(
    (setup.num_target_classes, setup.num_source_classes), 1.0 / setup.num_source_classes, np.float32
  )
  relationship = jax.device_put(relationships[kind] if kind else uniform, rep)
  anchor = jax.device_put(source["params"]["backbone"], rep)
  coefs = jax.device_put(
    {k: np.float32(settings[k]) for k in ("trade_off", "l2sp_alpha", "l2sp_beta", "lr_scale")},
    rep,
  )
  return relationship, anchor, coefs


def finetune_variant(
  setup: Setup,
  workdir: str,
  variant: str,
  *,
  source: PyTree,
  start: PyTree,
  relationships: Mapping[str, np.ndarray],
  step_fn: Callable,
  tx: optax.GradientTransformation,
  writer,
  stage: str | None = None,
  candidate: Mapping[str, float] | None = None,
) -> PyTree:
  """Runs (or resumes) the fine-tuning stage of one variant; returns its final state.

  Args:
    setup: the run's Setup (its target training split is what is fine-tuned on).
    workdir: the run's directory.
    variant: one of VARIANTS; a `co_tuning_<kind>` variant needs `relationships[kind]`.
    source: the pre-trained {'params', 'batch_stats'} (BatchNorm statistics, L2-SP anchor).
    start: `finetune_start(setup, source)`; left intact (the stage works on copies).
    relationships: kind -> [C_t, C_s] relationship.
    step_fn, tx: `make_finetune_step(setup, tx)` and `make_optimizer(config)`.
    writer: the metric writer.
    stage: the stage (checkpoint folder) name; default the variant's name.
    candidate: hyper-parameters overriding the config's (see `variant_settings`).

  Returns:
    {'params': {'backbone', 'source_head', 'target_head'}, 'batch_stats', 'opt_state'}.
  """
  settings = variant_settings(setup.config, variant, candidate)
  arrays = _step_arguments(setup, settings, relationships, source)
  state = {
    "params": start,
    "batch_stats": source["batch_stats"],
    "opt_state": set_weight_decay(tx.init(start), settings["weight_decay"]),
  }
  # Copies: donation inside the loop must not invalidate the shared starting point.
  state = jax.tree.map(jnp.copy, mesh_lib.replicate(state, setup.mesh))
  bound = stages.bind(step_fn, setup.x_target, setup.y_target, *arrays)
  return stages.run_stage(
    setup.config,
    workdir,
    stage or variant,
    bound,
    state,
    setup.config.finetune.steps,
    writer=writer,
    stage_fields={},  # fine-tuning stages depend on the seed: never shared
  )


def make_target_predict(setup: Setup) -> Callable:
  """`(state, x [N, ...]) -> target-head probabilities [N, C_t]`, eval mode."""
  src, tgt = setup.source_model, setup.target_model

  @jax.jit
  def batch_fn(params, stats, xb):
    variables = {"params": {"backbone": params["backbone"]}, "batch_stats": stats}
    feats = src.apply(variables, xb, train=False, method=models.Classifier.features)
    logits = tgt.apply(
      {"params": {"head": params["target_head"]}}, feats, method=models.Classifier.classify
    )
    return jax.nn.softmax(logits, axis=-1)

  def predict(state, x: np.ndarray) -> np.ndarray:
    fn = functools.partial(batch_fn, state["params"], state["batch_stats"])
    return evaluation.map_batched(fn, x, setup.config.eval_batch_size)

  return predict


def evaluate_target_outcomes(setup: Setup, predict: Callable, state: PyTree) -> tuple[dict, dict]:
  """`evaluate_target`'s metrics and the per-example outcomes on the target test split."""
  test = setup.task.target_test
  probs = predict(state, test.x)
  outcomes = results_lib.outcomes(probs, test.y)
  out = {
    "accuracy": results_lib.accuracy(outcomes),
    "ece": float(
      core.calibration.expected_calibration_error(
        probs, test.y, num_bins=setup.config.calibration.num_bins
      )
    ),
  }
  if len(setup.task.target_val.y):
    out["val_accuracy"] = validation_accuracy(setup, predict, state)
  return out, outcomes


def validation_accuracy(setup: Setup, predict: Callable, state: PyTree) -> float:
  """Accuracy of the target head on the fixed target validation split."""
  val = setup.task.target_val
  return float(np.mean(np.argmax(predict(state, val.x), -1) == val.y))


def evaluate_target(setup: Setup, predict: Callable, state: PyTree) -> dict:
  """Accuracy and ECE of the target head on the target test (and val) split."""
  return evaluate_target_outcomes(setup, predict, state)[0]
