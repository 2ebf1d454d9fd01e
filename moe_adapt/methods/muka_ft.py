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

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from moe_adapt import core, data
from moe_adapt.data import fetch
from moe_adapt.methods import _checks, muka, muka_stages
from moe_adapt.methods import muka_setup as setup_lib
from moe_adapt.models import encoders
from moe_adapt.models import split_text_classifier as split_lib
from moe_adapt.train import artifacts, benchmarks, evaluation, stage_cache, stages
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import workdir as workdir_lib

PyTree = Any

# Variants whose targets use the MC-dropout scores (they need S >= 2 samples).
MC_VARIANTS = ("muki", "hard", "no_margin")
# The config fields the lower pass depends on (its cache key; the val texts are encoded
# only with checkpoint selection).
HIDDEN_FIELDS = ("data", "model.encoder", "model.train_layers", "student.select_checkpoints")
# ... each teacher (stage cache) and the teachers' scores.
TEACHER_FIELDS = (
  "data.benchmark",
  "data.options",
  "data.benchmark_seed",
  "data.domain",
  "data.teacher_per_class",
  "model",
  "teachers",
  "num_devices",
)
SCORE_FIELDS = ("data", *TEACHER_FIELDS, "muki.num_mc_samples", "muki.kd_temperature")
PARTS = ("teacher", "transfer", "val", "test")


# ----------------------------------------------------------------------------
# Config and data
# ----------------------------------------------------------------------------


def validate_config(config) -> None:
  """`muka_setup.validate_config` plus the fine-tuned setting's fields; names the field."""
  setup_lib.validate_config(config)
  integer = functools.partial(_checks.integer, config)
  integer("data.teacher_per_class", 1)
  integer("model.train_layers", 1)
  integer("model.batch_size", 1)
  encoders.check_name(config.model.encoder)
  if config.teachers.get("backbone_options", ()):
    raise ValueError(
      f"teachers.backbone_options={tuple(config.teachers.backbone_options)!r} is invalid with "
      "model.encoder (every teacher fine-tunes the same encoder); accepted: ()"
    )
  mc = [v for v in config.variants if v in MC_VARIANTS]
  if mc and config.muki.num_mc_samples < 2:
    raise ValueError(
      f"muki.num_mc_samples={config.muki.num_mc_samples} is invalid with MC-dropout scores "
      f"(variants {', '.join(mc)}): one sample has no spread; accepted: an integer >= 2"
    )


@dataclasses.dataclass(frozen=True)
class FtSetup(setup_lib.Setup):
  """`muka_setup.Setup` of the fine-tuned setting.

  Before `with_hidden` the splits' x are token ids and masks int32 [N, 2, T]; after it,
  packed hidden states float32 [N, T, D + 1] after block `start` (`split_text_classifier`).
  """

  # The teachers' labelled training texts (disjoint from `train`, the transfer set).
  teacher_pool: data.Split | None = None
  # Token ids and masks [N, 2, T] of every part (PARTS; 'val' absent without selection).
  tokens: Mapping[str, data.Split] = dataclasses.field(default_factory=dict)
  encoder_config: Any = None
  encoder_params: PyTree = None
  start: int = 0

  def teacher_examples(self, k: int) -> np.ndarray:
    """Indices into `teacher_pool` of teacher k's classes."""
    return np.flatnonzero(np.isin(self.teacher_pool.y, self.chunks[k]))

  def teacher_labels(self, k: int) -> np.ndarray:
    """int32 [N_k]: teacher k's local labels of `teacher_examples(k)`."""
    local = np.full(self.num_classes, -1, np.int32)
    local[list(self.chunks[k])] = np.arange(len(self.chunks[k]), dtype=np.int32)
    return local[self.teacher_pool.y[self.teacher_examples(k)]]


