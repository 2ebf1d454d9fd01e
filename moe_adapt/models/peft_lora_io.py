"""PEFT LoRA adapter directories: read one, name a base's Linear layers, write one.

The layout is described in `moe_adapt.models.peft_lora`; this module reads and writes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import safetensors

from moe_adapt.models import checkpoints, hf_io

ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
  """A PEFT LoRA adapter read from disk.

  Attributes:
    name: the directory's name (for messages and tables).
    rank: `r` of adapter_config.json (layers may differ through `rank_pattern`; their
      factors' shapes are what counts).
    alpha: `lora_alpha`.
    dropout: `lora_dropout` (training only; it does not change the adapted weights).
    target_modules: as in adapter_config.json: a list of module-name suffixes, or a regex
      string matched against the whole module name.
    use_rslora: scale alpha / √r instead of alpha / r.
    factors: module name → (A [r, in], B [out, r]) float32 arrays.
  """

  name: str
  rank: int
  alpha: float
  dropout: float
  target_modules: tuple[str, ...] | str
  use_rslora: bool
  factors: dict[str, tuple[np.ndarray, np.ndarray]]

  def scale(self, module: str) -> float:
    """s of one layer: alpha / r (alpha / √r with rsLoRA), r its factors' rank."""
    r = self.factors[module][0].shape[0]
    return self.alpha / math.sqrt(r) if self.use_rslora else self.alpha / r

  def delta(self, module: str) -> np.ndarray:
    """ΔW = s·B·A [out, in] of one layer (float32)."""
    a, b = self.factors[module]
    return (self.scale(module) * (b @ a)).astype(np.float32)


class LinearLayer(NamedTuple):
  """A Linear layer of a base checkpoint: where its kernel is and its torch shape."""

  path: tuple[str, ...]  # in the variables tree; the last key is 'kernel' [in, out]
  shape: tuple[int, int]  # (out, in), the torch weight's


def read_adapter(directory: str | os.PathLike[str]) -> LoraAdapter:
  """Reads a PEFT LoRA adapter directory (see the module docstring).

  Raises:
    FileNotFoundError: missing files; ValueError: not a LoRA adapter, options this reader
      does not support (DoRA, fan_in_fan_out, biases, alpha_pattern, modules_to_save), or
      tensors that are not pairs of LoRA factors.
  """
  directory = pathlib.Path(directory)
  for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
    if not (directory / file).is_file():
      raise FileNotFoundError(f"PEFT adapter directory {directory} has no {file}")
  with open(directory / ADAPTER_CONFIG, encoding="utf-8") as f:
    config = json.load(f)
  where = f"{directory / ADAPTER_CONFIG}"
  targets = _check_config(config, where)
  factors = _read_factors(directory / ADAPTER_WEIGHTS)
  return LoraAdapter(
    name=directory.name,
    rank=int(config["r"]),
    alpha=float(config["lora_alpha"]),
    dropout=float(config.get("lora_dropout", 0.0)),
    target_modules=targets if isinstance(targets, str) else tuple(targets),
    use_rslora=bool(config.get("use_rslora", False)),
    factors=factors,
  )


def _check_config(config: Mapping[str, Any], where: str) -> list[str] | str:
  """The target_modules of a LoRA adapter config that this reader supports, or ValueError."""
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}; accepted: 'LORA'")
  # Options that change what the tensors mean; their unset values are accepted.
  for field, accepted in (
    ("use_dora", (False, None)),
    ("fan_in_fan_out", (False, None)),
    ("bias", ("none", None)),
    ("alpha_pattern", ({}, None)),
    ("modules_to_save", (None, [])),
  ):
    if config.get(field) not in accepted:
      raise ValueError(
        f"{where}: {field}={config[field]!r} is unsupported; accepted: {accepted[0]!r}"
      )
  targets = config.get("target_modules")
  if not (isinstance(targets, str) or (isinstance(targets, list) and targets)):
    raise ValueError(f"{where}: target_modules={targets!r}; accepted: a non-empty list or a regex")
  return targets


