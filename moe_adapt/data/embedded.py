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

Encoders (`encoder`): 'minilm' (all-MiniLM-L6-v2, `moe-adapt-data fetch minilm`, D = 384),
'tiny_random' (a 2-layer, 32-wide BERT with fixed random weights, D = 32; for tests and
smoke runs, needs no download), or the path of a Hugging Face BERT / DistilBERT checkpoint
directory (its vocabulary must be the base benchmark's WordPiece one, e.g.
bert-base-uncased's 30522 ids). An encoder is a model, and data/ does not import models/:
the caller passes `encoder_backend=moe_adapt.models.encoders` (the methods do), or any
object with its four functions (`EncoderBackend`).

The embeddings are stored as .npz under `registry.cache_dir()`, keyed by a hash of (base
name, its resolved options, the encoder's weights' SHA-256, max_len, the per-class caps,
the seed, and a digest of the kept token ids): a second load reads them back and never
runs the encoder; a changed tokenizer, encoder or option gives another file.

`text_hidden` (`moe_adapt.data.text_hidden`) keeps the lower layers' hidden states instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from moe_adapt.data import fetch, registry

# Bump when a change here changes the embeddings built from the same inputs.
CODE_VERSION = 1
SPLITS = ("train", "val", "test")


class EncoderBackend(Protocol):
  """What the wrapper needs of a sentence encoder (`moe_adapt.models.encoders` is one).

  `minilm_dir` is MiniLM's extracted directory for encoder 'minilm', else None.
  """

  def check_name(self, name: Any) -> None: ...

  def plan(self, name: str, minilm_dir: Path | None) -> tuple[int, int]:
    """(embedding width D, vocabulary size), without loading the weights."""
    ...

  def weights_sha256(self, name: str, minilm_dir: Path | None) -> str: ...

  def encode(
    self,
    name: str,
    minilm_dir: Path | None,
    token_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    batch_size: int,
  ) -> np.ndarray:
    """Sentence embeddings float32 [N, D] of token ids and masks [N, T]."""
    ...


def _minilm_dir(encoder: str, data_dir: str | None) -> Path | None:
  return fetch.minilm_dir(data_dir) if encoder == "minilm" else None


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


def _check_options(
  base: Any,
  base_options: Any,
  encoder: str,
  encoder_backend: EncoderBackend | None,
  max_len: Any,
  batch_size: Any,
  per_class: tuple[Any, Any, Any],
) -> tuple[dict[str, Any], dict[str, int | None]]:
  """(the base's options, {split: cap}) after checking `embedded`'s arguments."""
  if not isinstance(base, str):
    raise ValueError(f"base={base!r} is invalid; accepted: the name of a text benchmark")
  if base_options is None:
    base_options = {}
  if not isinstance(base_options, Mapping):
    raise ValueError(f"base_options={base_options!r} is invalid; accepted: a dict of options")
  options = {k: v for k, v in dict(base_options).items() if v != ""}
  if encoder_backend is None:
    raise ValueError(
      "encoder_backend=None is invalid; accepted: moe_adapt.models.encoders (or an "
      "EncoderBackend): the encoder is a model, which data/ does not import"
    )
  encoder_backend.check_name(encoder)
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
  caps = {part: _check_cap(f"{part}_per_class", value) for part, value in zip(SPLITS, per_class)}
  return options, caps


def _text_base(base: str, options: Mapping[str, Any]) -> Any:
  """The text benchmark `base` built with `options`, or ValueError if it is not one."""
  if base == "embedded":
    raise ValueError("base='embedded' is invalid; accepted: a text benchmark, not the wrapper")
  base_bench = registry.get_benchmark(base, **options)
  if not hasattr(base_bench, "max_len"):
    raise ValueError(
      f"base={base!r} is not a text benchmark (its splits hold no token ids); accepted: "
      "newsgroups, tweets_topics, vader_sentiment"
    )
  return base_bench


def _resolved(
  base: str, base_bench: Any, encoder: str, batch_size: int, caps: Mapping[str, int | None]
) -> dict[str, Any]:
  """The resolved options of the benchmark (its provenance, and its cache key's content)."""
  return {
    "base": base,
    "base_options": dict(base_bench.options),
    "encoder": encoder,
    "max_len": base_bench.max_len,
    "batch_size": int(batch_size),
    **{f"{part}_per_class": caps[part] for part in SPLITS},
  }


def _kept_tokens(
  text: Mapping[str, Any], caps: Mapping[str, int | None]
) -> tuple[dict, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
  """(kept rows by (domain, split), their token ids, masks and labels), within the caps."""
  kept = {
    (domain, part): _cap(getattr(splits, part).labels, caps[part])
    for domain, splits in text.items()
    for part in SPLITS
  }
  ids = [getattr(text[d], p).token_ids[i] for (d, p), i in kept.items()]
  masks = [getattr(text[d], p).attention_mask[i] for (d, p), i in kept.items()]
  labels = [getattr(text[d], p).labels[i] for (d, p), i in kept.items()]
  return kept, ids, masks, labels


def _check_vocab(ids: list[np.ndarray], vocab_size: int, encoder: str, base: str) -> None:
  top = max((int(x.max()) for x in ids if x.size), default=0)
  if top >= vocab_size:  # an embedding lookup would clip such ids silently
    raise ValueError(
      f"encoder={encoder!r} has vocab_size={vocab_size}, but base {base!r}'s token ids "
      f"reach {top}; accepted: an encoder with the base tokenizer's vocabulary"
    )


def embedded(
  *,
  base: str = "newsgroups",
  base_options: Mapping[str, Any] | None = None,
  encoder: str = "minilm",
  encoder_backend: EncoderBackend | None = None,
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
    encoder: an encoder's name or checkpoint directory (see the module docstring).
    encoder_backend: what encodes: `moe_adapt.models.encoders` or an `EncoderBackend`.
    max_len: the token length (sets base_options['max_len']); None keeps the base's.
    batch_size: documents per encoder call.
    train_per_class, val_per_class, test_per_class: at most this many documents of each
      class in each split (None = all), chosen before encoding.
    use_cache: read and write the embedding cache.

  Raises:
    ValueError: naming the offending option.
  """
  per_class = (train_per_class, val_per_class, test_per_class)
  options, caps = _check_options(
    base, base_options, encoder, encoder_backend, max_len, batch_size, per_class
  )
  base_bench = _text_base(base, options)
  data_dir = options.get("data_dir")
  # Read from the headers (checkpoints) or config.json (MiniLM): no weights loaded.
  dim, vocab_size = encoder_backend.plan(encoder, _minilm_dir(encoder, data_dir))
  resolved = _resolved(base, base_bench, encoder, batch_size, caps)

  def load(seed: int) -> dict[str, registry.DomainSplits]:
    text = base_bench.load(seed=seed)
    kept, ids, masks, labels = _kept_tokens(text, caps)
    _check_vocab(ids, vocab_size, encoder, base)
    return _embed_splits(
      encoder_backend, resolved, seed, data_dir, kept, ids, masks, labels, use_cache
    )

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


def cached_x(
  prefix: str,
  base: str,
  key: Mapping[str, Any],
  tokens: str,
  compute: Callable[[], np.ndarray],
  use_cache: bool,
) -> np.ndarray:
  """`compute()`'s float32 array, or the copy stored for `key` under `registry.cache_dir()`
  (`<prefix>-<base>-<hash of key>.npz`, checked against the token digest `tokens`)."""
  if not use_cache:
    return compute()
  digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True, default=str).encode()).hexdigest()
  path = registry.cache_dir() / f"{prefix}-{base}-{digest[:16]}.npz"
  stored = registry._read_npz(path, ["x", "tokens_sha256"])
  if stored is not None and str(stored["tokens_sha256"]) == tokens:
    return stored["x"]
  x = compute()
  registry._write_npz_atomic(path, {"x": x, "tokens_sha256": np.asarray(tokens)})
  return x


def domain_splits(
  kept, labels: list[np.ndarray], x: np.ndarray
) -> dict[str, registry.DomainSplits]:
  """`{domain: DomainSplits}` from the rows of `x` in `kept`'s (domain, split) order."""
  parts: dict[str, list[registry.Split]] = {}
  start = 0
  for ((domain, _), _), y in zip(kept.items(), labels):
    parts.setdefault(domain, []).append(registry.Split(x[start : start + len(y)], y))
    start += len(y)
  return {domain: registry.DomainSplits(*splits) for domain, splits in parts.items()}


def _embed_splits(backend, resolved, seed, data_dir, kept, ids, masks, labels, use_cache):
  """Embeds the kept documents (or reads the cache) and builds `{domain: DomainSplits}`."""
  all_ids, all_masks = np.concatenate(ids), np.concatenate(masks)
  tokens = hashlib.sha256(all_ids.tobytes() + all_masks.tobytes()).hexdigest()
  minilm_dir = _minilm_dir(resolved["encoder"], data_dir)

  def compute() -> np.ndarray:
    return backend.encode(
      resolved["encoder"], minilm_dir, all_ids, all_masks, batch_size=resolved["batch_size"]
    )

  key = {}
  if use_cache:
    key = {
      **{k: v for k, v in resolved.items() if k != "batch_size"},
      "encoder_sha256": backend.weights_sha256(resolved["encoder"], minilm_dir),
      "seed": seed,
      "tokens_sha256": tokens,
      "code_version": CODE_VERSION,
    }
  x = cached_x("embedded", resolved["base"], key, tokens, compute, use_cache)
  return domain_splits(kept, labels, x)


registry.register_benchmark("embedded", embedded)
