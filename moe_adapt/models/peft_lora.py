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

Sign analysis (`sign_analysis`) runs `core.merging.sign_disagreement` and
`pairwise_sign_disagreement` on the stacked ΔW (FSD of each pair of adapters).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from moe_adapt.core import merging
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.models import checkpoints, hf_io

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METHODS = ("average", "ties", "factor_average")
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
  pieces: dict[str, dict[str, np.ndarray]] = {}
  with safetensors.safe_open(str(directory / ADAPTER_WEIGHTS), framework="numpy") as f:
    for key in f.keys():
      match = _KEY.match(key)
      if match is None:
        raise ValueError(
          f"{directory / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA factor "
          "(base_model.model.<module>.lora_A.weight / lora_B.weight)"
        )
      value = np.asarray(f.get_tensor(key), np.float32)
      pieces.setdefault(match["module"], {})[match["factor"]] = value
  factors = {}
  for module, pair in sorted(pieces.items()):
    a, b = pair.get("A"), pair.get("B")
    if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise ValueError(
        f"{directory / ADAPTER_WEIGHTS}: layer {module} needs lora_A [r, in] and lora_B [out, r]; "
        f"got { ({k: v.shape for k, v in pair.items()}) }"
      )
    factors[module] = (a, b)
  if not factors:
    raise ValueError(f"{directory / ADAPTER_WEIGHTS} holds no LoRA factors")
  return LoraAdapter(
    name=directory.name,
    rank=int(config["r"]),
    alpha=float(config["lora_alpha"]),
    dropout=float(config.get("lora_dropout", 0.0)),
    target_modules=targets if isinstance(targets, str) else tuple(targets),
    use_rslora=bool(config.get("use_rslora", False)),
    factors=factors,
  )


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


def _adapter_config(rank: int, alpha: float, modules: list[str], base: str) -> dict[str, Any]:
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
  _write(directory, tensors, r, alpha, sorted(merged.deltas), base_model_name_or_path)
  return {"rank": r, "relative_error": error}


def _write(
  directory: pathlib.Path,
  tensors: Mapping[str, Any],
  rank: int,
  alpha: float,
  modules: list[str],
  base: str,
) -> None:
  config = _adapter_config(rank, alpha, modules, base)
  (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
  hf_io.save_file(tensors, directory / ADAPTER_WEIGHTS)


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
  _write(
    directory,
    tensors,
    config.lora_rank,
    config.lora_alpha,
    sorted(modules),
    base_model_name_or_path,
  )
  return sorted(modules)


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
