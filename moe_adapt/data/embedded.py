"""A text benchmark turned into vectors: frozen sentence embeddings, computed once and cached.

  get_benchmark("embedded", base="newsgroups", base_options={"grouping": "single"},
                encoder="minilm", max_len=64, train_per_class=300, test_per_class=100)

loads the base text benchmark (its token ids), keeps at most `<split>_per_class` documents
of each class in each split (the first ones in the base's already shuffled order, so a
seeded random subset), encodes every kept document once with a frozen encoder (the
masked mean of its last hidden states, as sentence-transformers pools all-MiniLM-L6-v2,
without the final L2 normalisation) and returns a `registry.Benchmark` whose splits hold
x = embeddings float32 [N, D] (input_shape (D,)). Any vector model (e.g. the `mlp`
backbone of `moe_adapt.models`) can then train on it in milliseconds per step, where
fine-tuning the encoder would not fit a CPU budget.

Encoders: 'minilm' (all-MiniLM-L6-v2, `moe-adapt-data fetch minilm`, D = 384),
'tiny_random' (a 2-layer, 32-wide BERT with fixed random weights, D = 32; for tests and
smoke runs, needs no download), or the path of a Hugging Face BERT / DistilBERT checkpoint
directory (config.json + safetensors, read by `moe_adapt.models.checkpoints`; its
vocabulary must be the base benchmark's WordPiece one, e.g. bert-base-uncased's 30522 ids).

The embeddings are stored as .npz under `registry.cache_dir()`, keyed by a hash of (base
name, its resolved options, the encoder's weights' SHA-256, max_len, the per-class caps,
the seed, and a digest of the kept token ids): a second load reads them back and never
runs the encoder; a changed tokenizer, encoder or option gives another file.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moe_adapt.data import fetch, registry

# Bump when a change here changes the embeddings built from the same inputs.
CODE_VERSION = 1
ENCODERS = ("minilm", "tiny_random")
_ENCODERS_ACCEPTED = (
  f"{', '.join(ENCODERS)}, or a BERT / DistilBERT checkpoint directory (config.json + "
  "model.safetensors)"
)
# Checkpoint architectures (models.checkpoints) whose token ids are WordPiece ids.
_CHECKPOINT_ARCHITECTURES = ("bert", "distilbert")
SPLITS = ("train", "val", "test")
# The tiny test encoder's architecture: MiniLM's vocabulary (any BERT WordPiece id fits).
_TINY_BERT = dict(
  vocab_size=30522,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=64,
)


# ----------------------------------------------------------------------------- encoders


def _is_checkpoint(name: str) -> bool:
  """Whether encoder `name` is a checkpoint directory (anything but ENCODERS' names)."""
  return name not in ENCODERS


def _check_encoder(name: Any) -> None:
  if not isinstance(name, str) or not name:
    raise ValueError(f"encoder={name!r} is invalid; accepted: {_ENCODERS_ACCEPTED}")
  if _is_checkpoint(name) and not (Path(name) / "config.json").is_file():
    raise ValueError(
      f"encoder={name!r} is unknown (and not a checkpoint directory: no config.json "
      f"there); accepted: {_ENCODERS_ACCEPTED}"
    )


def _checkpoint_plan(directory: str):
  """(BertConfig, weight files) of a BERT-family checkpoint directory, from its headers."""
  from moe_adapt.models import checkpoints, hf_io

  architecture, _, module, _, _ = checkpoints.plan(directory)
  if architecture not in _CHECKPOINT_ARCHITECTURES:
    raise ValueError(
      f"encoder={directory!r} holds a {architecture!r} checkpoint; accepted: "
      f"{', '.join(_CHECKPOINT_ARCHITECTURES)} (WordPiece token ids, as the text benchmarks')"
    )
  return module.config, hf_io.weight_files(directory)


def load_encoder(name: str, data_dir: str | None = None) -> tuple[Any, Any, str]:
  """(BertConfig, encoder params without pooler, SHA-256 of the weights) of encoder `name`.

  Raises:
    ValueError: an unknown `name`, a checkpoint of another architecture; fetch.ArchiveError
      when MiniLM is not fetched.
  """
  _check_encoder(name)
  if _is_checkpoint(name):
    from moe_adapt.models import checkpoints

    config, _ = _checkpoint_plan(name)
    params = checkpoints.load_checkpoint(name).params
    params = {k: v for k, v in params.items() if k != "pooler"}
    return config, params, _weights_sha256(name, data_dir)
  # Imported here: the encoder is a model (a layer above data/), needed only by this
  # wrapper and only when it actually encodes or hashes weights.
  import jax
  import jax.numpy as jnp

  from moe_adapt.models import bert

  if name == "minilm":
    files = fetch.minilm_files(data_dir)
    config, params, _ = bert.load_minilm(data_dir)
    params = {k: v for k, v in params.items() if k != "pooler"}
    stat = files.weights.stat()
    return config, params, _file_sha256(str(files.weights), stat.st_size, stat.st_mtime_ns)
  config = bert.BertConfig(**_TINY_BERT)
  module = bert.BertEncoder(config, add_pooler=False)
  params = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(leaf, np.float32).tobytes())
  return config, params, digest.hexdigest()


