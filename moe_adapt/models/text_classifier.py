"""A sentence classifier: BERT encoder → pooling → linear head.

Params are {'encoder': ..., 'head': ...}, parallel to `Classifier`'s {'backbone', 'head'},
so `adapters.trainable_mask(params, train='adapters')` trains adapters + head. Load a
pretrained encoder into freshly initialised params with `with_pretrained_encoder`, which
keeps the new adapters and head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_adapt.models import adapters as adapters_lib
from moe_adapt.models import bert

POOLINGS = ("mean", "cls", "pooler")


class TextClassifier(nn.Module):
  """Token ids [B, T] and attention mask [B, T] → logits [B, num_classes] (float32).

  Attributes:
    config: the encoder's architecture.
    num_classes: number of logits C.
    adapter: adapters inserted into every encoder block.
    pooling: 'mean' (masked mean of the last hidden states, as sentence-transformers),
      'cls' (the first token's state) or 'pooler' (BERT's tanh pooler on it).
    dropout_rate: dropout on the pooled features before the head, when training.
    dtype: encoder computation dtype (parameters stay float32).
  """

  config: bert.BertConfig
  num_classes: int
  adapter: adapters_lib.AdapterConfig = adapters_lib.AdapterConfig()
  pooling: str = "mean"
  dropout_rate: float = 0.0
  dtype: Any = None

  def __post_init__(self):
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
      raise ValueError(f"TextClassifier: num_classes={self.num_classes!r} must be an int >= 1")
    if self.num_classes < 1:
      raise ValueError(f"TextClassifier: num_classes={self.num_classes!r} must be an int >= 1")
    if self.pooling not in POOLINGS:
      raise ValueError(
        f"TextClassifier: pooling={self.pooling!r} is unknown; accepted: {', '.join(POOLINGS)}"
      )
    super().__post_init__()

  def setup(self):
    self.encoder = bert.BertEncoder(
      self.config, self.adapter, add_pooler=self.pooling == "pooler", dtype=self.dtype
    )
    self.dropout = nn.Dropout(self.dropout_rate)
    self.head = nn.Dense(self.num_classes, dtype=jnp.float32)

  def __call__(
    self, token_ids: jax.Array, attention_mask: jax.Array, *, train: bool = False
  ) -> jax.Array:
    """[B, T] ids and mask → logits [B, num_classes]."""
    return self.classify(self.features(token_ids, attention_mask, train=train), train=train)

  def features(
    self, token_ids: jax.Array, attention_mask: jax.Array, *, train: bool = False
  ) -> jax.Array:
    """[B, T] ids and mask → pooled features [B, D]."""
    out = self.encoder(token_ids, attention_mask, deterministic=not train)
    if self.pooling == "mean":
      return bert.mean_pool(out.hidden, attention_mask)
    if self.pooling == "cls":
      return out.hidden[:, 0]
    return out.pooled

  def classify(self, features: jax.Array, *, train: bool = False) -> jax.Array:
    """Features [B, D] → logits [B, num_classes]; uses only params['head']."""
    if features.ndim != 2:
      raise ValueError(f"TextClassifier.classify: features must be [B, D]; got {features.shape}")
    return self.head(self.dropout(features, deterministic=not train))


def with_pretrained_encoder(
  params: Mapping[str, Any], encoder_params: Mapping[str, Any]
) -> dict[str, Any]:
  """`params` with the encoder's backbone leaves replaced by `encoder_params`.

  Args:
    params: a `TextClassifier`'s initialised `variables['params']`.
    encoder_params: backbone params, e.g. from `bert.load_hf_weights` or `bert.load_minilm`
      (a pooler in them is dropped when the classifier has none).

  Returns:
    New params: pretrained backbone, the initialised adapters and head of `params`.

  Raises:
    ValueError: when the pretrained tree's structure or shapes differ from the model's.
  """
  if "encoder" not in params:
    raise ValueError(f"params must hold 'encoder' (TextClassifier params); got {list(params)}")
  backbone, adapters = adapters_lib.split_params(params["encoder"])
  pretrained = dict(encoder_params)
  if "pooler" not in backbone:
    pretrained.pop("pooler", None)
  want = jax.tree.map(jnp.shape, backbone)
  got = jax.tree.map(jnp.shape, pretrained)
  if want != got:
    diff = _tree_diff(want, got)
    raise ValueError(f"encoder_params do not match the model's encoder: {diff}")
  return {**params, "encoder": adapters_lib.merge_params(pretrained, adapters)}


def _tree_diff(want: Any, got: Any, path: str = "") -> str:
  """First difference between two trees of shapes, for error messages."""
  if isinstance(want, Mapping) and isinstance(got, Mapping):
    for key in sorted(set(want) | set(got)):
      if key not in got:
        return f"{path}/{key} missing"
      if key not in want:
        return f"{path}/{key} unexpected"
      diff = _tree_diff(want[key], got[key], f"{path}/{key}")
      if diff:
        return diff
    return ""
  return "" if want == got else f"{path}: model {want}, given {got}"
