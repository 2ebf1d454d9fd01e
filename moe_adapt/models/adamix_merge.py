"""Single-adapter equivalents of trained AdaMix mixtures (`models.adamix`).

`merge_mixture_params` turns a model's mixture parameters into those of one module with the
experts' weights averaged (AdaMix's 'merged' inference, what is deployed);
`mixture_lora_delta` is one LoRA mixture projection's merged update;
`mixture_param_counts` counts the adapter parameters trained and deployed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from moe_adapt.core import merging
from moe_adapt.models import adapters as adapters_lib

MIXTURE_KINDS = ("adamix", "adamix_lora")


def mixture_lora_delta(
  lora_a: jax.Array, lora_b: jax.Array, *, scale: float, pairing: str = "independent"
) -> jax.Array:
  """The merged LoRA update ΔW [in, out] of one mixture projection.

  A routed leaf carries the expert axis (lora_a [M, in, r], lora_b [M, r, out]):

  - B shared: ΔW = scale·mean_i(A_i)·B, which equals mean_i(scale·A_i·B) exactly;
  - A shared: ΔW = scale·A·mean_i(B_i);
  - both routed, pairing='independent' (the official code, A and B drawn separately):
    ΔW = scale·mean_i(A_i)·mean_j(B_j), the mean over the M² sub-models A_i·B_j trained;
  - both routed, pairing='paired' (expert i = the pair (A_i, B_i)): ΔW =
    scale·mean_i(A_i·B_i), averaged in ΔW space without the cross terms A_i·B_j (i ≠ j).
  """
  if pairing not in adapters_lib.LORA_PAIRINGS:
    raise ValueError(
      f"pairing={pairing!r} is unknown; accepted: {', '.join(adapters_lib.LORA_PAIRINGS)}"
    )
  a_routed, b_routed = jnp.ndim(lora_a) == 3, jnp.ndim(lora_b) == 3
  if jnp.ndim(lora_a) not in (2, 3) or jnp.ndim(lora_b) not in (2, 3):
    raise ValueError(
      f"lora_a {jnp.shape(lora_a)} and lora_b {jnp.shape(lora_b)}; accepted: [M, in, r] or "
      "[in, r], and [M, r, out] or [r, out]"
    )
  if a_routed and b_routed and pairing == "paired":
    return scale * merging.weighted_average(jnp.einsum("mir,mro->mio", lora_a, lora_b))
  a = merging.weighted_average(lora_a) if a_routed else lora_a
  b = merging.weighted_average(lora_b) if b_routed else lora_b
  return scale * (a @ b)


def _check_kind(config: adapters_lib.AdapterConfig, fn: str) -> None:
  if not isinstance(config, adapters_lib.AdapterConfig) or config.kind not in MIXTURE_KINDS:
    kind = getattr(config, "kind", config)
    raise ValueError(f"{fn}: config.kind={kind!r} is invalid; accepted: {', '.join(MIXTURE_KINDS)}")


def _check_leaf(leaf: Any, routed: bool, m: int, path: str) -> None:
  """A routed leaf is [M, ...] (ndim 2 or 3), a shared one has no expert axis."""
  shape = jnp.shape(leaf)
  ndim = 3 if path.endswith(("kernel", "lora_a", "lora_b")) else 2
  ndim = ndim if routed else ndim - 1
  if len(shape) != ndim or (routed and shape[0] != m):
    want = f"[{m}, ...] with {ndim} axes" if routed else f"{ndim} axes (shared, no expert axis)"
    raise ValueError(
      f"merge_mixture_params: {path} has shape {shape}; the config "
      f"(num_experts={m}, share={'routed' if routed else 'shared'}) expects {want}"
    )


def _merge_adapter(
  tree: Mapping[str, Any], path: str, config: adapters_lib.AdapterConfig
) -> dict[str, Any]:
  """One bottleneck adapter from a mixture: routed leaves averaged, shared ones copied."""
  m = config.num_experts
  out = {}
  for name, routed in (("down", config.share != "down"), ("up", config.share != "up")):
    layer = tree.get(name)
    if not isinstance(layer, Mapping) or set(layer) != {"kernel", "bias"}:
      raise ValueError(f"merge_mixture_params: {path}/{name} must hold kernel and bias")
    for leaf in ("kernel", "bias"):
      _check_leaf(layer[leaf], routed, m, f"{path}/{name}/{leaf}")
    out[name] = merging.weighted_average(dict(layer)) if routed else dict(layer)
  return out


def _merge_lora(
  tree: Mapping[str, Any], path: str, config: adapters_lib.AdapterConfig
) -> dict[str, Any]:
  """One projection with its mixture's merged ΔW folded into the kernel, LoRA leaves dropped."""
  m = config.num_experts
  if "kernel" not in tree or "lora_a" not in tree or "lora_b" not in tree:
    raise ValueError(f"merge_mixture_params: {path} must hold kernel, lora_a and lora_b")
  _check_leaf(tree["lora_a"], config.share != "down", m, f"{path}/lora_a")
  _check_leaf(tree["lora_b"], config.share != "up", m, f"{path}/lora_b")
  out = {k: v for k, v in tree.items() if not k.startswith("lora")}
  delta = mixture_lora_delta(
    tree["lora_a"], tree["lora_b"], scale=config.lora_scale, pairing=config.lora_pairing
  )
  out["kernel"] = tree["kernel"] + delta.astype(tree["kernel"].dtype)
  return out


