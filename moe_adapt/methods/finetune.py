"""Fine-tuning a pretrained transformer with adapters: the `finetune` method and its harness.

The harness (used by `adamix` and `adapter_soup` too) covers one recipe: a pretrained
backbone — MiniLM (`model.kind='minilm'`, weights from `moe-adapt-data fetch minilm`), a
randomly initialised small BERT (`'bert'`, for tests) or a ViT pre-trained inside the
pipeline on source domains (`'vit'`, stage `pretrain`) — gets adapters inserted
(`models.adapters.AdapterConfig`), a new linear head, and is trained on labeled examples
with only the chosen parameters updated (`train`: 'adapters' = adapters + head, 'head',
'all'). Trees of the trainable parameters are what the step differentiates, so a frozen
backbone costs no weight gradients.

The `finetune` method compares, in one run on the same data, the variants

- `full`: every parameter (its own learning rate, `train.lr_full`);
- `head`: the linear head on the frozen backbone (a linear probe);
- `houlsby`, `pfeiffer`: bottleneck adapters (two per block / one per block) + head;
- `lora`: LoRA on `adapter.lora_targets` + head;

paired: the same batches in the same order, the same head initialisation and the same
dropout streams (`variant_key`), so that their differences carry no batch-order noise;
with `data.protocol`:

- 'lodo' (leave-domain-out): train on the training splits of every domain but the
  targets, report accuracy on the targets' test splits;
- 'pooled' (in-domain): train on the training splits of `data.domains` (all by default)
  and report accuracy on each of their test splits.

Results also carry, per variant, the parameter counts ({total, trainable, inference}),
the training cost per step (seconds, measured on a few extra compiled steps) and the
per-example test outcomes (`per_example`, for `launch.collect`'s paired intervals).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_adapt import core, data, models
from moe_adapt.methods import _checks
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import stages

PyTree = Any

MODEL_KINDS = ("minilm", "bert", "vit")
PROTOCOLS = ("lodo", "pooled")
TRAIN_MODES = adapters_lib.TRAIN_MODES
# variant -> (adapter kind, what is trained).
VARIANTS: dict[str, tuple[str, str]] = {
  "full": ("none", "all"),
  "head": ("none", "head"),
  "houlsby": ("houlsby", "adapters"),
  "pfeiffer": ("pfeiffer", "adapters"),
  "lora": ("lora", "adapters"),
}
# Steps timed after training to report the cost of one step.
TIMED_STEPS = 5


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


class Examples(NamedTuple):
  """Labeled examples of one modality.

  Attributes:
    inputs: the model's positional inputs: text (token_ids [N, T] int32, attention_mask
      [N, T] int32); images (x [N, H, W, C] float32,).
    labels: [N] int32.
  """

  inputs: tuple[np.ndarray, ...]
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def take(self, idx: np.ndarray) -> Examples:
    return Examples(tuple(a[idx] for a in self.inputs), self.labels[idx])


def concat_examples(parts: Sequence[Examples]) -> Examples:
  """The examples of `parts` one after the other."""
  if not parts:
    raise ValueError("concat_examples needs at least one part")
  inputs = tuple(np.concatenate(arrays) for arrays in zip(*(p.inputs for p in parts)))
  return Examples(inputs, np.concatenate([p.labels for p in parts]))


@dataclasses.dataclass(frozen=True)
class Task:
  """A benchmark's domains as `Examples` per split.

  Attributes:
    benchmark: the benchmark's name.
    modality: 'text' or 'image'.
    domains: every domain, in the benchmark's order.
    class_names: [C] class names.
    default_targets: the benchmark's default held-out domains.
    train: domain -> Examples of the training split.
    val: domain -> Examples of the validation split.
    test: domain -> Examples of the test split.
  """

  benchmark: str
  modality: str
  domains: tuple[str, ...]
  class_names: tuple[str, ...]
  default_targets: tuple[str, ...]
  train: Mapping[str, Examples]
  val: Mapping[str, Examples]
  test: Mapping[str, Examples]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def pooled(self, split: str, domains: Sequence[str]) -> Examples:
    """The examples of `split` of `domains`, concatenated in the given order."""
    return concat_examples([getattr(self, split)[d] for d in domains])


def load_task(config) -> Task:
  """Loads `config.data.benchmark` (with `data.options`, '' = default) as a `Task`."""
  cfg = config.data
  options = {k: v for k, v in cfg.options.to_dict().items() if v != ""}
  bench = data.get_benchmark(cfg.benchmark, **options)
  loaded = bench.load(seed=cfg.benchmark_seed)
  text = hasattr(bench, "max_len")

  def examples(split) -> Examples:
    if text:
      return Examples((split.token_ids, split.attention_mask), split.labels.astype(np.int32))
    return Examples((split.x.astype(np.float32),), split.y.astype(np.int32))

  parts = {
    name: {d: examples(getattr(s, name)) for d, s in loaded.items()}
    for name in ("train", "val", "test")
  }
  # Fixed subsets (the same for every seed and method): test examples per domain, and for
  # the converged regime a subsampled training set and its dev set (validation split).
  caps = {
    "test": config.eval.max_examples,
    "train": config.train.get("subsample", 0),
    "val": config.train.get("dev_examples", 0),
  }
  for name, cap in caps.items():
    if cap:
      rng = np.random.default_rng(cfg.benchmark_seed)
      parts[name] = {
        d: ex.take(np.sort(rng.permutation(len(ex))[:cap])) if len(ex) > cap else ex
        for d, ex in parts[name].items()
      }
  return Task(
    benchmark=bench.name,
    modality="text" if text else "image",
    domains=tuple(bench.domains),
    class_names=tuple(bench.class_names),
    default_targets=tuple(bench.default_targets),
    **parts,
  )


# ----------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------


def validate_harness_config(config) -> None:
  """Checks the fields the harness reads (data, model, adapter, train, pretrain, ...)."""
  for name in ("seed", "data.benchmark_seed", "num_devices", "eval.max_examples"):
    _checks.integer(config, name, 0)
  for name in (
    "train.steps",
    "train.batch_size",
    "eval_batch_size",
    "checkpoint_every",
    "log_every",
  ):
    _checks.integer(config, name, 1)
  for name in ("train.epochs", "train.subsample", "train.dev_examples"):
    if name.split(".")[1] in config.train:
      _checks.integer(config, name, 0)
  for name in ("train.lr", "train.lr_full"):
    _checks.number(config, name, low=0.0)
  _checks.number(config, "train.warmup_fraction", low=0.0, high=1.0, low_open=False)
  _checks.number(config, "train.weight_decay", low=0.0, low_open=False)
  _checks.number(config, "model.dropout", low=0.0, high=1.0, low_open=False)
  _checks.choice(config, "model.kind", MODEL_KINDS)
  _checks.compute_dtype(config)
  if config.model.kind == "vit":
    _checks.integer(config, "pretrain.steps", 1)
    _checks.integer(config, "pretrain.batch_size", 1)
    _checks.number(config, "pretrain.lr", low=0.0)
  try:
    adapter_config(config, "pfeiffer")
  except (TypeError, ValueError) as e:
    raise ValueError(f"adapter: {e}") from None


def validate_config(config) -> None:
  """Checks every field of the `finetune` method; raises ValueError naming the field."""
  validate_harness_config(config)
  _checks.choice(config, "data.protocol", PROTOCOLS)
  _checks.names(config, "variants", tuple(VARIANTS))
  _checks.runs_baseline(config, "variants", "full")  # launch.collect.BASELINES["finetune"]


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def adapter_config(config, kind: str, **overrides: Any) -> adapters_lib.AdapterConfig:
  """`AdapterConfig(kind, **config.adapter, **overrides)`."""
  fields = dict(config.adapter.to_dict())
  fields.pop("kind", None)  # a method may keep its adapter kind there; `kind` wins
  fields.update(overrides)
  return adapters_lib.AdapterConfig(kind=kind, **fields)


@dataclasses.dataclass(frozen=True)
class Setup:
  """The task, the mesh and the backbone's description, shared by every stage."""

  config: Any
  task: Task
  mesh: jax.sharding.Mesh
  backbone_config: Any  # bert.BertConfig (text) or dict of ViT options (image)
  # Pretrained encoder params (text) or None (ViT: produced by the `pretrain` stage).
  pretrained: PyTree | None

  @property
  def backbone_key(self) -> str:
    """The top-level params key of the backbone, 'encoder' (text) or 'backbone' (ViT)."""
    return "encoder" if self.task.modality == "text" else "backbone"

  def key(self, stage: str, index: int = 0) -> jax.Array:
    """The PRNG key of a stage (by name), fold in `index` (e.g. a domain number)."""
    digest = zlib.crc32(stage.encode()) % (2**31)
    key = jax.random.fold_in(jax.random.key(self.config.seed), digest)
    return jax.random.fold_in(key, index)

  def constrain(self, x: jax.Array) -> jax.Array:
    """Shards the leading (batch) axis over the mesh when it divides evenly."""
    if self.mesh.size == 1 or x.shape[0] % self.mesh.size:
      return x
    spec = P("data", *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def make_setup(config) -> Setup:
  """Loads the data and the pretrained encoder; every data-dependent check happens here."""
  task = load_task(config)
  kind = config.model.kind
  if (kind == "vit") != (task.modality == "image"):
    raise ValueError(
      f"model.kind={kind!r} does not fit benchmark {task.benchmark!r} ({task.modality}); "
      f"accepted: {'vit' if task.modality == 'image' else 'minilm, bert'}"
    )
  pretrained = None
  init = config.model.get("init", "")
  if init:
    backbone_config, pretrained = _encoder_from_checkpoint(init, task)
  elif kind == "minilm":
    data_dir = config.data.options.get("data_dir", "") or None
    backbone_config, pretrained, _ = models.bert.load_minilm(data.fetch.minilm_dir(data_dir))
  elif kind == "bert":
    backbone_config = models.bert.BertConfig(**config.model.options.to_dict())
  else:
    backbone_config = dict(config.model.options.to_dict())
  setup = Setup(
    config=config,
    task=task,
    mesh=mesh_lib.make_mesh(config.num_devices or None),
    backbone_config=backbone_config,
    pretrained=pretrained,
  )
  hidden = (
    backbone_config.get("hidden_size", models.vit.ViT.hidden_size)
    if isinstance(backbone_config, Mapping)
    else backbone_config.hidden_size
  )
  for name in ("bottleneck", "lora_rank"):
    adapters_lib.check_width(f"adapter.{name}", config.adapter[name], hidden, "the hidden size")
  # Domain fields are checked here, before the CLI writes anything into the workdir, so a
  # corrected command can reuse it.
  if "protocol" in config.data:
    protocol_domains(setup)
  if kind == "vit":
    pretrain_domains(setup)
  return setup


# Encoders that `model.init` can start text tasks from: their WordPiece vocabulary can be the
# benchmarks' (MiniLM's, i.e. bert-base-uncased's); RoBERTa's BPE ids would not match.
INIT_ARCHITECTURES = ("bert", "distilbert")


def _encoder_from_checkpoint(init: str, task: Task) -> tuple[models.bert.BertConfig, PyTree]:
  """(BertConfig, encoder params) of the HF checkpoint directory `model.init`, checked
  against the task: text only, a BERT-family encoder whose vocabulary holds every token id."""
  if task.modality != "text":
    raise ValueError(
      f"model.init={init!r}: starting from a checkpoint is supported for text benchmarks "
      f"(BERT-family encoders); {task.benchmark!r} is {task.modality}"
    )
  checkpoint = models.checkpoints.load_checkpoint(init)
  if checkpoint.architecture not in INIT_ARCHITECTURES:
    raise ValueError(
      f"model.init={init!r} holds a {checkpoint.architecture!r} checkpoint; accepted for "
      f"text benchmarks: {', '.join(INIT_ARCHITECTURES)} (the benchmarks' token ids are "
      "bert-base-uncased WordPiece ids)"
    )
  config = checkpoint.module.config
  largest = max(
    int(np.max(ex.inputs[0]))
    for split in (task.train, task.val, task.test)
    for ex in split.values()
  )
  if largest >= config.vocab_size:
    raise ValueError(
      f"model.init={init!r} has vocab_size={config.vocab_size}, but the benchmark's token ids "
      f"reach {largest}; accepted: a checkpoint with the benchmark tokenizer's vocabulary"
    )
  return config, checkpoint.params


def build_model(setup: Setup, adapter: adapters_lib.AdapterConfig) -> nn.Module:
  """The classifier with `adapter` inserted: `apply(v, *inputs, train=)` -> logits [B, C]."""
  c = setup.config.model
  # model.dtype: the encoder and adapters compute in it; parameters, optimiser state, the
  # head (float32 logits) and the losses stay float32. None keeps the float32 inputs' dtype.
  dtype = _checks.compute_dtype(setup.config)
  dtype = None if dtype == jnp.float32 else dtype
  if setup.task.modality == "text":
    return models.text_classifier.TextClassifier(
      setup.backbone_config,
      setup.task.num_classes,
      adapter=adapter,
      pooling="mean",
      dropout_rate=c.dropout,
      dtype=dtype,
    )
  options = dict(setup.backbone_config)
  return models.vit.vit_classifier(
    setup.task.num_classes, adapter=adapter, dropout_rate=c.dropout, dtype=dtype, **options
  )


def _dummy_inputs(setup: Setup) -> tuple[jax.Array, ...]:
  first = setup.task.train[setup.task.domains[0]]
  return tuple(jnp.zeros((1, *a.shape[1:]), a.dtype) for a in first.inputs)


def init_params(setup: Setup, model: nn.Module, key: jax.Array, backbone: PyTree | None) -> PyTree:
  """Fresh params of `model` (adapters, head) with the backbone's leaves from `backbone`.

  `backbone` holds the backbone's parameters without adapters (e.g. `setup.pretrained`);
  None keeps the random initialisation.
  """
  params = model.init(key, *_dummy_inputs(setup))["params"]
  params = jax.tree.map(jnp.asarray, params)
  if backbone is None:
    return params
  bk = setup.backbone_key
  own, adapter_leaves = adapters_lib.split_params(params[bk])
  given = dict(backbone)
  if "pooler" in given and "pooler" not in own:
    given.pop("pooler")
  if jax.tree.map(jnp.shape, own) != jax.tree.map(jnp.shape, given):
    raise ValueError(f"pretrained {bk} params do not match the model's {bk}")
  return {**params, bk: adapters_lib.merge_params(given, adapter_leaves)}


def backbone_of(setup: Setup, params: PyTree) -> PyTree:
  """The backbone's own parameters (adapters removed) of a full params tree."""
  return adapters_lib.split_params(params[setup.backbone_key])[0]


def split_trainable(params: PyTree, train: str) -> tuple[PyTree, PyTree]:
  """(frozen, trainable) trees for `train` in 'adapters', 'head', 'all'; merge_params joins."""
  if train == "all":
    return {}, dict(params)
  if train == "head":
    frozen = {k: v for k, v in params.items() if k != adapters_lib.HEAD_KEY}
    return frozen, {adapters_lib.HEAD_KEY: params[adapters_lib.HEAD_KEY]}
  return adapters_lib.split_params(params, include_head=True)


def join(frozen: PyTree, trainable: PyTree) -> PyTree:
  """Inverse of `split_trainable`."""
  return adapters_lib.merge_params(frozen, trainable)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def make_optimizer(steps: int, lr: float, *, warmup_fraction: float, weight_decay: float):
  """AdamW with linear warm-up over `warmup_fraction` of the steps, then linear decay to 0."""
  warmup = round(warmup_fraction * steps)
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, lr, max(warmup, 1)),
      optax.linear_schedule(lr, 0.0, max(steps - warmup, 1)),
    ],
    [warmup],
  )
  return optax.adamw(schedule, weight_decay=weight_decay)


