"""A text benchmark as an encoder's frozen lower layers' hidden states, computed once, cached.

  get_benchmark("text_hidden", base="vader_sentiment", base_options={"max_per_domain": 800},
                encoder="minilm", encoder_backend=moe_adapt.models.encoders,
                frozen_layers=5, max_len=32)

loads the base text benchmark (its token ids), runs the encoder's embeddings and its first
`frozen_layers` transformer layers once, frozen, on every document, and returns a
`registry.Benchmark` whose splits hold x = float32 [N, T, D + 1]: the hidden states
[N, T, D] with the attention mask as the last channel (input_shape (T, D + 1)). A model of
the encoder's remaining layers (`moe_adapt.models.text_top`, initialised from the same
checkpoint) then trains on it as the whole encoder would train with its lower layers frozen,
at the cost of those layers only: this is how Meta-DMoE's experts and student are fine-tuned
copies of MiniLM's top layer on 2 CPU cores.

Its encoders are `embedded`'s: 'minilm', 'tiny_random' or a BERT / DistilBERT checkpoint
directory. The encoder is a model and data/ does not import models/: `encoder_backend` is
`moe_adapt.models.encoders` (or any object with its `check_name`, `plan`, `depth`,
`weights_sha256` and `hidden_states`); `moe_adapt.train.benchmarks` passes it for the
methods.

The arrays are stored as .npz under `registry.cache_dir()`, keyed by a hash of (base name,
its resolved options, the encoder's weights' SHA-256, frozen_layers, the seed and a digest
of the token ids): a second load reads them back and never runs the encoder.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from moe_adapt.data import embedded, registry

# Bump when a change here changes the `text_hidden` arrays built from the same inputs.
TEXT_HIDDEN_CODE_VERSION = 1


def _check_frozen(frozen_layers: Any, total: int, encoder: str) -> int:
  ok = isinstance(frozen_layers, int | np.integer) and not isinstance(frozen_layers, bool)
  if not ok or not 1 <= frozen_layers <= total - 1:
    raise ValueError(
      f"frozen_layers={frozen_layers!r} is invalid for encoder {encoder!r} ({total} layers: "
      f"at least one must be left to train); accepted: an int in 1..{total - 1}"
    )
  return int(frozen_layers)


def text_hidden(
  *,
  base: str = "vader_sentiment",
  base_options: Mapping[str, Any] | None = None,
  encoder: str = "minilm",
  encoder_backend: Any = None,
  frozen_layers: int = 5,
  max_len: int | None = 32,
  batch_size: int = 64,
  use_cache: bool = True,
) -> registry.Benchmark:
  """The text benchmark `base` as layer-`frozen_layers` hidden states (module docstring).

  Args:
    base: a registered text benchmark (vader_sentiment, tweets_topics, newsgroups).
    base_options: its options ('' values mean its default); `data_dir` there also locates
      the MiniLM weights, `max_per_domain` caps every domain's documents.
    encoder: an encoder's name or checkpoint directory.
    encoder_backend: `moe_adapt.models.encoders` or an equivalent object.
    frozen_layers: how many of the encoder's layers run frozen (1 .. depth - 1).
    max_len: the token length T (sets base_options['max_len']); None keeps the base's.
    batch_size: documents per encoder call.
    use_cache: read and write the .npz cache.

  Raises:
    ValueError: naming the offending option.
  """
  options, _ = embedded._check_options(
    base, base_options, encoder, encoder_backend, max_len, batch_size, (None, None, None)
  )
  base_bench = embedded._text_base(base, options)
  minilm_dir = embedded._minilm_dir(encoder, options.get("data_dir"))
  dim, vocab_size = encoder_backend.plan(encoder, minilm_dir)
  frozen = _check_frozen(frozen_layers, encoder_backend.depth(encoder, minilm_dir), encoder)
  resolved = {
    "base": base,
    "base_options": dict(base_bench.options),
    "encoder": encoder,
    "frozen_layers": frozen,
    "max_len": base_bench.max_len,
  }

  load = functools.partial(
    _load, base_bench, encoder_backend, resolved, minilm_dir, vocab_size, batch_size, use_cache
  )
  return registry.Benchmark(
    name="text_hidden",
    domains=tuple(base_bench.domains),
    num_classes=base_bench.num_classes,
    class_names=tuple(base_bench.class_names),
    input_shape=(int(base_bench.max_len), int(dim) + 1),
    default_targets=tuple(base_bench.default_targets),
    loader=load,
    options=resolved,
  )


def _load(
  base_bench, backend, resolved, minilm_dir, vocab_size, batch_size, use_cache, seed: int
) -> dict[str, registry.DomainSplits]:
  """The benchmark's loader: `{domain: DomainSplits}` of hidden states for `seed`."""
  text = base_bench.load(seed=seed)
  kept, ids, masks, labels = embedded._kept_tokens(text, dict.fromkeys(embedded.SPLITS))
  embedded._check_vocab(ids, vocab_size, resolved["encoder"], resolved["base"])
  all_ids, all_masks = np.concatenate(ids), np.concatenate(masks)
  x = _hidden(backend, resolved, seed, minilm_dir, all_ids, all_masks, batch_size, use_cache)
  return embedded.domain_splits(kept, labels, x)


def _hidden(backend, resolved, seed, minilm_dir, ids, masks, batch_size, use_cache):
  """x float32 [N, T, D + 1] of all documents: read from the cache or computed (and stored)."""
  tokens = hashlib.sha256(ids.tobytes() + masks.tobytes()).hexdigest()

  def compute() -> np.ndarray:
    hidden = backend.hidden_states(
      resolved["encoder"],
      minilm_dir,
      ids,
      masks,
      num_layers=resolved["frozen_layers"],
      batch_size=batch_size,
    )
    return np.concatenate([hidden, masks[..., None].astype(np.float32)], axis=-1)

  key = {}
  if use_cache:
    key = {
      **resolved,
      "encoder_sha256": backend.weights_sha256(resolved["encoder"], minilm_dir),
      "seed": seed,
      "tokens_sha256": tokens,
      "code_version": TEXT_HIDDEN_CODE_VERSION,
    }
  return embedded.cached_x("text_hidden", resolved["base"], key, tokens, compute, use_cache)


registry.register_benchmark("text_hidden", text_hidden)
