"""The fine-tuning harness of the adapter methods (`finetune`, `adamix`, `adapter_soup`).

It covers one recipe: a pretrained backbone — MiniLM (`model.kind='minilm'`, weights from
`moe-adapt-data fetch minilm`), a randomly initialised small BERT (`'bert'`, for tests) or a
ViT pre-trained inside the pipeline on source domains (`'vit'`, stage `pretrain`) — gets
adapters inserted (`models.adapters.AdapterConfig`), a new linear head, and is trained on
labeled examples with only the chosen parameters updated ('adapters' = adapters + head,
'head', 'all'). Its pieces live below the methods: the data as `data.examples.Task`, the
models in `models.adapted`, the training loop in `train.finetuning`, batched prediction in
`train.evaluation`; this module binds them to one `Setup` (config, task, mesh, backbone),
checks the fields they read, and holds what every adapter method shares: the training and
evaluation domains of `data.protocol`, the variants' shared training key (paired
comparisons), the ViT's pre-training and the best-epoch selection on dev data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moe_adapt import data, models
from moe_adapt.data.examples import Examples, Task, load_task
from moe_adapt.methods import _checks
from moe_adapt.models import adapted
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import evaluation, finetuning, stages
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train.finetuning import Trained

PyTree = Any

MODEL_KINDS = ("minilm", "bert", "vit")
PROTOCOLS = ("lodo", "pooled")


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


# ----------------------------------------------------------------------------
# Setup
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
    return stages.stage_key(self.config.seed, stage, index)


def _backbone(config, task: Task) -> tuple[Any, PyTree | None]:
  """(backbone config, pretrained encoder params or None) of `model.init` / `model.kind`."""
  init, kind = config.model.get("init", ""), config.model.kind
  if init:
    if task.modality != "text":
      raise ValueError(
        f"model.init={init!r}: starting from a checkpoint is supported for text benchmarks "
        f"(BERT-family encoders); {task.benchmark!r} is {task.modality}"
      )
    largest = max(
      int(np.max(ex.inputs[0]))
      for split in (task.train, task.val, task.test)
      for ex in split.values()
    )
    return adapted.encoder_from_checkpoint(init, max_token_id=largest)
  if kind == "minilm":
    data_dir = config.data.options.get("data_dir", "") or None
    backbone_config, pretrained, _ = models.bert.load_minilm(data.fetch.minilm_dir(data_dir))
    return backbone_config, pretrained
  if kind == "bert":
    return models.bert.BertConfig(**config.model.options.to_dict()), None
  return dict(config.model.options.to_dict()), None


def make_setup(config) -> Setup:
  """Loads the data and the pretrained encoder; every data-dependent check happens here."""
  task = load_task(config)
  kind = config.model.kind
  if (kind == "vit") != (task.modality == "image"):
    raise ValueError(
      f"model.kind={kind!r} does not fit benchmark {task.benchmark!r} ({task.modality}); "
      f"accepted: {'vit' if task.modality == 'image' else 'minilm, bert'}"
    )
  backbone_config, pretrained = _backbone(config, task)
  setup = Setup(
    config=config,
    task=task,
    mesh=mesh_lib.make_mesh(config.num_devices or None),
    backbone_config=backbone_config,
    pretrained=pretrained,
  )
  hidden = adapted.hidden_size(backbone_config)
  for name in ("bottleneck", "lora_rank"):
    adapters_lib.check_width(f"adapter.{name}", config.adapter[name], hidden, "the hidden size")
  # Domain fields are checked here, before the CLI writes anything into the workdir, so a
  # corrected command can reuse it.
  if "protocol" in config.data:
    protocol_domains(setup)
  if kind == "vit":
    pretrain_domains(setup)
  return setup


# ----------------------------------------------------------------------------
# The harness bound to a Setup: models, training, evaluation
# ----------------------------------------------------------------------------


def build_model(setup: Setup, adapter: adapters_lib.AdapterConfig) -> nn.Module:
  """The classifier with `adapter` inserted: `apply(v, *inputs, train=)` -> logits [B, C]."""
  # model.dtype: the encoder and adapters compute in it; parameters, optimiser state, the
  # head (float32 logits) and the losses stay float32. None keeps the float32 inputs' dtype.
  dtype = _checks.compute_dtype(setup.config)
  return adapted.build_classifier(
    setup.backbone_config,
    setup.task.num_classes,
    adapter=adapter,
    dropout=setup.config.model.dropout,
    dtype=None if dtype == jnp.float32 else dtype,
  )


def init_params(setup: Setup, model: nn.Module, key: jax.Array, backbone: PyTree | None) -> PyTree:
  """Fresh params of `model` (adapters, head) with the backbone's leaves from `backbone`
  (its parameters without adapters, e.g. `setup.pretrained`; None = random)."""
  first = setup.task.train[setup.task.domains[0]]
  dummy = tuple(jnp.zeros((1, *a.shape[1:]), a.dtype) for a in first.inputs)
  return adapted.init_params(model, key, dummy, backbone=backbone, backbone_key=setup.backbone_key)


def backbone_of(setup: Setup, params: PyTree) -> PyTree:
  """The backbone's own parameters (adapters removed) of a full params tree."""
  return adapted.backbone_of(params, setup.backbone_key)