def epoch_batch(
  key: jax.Array, step: jax.Array, num_examples: int, *, batch_size: int, epoch_steps: int
) -> jax.Array:
  """Indices [batch_size] of step `step` in epoch training: batch `step mod epoch_steps` of
  a permutation of the examples drawn per epoch from `key` (the last batch of an epoch
  wraps round to the permutation's start)."""
  # The permutations' keys: a branch of `key` that the per-step keys (fold_in) never take.
  perm_key = jax.random.fold_in(jax.random.split(key)[0], step // epoch_steps)
  position = (step % epoch_steps) * batch_size + jnp.arange(batch_size)
  return jax.random.permutation(perm_key, num_examples)[position % num_examples]


def make_train_step(
  setup: Setup,
  model: nn.Module,
  tx: optax.GradientTransformation,
  *,
  batch_size: int,
  consistency_weight: float = 0.0,
  log_consistency: bool = False,
  epoch_steps: int = 0,
) -> Callable:
  """`jitted(state, step, key, frozen, *inputs, labels)`: one AdamW step on a sampled batch.

  loss = mean CE(pass 1) [+ w · mean symmetric_kl(pass 1, pass 2) with stop-gradient
  targets, pass 2 a second forward with fresh dropout and routing draws — AdaMix's
  consistency regulariser; its value is the 'consistency' metric, computed without a
  gradient for w = 0 when `log_consistency`]. `state` = {'params': trainable tree,
  'opt_state'}; `frozen` is the rest of the parameters; the training arrays live on device
  and batches are drawn in-jit from `fold_in(key, step)` (with replacement; with
  `epoch_steps` > 0 without: step t takes batch t mod epoch_steps of a permutation drawn per
  epoch, the last batch of an epoch wrapping round to its start), so resumed runs are
  bitwise identical. The key is an argument, not a constant, so stages differing only in it
  compile to the same program (a persistent compilation cache then serves them all).
  """

  def step(state, step, key, frozen, *arrays):
    *inputs, labels = arrays
    k = jax.random.fold_in(key, step)
    idx_key, d1, r1, d2, r2 = jax.random.split(k, 5)
    n = labels.shape[0]
    if epoch_steps:
      idx = epoch_batch(key, step, n, batch_size=batch_size, epoch_steps=epoch_steps)
    else:
      idx = jax.random.randint(idx_key, (batch_size,), 0, n)
    batch = [setup.constrain(a[idx]) for a in inputs]
    y = labels[idx]

    def forward(params, dropout_key, routing_key):
      return model.apply(
        {"params": params},
        *batch,
        train=True,
        rngs={"dropout": dropout_key, "routing": routing_key},
      )

    def loss_fn(trainable):
      params = join(frozen, trainable)
      logits = forward(params, d1, r1)
      ce = jnp.mean(core.losses.cross_entropy(logits, y))
      if not consistency_weight and not log_consistency:
        return ce, {"ce": ce}
      logits2 = forward(params, d2, r2)
      reg = jnp.mean(core.losses.symmetric_kl(logits, logits2, stop_gradient_targets=True))
      if not consistency_weight:  # logged only: no gradient through the second pass
        return ce, {"ce": ce, "consistency": jax.lax.stop_gradient(reg)}
      return ce + consistency_weight * reg, {"ce": ce, "consistency": reg}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, {"loss": loss, **aux}

  return jax.jit(step, donate_argnums=0)


class Trained(NamedTuple):
  """A trained model: its full params and the measured cost of one training step (s).

  `selection` (epoch training with a dev set only): {'epoch': the selected epoch (1-based),
  'dev_accuracy': [one per epoch]}; `params` are that epoch's.
  """

  params: PyTree
  step_time_s: float
  selection: dict[str, Any] | None = None


def epoch_steps(num_examples: int, batch_size: int) -> int:
  """Steps of one pass over `num_examples` (the last batch wraps round): ceil(N / B)."""
  return -(-num_examples // batch_size)


def train(
  setup: Setup,
  workdir: str,
  writer: metrics_lib.MetricWriter | None,
  *,
  stage: str,
  model: nn.Module,
  params: PyTree,
  train_mode: str,
  examples: Examples,
  steps: int,
  lr: float,
  batch_size: int,
  consistency_weight: float = 0.0,
  stage_fields: Mapping[str, Sequence[str]] | None = None,
  time_steps: bool = True,
  key: jax.Array | None = None,
  log_consistency: bool = False,
  epochs: int = 0,
  select: Callable[[PyTree], float] | None = None,
) -> Trained:
  """Trains the `train_mode` part of `params` on `examples` as stage `stage` (resumable).

  `key` (default: the stage's own, `setup.key(stage)`) fixes the batch order and the
  dropout and routing draws; the compared variants of one run pass the same key
  (`variant_key`), so that they see the same batches and random streams.

  With `epochs` > 0, `steps` is ignored: `epochs` passes over `examples` (`epoch_steps`
  steps each, a fresh permutation per epoch, one learning-rate schedule over all), each
  its own stage `<stage>/epoch_<e>`; `select(full params) -> dev accuracy` then picks the
  epoch whose end state is returned (the first best, as the paper's best-epoch
  selection; without `select`, the last).

  Returns the full params and the seconds per step, timed on `TIMED_STEPS` extra steps of
  the compiled step on a copy of the final state (the copy is discarded); with
  `time_steps=False` nothing is timed (NaN) and a restored stage compiles nothing.
  """
  cfg = setup.config.train
  per_epoch = epoch_steps(len(examples), batch_size) if epochs else 0
  if epochs:
    steps = epochs * per_epoch
  tx = make_optimizer(steps, lr, warmup_fraction=cfg.warmup_fraction, weight_decay=cfg.weight_decay)
  frozen, trainable = split_trainable(params, train_mode)
  # A copy: the step donates its state, and callers share backbone leaves between models.
  trainable = jax.tree.map(jnp.copy, trainable)
  rep = mesh_lib.replicated(setup.mesh)
  state = mesh_lib.replicate({"params": trainable, "opt_state": tx.init(trainable)}, setup.mesh)
  arrays = jax.device_put((frozen, *examples.inputs, examples.labels), rep)
  step_fn = make_train_step(
    setup,
    model,
    tx,
    batch_size=batch_size,
    consistency_weight=consistency_weight,
    log_consistency=log_consistency,
    epoch_steps=per_epoch,
  )
  bound = stages.bind(step_fn, setup.key(stage) if key is None else key, *arrays)
  selection = None
  if not epochs:
    state = stages.run_stage(
      setup.config,
      workdir,
      stage,
      bound,
      state,
      steps,
      writer=writer,
      stage_fields=stage_fields or {},
    )
    final = state["params"]
  else:
    dev, best, final = [], -1.0, None
    for epoch in range(epochs):
      offset = epoch * per_epoch

      def shifted(state, step, offset=offset):
        return bound(state, step + offset)

      state = stages.run_stage(
        setup.config,
        workdir,
        f"{stage}/epoch_{epoch + 1:03d}",
        shifted,
        state,
        per_epoch,
        writer=writer,
        stage_fields={},
      )
      if select is None:
        continue
      dev.append(float(select(join(frozen, state["params"]))))
      if dev[-1] > best:  # a host copy: the next step donates the state's buffers
        best, final = dev[-1], jax.device_get(state["params"])
    if select is None:
      final = state["params"]
    else:
      final = jax.tree.map(jnp.asarray, final)
      selection = {"epoch": int(np.argmax(dev)) + 1, "dev_accuracy": dev}
  if not time_steps:
    return Trained(join(frozen, final), float("nan"), selection)
  probe = jax.tree.map(jnp.copy, state)
  probe, _ = bound(probe, jnp.int32(0))  # compiled already unless the stage was restored
  jax.block_until_ready(probe)
  start = time.perf_counter()
  for i in range(TIMED_STEPS):
    probe, _ = bound(probe, jnp.int32(i))
  jax.block_until_ready(probe)
  step_time = (time.perf_counter() - start) / TIMED_STEPS
  return Trained(join(frozen, final), step_time, selection)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_batch(model: nn.Module, method: str, params: PyTree, key: jax.Array, *inputs):
  # `model` is static (Linen modules hash by their fields): one compile per architecture.
  return model.apply(
    {"params": params},
    *inputs,
    train=False,
    method=method,
    rngs={"routing": key},
  )


def _batched(
  model, method, params, examples: Examples, batch_size: int, key, fresh_keys: bool = False
) -> np.ndarray:
  n = len(examples)
  out = []
  for start in range(0, n, batch_size):
    batch_key = jax.random.fold_in(key, start) if fresh_keys else key
    chunk = [a[start : start + batch_size] for a in examples.inputs]
    pad = batch_size - len(chunk[0])
    if pad:  # fixed shapes: one compile
      chunk = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in chunk]
    out.append(np.asarray(_apply_batch(model, method, params, batch_key, *chunk)))
  return np.concatenate(out)[:n]


def predict_logits(
  model: nn.Module,
  params: PyTree,
  examples: Examples,
  *,
  batch_size: int,
  routing_key: jax.Array | None = None,
  fresh_keys: bool = False,
) -> np.ndarray:
  """Eval-mode logits [N, C]. Routed mixtures in a random inference mode draw from
  `routing_key`: the same key for every batch (one fixed random sub-model in 'random'
  mode), or with `fresh_keys` one derived per batch (fresh draws on every forward)."""
  key = jax.random.key(0) if routing_key is None else routing_key
  return _batched(model, "__call__", params, examples, batch_size, key, fresh_keys)


def embed(setup: Setup, model: nn.Module, params: PyTree, examples: Examples) -> np.ndarray:
  """Pooled features [N, D] of `model` (sentence embeddings for the text encoder)."""
  bs = setup.config.eval_batch_size
  return _batched(model, "features", params, examples, bs, jax.random.key(0))


def evaluate_outcomes(
  setup: Setup,
  model: nn.Module,
  params: PyTree,
  domains: Sequence[str],
  *,
  split: str = "test",
  routing_key: jax.Array | None = None,
  fresh_keys: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[int]]]]:
  """`evaluate`'s metrics and the per-example outcomes ({domain: results_lib.outcomes})."""
  out, per_example = {}, {}
  for i, d in enumerate(domains):
    ex = getattr(setup.task, split)[d]
    key = routing_key
    if fresh_keys:  # each domain's batches get their own keys too
      key = jax.random.fold_in(jax.random.key(0) if key is None else key, i)
    logits = predict_logits(
      model,
      params,
      ex,
      batch_size=setup.config.eval_batch_size,
      routing_key=key,
      fresh_keys=fresh_keys,
    )
    per_example[d] = results_lib.outcomes(logits, ex.labels)
    out[d] = {"accuracy": results_lib.accuracy(per_example[d])}
  out["mean"] = {"accuracy": float(np.mean([out[d]["accuracy"] for d in domains]))}
  return out, per_example


