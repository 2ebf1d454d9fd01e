"""MUKA / MUKI with fine-tuned MiniLM teachers and student (`configs/muka.py:newsgroups_ft`).

The papers' premises (issue 21): teachers are a pre-trained language model fine-tuned on
disjoint label sets, with dropout in every transformer layer, so that Monte-Carlo dropout
measures their uncertainty; the student starts from the same pre-trained model, learns
from an unlabelled transfer set the teachers never saw, and its checkpoint is chosen on a
small labelled validation set. `config.method = 'muka_ft'`; results.json says method
'muka' (the same variants and tables). Everything not listed below is `methods.muka`'s
(integration, the variants' targets and loss, one compiled student step, evaluation).

Data (one text benchmark, one domain, e.g. 20 Newsgroups with all 20 labels): in the
train split, the first `data.teacher_per_class` texts of each class are the teachers'
labelled training texts, the next `data.train_per_class` the transfer set (labels
ignored, except by `oracle`): the two are disjoint by construction. The val split gives
the student's checkpoint selection (`data.val_per_class` per class), the test split the
evaluation (`data.test_per_class`).

Models: the encoder (`model.encoder`: 'minilm' or 'tiny_random', `models.encoders`) with
its top `model.train_layers` blocks and a new head trained (`models.split_text_classifier`):
the lower blocks are frozen, their hidden states computed once (dropout off) and cached,
and every teacher and the student train the top blocks with dropout on in them.

Stages:

1. the lower pass: packed hidden states of the teachers' texts, the transfer, val and test
   sets, cached as `hidden-<key>.npz` (in `stage_cache` when set, else the workdir), the key
   covering the data and the encoder;
2. `teacher_<k>`: teacher k (the pretrained top blocks + a new head over its classes)
   trained by CE on its classes' texts; shared by a sweep's runs via the stage cache;
3. scores over the transfer set, computed once and cached (`scores-<key>.npz` in the stage
   cache, else `<workdir>/confidences.npz`): `mc` = 1 − normalised entropy of the mean of S
   softmaxes of the WHOLE network (embeddings to head) with dropout on in every layer, the
   S passes vmapped (`core.routing.mc_dropout_probs`) over batches of `model.batch_size`
   texts; `single` and the deterministic logits from the dropout-off network. The MC masks
   come from `teachers.seed`, so scores, like teachers, are the same in every run;
4. students (`muka.train_students`), all starting from the pretrained top blocks and one
   new head (key of the run's seed), with the same batch order; `student.select_checkpoints`
   candidates scored on the val split, the choice under results.json's `selection`;
5. evaluation as `methods.muka`, plus `diagnostics`: how well the teachers' confidences
   find the teacher that owns the gold label (MC and single pass).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from moe_adapt import core
from moe_adapt.methods import muka, muka_stages
from moe_adapt.methods import muka_setup as setup_lib
from moe_adapt.methods.muka_ft_setup import (
  SCORE_FIELDS,
  TEACHER_FIELDS,
  FtSetup,
  cached,
  make_setup,
  validate_config,
  with_hidden,
)
from moe_adapt.models import split_text_classifier as split_lib
from moe_adapt.train import evaluation, stages
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib

PyTree = Any

# ----------------------------------------------------------------------------
# Teachers and their scores
# ----------------------------------------------------------------------------


def init_top(setup: FtSetup, model: split_lib.TopClassifier, key: jax.Array, tx) -> PyTree:
  """{'params', 'batch_stats', 'opt_state'}: the pretrained top blocks and a new head."""
  state = setup_lib.init_model(model, key, setup.input_shape, tx)
  # Copies: the training steps donate their state, the pretrained arrays must survive.
  top = jax.tree.map(jnp.copy, split_lib.top_params(setup.encoder_params, setup.start))
  params = {**state["params"], "encoder": top}
  return {**state, "params": params, "opt_state": tx.init(params)}


def train_teachers(setup: FtSetup, workdir: str, writer) -> list[dict]:
  """Stages `teacher_<k>`: each teacher's {'params', 'batch_stats'} (top blocks + head)."""
  cfg = setup.config.teachers
  rep = mesh_lib.replicated(setup.mesh)
  teachers = []
  for k in range(setup.num_teachers):
    tx = optax.adam(cfg.lr)
    state = init_top(setup, setup.teacher_models[k], setup.key("teacher", k), tx)
    x = jax.device_put(setup.teacher_pool.x[setup.teacher_examples(k)], rep)
    y = jax.device_put(setup.teacher_labels(k), rep)
    step = stages.bind(muka_stages.make_teacher_step(setup, k, tx), x, y)
    state = stages.run_stage(
      setup.config,
      workdir,
      f"teacher_{k}",
      step,
      mesh_lib.replicate(state, setup.mesh),
      cfg.steps,
      writer=writer,
      stage_fields={f"teacher_{k}": TEACHER_FIELDS},
    )
    teachers.append({"params": state["params"], "batch_stats": state["batch_stats"]})
  return teachers