@functools.cache
def _forward_fn(config):
  """A jitted `(params, ids [B, T], mask [B, T]) -> mean-pooled hidden [B, D]` for `config`."""
  import jax

  from moe_adapt.models import bert

  module = bert.BertEncoder(config, add_pooler=False)

  @jax.jit
  def forward(params, ids, mask):
    hidden = module.apply({"params": params}, ids, mask, deterministic=True).hidden
    return bert.mean_pool(hidden, mask)

  return forward


def encode(
  config,
  params,
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


# ---------------------------------------------------------------------------- the wrapper


def _cap(labels: np.ndarray, cap: int | None) -> np.ndarray:
  """Indices of the first `cap` examples of each class (all when None), in split order."""
  if cap is None:
    return np.arange(len(labels))
  keep = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    keep[np.flatnonzero(labels == c)[:cap]] = True
  return np.flatnonzero(keep)


def _check_cap(field: str, value: Any) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{field}={value!r} is invalid; accepted: None (all) or an int >= 1")
  return int(value)


def embedded(
  *,
  base: str = "newsgroups",
  base_options: Mapping[str, Any] | None = None,
  encoder: str = "minilm",
  max_len: int | None = None,
  batch_size: int = 64,
  train_per_class: int | None = None,
  val_per_class: int | None = None,
  test_per_class: int | None = None,
  use_cache: bool = True,
) -> registry.Benchmark:
  """The text benchmark `base` as frozen sentence embeddings (see the module docstring).

  Args:
    base: a registered text benchmark (newsgroups, tweets_topics, vader_sentiment).
    base_options: its options; '' values mean its default. `data_dir` there also locates
      the MiniLM weights.
    encoder: one of ENCODERS.
    max_len: the token length (sets base_options['max_len']); None keeps the base's.
    batch_size: documents per encoder call.
    train_per_class, val_per_class, test_per_class: at most this many documents of each
      class in each split (None = all), chosen before encoding.
    use_cache: read and write the embedding cache.

  Raises:
    ValueError: naming the offending option.
  """
  if not isinstance(base, str):
    raise ValueError(f"base={base!r} is invalid; accepted: the name of a text benchmark")
  if base_options is None:
    base_options = {}
  if not isinstance(base_options, Mapping):
    raise ValueError(f"base_options={base_options!r} is invalid; accepted: a dict of options")
  options = {k: v for k, v in dict(base_options).items() if v != ""}
  _check_encoder(encoder)
  if max_len is not None:
    if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer) or max_len < 2:
      raise ValueError(f"max_len={max_len!r} is invalid; accepted: None or an int >= 2")
    if options.get("max_len", max_len) != max_len:
      raise ValueError(
        f"max_len={max_len} differs from base_options['max_len']={options['max_len']}; "
        "accepted: set it in one place"
      )
    options["max_len"] = int(max_len)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} is invalid; accepted: an int >= 1")
  caps = {
    "train": _check_cap("train_per_class", train_per_class),
    "val": _check_cap("val_per_class", val_per_class),
    "test": _check_cap("test_per_class", test_per_class),
  }
  if base == "embedded":
    raise ValueError("base='embedded' is invalid; accepted: a text benchmark, not the wrapper")
  base_bench = registry.get_benchmark(base, **options)
  if not hasattr(base_bench, "max_len"):
    raise ValueError(
      f"base={base!r} is not a text benchmark (its splits hold no token ids); accepted: "
      "newsgroups, tweets_topics, vader_sentiment"
    )
  data_dir = options.get("data_dir")
  vocab_size = _TINY_BERT["vocab_size"]
  if encoder == "tiny_random":
    dim = _TINY_BERT["hidden_size"]
  elif _is_checkpoint(encoder):  # names and shapes checked from the headers, no data read
    bert_config, _ = _checkpoint_plan(encoder)
    dim, vocab_size = bert_config.hidden_size, bert_config.vocab_size
  else:  # MiniLM: read the width from its config without loading the weights
    from moe_adapt.models import bert

    minilm = bert.BertConfig.from_json(fetch.minilm_files(data_dir).config)
    dim, vocab_size = minilm.hidden_size, minilm.vocab_size
  resolved = {
    "base": base,
    "base_options": dict(base_bench.options),
    "encoder": encoder,
    "max_len": base_bench.max_len,
    "batch_size": int(batch_size),
    **{f"{part}_per_class": caps[part] for part in SPLITS},
  }

  def load(seed: int) -> dict[str, registry.DomainSplits]:
    text = base_bench.load(seed=seed)
    kept = {
      (domain, part): _cap(getattr(splits, part).labels, caps[part])
      for domain, splits in text.items()
      for part in SPLITS
    }
    ids = [getattr(text[d], p).token_ids[i] for (d, p), i in kept.items()]
    masks = [getattr(text[d], p).attention_mask[i] for (d, p), i in kept.items()]
    labels = [getattr(text[d], p).labels[i] for (d, p), i in kept.items()]
    top = max((int(x.max()) for x in ids if x.size), default=0)
    if top >= vocab_size:  # an embedding lookup would clip such ids silently
      raise ValueError(
        f"encoder={encoder!r} has vocab_size={vocab_size}, but base {base!r}'s token ids "
        f"reach {top}; accepted: an encoder with the base tokenizer's vocabulary"
      )
    return _embed_splits(resolved, seed, data_dir, kept, ids, masks, labels, use_cache)

  return registry.Benchmark(
    name="embedded",
    domains=tuple(base_bench.domains),
    num_classes=base_bench.num_classes,
    class_names=tuple(base_bench.class_names),
    input_shape=(int(dim),),
    default_targets=tuple(base_bench.default_targets),
    loader=load,
    options=resolved,
  )