def evaluate(
  setup: Setup,
  model: nn.Module,
  params: PyTree,
  domains: Sequence[str],
  *,
  split: str = "test",
  routing_key: jax.Array | None = None,
  fresh_keys: bool = False,
) -> dict[str, dict[str, float]]:
  """{domain: {'accuracy'}, 'mean': {'accuracy'}} on `split` of `domains` (mean over domains)."""
  return evaluate_outcomes(
    setup, model, params, domains, split=split, routing_key=routing_key, fresh_keys=fresh_keys
  )[0]


def param_counts(params: PyTree, *, train_mode: str, inference_params: PyTree) -> dict[str, int]:
  """{'total', 'trainable' (without the head), 'head', 'inference'} scalar counts.

  `inference_params` is what a deployed model holds (e.g. LoRA folded, mixtures merged).
  """
  frozen, trainable = split_trainable(params, train_mode)
  del frozen
  head = adapters_lib.count_params(params[adapters_lib.HEAD_KEY])
  return {
    "total": adapters_lib.count_params(params),
    "trainable": adapters_lib.count_params(trainable) - head,
    "head": head,
    "inference": adapters_lib.count_params(inference_params),
  }


# ----------------------------------------------------------------------------
# Pretraining (ViT) and the backbone
# ----------------------------------------------------------------------------

