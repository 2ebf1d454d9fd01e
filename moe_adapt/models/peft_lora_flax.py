"""PEFT LoRA adapters of a BERT-family base as our `LoRADense` leaves, and back.

`to_flax` turns a PEFT adapter into an `adapters.AdapterConfig(kind='lora')` and the
`lora_a` / `lora_b` leaves (A [in, r] = Aᵀ, B [r, out] = Bᵀ); `from_flax` writes such leaves
back as a PEFT adapter.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from moe_adapt.models import adapters as adapters_lib
from moe_adapt.models import hf_io
from moe_adapt.models.peft_lora_io import LinearLayer, LoraAdapter, check_targets, write_files


def _projection_path(module: str, layers: Mapping[str, LinearLayer]) -> tuple[str, ...]:
  """Our path (without 'params' and 'kernel') of a BERT-family projection, or ValueError."""
  path = layers[module].path
  if path[0] != "params" or path[-2] not in adapters_lib.PROJECTIONS:
    raise ValueError(
      f"layer {module} is not one of the encoder blocks' projections "
      f"({', '.join(adapters_lib.PROJECTIONS)}), so an AdapterConfig cannot hold its LoRA; "
      "fold the adapter into the weights instead (`apply_adapter`)"
    )
  return path[1:-1]


def to_flax(
  adapter: LoraAdapter, layers: Mapping[str, LinearLayer]
) -> tuple[adapters_lib.AdapterConfig, dict[str, Any]]:
  """A PEFT LoRA adapter of a BERT-family base as (AdapterConfig, LoRA leaves).

  The leaves tree ({'layer_0': {'attention': {'query': {'lora_a', 'lora_b'}}}, ...}) merges
  into the `BertEncoder` params (`adapters.merge_params`); a model built with the returned
  config then computes what PEFT computes. `AdapterConfig` puts LoRA on the same
  projections of every block with one rank, so the adapter must too.

  Raises:
    ValueError: layers outside the blocks' projections (e.g. the pooler), projections not
      adapted in every block, or layers of different ranks.
  """
  check_targets(adapter, layers)
  tree: dict[str, Any] = {}
  adapted = set()
  ranks = {a.shape[0] for a, _ in adapter.factors.values()}
  if len(ranks) != 1:
    raise ValueError(
      f"adapter {adapter.name!r} has layers of ranks {sorted(ranks)}; one rank needed"
    )
  for module, (a, b) in adapter.factors.items():
    path = _projection_path(module, layers)
    adapted.add(path)
    hf_io.place(tree, (*path, "lora_a"), jnp.asarray(a.T))
    hf_io.place(tree, (*path, "lora_b"), jnp.asarray(b.T))
  blocks = {
    layer.path[1]
    for layer in layers.values()
    if layer.path[0] == "params" and layer.path[1].startswith("layer_")
  }
  targets = sorted({p[-1] for p in adapted}, key=adapters_lib.PROJECTIONS.index)
  missing = sorted(
    (block, t) for block in blocks for t in targets if (block, *_sub(t)) not in adapted
  )
  if missing:
    raise ValueError(
      f"adapter {adapter.name!r} adapts {targets} but not in every block (missing: "
      f"{missing[:4]}); AdapterConfig applies LoRA to every block — fold it instead"
    )
  (rank,) = ranks
  # rsLoRA's scale alpha/√r is our alpha'/r with alpha' = alpha·√r.
  alpha = adapter.alpha * math.sqrt(rank) if adapter.use_rslora else adapter.alpha
  config = adapters_lib.AdapterConfig(
    kind="lora",
    lora_rank=rank,
    lora_alpha=alpha,
    lora_targets=tuple(targets),
    lora_dropout=adapter.dropout,
  )
  return config, tree


def _sub(target: str) -> tuple[str, ...]:
  """The path of a projection inside a block (attention projections sit in 'attention')."""
  return ("attention", target) if target in ("query", "key", "value", "out") else (target,)


def from_flax(
  encoder_params: Mapping[str, Any],
  config: adapters_lib.AdapterConfig,
  layers: Mapping[str, LinearLayer],
  directory: str | os.PathLike[str],
  *,
  base_model_name_or_path: str = "",
) -> list[str]:
  """Writes the LoRA leaves of `BertEncoder` params as a PEFT adapter; returns its layers.

  Args:
    encoder_params: params of a `BertEncoder` built with `config` (kind 'lora'), e.g. a
      `TextClassifier`'s params['encoder'].
    config: the AdapterConfig the model was built with (rank and alpha).
    layers: `linear_layers(base)` of the checkpoint the encoder was loaded from, which
      names the layers as PEFT does.
    directory: where adapter_config.json and adapter_model.safetensors go.
  """
  if config.kind != "lora":
    raise ValueError(f"config.kind={config.kind!r}; accepted: 'lora'")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors, modules = {}, []
  for module, layer in layers.items():
    if layer.path[0] != "params":
      continue
    node: Any = encoder_params
    for key in layer.path[1:-1]:
      node = node.get(key, {}) if isinstance(node, Mapping) else {}
    if isinstance(node, Mapping) and "lora_a" in node:
      tensors[f"base_model.model.{module}.lora_A.weight"] = np.asarray(node["lora_a"]).T
      tensors[f"base_model.model.{module}.lora_B.weight"] = np.asarray(node["lora_b"]).T
      modules.append(module)
  if not modules:
    raise ValueError("encoder_params hold no LoRA leaves (lora_a, lora_b) at the base's layers")
  write_files(
    directory,
    tensors,
    config.lora_rank,
    config.lora_alpha,
    sorted(modules),
    base_model_name_or_path,
  )
  return sorted(modules)
