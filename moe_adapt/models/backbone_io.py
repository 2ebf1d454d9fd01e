"""Meta-DMoE's shared backbone: read from a checkpoint directory, saved and loaded as msgpack.

`backbone.checkpoint` (configs/meta_dmoe.py) is either a Hugging Face / timm ResNet
checkpoint directory (`backbone_checkpoint` reads its header: the network, which becomes the
experts' and the student's architecture, and its input normalisation;
`backbone_from_checkpoint` its weights) or a file written by `save_backbone` (every run
writes `<workdir>/backbone.msgpack`), read back by `load_backbone` with its shapes checked
against the model's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import serialization

from moe_adapt.models import checkpoints

PyTree = Any


def save_backbone(path: str, variables: PyTree) -> None:
  """Writes {'params', 'batch_stats'} as a msgpack file that `load_backbone` reads."""
  blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(variables)))
  epath.Path(path).write_bytes(blob)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.shape(v) for path, v in flat}


# Checkpoint architectures (models.checkpoints) that can be the shared backbone.
BACKBONE_ARCHITECTURES = ("resnet", "timm_resnet")


@dataclasses.dataclass(frozen=True)
class BackboneCheckpoint:
  """A Hugging Face / timm checkpoint directory as the shared backbone (header only).

  Attributes:
    architecture: one of BACKBONE_ARCHITECTURES.
    module: the checkpoint's backbone, images [B, H, W, C] (normalised) -> features [B, D].
    mean: [C] per-channel mean subtracted from images in [0, 1].
    std: [C] per-channel standard deviation dividing them after.
  """

  architecture: str
  module: Any
  mean: np.ndarray
  std: np.ndarray

  def check_input(self, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3 or input_shape[-1] != self.mean.shape[0]:
      raise ValueError(
        f"backbone.checkpoint takes {self.mean.shape[0]}-channel images [H, W, C] but the "
        f"benchmark's inputs have shape {tuple(input_shape)}; accepted: an image benchmark "
        f"with {self.mean.shape[0]} channels (e.g. 'tfds')"
      )

  def info(self, path: str) -> dict:
    return {
      "checkpoint": str(path),
      "architecture": self.architecture,
      "input_mean": self.mean.tolist(),
      "input_std": self.std.tolist(),
    }


def backbone_checkpoint(path: str) -> BackboneCheckpoint | None:
  """`backbone.checkpoint` read as a checkpoint directory (headers only), or None.

  None for '' and for a file (a `save_backbone` file, read by `load_backbone`).

  Raises:
    ValueError: naming backbone.checkpoint: a directory without a checkpoint, or of
      another architecture than a ResNet.
  """
  if not path or not epath.Path(path).is_dir():
    return None
  field = f"backbone.checkpoint={path!r}"
  try:
    architecture, _, module, _, _ = checkpoints.plan(path)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(
      f"{field} cannot be loaded: {e}; accepted: a Hugging Face / timm ResNet checkpoint "
      "directory (config.json + model.safetensors)"
    ) from None
  if architecture not in BACKBONE_ARCHITECTURES:
    raise ValueError(
      f"{field} holds a {architecture!r} checkpoint; accepted: "
      f"{', '.join(BACKBONE_ARCHITECTURES)} (a ResNet image backbone)"
    )
  mean, std = checkpoints.input_normalization(path)
  return BackboneCheckpoint(architecture, module, mean, std)


def normalize_splits(splits, mean: np.ndarray, std: np.ndarray):
  """`splits` (a data.DomainSplits, images in [0, 1]) with (x - mean) / std, new arrays."""
  return splits._replace(
    **{
      name: part._replace(x=((part.x - mean) / std).astype(np.float32))
      for name, part in splits._asdict().items()
    }
  )


def backbone_from_checkpoint(path: str, template: PyTree) -> PyTree:
  """The shared backbone from a Hugging Face / timm ResNet checkpoint directory.

  The checkpoint's backbone ('params' and 'batch_stats') replaces `template`'s under
  'backbone'; the classification head stays `template`'s (a new head for the benchmark's
  classes; the checkpoint's own head, if any, is not used).

  Raises:
    ValueError: naming backbone.checkpoint: no checkpoint there, another architecture, or
      a backbone whose tensors differ from `template`'s.
  """
  field = f"backbone.checkpoint={path!r}"
  if backbone_checkpoint(path) is None:
    raise ValueError(f"{field} is not a checkpoint directory")
  ckpt = checkpoints.load_checkpoint(path)
  loaded = {
    "params": ckpt.variables["params"],
    "batch_stats": ckpt.variables.get("batch_stats", {}),
  }
  want = {
    "params": template["params"]["backbone"],
    "batch_stats": template.get("batch_stats", {}).get("backbone", {}),
  }
  want_shapes, got_shapes = _flat_shapes(want), _flat_shapes(loaded)
  differ = sorted(
    k for k in set(want_shapes) | set(got_shapes) if want_shapes.get(k) != got_shapes.get(k)
  )
  if differ:
    raise ValueError(
      f"{field} is a {ckpt.architecture} whose backbone differs from the model at "
      f"{len(differ)} tensor(s), first {differ[0]!r}: {got_shapes.get(differ[0])} in the "
      f"checkpoint, {want_shapes.get(differ[0])} in the model; accepted: a model built from "
      "that checkpoint (make_setup does so)"
    )
  as_jax = functools.partial(jax.tree.map, jnp.asarray)
  return {
    "params": {**template["params"], "backbone": as_jax(loaded["params"])},
    "batch_stats": {**template.get("batch_stats", {}), "backbone": as_jax(loaded["batch_stats"])},
  }


def load_backbone(path: str, template: PyTree) -> PyTree:
  """Reads a `save_backbone` file and checks it against `template` (the model's variables).

  A directory is read as a Hugging Face / timm checkpoint (`backbone_from_checkpoint`).

  Raises:
    ValueError: naming the first parameter (in the model's order) that is missing from
      the file or whose shape differs, or the first one the model does not have.
  """
  file = epath.Path(path)
  if file.is_dir():
    return backbone_from_checkpoint(path, template)
  if not file.exists():
    raise ValueError(
      f"backbone.checkpoint={path!r} does not exist; accepted: a file written by "
      "models.backbone_io.save_backbone (e.g. <workdir>/backbone.msgpack of an earlier run) or a "
      "Hugging Face / timm ResNet checkpoint directory"
    )
  loaded = serialization.msgpack_restore(file.read_bytes())
  want, got = _flat_shapes(template), _flat_shapes(loaded)
  for name, shape in want.items():
    if name not in got:
      raise ValueError(f"backbone.checkpoint={path!r} lacks parameter {name!r} (shape {shape})")
    if tuple(got[name]) != tuple(shape):
      raise ValueError(
        f"backbone.checkpoint={path!r}: parameter {name!r} has shape {tuple(got[name])}, "
        f"the model expects {tuple(shape)}"
      )
  extra = [n for n in got if n not in want]
  if extra:
    raise ValueError(
      f"backbone.checkpoint={path!r} has parameter {extra[0]!r}, which the model does not have"
    )
  return serialization.from_state_dict(template, loaded)
