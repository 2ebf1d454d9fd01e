"""A content-addressed cache of finished training stages, shared by the runs of a sweep.

An ablation that changes only the last stage of a pipeline (say the distillation
target of Meta-DMoE's meta-training) need not retrain the experts: a finished
stage's checkpoint directory is stored under a key made from exactly the config
fields that stage depends on, and a later run whose fields are equal copies it
into its own workdir instead of training. Copies (not links) keep every workdir
self-contained; entries are written to a temporary name and renamed into place,
so concurrent runs never see a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from moe_adapt.train.workdir import flatten_dict


def stage_key(config: Mapping[str, Any], fields: Sequence[str]) -> str:
  """A short hash of the config entries at or below the dotted prefixes `fields`."""
  flat = flatten_dict(json.loads(json.dumps(dict(config))))
  selected = {k: v for k, v in flat.items() if any(k == f or k.startswith(f + ".") for f in fields)}
  blob = json.dumps(selected, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _entry(cache_dir: str | os.PathLike, stage: str, key: str) -> pathlib.Path:
  return pathlib.Path(cache_dir) / f"{stage}-{key}"


def fetch(cache_dir: str | os.PathLike, stage: str, key: str, dest: str | os.PathLike) -> bool:
  """Copies the cached stage into `dest` if `dest` does not exist yet; True if it did."""
  dest, entry = pathlib.Path(dest), _entry(cache_dir, stage, key)
  if dest.exists() or not entry.is_dir():
    return False
  tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
  shutil.copytree(entry, tmp)
  os.replace(tmp, dest)
  return True


def store(cache_dir: str | os.PathLike, stage: str, key: str, src: str | os.PathLike) -> None:
  """Stores the finished stage directory `src` under its key (no-op if present)."""
  entry = _entry(cache_dir, stage, key)
  if entry.exists():
    return
  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = entry.with_name(f".{entry.name}.tmp-{uuid.uuid4().hex[:8]}")
  shutil.copytree(src, tmp)
  try:
    os.rename(tmp, entry)
  except OSError:  # Another run stored the same entry first.
    shutil.rmtree(tmp, ignore_errors=True)
