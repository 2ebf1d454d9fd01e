"""Reading and writing safetensors checkpoints tensor by tensor, with name/shape checks.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed
by `model.safetensors.index.json` (`{"weight_map": {tensor: file}}`), as transformers and
timm write them. Loaders describe what they expect as a `TensorSpec` per checkpoint name;
`check_tensors` compares that with the names and shapes in the file headers (no tensor data
is read) and raises one `WeightLoadError` listing every missing, unexpected and mis-shaped
tensor; `read_tensors` then reads one tensor at a time, converts it (transpose of a Linear
weight, layout of a conv kernel) and places it into a Flax variables tree, so the peak
memory is the loaded tree plus one tensor, never two copies of the model. float16 and
bfloat16 tensors are converted to float32.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# How a checkpoint tensor becomes a Flax leaf.
TRANSFORMS = ("copy", "linear", "conv")


class WeightLoadError(ValueError):
  """A checkpoint does not match the configured architecture."""


class TensorSpec(NamedTuple):
  """Where a checkpoint tensor goes.

  Attributes:
    path: variables-tree path of the Flax leaf, starting with the collection ('params',
      'batch_stats').
    shape: the tensor's shape in the checkpoint.
    transform: 'copy'; 'linear' (torch Linear weight [out, in] → kernel [in, out]); 'conv'
      (torch conv weight [out, in, kh, kw] → Flax kernel [kh, kw, in, out]).
  """

  path: tuple[str, ...]
  shape: tuple[int, ...]
  transform: str = "copy"


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """The `config.json` of a checkpoint directory, as a dict."""
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint directory {directory} has no {CONFIG_FILE}")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  if not isinstance(config, dict):
    raise ValueError(f"{path} must hold a JSON object; got {type(config).__name__}")
  return config


def weight_files(directory: str | os.PathLike[str]) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint directory (one, or the shards of its index)."""
  directory = pathlib.Path(directory)
  if (directory / WEIGHTS_FILE).is_file():
    return [directory / WEIGHTS_FILE]
  if (directory / INDEX_FILE).is_file():
    with open(directory / INDEX_FILE, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [directory / shard for shard in shards]
  raise FileNotFoundError(f"checkpoint directory {directory} has no {WEIGHTS_FILE} or {INDEX_FILE}")


def tensor_shapes(files: list[pathlib.Path]) -> dict[str, tuple[int, ...]]:
  """Checkpoint tensor name → shape, read from the file headers only."""
  shapes: dict[str, tuple[int, ...]] = {}
  for path in files:
    with safetensors.safe_open(str(path), framework="numpy") as f:
      for name in f.keys():
        shapes[name] = tuple(f.get_slice(name).get_shape())
  return shapes


def check_tensors(
  expected: Mapping[str, TensorSpec],
  given: Mapping[str, tuple[int, ...]],
  *,
  what: str,
  hint: str = "",
) -> None:
  """Raises `WeightLoadError` naming every missing, unexpected and mis-shaped tensor.

  Args:
    expected: checkpoint name → spec, what the architecture needs.
    given: checkpoint name → shape, what the checkpoint holds (after ignored names and
      prefixes were removed).
    what: the architecture, for the message.
    hint: a line to add when most expected tensors are missing (e.g. which architecture the
      checkpoint's names look like).
  """
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  mismatched = sorted(
    f"{name}: checkpoint {tuple(given[name])}, config expects {expected[name].shape}"
    for name in set(given) & set(expected)
    if tuple(given[name]) != tuple(expected[name].shape)
  )
  if not (missing or unexpected or mismatched):
    return
  parts = [f"checkpoint does not match {what}:"]
  if expected and 2 * len(missing) > len(expected):
    parts.append(
      f"  {len(missing)} of its {len(expected)} tensors are not in the checkpoint: a "
      f"checkpoint of another architecture? {hint}".rstrip()
    )
  for title, items in (
    ("missing tensors", missing),
    ("unexpected tensors", unexpected),
    ("shape mismatches", mismatched),
  ):
    if items:
      parts.append(f"  {title} ({len(items)}):")
      parts.extend(f"    {item}" for item in items)
  raise WeightLoadError("\n".join(parts))


def convert(value: np.ndarray, transform: str) -> np.ndarray:
  """A checkpoint tensor in its Flax layout, float32 (see `TensorSpec`)."""
  value = np.asarray(value, dtype=np.float32)
  if transform == "linear":
    return value.T
  if transform == "conv":
    return value.transpose(2, 3, 1, 0)
  if transform == "copy":
    return value
  raise ValueError(f"transform={transform!r} is unknown; accepted: {', '.join(TRANSFORMS)}")


def place(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  """Sets `tree[path[0]]...[path[-1]] = value`, creating the nested dicts."""
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = value


def iter_tensors(files: list[pathlib.Path], names: set[str]) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) for each tensor in `names`, read one at a time from the files.

  The file is opened (memory-mapped) anew for each tensor: pages of a mapping count in the
  process's resident memory while it is open, so one mapping held over the whole load would
  show the file as a second copy of the model.
  """
  for path in files:
    with safetensors.safe_open(str(path), framework="numpy") as f:
      keys = [(name, f.get_slice(name).get_dtype()) for name in f.keys() if name in names]
    for name, dtype in keys:
      if dtype == "BF16":  # NumPy has no bfloat16: safetensors' numpy reader refuses it.
        yield name, _read_bfloat16(path, name)
        continue
      with safetensors.safe_open(str(path), framework="numpy") as f:
        value = f.get_tensor(name)
      yield name, value


def _read_bfloat16(path: pathlib.Path, name: str) -> np.ndarray:
  """One BF16 tensor of a safetensors file, read from its header's offsets."""
  with open(path, "rb") as f:
    header_size = int.from_bytes(f.read(8), "little")
    entry = json.loads(f.read(header_size))[name]
  begin, end = entry["data_offsets"]
  raw = np.fromfile(path, dtype="<u2", count=(end - begin) // 2, offset=8 + header_size + begin)
  return raw.view(jnp.bfloat16).reshape(entry["shape"])


def read_tensors(
  files: list[pathlib.Path], specs: Mapping[str, TensorSpec], rename: Mapping[str, str]
) -> dict[str, Any]:
  """Reads the tensors of `files` into a variables tree, one tensor at a time.

  Args:
    files: safetensors files.
    specs: (renamed) checkpoint name → where it goes; call `check_tensors` first.
    rename: file tensor name → the name `specs` uses (prefixes stripped); names absent
      from it are skipped (ignored buffers).

  Returns:
    {'params': ..., 'batch_stats': ...}: float32 jax arrays in Flax layouts.
  """
  tree: dict[str, Any] = {}
  for file_name, value in iter_tensors(files, set(rename)):
    spec = specs[rename[file_name]]
    place(tree, spec.path, jnp.asarray(convert(value, spec.transform)))
    del value  # Only one tensor's host copy lives at a time.
  return tree


def save_file(tensors: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
  """Writes float arrays as a safetensors file (float32, C-contiguous)."""
  arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}
  safetensors.numpy.save_file(arrays, str(path), metadata={"format": "pt"})