def disjoint_pools(labels: np.ndarray, num_classes: int, teacher_cap: int, transfer_cap: int):
  """(teachers' indices, transfer indices) into a split: per class, the first `teacher_cap`
  examples for the teachers, the next `transfer_cap` (0 = all the rest) for the transfer set.

  Raises:
    ValueError: naming data.teacher_per_class when a class keeps no transfer example.
  """
  teacher, transfer = [], []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) <= teacher_cap:
      raise ValueError(
        f"data.teacher_per_class={teacher_cap} leaves class {c} ({len(idx)} training texts) "
        "no transfer text; accepted: fewer than each class's training texts"
      )
    teacher.append(idx[:teacher_cap])
    rest = idx[teacher_cap:]
    transfer.append(rest[:transfer_cap] if transfer_cap else rest)
  return np.sort(np.concatenate(teacher)), np.sort(np.concatenate(transfer))


def _token_split(split, idx: np.ndarray | None = None) -> data.Split:
  """A text split's rows `idx` as Split(x = int32 [N, 2, T] ids and masks, y)."""
  if idx is None:
    idx = np.arange(len(split.labels))
  x = np.stack([split.token_ids[idx], split.attention_mask[idx]], axis=1).astype(np.int32)
  return data.Split(x, np.asarray(split.labels[idx], np.int32))


def _first_per_class(labels: np.ndarray, num_classes: int, cap: int, where: str) -> np.ndarray:
  keep = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if not len(idx):
      raise ValueError(f"{where} has no example of class {c}; accepted: every class present")
    keep.append(idx[:cap] if cap else idx)
  return np.sort(np.concatenate(keep))


def _load_encoder(config) -> tuple[Any, PyTree]:
  """(BertConfig, encoder params without pooler) of `model.encoder`."""
  name = config.model.encoder
  data_dir = config.data.options.get("data_dir", "") or None
  minilm_dir = fetch.minilm_dir(data_dir) if name == "minilm" else None
  encoder_config, params, _ = encoders.load(name, minilm_dir)
  return encoder_config, params


def make_setup(config) -> FtSetup:
  """Loads the texts, the encoder and builds the models (the lower pass is `with_hidden`).

  Raises:
    ValueError: naming the field: an unknown domain, more teachers than classes (e.g. a
      `data.options.classes` subset leaving a teacher without classes), a class without
      transfer, val or test texts, too many trained blocks, token ids beyond the vocabulary.
  """
  benchmark = benchmarks.benchmark(config.data)
  if not hasattr(benchmark, "max_len"):
    raise ValueError(
      f"data.benchmark={config.data.benchmark!r} holds no texts; accepted with model.encoder: "
      "a text benchmark (newsgroups, tweets_topics, vader_sentiment)"
    )
  domain = config.data.domain or benchmark.domains[0]
  if domain not in benchmark.domains:
    raise ValueError(
      f"data.domain={domain!r} is not a domain of benchmark {benchmark.name!r}; accepted: "
      f"{', '.join(benchmark.domains)}"
    )
  c = benchmark.num_classes
  try:
    chunks = setup_lib.label_chunks(
      c, config.teachers.num_teachers, overlap=config.teachers.get("overlap", 0)
    )
  except ValueError as e:
    raise ValueError(f"{e} (data.options.classes keeps {c} classes)") from None
  text = benchmark.load(seed=config.data.benchmark_seed)[domain]
  cfg = config.data
  teacher_idx, transfer_idx = disjoint_pools(
    text.train.labels, c, cfg.teacher_per_class, cfg.train_per_class
  )
  tokens = {
    "teacher": _token_split(text.train, teacher_idx),
    "transfer": _token_split(text.train, transfer_idx),
    "test": _token_split(
      text.test, _first_per_class(text.test.labels, c, cfg.test_per_class, f"{domain} (test)")
    ),
  }
  if config.student.select_checkpoints > 1:
    if not len(text.val.labels):
      raise ValueError(
        f"student.select_checkpoints={config.student.select_checkpoints} needs labelled "
        f"validation texts, but domain {domain!r} has an empty val split; accepted: 1 or a "
        "benchmark with a val split (data.options.val_fraction > 0)"
      )
    val_idx = _first_per_class(text.val.labels, c, cfg.val_per_class, f"{domain} (val)")
    tokens["val"] = _token_split(text.val, val_idx)
  encoder_config, encoder_params = _load_encoder(config)
  top = max(int(s.x[:, 0].max()) for s in tokens.values())
  if top >= encoder_config.vocab_size:
    raise ValueError(
      f"model.encoder={config.model.encoder!r} has vocab_size={encoder_config.vocab_size}, but "
      f"the texts' token ids reach {top}; accepted: an encoder with the tokenizer's vocabulary"
    )
  start = split_lib.check_train_layers(
    encoder_config, config.model.train_layers, field="model.train_layers"
  )

  def classifier(num: int) -> split_lib.TopClassifier:
    return split_lib.TopClassifier(encoder_config, num, start, config.model.dropout)

  mesh = mesh_lib.make_mesh(config.num_devices or None)
  return FtSetup(
    config=config,
    domain=domain,
    class_names=tuple(benchmark.class_names),
    chunks=chunks,
    train=tokens["transfer"],
    test=tokens["test"],
    input_shape=tokens["transfer"].x.shape[1:],
    mesh=mesh,
    teacher_models=tuple(classifier(len(chunk)) for chunk in chunks),
    student_model=classifier(c),
    x_train=None,
    val=tokens.get("val"),
    teacher_pool=tokens["teacher"],
    tokens=tokens,
    encoder_config=encoder_config,
    encoder_params=encoder_params,
    start=start,
  )


