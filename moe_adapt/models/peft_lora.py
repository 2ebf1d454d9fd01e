"""PEFT LoRA adapters: read, apply onto a loaded checkpoint, merge, analyse signs, write back.

A PEFT LoRA adapter directory holds `adapter_config.json` (`r`, `lora_alpha`,
`lora_dropout`, `target_modules`, ...) and `adapter_model.safetensors` with, for each
adapted Linear layer `M` of the base model (its transformers module name, e.g.
`bert.encoder.layer.0.attention.self.query`), the tensors
`base_model.model.M.lora_A.weight` A [r, in] and `base_model.model.M.lora_B.weight`
B [out, r]. The layer then computes x Wᵀ + b + s·x Aᵀ Bᵀ with s = lora_alpha / r
(lora_alpha / √r with `use_rslora`), i.e. its weight becomes W + ΔW, ΔW = s·B·A [out, in].

Merging several adapters of one base (`merge`), with the `core.merging` functions:

- 'average' (weighted_average) and 'ties' (ties_merge) merge the products ΔW_k, layer by
  layer, which is what each adapter does to the model; ranks may differ, and a layer an
  adapter does not adapt counts as ΔW = 0 for it. The merged ΔW is written back as a LoRA
  adapter by a truncated SVD, ΔW ≈ B'·A' with B' = U√S, A' = √S Vᵀ, lora_alpha = r' (s = 1).
  The default rank r' = Σ_k r_k is exact for 'average' (a sum of K rank-r_k matrices has
  rank ≤ Σ r_k); TIES' trimmed, sign-elected ΔW is in general of full rank, so `write_adapter`
  reports the relative Frobenius error of the truncation (or write the merged full model
  with `write_merged_model`, which is exact).
- 'factor_average' averages A and B separately (weighted_average over each factor), as some
  soup implementations do; the result is NOT the average of the ΔW (B̄·Ā ≠ mean(B·A)), and
  it needs equal ranks, alphas and target layers.

Training on: `to_flax` turns a PEFT adapter of a BERT-family base into an
`adapters.AdapterConfig(kind='lora')` and the `lora_a` / `lora_b` leaves of our `LoRADense`
(A [in, r] = Aᵀ, B [r, out] = Bᵀ), so the harness can evaluate or keep training it;
`from_flax` writes such leaves (e.g. a LoRA fine-tuned by `methods.finetune`) back as a
PEFT adapter.

Reading and writing adapter directories is `peft_lora_io`, the Flax conversion
`peft_lora_flax`; their public names are importable from here too.

Sign analysis (`sign_analysis`) runs `core.merging.sign_disagreement` and
`pairwise_sign_disagreement` on the stacked ΔW (FSD of each pair of adapters).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from moe_adapt.core import merging
from moe_adapt.models import checkpoints, hf_io
from moe_adapt.models.peft_lora_flax import from_flax, to_flax
from moe_adapt.models.peft_lora_io import (
  ADAPTER_CONFIG,
  ADAPTER_WEIGHTS,
  LinearLayer,
  LoraAdapter,
  check_targets,
  linear_layers,
  read_adapter,
  write_files,
)

# Reading, writing and the Flax conversion live in peft_lora_io and peft_lora_flax; their
# public names stay importable here.
__all__ = [
  "ADAPTER_CONFIG",
  "ADAPTER_WEIGHTS",
  "METHODS",
  "LinearLayer",
  "LoraAdapter",
  "Merged",
  "apply_adapter",
  "check_targets",
  "deltas",
  "fold",
  "from_flax",
  "linear_layers",
  "merge",
  "read_adapter",
  "sign_analysis",
  "stack_deltas",
  "to_flax",
  "write_adapter",
  "write_merged_model",
]

METHODS = ("average", "ties", "factor_average")


def deltas(adapter: LoraAdapter, layers: Mapping[str, LinearLayer]) -> dict[str, np.ndarray]:
  """module → ΔW [out, in] of every layer the adapter changes (checked against the base)."""
  check_targets(adapter, layers)
  return {module: adapter.delta(module) for module in adapter.factors}


def fold(
  checkpoint: checkpoints.Checkpoint,
  layers: Mapping[str, LinearLayer],
  layer_deltas: Mapping[str, Any],
) -> checkpoints.Checkpoint:
  """The checkpoint with W + ΔW in every layer of `layer_deltas` (module → ΔW [out, in])."""
  tree = {**checkpoint.variables, "head": checkpoint.head}

  def update(node: Any, path: tuple[str, ...], delta: Any) -> Any:
    if not path:
      return node + jnp.asarray(delta, node.dtype).T  # kernels are [in, out]
    return {**node, path[0]: update(node[path[0]], path[1:], delta)}

  for module, delta in layer_deltas.items():
    if module not in layers:
      raise ValueError(f"layer {module} is not a Linear layer of the base")
    tree = update(tree, layers[module].path, delta)
  head = tree.pop("head")
  return checkpoint._replace(variables=tree, head=head)


def apply_adapter(
  base: str | os.PathLike[str], adapter: str | os.PathLike[str]
) -> checkpoints.Checkpoint:
  """Loads the base checkpoint with a PEFT LoRA adapter folded into its weights."""
  layers = linear_layers(base)
  return fold(checkpoints.load_checkpoint(base), layers, deltas(read_adapter(adapter), layers))


def stack_deltas(adapters: Sequence[LoraAdapter], layers: Mapping[str, LinearLayer]) -> dict:
  """{module: [K, out, in]} over the union of the adapters' layers (ΔW = 0 where absent)."""
  per_adapter = [deltas(a, layers) for a in adapters]
  modules = sorted(set().union(*per_adapter))
  return {
    m: jnp.stack([d.get(m, np.zeros(layers[m].shape, np.float32)) for d in per_adapter])
    for m in modules
  }