@functools.partial(jax.jit, static_argnums=(0, 1))
def mc_mean_probs(model, num_samples: int, params: PyTree, tokens: jax.Array, key: jax.Array):
  """Mean [B, C] of `num_samples` softmaxes of the whole network with dropout on everywhere.

  Args:
    model: a `text_classifier.TextClassifier` (`split_text_classifier.full_classifier`).
    num_samples: S; the passes are vmapped (`core.routing.mc_dropout_probs`): pass i uses
      `jax.random.split(key, S)[i]`.
    params: its params (`split_text_classifier.full_params`).
    tokens: int32 [B, 2, T] ids and masks.
    key: the PRNG key of this batch.
  """

  def apply_fn(p, x, drop_key):
    return model.apply({"params": p}, x[:, 0], x[:, 1], train=True, rngs={"dropout": drop_key})

  return core.routing.mc_dropout_probs(apply_fn, params, tokens, key, num_samples=num_samples).mean(
    axis=0
  )


@functools.partial(jax.jit, static_argnums=0)
def _logits_batch(model, variables: dict, xb: jax.Array) -> jax.Array:
  return model.apply(variables, xb, train=False)


def compute_scores(setup: FtSetup, teachers) -> dict[str, np.ndarray]:
  """Teacher logits and confidences over the transfer set (`muka.compute_scores`' keys).

  'logits_<k>' [N, C_k] come from the dropout-off network (the top blocks on the cached
  hidden states: the same function as the whole network); 'mc' [N, K] from S passes of the
  whole network with dropout in every layer; 'single' [N, K] from the logits at
  muki.kd_temperature.
  """
  cfg = setup.config
  lower = split_lib.lower_params(setup.encoder_params, setup.start)
  tokens, bs, s = setup.tokens["transfer"].x, cfg.model.batch_size, cfg.muki.num_mc_samples
  out, mc, single = {}, [], []
  for k, variables in enumerate(teachers):
    model = setup.teacher_models[k]
    logits = evaluation.map_batched(
      functools.partial(_logits_batch, model, variables), setup.train.x, cfg.eval_batch_size
    )
    full = split_lib.full_classifier(setup.encoder_config, model.num_classes, model.rate)
    params = split_lib.full_params(lower, variables["params"])
    base = jax.random.fold_in(stages.stage_key(cfg.teachers.seed, "mc"), k)
    probs = evaluation.map_batches(
      lambda start, xb, full=full, params=params, base=base: mc_mean_probs(
        full, s, params, xb, jax.random.fold_in(base, start)
      ),
      (tokens,),
      bs,
    )
    out[f"logits_{k}"] = np.asarray(logits, np.float32)
    mc.append(1.0 - np.asarray(core.routing.normalized_entropy(jnp.asarray(probs))))
    det = jax.nn.softmax(jnp.asarray(logits) / cfg.muki.kd_temperature, axis=-1)
    single.append(1.0 - np.asarray(core.routing.normalized_entropy(det)))
  out["mc"] = np.stack(mc, axis=1).astype(np.float32)
  out["single"] = np.stack(single, axis=1).astype(np.float32)
  return out


def teacher_scores(setup: FtSetup, teachers, workdir: str) -> dict[str, np.ndarray]:
  """`compute_scores`, computed once: read back from the stage cache or the workdir."""
  n, k = len(setup.train.y), setup.num_teachers
  expected = {"mc": (n, k), "single": (n, k)}
  expected.update({f"logits_{j}": (n, len(c)) for j, c in enumerate(setup.chunks)})
  return cached(
    setup.config, workdir, "scores", SCORE_FIELDS, lambda: compute_scores(setup, teachers), expected
  )


