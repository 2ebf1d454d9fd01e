"""The architecture of a BERT-style encoder (`BertConfig`), read from an HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

# HF `hidden_act` values → our activation names.
HF_ACTIVATIONS = {
  "gelu": "gelu",
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "relu": "relu",
}


# How positions are numbered: 'bert' 0, 1, ...; 'roberta' (fairseq) pad_token_id + 1, + 2, ...
# over non-padding tokens, padding tokens at pad_token_id.
MODEL_TYPES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT-style encoder; field names follow HF `config.json`."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pad_token_id: int = 0
  model_type: str = "bert"

  def __post_init__(self):
    for field in (
      "vocab_size",
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "intermediate_size",
      "max_position_embeddings",
    ):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BertConfig.{field}={value!r} must be a positive int")
    if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
      raise ValueError(
        f"BertConfig.type_vocab_size={self.type_vocab_size!r} must be an int >= 0 "
        "(0: no token-type embeddings, as DistilBERT)"
      )
    if self.model_type not in MODEL_TYPES:
      raise ValueError(
        f"BertConfig.model_type={self.model_type!r} is unsupported; accepted: "
        f"{', '.join(MODEL_TYPES)}"
      )
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"BertConfig.hidden_size={self.hidden_size} must be divisible by "
        f"num_attention_heads={self.num_attention_heads}"
      )
    if self.hidden_act not in HF_ACTIVATIONS:
      raise ValueError(
        f"BertConfig.hidden_act={self.hidden_act!r} is unsupported; accepted: "
        f"{', '.join(HF_ACTIVATIONS)}"
      )
    for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      if not 0 <= getattr(self, field) < 1:
        raise ValueError(f"BertConfig.{field}={getattr(self, field)!r} must be in [0, 1)")

  @property
  def activation(self) -> str:
    return HF_ACTIVATIONS[self.hidden_act]

  @classmethod
  def from_dict(cls, hf_config: Mapping[str, Any]) -> BertConfig:
    """From the contents of an HF `config.json` (unknown keys are ignored)."""
    model_type = hf_config.get("model_type", "bert")
    if model_type not in MODEL_TYPES:
      raise ValueError(
        f"model_type={model_type!r} is unsupported; accepted: {', '.join(MODEL_TYPES)} "
        "(DistilBERT: checkpoints.distilbert_config)"
      )
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(
        f"position_embedding_type={position_type!r} is unsupported; accepted: absolute"
      )
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf_config.items() if k in names})

  @classmethod
  def from_json(cls, path: str | os.PathLike[str]) -> BertConfig:
    """From an HF `config.json` file."""
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))
