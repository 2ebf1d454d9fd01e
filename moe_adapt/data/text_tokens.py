"""Tokenization of the text corpora for MiniLM, cached as .npz.

Tokenized arrays are cached under `DIR/text_cache/`, keyed by archive hash, tokenizer
hash, max_len and `CODE_VERSION`; a damaged or incomplete cache file is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers

from moe_adapt.data import fetch
from moe_adapt.data.text_corpora import READERS, read_corpus

# Bump when a change here changes the arrays built from the same archive and tokenizer.
CODE_VERSION = 1
# Default padded lengths: tweets and VADER snippets fit in 64 WordPiece tokens; newsgroup
# posts are long (median ~160 words) and are truncated.
DEFAULT_MAX_LEN = {
  "vader_sentiment": 64,
  "tweets_topics": 64,
  "newsgroups": 128,
  "bbc_news": 128,
}


def load_tokenizer(path: str | os.PathLike[str], max_len: int) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` from `path` that truncates and pads to exactly `max_len`."""
  tokenizer = tokenizers.Tokenizer.from_file(str(path))
  padding = tokenizer.padding or {}
  pad_token = padding.get("pad_token", "[PAD]")
  pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
  tokenizer.enable_truncation(max_length=max_len)
  tokenizer.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token)
  return tokenizer


def tokenize(
  texts: Sequence[str], tokenizer: tokenizers.Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and attention masks, both int32 [N, T], of a fixed-length tokenizer."""
  encodings = tokenizer.encode_batch(list(texts))
  ids = np.asarray([e.ids for e in encodings], np.int32)
  mask = np.asarray([e.attention_mask for e in encodings], np.int32)
  return ids, mask


def check_max_len(max_len: Any) -> int:
  if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer) or max_len < 2:
    raise ValueError(f"max_len must be an int >= 2; got {max_len!r}")
  return int(max_len)


def tokenized_corpus(
  name: str,
  *,
  max_len: int,
  data_dir: str | os.PathLike[str] | None = None,
  tokenizer: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
  """The corpus of `name` tokenized to `max_len`, read from the .npz cache when present.

  Args:
    name: a key of `TEXT_BENCHMARKS`.
    max_len: padded length T.
    data_dir: the data directory (see `fetch.resolve_data_dir`).
    tokenizer: path of a `tokenizer.json`; default MiniLM's (fetched with
      `moe-adapt-data fetch minilm`).

  Returns:
    {'token_ids': [N, T] int32, 'attention_mask': [N, T] int32, 'labels': [N] int32,
     'domains': [N] int32, 'is_test': [N] bool, 'class_names': tuple, 'domain_names': tuple}.
  """
  if name not in READERS:
    raise ValueError(f"name={name!r} is unknown; accepted: {', '.join(READERS)}")
  max_len = check_max_len(max_len)
  root = fetch.resolve_data_dir(data_dir)
  tokenizer_path = pathlib.Path(tokenizer) if tokenizer else fetch.minilm_files(root).tokenizer
  if not tokenizer_path.is_file():
    raise ValueError(f"tokenizer={str(tokenizer_path)!r} is not a file (a tokenizer.json)")
  key = json.dumps(
    {
      "archive_sha256": fetch.ARCHIVES[name].sha256,
      "tokenizer_sha256": fetch.sha256_file(tokenizer_path),
      "max_len": max_len,
      "code_version": CODE_VERSION,
    },
    sort_keys=True,
  )
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  path = root / "text_cache" / f"{name}-L{max_len}-{digest}.npz"
  cached = _read_cache(path)
  if cached is not None:
    return cached
  corpus = read_corpus(name, root)
  ids, mask = tokenize(corpus.texts, load_tokenizer(tokenizer_path, max_len))
  arrays = {
    "token_ids": ids,
    "attention_mask": mask,
    "labels": corpus.labels,
    "domains": corpus.domains,
    "is_test": corpus.is_test,
    "class_names": np.asarray(corpus.class_names),
    "domain_names": np.asarray(corpus.domain_names),
  }
  _write_cache(path, arrays)
  return _read_cache(path)


_CACHE_FIELDS = (
  "token_ids",
  "attention_mask",
  "labels",
  "domains",
  "is_test",
  "class_names",
  "domain_names",
)


def _read_cache(path: pathlib.Path) -> dict[str, Any] | None:
  """The cached arrays, or None when the file is missing, damaged or incomplete."""
  if not path.is_file():
    return None
  try:
    with np.load(path) as stored:
      if not set(_CACHE_FIELDS) <= set(stored.files):
        return None
      out = {k: stored[k] for k in _CACHE_FIELDS}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError):
    return None  # Rebuilt and replaced by the caller.
  out["class_names"] = tuple(str(c) for c in out["class_names"])
  out["domain_names"] = tuple(str(d) for d in out["domain_names"])
  return out


def _write_cache(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes atomically (temporary file + rename): readers never see a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