PRETRAIN_FIELDS = (
  "data.benchmark",
  "data.options",
  "data.benchmark_seed",
  # With the 'lodo' protocol the held-out targets are kept out of pre-training too.
  "data.protocol",
  "data.target_domains",
  "model",
  "pretrain",
  "num_devices",
)


def pretrain_domains(setup: Setup) -> tuple[str, ...]:
  """Domains the ViT is pre-trained on.

  `pretrain.domains` when given; else every domain that is neither one of the benchmark's
  default targets nor, under the 'lodo' protocol, one of `data.target_domains`: a domain
  held out for evaluation is never seen in pre-training.
  """
  given = tuple(setup.config.pretrain.domains)
  held_out = set(setup.task.default_targets)
  if setup.config.data.get("protocol") == "lodo":
    held_out |= set(setup.config.data.target_domains)
  domains = given or tuple(d for d in setup.task.domains if d not in held_out)
  bad = [d for d in domains if d not in setup.task.domains]
  if bad:
    raise ValueError(
      f"pretrain.domains has unknown {bad}; accepted: {', '.join(setup.task.domains)}"
    )
  return domains


def pretrained_backbone(setup: Setup, workdir: str, writer) -> PyTree:
  """The backbone's parameters: MiniLM's, random (`bert`), or the ViT trained by `pretrain`.

  The `pretrain` stage trains the whole ViT classifier (no adapters) with CE on the
  training splits of `pretrain_domains`; it depends only on PRETRAIN_FIELDS, so the runs of
  a sweep share it through the stage cache.
  """
  if setup.pretrained is not None:
    return setup.pretrained
  model = build_model(setup, adapters_lib.AdapterConfig())
  params = init_params(setup, model, setup.key("backbone_init"), None)
  if setup.config.model.kind == "bert":
    return backbone_of(setup, params)
  cfg = setup.config.pretrain
  trained = train(
    setup,
    workdir,
    writer,
    stage="pretrain",
    model=model,
    params=params,
    train_mode="all",
    examples=setup.task.pooled("train", pretrain_domains(setup)),
    steps=cfg.steps,
    lr=cfg.lr,
    batch_size=cfg.batch_size,
    stage_fields={"pretrain": PRETRAIN_FIELDS},
    time_steps=False,
  )
  return backbone_of(setup, trained.params)