class Merged(NamedTuple):
  """A merge's result: `deltas` (module → ΔW [out, in]) and, for 'factor_average', the
  averaged factors (module → (A [r, in], B [out, r])) with their rank and alpha."""

  method: str
  deltas: dict[str, np.ndarray]
  factors: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
  rank: int | None = None
  alpha: float | None = None


def _check_equal_shapes(adapters: Sequence[LoraAdapter]) -> None:
  first = adapters[0]
  # Ranks first: they are what makes the factors' shapes differ.
  for field in ("rank", "alpha", "use_rslora"):
    for other in adapters[1:]:
      if getattr(other, field) != getattr(first, field):
        raise ValueError(
          f"method='factor_average' averages the factors A [r, in] and B [out, r] themselves and "
          f"needs equal shapes and scales, but adapter {first.name!r} has {field}="
          f"{getattr(first, field)} and {other.name!r} has {field}={getattr(other, field)}; use "
          "method='average' or 'ties', which merge ΔW = s·B·A of any ranks"
        )
  for other in adapters[1:]:
    if set(other.factors) != set(first.factors):
      raise ValueError(
        f"method='factor_average' needs the same adapted layers, but {first.name!r} and "
        f"{other.name!r} differ in {sorted(set(other.factors) ^ set(first.factors))[:3]}"
      )
    for module, (a, b) in other.factors.items():
      if a.shape != first.factors[module][0].shape or b.shape != first.factors[module][1].shape:
        raise ValueError(
          f"method='factor_average': layer {module} has rank {a.shape[0]} in {other.name!r} "
          f"but {first.factors[module][0].shape[0]} in {first.name!r}; factors of different "
          "ranks cannot be averaged (use method='average' or 'ties')"
        )