def diagnostics(setup: FtSetup, scores: dict[str, np.ndarray]) -> dict:
  """How well the teachers' confidences find the teacher that owns the gold label.

  Per score kind ('mc', 'single'), over the transfer set (disjoint label sets):
  `selects_owner` (the most confident teacher owns the label), `confidence_gap` (mean
  confidence of the owning teacher minus the mean of the others'; confidence = 1 −
  normalised entropy, so this is the entropy gap between wrong and right teachers);
  per teacher, its mean confidence on its own classes and on the others'; and per teacher
  `top_prob_on_others`: its mean largest softmax probability on the other teachers'
  classes (how confidently it answers what it cannot know). `routed_accuracy`: the
  accuracy of the most confident teacher's argmax against the transfer labels.
  """
  y, member = setup.train.y, setup.membership() > 0  # [N], [K, C]
  owns = member[:, y].T  # [N, K]
  out = {}
  for kind in ("mc", "single"):
    s = scores[kind]
    best = np.argmax(s, axis=1)
    preds = np.stack(  # [N, K]: each teacher's argmax as a global class
      [
        np.asarray(setup.chunks[k])[np.argmax(scores[f"logits_{k}"], 1)]
        for k in range(setup.num_teachers)
      ],
      axis=1,
    )
    routed = preds[np.arange(len(y)), best]
    own = np.where(owns, s, np.nan)
    other = np.where(owns, np.nan, s)
    out[kind] = {
      "selects_owner": float(np.mean(owns[np.arange(len(y)), best])),
      "confidence_gap": float(np.nanmean(np.nanmean(own, 1) - np.nanmean(other, 1))),
      "routed_accuracy": float(np.mean(routed == y)),
      "confidence_own": [float(v) for v in np.nanmean(own, 0)],
      "confidence_others": [float(v) for v in np.nanmean(other, 0)],
    }
  out["top_prob_on_others"] = [
    float(np.mean(muka_stages.softmax_np(scores[f"logits_{k}"]).max(1)[~owns[:, k]]))
    for k in range(setup.num_teachers)
  ]
  return out


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


def run(config, workdir: str, *, setup: FtSetup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md."""
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  setup = with_hidden(setup, workdir)  # 1. the lower pass (cached)
  logging.info(
    "muka_ft: %d teachers on %s; %d teacher / %d transfer / %d test texts",
    setup.num_teachers,
    setup.chunks,
    len(setup.teacher_pool.y),
    len(setup.train.y),
    len(setup.test.y),
  )
  writer = metrics_lib.MetricWriter(workdir)
  teachers = train_teachers(setup, workdir, writer)  # 2. teachers
  scores = teacher_scores(setup, teachers, workdir)  # 3. their scores (once)

  def init(tx) -> PyTree:  # 4. every student starts here
    return init_top(setup, setup.student_model, setup.key("student_init"), tx)

  metrics, per_example, selection = muka.train_students(
    setup, workdir, writer, teachers, scores, init=init
  )
  writer.close()
  return {
    "method": "muka",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "target_domains": [setup.domain],
    "encoder": config.model.encoder,
    "train_layers": config.model.train_layers,
    "teacher_classes": [[setup.class_names[c] for c in chunk] for chunk in setup.chunks],
    "teacher_labels": [list(chunk) for chunk in setup.chunks],
    "overlap": config.teachers.get("overlap", 0),
    "num_examples": {
      "teacher": len(setup.teacher_pool.y),
      "transfer": len(setup.train.y),
      "val": 0 if setup.val is None else len(setup.val.y),
      "test": len(setup.test.y),
    },
    "confidences": {
      "mc_selects_owner": muka_stages.owner_rate(setup, scores["mc"]),
      "single_selects_owner": muka_stages.owner_rate(setup, scores["single"]),
      "mc_mean": [float(v) for v in scores["mc"].mean(axis=0)],
      "single_mean": [float(v) for v in scores["single"].mean(axis=0)],
    },
    "diagnostics": diagnostics(setup, scores),
    "metrics": metrics,
    "selection": selection,
    results_lib.PER_EXAMPLE: per_example,
  }