# ----------------------------------------------------------------------------
# The `finetune` method
# ----------------------------------------------------------------------------


def protocol_domains(setup: Setup) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(training domains, evaluation domains) of `data.protocol`."""
  cfg, task = setup.config.data, setup.task
  if cfg.protocol == "lodo":
    targets = tuple(cfg.target_domains) or task.default_targets
    sources = tuple(d for d in task.domains if d not in targets)
    _check_domains(task, "data.target_domains", targets)
    if not sources:
      raise ValueError("data.target_domains holds every domain; leave at least one to train on")
    return sources, targets
  domains = tuple(cfg.domains) or task.domains
  _check_domains(task, "data.domains", domains)
  return domains, domains


def _check_domains(task: Task, name: str, domains: Sequence[str]) -> None:
  bad = [d for d in domains if d not in task.domains]
  if bad or not domains:
    raise ValueError(f"{name}={tuple(domains)!r} is invalid; accepted: {', '.join(task.domains)}")


def variant_key(setup: Setup) -> jax.Array:
  """The training key every compared variant of a run shares (paired comparisons).

  Step t of each variant draws its batch indices, dropout and routing keys from
  `fold_in(variant_key, t)`: on the same training set the variants see the same batches
  in the same order, and the same dropout masks wherever their modules coincide (e.g. the
  backbone of a frozen-backbone variant). With the shared initialisation key
  (`setup.key('init')`) they also start from the same head.
  """
  return setup.key("variants")


def dev_selector(
  setup: Setup, model: nn.Module, domains: Sequence[str]
) -> Callable[[PyTree], float] | None:
  """`train`'s `select` in epoch training (`train.epochs` > 0): the mean accuracy over
  `domains` of their validation splits (`train.dev_examples` per domain, 0 = all), never
  the test splits; None without epochs."""
  if not setup.config.train.get("epochs", 0):
    return None
  return lambda params: evaluate(setup, model, params, domains, split="val")["mean"]["accuracy"]


def selection_entry(trained: Trained, num_examples: int, batch_size: int) -> dict[str, Any]:
  """results.json `selection` of one variant: the selected epoch and its last step."""
  epoch = trained.selection["epoch"]
  return {"epoch": epoch, "checkpoint_step": epoch * epoch_steps(num_examples, batch_size)}


def variant_lr(config, train_mode: str) -> float:
  """`train.lr_full` for full fine-tuning, `train.lr` otherwise."""
  return config.train.lr_full if train_mode == "all" else config.train.lr


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every variant and returns the results dict of DESIGN.md."""
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  sources, targets = protocol_domains(setup)
  train_set = setup.task.pooled("train", sources)
  logging.info(
    "finetune: %d training examples from %s; eval on %s", len(train_set), sources, targets
  )
  writer = metrics_lib.MetricWriter(workdir)
  backbone = pretrained_backbone(setup, workdir, writer)
  metrics, per_example, counts, step_time, selection, dev = {}, {}, {}, {}, {}, {}
  for variant in config.variants:
    kind, train_mode = VARIANTS[variant]
    adapter = adapter_config(config, kind)
    model = build_model(setup, adapter)
    params = init_params(setup, model, setup.key("init"), backbone)
    trained = train(
      setup,
      workdir,
      writer,
      stage=variant,
      model=model,
      params=params,
      train_mode=train_mode,
      examples=train_set,
      steps=config.train.steps,
      lr=variant_lr(config, train_mode),
      batch_size=config.train.batch_size,
      key=variant_key(setup),
      epochs=config.train.get("epochs", 0),
      select=dev_selector(setup, model, sources),
    )
    if trained.selection is not None:
      selection[variant] = selection_entry(trained, len(train_set), config.train.batch_size)
      dev[variant] = trained.selection["dev_accuracy"]
    metrics[variant], per_example[variant] = evaluate_outcomes(
      setup, model, trained.params, targets
    )
    inference = (
      adapters_lib.merge_lora(trained.params, adapter) if kind == "lora" else trained.params
    )
    counts[variant] = param_counts(
      trained.params, train_mode=train_mode, inference_params=inference
    )
    step_time[variant] = trained.step_time_s
  writer.close()
  results = {
    "method": "finetune",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "protocol": config.data.protocol,
    "source_domains": list(sources),
    "target_domains": list(targets),
    "num_examples": {"train": len(train_set)},
    "params": counts,
    "step_time_s": step_time,
    "metrics": metrics,
    results_lib.PER_EXAMPLE: per_example,
  }
  if selection:  # epoch training: the selected epochs and the dev curves they come from
    results["selection"] = selection
    results["dev_accuracy"] = dev
  return results
