"""Tests for moe_adapt.models.merge_files: out-of-core merges equal the in-memory ones."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from moe_adapt.core import merging
from moe_adapt.models import merge_files

# One shape for every tensor, so that each method compiles once per dtype.
SHAPES = {"a.kernel": (6, 5), "a.bias": (6, 5), "b.kernel": (6, 5)}


def members(tmp_path, k=3):
  rng = np.random.default_rng(0)
  trees, paths = [], []
  for i in range(k + 1):  # the last one is the base
    tree = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    tree["half"] = rng.normal(size=(6, 5)).astype(jnp.bfloat16)
    tree["ids"] = np.arange(4, dtype=np.int64) + i
    path = str(tmp_path / f"m{i}.safetensors")
    merge_files.write_safetensors(path, tree)
    trees.append(tree)
    paths.append(path)
  return trees[:k], paths[:k], trees[k], paths[k]


def load(out_dir):
  with open(os.path.join(out_dir, merge_files.INDEX_NAME)) as f:
    index = json.load(f)
  out = {}
  for name, shard in index["weight_map"].items():
    with safe_open(os.path.join(out_dir, shard), framework="flax") as f:
      out[name] = np.asarray(f.get_tensor(name))
  return out, index


def test_written_files_read_back_with_safetensors(tmp_path):
  trees, paths, _, _ = members(tmp_path)
  with safe_open(paths[1], framework="flax") as f:
    for name, value in trees[1].items():
      np.testing.assert_array_equal(np.asarray(f.get_tensor(name)), value)


def reference(method, stacked, b, tau, key, options):
  """The in-memory merge of one tensor, with the base added back where the method needs it."""
  if method == "task_arithmetic":
    return merging.task_arithmetic(stacked, b, **options)["t"]
  if method == "ties":
    return b["t"] + merging.ties_merge(tau, **options)["t"]
  return b["t"] + merging.dare(key, tau, **options)["t"]


@pytest.mark.parametrize(
  "method,options",
  [
    ("task_arithmetic", {"scale": 0.5}),
    ("ties", {"density": 0.4, "zero_sign": "positive"}),
    ("dare", {"density": 0.5}),
  ],
)
def test_merge_equals_in_memory_merge(tmp_path, method, options):
  trees, paths, base_tree, base = members(tmp_path)
  key = jax.random.key(1)
  out_dir = str(tmp_path / "out")
  report = merge_files.merge_safetensors(
    paths, out_dir, method=method, base=base, key=key, shard_bytes=100, **options
  )
  got, index = load(out_dir)
  assert len(report["shards"]) > 1 and set(index["weight_map"]) == set(trees[0])
  assert index["metadata"]["total_size"] == report["output_bytes"]
  np.testing.assert_array_equal(got["ids"], trees[0]["ids"])  # non-floating: copied
  for i, name in enumerate(trees[0]):
    if name == "ids":
      continue
    stacked = {"t": jnp.stack([t[name] for t in trees])}
    b = {"t": jnp.asarray(base_tree[name])}
    tau = merging.task_vectors(stacked, b)
    k = jax.random.fold_in(key, i)
    ref = reference(method, stacked, b, tau, k, options)
    assert got[name].dtype == trees[0][name].dtype
    np.testing.assert_allclose(
      np.asarray(got[name], np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2
    )
    if got[name].dtype == np.float32:
      np.testing.assert_allclose(got[name], np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_bad_input(tmp_path):
  trees, paths, _, _ = members(tmp_path)
  odd = str(tmp_path / "odd.safetensors")
  merge_files.write_safetensors(odd, {**trees[0], "a.bias": np.zeros(4, np.float32)})
  with pytest.raises(ValueError, match=r"paths\[1\] .*tensor 'a.bias' is F32\[4\]; accepted"):
    merge_files.merge_safetensors([paths[0], odd], str(tmp_path / "o1"), method="average")
  fewer = str(tmp_path / "fewer.safetensors")
  merge_files.write_safetensors(fewer, {"a.bias": trees[0]["a.bias"]})
  with pytest.raises(ValueError, match=r"paths\[1\] .*the same tensor names"):
    merge_files.merge_safetensors([paths[0], fewer], str(tmp_path / "o2"), method="average")
  with pytest.raises(ValueError, match="method='slerp' is invalid"):
    merge_files.merge_safetensors(paths, str(tmp_path / "o3"), method="slerp")
  with pytest.raises(ValueError, match="key is None"):
    merge_files.merge_safetensors(paths, str(tmp_path / "o4"), method="dare", density=0.5)
  merge_files.merge_safetensors(paths, str(tmp_path / "o5"), method="average")
  with pytest.raises(ValueError, match="already holds model-00001-of-00001"):
    merge_files.merge_safetensors(paths, str(tmp_path / "o5"), method="average")