def merge(
  adapters: Sequence[LoraAdapter],
  layers: Mapping[str, LinearLayer],
  *,
  method: str,
  weights: Sequence[float] | None = None,
  density: float = 0.2,
  scale: float = 1.0,
) -> Merged:
  """Merges K adapters of one base (see the module docstring for the methods).

  Args:
    adapters: K >= 1 adapters, checked against `layers` (from `linear_layers(base)`).
    layers: the base's Linear layers.
    method: one of `METHODS`.
    weights: K weights for 'average' / 'factor_average' (normalised; uniform when None).
    density: TIES trim density, in [0, 1].
    scale: TIES λ.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown; accepted: {', '.join(METHODS)}")
  if not adapters:
    raise ValueError("merge needs at least one adapter")
  if weights is not None and len(weights) != len(adapters):
    raise ValueError(f"weights has {len(weights)} entries for {len(adapters)} adapters")
  if weights is not None and method == "ties":
    raise ValueError("weights apply to method='average' and 'factor_average', not 'ties'")
  w = None if weights is None else jnp.asarray(weights, jnp.float32)
  if method == "factor_average":
    _check_equal_shapes(adapters)
    for adapter in adapters:
      check_targets(adapter, layers)
    stacked = {
      m: {
        "a": jnp.stack([ad.factors[m][0] for ad in adapters]),
        "b": jnp.stack([ad.factors[m][1] for ad in adapters]),
      }
      for m in adapters[0].factors
    }
    averaged = merging.weighted_average(stacked, w)
    factors = {m: (np.asarray(v["a"]), np.asarray(v["b"])) for m, v in averaged.items()}
    first = adapters[0]
    merged = LoraAdapter("merged", first.rank, first.alpha, 0.0, (), first.use_rslora, factors)
    return Merged(method, {m: merged.delta(m) for m in factors}, factors, first.rank, first.alpha)
  stacked = stack_deltas(adapters, layers)
  if method == "average":
    out = merging.weighted_average(stacked, w)
  else:
    out = merging.ties_merge(stacked, density=density, scale=scale)
  return Merged(method, {m: np.asarray(v) for m, v in out.items()})


def sign_analysis(
  adapters: Sequence[LoraAdapter], layers: Mapping[str, LinearLayer]
) -> tuple[float, np.ndarray]:
  """(FSD of all K adapters, [K, K] pairwise FSD) on their stacked ΔW (`core.merging`)."""
  stacked = stack_deltas(adapters, layers)
  return (
    float(merging.sign_disagreement(stacked)),
    np.asarray(merging.pairwise_sign_disagreement(stacked)),
  )


def write_adapter(
  merged: Merged,
  directory: str | os.PathLike[str],
  *,
  rank: int | None = None,
  default_rank: int | None = None,
  base_model_name_or_path: str = "",
) -> dict[str, Any]:
  """Writes a merge as a PEFT LoRA adapter directory.

  'factor_average' results are written as they are (their rank and alpha). Merged ΔW are
  factorised by a truncated SVD at rank r' (`rank`, else `default_rank`, else the
  smallest layer dimension), B' = U√S, A' = √S Vᵀ, lora_alpha = r' (so s = 1); layers
  smaller than r' get zero-padded factors (exact).

  Returns:
    {'rank': r', 'relative_error': ‖ΔW − B'A'‖_F / ‖ΔW‖_F over all layers together}.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  if merged.factors is not None:
    r, alpha, error = merged.rank, merged.alpha, 0.0
    for module, (a, b) in merged.factors.items():
      tensors[f"base_model.model.{module}.lora_A.weight"] = a
      tensors[f"base_model.model.{module}.lora_B.weight"] = b
  else:
    r = rank or default_rank or min(min(d.shape) for d in merged.deltas.values())
    if not isinstance(r, int) or r < 1:
      raise ValueError(f"rank={r!r} must be an int >= 1")
    alpha, residual, total = float(r), 0.0, 0.0
    for module, delta in merged.deltas.items():
      delta = np.asarray(delta, np.float64)
      u, s, vt = np.linalg.svd(delta, full_matrices=False)
      k = min(r, s.size)
      root = np.sqrt(s[:k])
      a = np.zeros((r, delta.shape[1]))
      b = np.zeros((delta.shape[0], r))
      a[:k] = root[:, None] * vt[:k]
      b[:, :k] = u[:, :k] * root
      residual += float(np.sum((delta - b @ a) ** 2))
      total += float(np.sum(delta**2))
      tensors[f"base_model.model.{module}.lora_A.weight"] = a
      tensors[f"base_model.model.{module}.lora_B.weight"] = b
    error = math.sqrt(residual / total) if total > 0 else 0.0
  write_files(directory, tensors, r, alpha, sorted(merged.deltas), base_model_name_or_path)
  return {"rank": r, "relative_error": error}


def write_merged_model(
  base: str | os.PathLike[str],
  layer_deltas: Mapping[str, Any],
  directory: str | os.PathLike[str],
) -> None:
  """Writes base + ΔW as a full checkpoint in the base's own naming (config.json copied).

  Tensors are read one at a time; safetensors writes a file from one mapping, so the
  output model is held once in memory while it is written.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  layers = linear_layers(base)
  for module in layer_deltas:
    if module not in layers:
      raise ValueError(f"layer {module} is not a Linear layer of the base {base}")
  files = hf_io.weight_files(base)
  tensors = {}
  for name, value in hf_io.iter_tensors(files, set(hf_io.tensor_shapes(files))):
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    if module in layer_deltas:
      value = np.asarray(value, np.float32) + np.asarray(layer_deltas[module], np.float32)
    tensors[name] = np.ascontiguousarray(value)
  safetensors.numpy.save_file(
    tensors, str(directory / hf_io.WEIGHTS_FILE), metadata={"format": "pt"}
  )
  (directory / hf_io.CONFIG_FILE).write_text(
    json.dumps(hf_io.read_config(base), indent=2) + "\n", encoding="utf-8"
  )