def train(
  setup: Setup, workdir: str, writer, *, stage: str, key: jax.Array | None = None, **kwargs
) -> Trained:
  """`train.finetuning.train` on the setup's config and mesh, as stage `stage` (resumable).

  `key` (default: the stage's own, `setup.key(stage)`) fixes the batch order and the
  dropout and routing draws; the compared variants of one run pass the same key
  (`variant_key`), so that they see the same batches and random streams.
  """
  key = setup.key(stage) if key is None else key
  return finetuning.train(
    setup.config, workdir, writer, stage=stage, mesh=setup.mesh, key=key, **kwargs
  )


def predict_logits(
  model: nn.Module,
  params: PyTree,
  examples: Examples,
  *,
  batch_size: int,
  routing_key: jax.Array | None = None,
  fresh_keys: bool = False,
) -> np.ndarray:
  """Eval-mode logits [N, C] (`train.evaluation.apply_batched`; routed mixtures in a random
  inference mode draw from `routing_key`, with `fresh_keys` a key per batch)."""
  return evaluation.apply_batched(
    model, params, examples.inputs, batch_size=batch_size, key=routing_key, fresh_keys=fresh_keys
  )


def embed(setup: Setup, model: nn.Module, params: PyTree, examples: Examples) -> np.ndarray:
  """Pooled features [N, D] of `model` (sentence embeddings for the text encoder)."""
  bs = setup.config.eval_batch_size
  return evaluation.apply_batched(model, params, examples.inputs, batch_size=bs, method="features")


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
    bs = setup.config.eval_batch_size
    logits = predict_logits(
      model, params, ex, batch_size=bs, routing_key=key, fresh_keys=fresh_keys
    )
    per_example[d] = results_lib.outcomes(logits, ex.labels)
    out[d] = {"accuracy": results_lib.accuracy(per_example[d])}
  out["mean"] = {"accuracy": float(np.mean([out[d]["accuracy"] for d in domains]))}
  return out, per_example


def evaluate(setup: Setup, model: nn.Module, params: PyTree, domains: Sequence[str], **kwargs):
  """{domain: {'accuracy'}, 'mean': {'accuracy'}} on `split` of `domains` (mean over domains);
  the options of `evaluate_outcomes`."""
  return evaluate_outcomes(setup, model, params, domains, **kwargs)[0]


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
# What the adapter methods share: domains, paired keys, dev selection
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
  return {
    "epoch": epoch,
    "checkpoint_step": epoch * finetuning.epoch_steps(num_examples, batch_size),
  }


def variant_lr(config, train_mode: str) -> float:
  """`train.lr_full` for full fine-tuning, `train.lr` otherwise."""
  return config.train.lr_full if train_mode == "all" else config.train.lr
