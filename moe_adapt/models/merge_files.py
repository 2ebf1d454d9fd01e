"""Out-of-core merging of safetensors checkpoints, tensor by tensor, from disk to disk.

`merge_safetensors` reads the same tensor from each of K member files, merges it with a
`core.merging` function and writes it straight into the output file at its final offset,
so peak memory is a few times K × the largest tensor, whatever the checkpoints' total size.
Files are read with plain `seek`/`readinto`, not memory-mapped: a mapping of every member
would count K whole files against a process's address-space limit (`ulimit -v`).

Each member is one `.safetensors` file of name → tensor, all with the same names, shapes
and dtypes (Hugging Face / PEFT checkpoints go through their loaders first). The output is
one or more shards `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`
(`{"metadata": {"total_size": ...}, "weight_map": {name: shard}}`), as Hugging Face writes
sharded checkpoints.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import struct
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.core import merging

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(jnp.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
METHODS = ("average", "task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs")
INDEX_NAME = "model.safetensors.index.json"


def read_header(path: str) -> tuple[dict[str, dict], int]:
  """({name: {'dtype', 'shape', 'data_offsets'}}, byte offset of the data) of a file."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
  header.pop("__metadata__", None)
  for name, entry in header.items():
    if entry["dtype"] not in _DTYPES:
      raise ValueError(
        f"{path}: tensor {name!r} has dtype {entry['dtype']}; accepted: {', '.join(_DTYPES)}"
      )
  return header, 8 + size


def read_tensor(f, entry: dict, data_start: int) -> np.ndarray:
  """One tensor of an open file, read into a fresh array (no memory map)."""
  begin, end = entry["data_offsets"]
  out = np.empty(entry["shape"], _DTYPES[entry["dtype"]])
  f.seek(data_start + begin)
  if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
    raise ValueError(f"{f.name}: tensor data is truncated")
  return out


def _shard_plan(names: list[str], header: dict, shard_bytes: int) -> list[list[str]]:
  shards, current, size = [], [], 0
  for name in names:
    begin, end = header[name]["data_offsets"]
    if current and size + end - begin > shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(name)
    size += end - begin
  return [*shards, current]