def _read_factors(path: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """module → (A [r, in], B [out, r]) float32 of a PEFT adapter's safetensors file."""
  pieces: dict[str, dict[str, np.ndarray]] = {}
  with safetensors.safe_open(str(path), framework="numpy") as f:
    for key in f.keys():
      match = _KEY.match(key)
      if match is None:
        raise ValueError(
          f"{path}: tensor {key!r} is not a LoRA factor "
          "(base_model.model.<module>.lora_A.weight / lora_B.weight)"
        )
      value = np.asarray(f.get_tensor(key), np.float32)
      pieces.setdefault(match["module"], {})[match["factor"]] = value
  factors = {}
  for module, pair in sorted(pieces.items()):
    a, b = pair.get("A"), pair.get("B")
    if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise ValueError(
        f"{path}: layer {module} needs lora_A [r, in] and lora_B [out, r]; "
        f"got { ({k: v.shape for k, v in pair.items()}) }"
      )
    factors[module] = (a, b)
  if not factors:
    raise ValueError(f"{path} holds no LoRA factors")
  return factors


def linear_layers(base: str | os.PathLike[str]) -> dict[str, LinearLayer]:
  """Module name (as in the checkpoint and in PEFT) → `LinearLayer`, for a base checkpoint."""
  _, _, _, specs, rename = checkpoints.plan(base)
  out = {}
  for file_name, short in rename.items():
    spec = specs.get(short)
    if file_name.endswith(".weight") and spec is not None and spec.transform == "linear":
      out[file_name[: -len(".weight")]] = LinearLayer(spec.path, spec.shape)
  return out


def _matches(module: str, targets: tuple[str, ...] | str) -> bool:
  """PEFT's rule: a regex string must match the whole name; a list entry, a name suffix."""
  if isinstance(targets, str):
    return re.fullmatch(targets, module) is not None
  return any(module == t or module.endswith(f".{t}") for t in targets)


def check_targets(adapter: LoraAdapter, layers: Mapping[str, LinearLayer]) -> None:
  """Raises ValueError unless every layer and target of `adapter` is a Linear of the base."""
  unknown = sorted(m for m in adapter.factors if m not in layers)
  unmatched = []
  if not isinstance(adapter.target_modules, str):
    unmatched = [t for t in adapter.target_modules if not any(_matches(m, (t,)) for m in layers)]
  if unknown or unmatched:
    example = ", ".join(sorted(layers)[:4])
    parts = [f"PEFT adapter {adapter.name!r} does not fit the base model:"]
    if unmatched:
      parts.append(f"  target_modules {unmatched} match no Linear layer of the base")
    if unknown:
      parts.append(
        f"  its layers {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not in the base"
      )
    parts.append(f"  the base's Linear layers are named like: {example}, ...")
    raise ValueError("\n".join(parts))
  for module, (a, b) in adapter.factors.items():
    out_dim, in_dim = layers[module].shape
    if a.shape[1] != in_dim or b.shape[0] != out_dim:
      raise ValueError(
        f"PEFT adapter {adapter.name!r}: layer {module} has ΔW [{b.shape[0]}, {a.shape[1]}], "
        f"the base's weight is [{out_dim}, {in_dim}]"
      )


def adapter_config(rank: int, alpha: float, modules: list[str], base: str) -> dict[str, Any]:
  return {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": base,
    "r": rank,
    "lora_alpha": alpha,
    "lora_dropout": 0.0,
    # Full module names: PEFT matches a list entry against the end of each module name.
    "target_modules": modules,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "inference_mode": True,
  }


def write_files(
  directory: pathlib.Path,
  tensors: Mapping[str, Any],
  rank: int,
  alpha: float,
  modules: list[str],
  base: str,
) -> None:
  config = adapter_config(rank, alpha, modules, base)
  (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
  hf_io.save_file(tensors, directory / ADAPTER_WEIGHTS)