def _cached(config, workdir: str, name: str, fields, compute, expected) -> dict[str, np.ndarray]:
  """`artifacts.cached_arrays` in the stage cache (`<name>-<key>.npz`, shared by the runs
  whose `fields` agree) when one is set, else in the workdir (`<name>.npz`)."""
  if config.stage_cache:
    directory = config.stage_cache
    filename = f"{name}-{stage_cache.stage_key(config.to_dict(), fields)}.npz"
  else:
    directory = workdir
    filename = muka.CONFIDENCE_FILE if name == "scores" else f"{name}.npz"
  workdir_lib.as_path(directory).mkdir(parents=True, exist_ok=True)
  return artifacts.cached_arrays(directory, filename, compute, expected_shapes=expected)


def with_hidden(setup: FtSetup, workdir: str) -> FtSetup:
  """Stage 1: `setup` whose splits hold the packed hidden states after block `start`."""
  cfg = setup.config
  lower = split_lib.lower_params(setup.encoder_params, setup.start)
  parts = {p: s for p, s in setup.tokens.items()}
  dim = setup.encoder_config.hidden_size + 1

  def compute() -> dict[str, np.ndarray]:
    logging.info("muka_ft: lower pass over %s texts", {p: len(s.y) for p, s in parts.items()})
    return {
      p: split_lib.lower_hidden(
        setup.encoder_config,
        lower,
        setup.start,
        s.x[:, 0],
        s.x[:, 1],
        batch_size=cfg.model.batch_size,
      )
      for p, s in parts.items()
    }

  expected = {p: (len(s.y), s.x.shape[2], dim) for p, s in parts.items()}
  hidden = _cached(cfg, workdir, "hidden", HIDDEN_FIELDS, compute, expected)
  split = {p: data.Split(hidden[p], parts[p].y) for p in parts}
  return dataclasses.replace(
    setup,
    train=split["transfer"],
    test=split["test"],
    val=split.get("val"),
    teacher_pool=split["teacher"],
    input_shape=hidden["transfer"].shape[1:],
    x_train=jax.device_put(hidden["transfer"], mesh_lib.replicated(setup.mesh)),
  )


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
  return _cached(
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
