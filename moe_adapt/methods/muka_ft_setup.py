"""The data, models and cached lower pass of MUKA with fine-tuned teachers (`methods.muka_ft`).

`make_setup` loads one domain of a text benchmark and splits its train split into the
teachers' labelled texts and the disjoint transfer set (`disjoint_pools`), loads the encoder
and builds the teachers' and the student's `split_text_classifier.TopClassifier`s;
`with_hidden` replaces the token splits by the frozen lower blocks' hidden states,
computed once and cached.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from moe_adapt import data
from moe_adapt.data import fetch
from moe_adapt.methods import _checks, muka
from moe_adapt.methods import muka_setup as setup_lib
from moe_adapt.models import encoders
from moe_adapt.models import split_text_classifier as split_lib
from moe_adapt.train import artifacts, benchmarks, stage_cache
from moe_adapt.train import mesh as mesh_lib
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


def _texts(config, benchmark) -> tuple[str, tuple, dict[str, data.Split]]:
  """(domain, the teachers' label chunks, token splits {part: Split}) of `make_setup`."""
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
  return domain, chunks, tokens


def make_setup(config) -> FtSetup:
  """Loads the texts, the encoder and builds the models (the lower pass is `with_hidden`).

  Raises:
    ValueError: naming the field: an unknown domain, more teachers than classes (e.g. a
      `data.options.classes` subset leaving a teacher without classes), a class without
      transfer, val or test texts, too many trained blocks, token ids beyond the vocabulary.
  """
  benchmark = benchmarks.benchmark(config.data)
  domain, chunks, tokens = _texts(config, benchmark)
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
    student_model=classifier(benchmark.num_classes),
    x_train=None,
    val=tokens.get("val"),
    teacher_pool=tokens["teacher"],
    tokens=tokens,
    encoder_config=encoder_config,
    encoder_params=encoder_params,
    start=start,
  )


def cached(config, workdir: str, name: str, fields, compute, expected) -> dict[str, np.ndarray]:
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
  hidden = cached(cfg, workdir, "hidden", HIDDEN_FIELDS, compute, expected)
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