def merge_mixture_params(
  params: Mapping[str, Any], config: adapters_lib.AdapterConfig
) -> tuple[dict[str, Any], adapters_lib.AdapterConfig]:
  """The single-module equivalent of a model with AdaMix mixtures, for deployment and counts.

  Args:
    params: a model's `variables['params']` built with `config`.
    config: an AdapterConfig of kind 'adamix' or 'adamix_lora'.

  Returns:
    (params_single, single_config). For 'adamix' each mixture becomes one bottleneck
    adapter (routed kernels/biases averaged over the expert axis, shared ones copied) and
    single_config is the same config with kind='pfeiffer'. For 'adamix_lora' each
    projection's merged ΔW (`mixture_lora_delta`) is folded into its kernel, the LoRA leaves
    are dropped and single_config has kind='none' (the plain backbone). The model built with
    single_config and params_single computes the merged (mixture_inference='merged') forward.
  """
  _check_kind(config, "merge_mixture_params")
  if not isinstance(params, Mapping):
    raise ValueError(f"params must be a nested mapping of parameters, got {type(params).__name__}")
  found = [0]

  def walk(tree: Mapping[str, Any], path: str) -> dict[str, Any]:
    if config.kind == "adamix_lora" and ("lora_a" in tree or "lora_b" in tree):
      found[0] += 1
      return _merge_lora(tree, path, config)
    out = {}
    for key, value in tree.items():
      if config.kind == "adamix" and key.startswith("adapter") and isinstance(value, Mapping):
        found[0] += 1
        out[key] = _merge_adapter(value, f"{path}/{key}", config)
      elif isinstance(value, Mapping):
        out[key] = walk(value, f"{path}/{key}")
      else:
        out[key] = value
    return out

  merged = walk(params, "")
  if not found[0]:
    raise ValueError(
      f"merge_mixture_params: params hold no {config.kind!r} mixtures; build the model with "
      "this config"
    )
  single_kind = "pfeiffer" if config.kind == "adamix" else "none"
  return merged, dataclasses.replace(config, kind=single_kind)


def mixture_param_counts(
  params: Mapping[str, Any], config: adapters_lib.AdapterConfig
) -> dict[str, int]:
  """Adapter parameter counts: {'trainable_adapter', 'inference_adapter'}.

  'trainable_adapter' counts every mixture leaf (all experts; `adapters.split_params`);
  'inference_adapter' counts the adapter leaves left after `merge_mixture_params`: one
  bottleneck adapter per layer for 'adamix' (what the paper's "#Param" reports), 0 for
  'adamix_lora' (the update folds into the kernels). The classifier head is not included.
  """
  # Traced only: counting needs shapes, and this also accepts `jax.eval_shape` trees.
  single = jax.eval_shape(lambda p: merge_mixture_params(p, config)[0], params)
  return {
    "trainable_adapter": adapters_lib.count_params(adapters_lib.split_params(params)[1]),
    "inference_adapter": adapters_lib.count_params(adapters_lib.split_params(single)[1]),
  }