def _write_header(f, names: list[str], header: dict) -> None:
  entries, offset = {}, 0
  for name in names:
    begin, end = header[name]["data_offsets"]
    entries[name] = {
      "dtype": header[name]["dtype"],
      "shape": header[name]["shape"],
      "data_offsets": [offset, offset + end - begin],
    }
    offset += end - begin
  entries["__metadata__"] = {"format": "pt"}
  text = json.dumps(entries, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
  f.write(struct.pack("<Q", len(text)) + text)


def _merge_one(method: str, stacked: jax.Array, base: jax.Array | None, key, options) -> Any:
  tree = {"t": stacked}
  if method == "average":
    return merging.weighted_average(tree, options.get("weights"))["t"]
  if method == "task_arithmetic":
    base_tree = None if base is None else {"t": base}
    return merging.task_arithmetic(tree, base_tree, **options)["t"]
  if base is not None:
    tree = merging.task_vectors(tree, {"t": base})
  if method == "ties":
    merged = merging.ties_merge(tree, **options)
  elif method == "dare":
    merged = merging.dare(key, tree, **options)
  elif method == "dare_ties":
    merged = merging.dare_ties(key, tree, **options)
  else:
    merged = merging.breadcrumbs(tree, **options)
  merged = merged["t"]
  return merged if base is None else (base.astype(jnp.float32) + merged).astype(base.dtype)


def _check_args(method: str, paths: Sequence[str], key: Any, options: dict) -> None:
  if method not in METHODS:
    raise ValueError(f"method={method!r} is invalid; accepted: {', '.join(METHODS)}")
  if not paths:
    raise ValueError("paths is empty; accepted: at least one safetensors file")
  if method in ("dare", "dare_ties") and key is None:
    raise ValueError(f"key is None; accepted: a PRNG key for method={method!r}")
  if options.get("trim", "leaf") != "leaf":
    raise ValueError("trim='member' is unsupported out of core; accepted: trim='leaf'")


def _check_headers(headers: list[tuple[dict, int]], files: list[str], num_paths: int) -> None:
  """Every file holds the tensors of paths[0], with the same dtypes and shapes."""
  first, _ = headers[0]
  names = list(first)
  for i, (header, _) in enumerate(headers[1:], start=1):
    arg = f"paths[{i}]" if i < num_paths else "base"
    if set(header) != set(first):
      diff = sorted(set(header) ^ set(first))[:3]
      raise ValueError(
        f"{arg} ({files[i]}) has tensors {len(header)} vs {len(first)} in paths[0], differing "
        f"in {diff}; accepted: the same tensor names in every file"
      )
    for name in names:
      a, b = header[name], first[name]
      if (a["dtype"], a["shape"]) != (b["dtype"], b["shape"]):
        raise ValueError(
          f"{arg} ({files[i]}): tensor {name!r} is {a['dtype']}{a['shape']}; accepted: "
          f"{b['dtype']}{b['shape']} as in paths[0]"
        )


def _merge_tensor(
  method: str,
  num_paths: int,
  has_base: bool,
  options: dict,
  tensors: list,
  key: jax.Array,
  index: int,
) -> np.ndarray:
  """One tensor of the output: floating ones merged, others copied from the first member.

  `tensors` holds the members' tensors, then the base's when `has_base`; the merge of
  tensor `index` gets the key `fold_in(key, index)`.
  """
  member_tensors = tensors[:num_paths]
  if not jnp.issubdtype(member_tensors[0].dtype, jnp.floating):
    return member_tensors[0]
  merged = _merge_one(
    method,
    jnp.stack(member_tensors),
    jnp.asarray(tensors[-1]) if has_base else None,
    jax.random.fold_in(key, index),
    options,
  )
  return np.asarray(merged).astype(member_tensors[0].dtype)


def _shard_names(out_dir: str, count: int) -> list[str]:
  """The names of `count` shards, or ValueError if `out_dir` holds one of them (or the index)."""
  shard_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
  for shard in [*shard_names, INDEX_NAME]:
    if os.path.exists(os.path.join(out_dir, shard)):
      raise ValueError(f"out_dir {out_dir} already holds {shard}; accepted: a folder without it")
  return shard_names


def _write_shards(
  files: list[str],
  headers: list[tuple[dict, int]],
  out_dir: str,
  shards: dict[str, list[str]],
  merge: Any,
  key: jax.Array,
) -> int:
  """Writes each shard (file name → its tensor names) tensor by tensor, then the index.

  Returns the total bytes written. `merge(tensors, key, i)` makes
  tensor i (its position in the first file's header) from the files' tensors.
  """
  first, _ = headers[0]
  handles = [open(p, "rb") for p in files]
  weight_map, total = {}, 0
  try:
    index_of = {name: i for i, name in enumerate(first)}
    for shard_name, shard in shards.items():
      with open(os.path.join(out_dir, shard_name), "wb") as out:
        _write_header(out, shard, first)
        for name in shard:
          tensors = [read_tensor(f, h[name], start) for f, (h, start) in zip(handles, headers)]
          result = merge(tensors, key, index_of[name])
          out.write(np.ascontiguousarray(result).reshape(-1).view(np.uint8).data)
          del tensors
          weight_map[name] = shard_name
          total += result.nbytes
  finally:
    for f in handles:
      f.close()
  with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return total


def merge_safetensors(
  paths: Sequence[str],
  out_dir: str,
  *,
  method: str,
  base: str | None = None,
  key: jax.Array | None = None,
  shard_bytes: int = 2**30,
  **options,
) -> dict:
  """Merges K safetensors files tensor by tensor into sharded safetensors in `out_dir`.

  Floating tensors are merged with `method`; other tensors (e.g. integer position ids) are
  copied from the first member. With `base`, members are full models: TIES, DARE,
  DARE-TIES and Breadcrumbs merge the task vectors θ_k − θ_base and add the base back;
  task arithmetic does the same; `average` ignores it. Without `base`, members are task
  vectors and the output is the merged task vector. TIES trims each tensor on its own (its
  `trim='leaf'`; whole-vector trimming needs every tensor at once).

  Args:
    paths: K member files.
    out_dir: output folder, created if missing; existing shards are not overwritten.
    method: `average` (options: weights), `task_arithmetic` (scale, weights), `ties`
      (density, scale, keep_rule, zero_sign), `dare` (density, rescale, scale), `dare_ties`
      (density, scale, zero_sign) or `breadcrumbs` (density, top_fraction, scale,
      keep_rule): the `core.merging` function of that name, with these keyword options.
    base: optional base-model file, with the members' names, shapes and dtypes.
    key: PRNG key for `dare` and `dare_ties` (tensor i uses `fold_in(key, i)`).
    shard_bytes: largest output shard (a single larger tensor gets its own shard).
    **options: passed to the merge function.

  Returns:
    report: tensors, input/output bytes, shard files, wall seconds and the process's peak
    resident memory (`ru_maxrss`, since the process started).
  """
  _check_args(method, paths, key, options)
  t0 = time.perf_counter()
  files = list(paths) + ([base] if base is not None else [])
  headers = [read_header(p) for p in files]
  first, _ = headers[0]
  names = list(first)
  _check_headers(headers, files, len(paths))
  os.makedirs(out_dir, exist_ok=True)
  plan = _shard_plan(names, first, shard_bytes)
  shard_names = _shard_names(out_dir, len(plan))
  key = jax.random.key(0) if key is None else key
  merge = functools.partial(_merge_tensor, method, len(paths), base is not None, options)
  total = _write_shards(files, headers, out_dir, dict(zip(shard_names, plan)), merge, key)
  return {
    "method": method,
    "members": len(paths),
    "tensors": len(names),
    "input_bytes": sum(os.path.getsize(p) for p in paths),
    "output_bytes": total,
    "shards": shard_names,
    "wall_s": round(time.perf_counter() - t0, 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1),
  }


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes {name: array} as one safetensors file (used to make test and benchmark members)."""
  header, offset = {}, 0
  for name, array in tensors.items():
    array = np.asarray(array)
    if array.dtype not in _CODES:
      raise ValueError(f"tensors[{name!r}] has dtype {array.dtype}; accepted: {sorted(_DTYPES)}")
    header[name] = {"dtype": _CODES[array.dtype], "shape": list(array.shape)}
    header[name]["data_offsets"] = [offset, offset + array.nbytes]
    offset += array.nbytes
  with open(path, "wb") as f:
    _write_header(f, list(tensors), header)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
