"""Adapter parameters kept separable: split, merge, masks for training, counts.

Every adapter parameter sits under a key starting with 'adapter' or 'lora' (see
`moe_adapt.models.adapters`); these functions cut a parameter tree along that rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

ADAPTER_PREFIXES = ("adapter", "lora")


HEAD_KEY = "head"


TRAIN_MODES = ("adapters", "head", "all")


def is_adapter_key(key: str) -> bool:
  """Whether a parameter-tree key holds adapter parameters (prefix 'adapter' or 'lora')."""
  return key.startswith(ADAPTER_PREFIXES)


def check_params_tree(params: Any, arg: str) -> None:
  """Raises ValueError unless `params` (argument `arg`) is a nested mapping."""
  if not isinstance(params, Mapping):
    raise ValueError(
      f"{arg} must be a nested mapping of parameters (variables['params']), "
      f"got {type(params).__name__}"
    )


def split_params(
  params: Mapping[str, Any], *, include_head: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Cuts `params` into (backbone, adapters), two trees with the original nesting.

  Args:
    params: a model's `variables['params']`.
    include_head: also move the top-level 'head' subtree into the second tree (what
      `train='adapters'` trains).

  Returns:
    (backbone, adapters); `merge_params(backbone, adapters)` gives `params` back. Branches
    left empty are dropped, so adapter trees of models with the same config have the same
    structure and can be stacked, averaged and compared.
  """
  check_params_tree(params, "params")

  def split(tree: Mapping[str, Any], top: bool) -> tuple[dict, dict]:
    backbone, adapters = {}, {}
    for key, value in tree.items():
      if is_adapter_key(key) or (top and include_head and key == HEAD_KEY):
        adapters[key] = value
      elif isinstance(value, Mapping):
        b, a = split(value, False)
        if b:
          backbone[key] = b
        if a:
          adapters[key] = a
      else:
        backbone[key] = value
    return backbone, adapters

  return split(params, True)


def merge_params(backbone: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `split_params`: the union of two trees; a leaf present in both is an error."""
  check_params_tree(backbone, "backbone")
  check_params_tree(adapters, "adapters")

  def merge(a: Mapping[str, Any], b: Mapping[str, Any], path: str) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
      if key not in out:
        out[key] = value
      elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
        out[key] = merge(out[key], value, f"{path}/{key}")
      else:
        raise ValueError(f"merge_params: {path}/{key} is in both backbone and adapters")
    return out

  return merge(backbone, adapters, "")


def trainable_mask(params: Mapping[str, Any], *, train: str) -> dict[str, Any]:
  """A tree of bools like `params`: True where a leaf is trained.

  Args:
    params: a model's `variables['params']`.
    train: 'adapters' (adapter leaves and the top-level 'head'), 'head' (the 'head' only),
      or 'all'.

  Returns:
    A tree for `optax.masked(tx, mask)`; see also `trainable_optimizer`.
  """
  check_params_tree(params, "params")
  if train not in TRAIN_MODES:
    raise ValueError(f"train={train!r} is unknown; accepted: {', '.join(TRAIN_MODES)}")
  if train != "all" and HEAD_KEY not in params:
    raise ValueError(
      f"train={train!r} needs a top-level '{HEAD_KEY}' in params; got {list(params)}"
    )
  if train == "adapters" and not split_params(params)[1]:
    raise ValueError(
      "train='adapters' but params hold no adapter parameters (keys starting with "
      f"{' or '.join(ADAPTER_PREFIXES)}); build the model with an AdapterConfig kind != 'none'"
    )

  def mark(tree: Any, on: bool, top: bool) -> Any:
    if not isinstance(tree, Mapping):
      return on
    out = {}
    for key, value in tree.items():
      key_on = on or train == "all"
      key_on = key_on or (top and key == HEAD_KEY)
      key_on = key_on or (train == "adapters" and is_adapter_key(key))
      out[key] = mark(value, key_on, False)
    return out

  return mark(params, False, True)


def trainable_optimizer(
  tx: optax.GradientTransformation, params: Mapping[str, Any], *, train: str
) -> optax.GradientTransformation:
  """`tx` on the leaves selected by `trainable_mask`, zero updates (frozen) elsewhere.

  This still differentiates through every leaf; where speed matters, differentiate only the
  trainable tree: `grad(lambda a: loss(merge_params(backbone, a)))`.
  """
  mask = trainable_mask(params, train=train)
  labels = jax.tree.map(lambda on: "trainable" if on else "frozen", mask)
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def count_params(tree: Any, mask: Any = None) -> int:
  """Number of scalars in a tree of arrays or shape structs (where `mask` is True, if given)."""
  # Works on arrays and on `jax.eval_shape` results alike.
  sizes = [math.prod(getattr(x, "shape", None) or jnp.shape(x)) for x in jax.tree.leaves(tree)]
  if mask is None:
    return int(sum(sizes))
  masks = jax.tree.leaves(mask)
  if len(masks) != len(sizes):
    raise ValueError(f"mask has {len(masks)} leaves but the tree has {len(sizes)}")
  return int(sum(n for n, on in zip(sizes, masks) if on))