def _embed_splits(resolved, seed, data_dir, kept, ids, masks, labels, use_cache):
  """Embeds the kept documents (or reads the cache) and builds `{domain: DomainSplits}`."""
  all_ids, all_masks = np.concatenate(ids), np.concatenate(masks)
  tokens = hashlib.sha256(all_ids.tobytes() + all_masks.tobytes()).hexdigest()
  x = None
  if use_cache:
    weights_sha = _weights_sha256(resolved["encoder"], data_dir)
    key = {
      **{k: v for k, v in resolved.items() if k != "batch_size"},
      "encoder_sha256": weights_sha,
      "seed": seed,
      "tokens_sha256": tokens,
      "code_version": CODE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = registry.cache_dir() / f"embedded-{resolved['base']}-{digest[:16]}.npz"
    stored = registry._read_npz(path, ["x", "tokens_sha256"])
    if stored is not None and str(stored["tokens_sha256"]) == tokens:
      x = stored["x"]
  if x is None:
    config, params, _ = load_encoder(resolved["encoder"], data_dir)
    x = encode(config, params, all_ids, all_masks, batch_size=resolved["batch_size"])
    if use_cache:
      registry._write_npz_atomic(path, {"x": x, "tokens_sha256": np.asarray(tokens)})
  out, start = {}, 0
  parts: dict[str, list[registry.Split]] = {}
  for ((domain, _), _), y in zip(kept.items(), labels):
    parts.setdefault(domain, []).append(registry.Split(x[start : start + len(y)], y))
    start += len(y)
  for domain, splits in parts.items():
    out[domain] = registry.DomainSplits(*splits)
  return out


def _weights_sha256(encoder: str, data_dir: str | None) -> str:
  """SHA-256 of the encoder's weights (of MiniLM's file: memoised per path, size, mtime)."""
  if encoder == "tiny_random":
    return _tiny_sha256()
  if _is_checkpoint(encoder):
    _, files = _checkpoint_plan(encoder)
    digest = hashlib.sha256()
    for path in files:
      stat = path.stat()
      digest.update(_file_sha256(str(path), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()
  path = fetch.minilm_files(data_dir).weights
  stat = path.stat()
  return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # memo key only: a replaced file is hashed again
  return fetch.sha256_file(path)


@functools.cache
def _tiny_sha256() -> str:
  return load_encoder("tiny_random")[2]


registry.register_benchmark("embedded", embedded)
