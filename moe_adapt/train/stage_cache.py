"""A content-addressed cache of finished training stages, shared by the runs of a sweep.

An ablation that changes only the last stage of a pipeline (say the distillation
target of Meta-DMoE's meta-training) need not retrain the experts: a finished
stage's checkpoint directory is stored under a key made from exactly the config
fields that stage depends on, and a later run whose fields are equal copies it
into its own workdir instead of training. Copies (not links) keep every workdir
self-contained.

Concurrent runs never see a half-written entry or stage directory:

- local paths: entries and fetched stages are written under a temporary name and
  renamed into place (atomic);
- remote paths (`gs://...`), where a folder rename is a copy and a delete: an entry
  counts only once its marker object `<stage>-<key>.complete` exists, written after
  the copy; a fetched stage is copied into place with each folder's
  `commit_success.txt` last, so that a copy cut short leaves step folders that the
  `Checkpointer` treats as unfinished saves (ignored, then removed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from moe_adapt.train.checkpoint import COMMIT_FILE
from moe_adapt.train.workdir import as_path, flatten_dict, is_local

COMPLETE_SUFFIX = ".complete"


def stage_key(config: Mapping[str, Any], fields: Sequence[str]) -> str:
  """A short hash of the config entries at or below the dotted prefixes `fields`."""
  flat = flatten_dict(json.loads(json.dumps(dict(config))))
  selected = {k: v for k, v in flat.items() if any(k == f or k.startswith(f + ".") for f in fields)}
  blob = json.dumps(selected, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _entry(cache_dir: str | os.PathLike, stage: str, key: str) -> epath.Path:
  return as_path(cache_dir) / f"{stage}-{key}"


def _marker(entry: epath.Path) -> epath.Path:
  return entry.with_name(entry.name + COMPLETE_SUFFIX)


def _is_complete(entry: epath.Path) -> bool:
  """A local entry exists only once complete (renamed into place); a remote one has a marker."""
  return entry.is_dir() if is_local(entry) else _marker(entry).exists()


def copy_tree(src: epath.Path, dst: epath.Path) -> None:
  """Copies the folder `src` to `dst` (created; existing files are overwritten).

  Between two local paths: `shutil.copytree`. Otherwise file by file through epath
  (any mix of local and remote), each folder's orbax commit file last.
  """
  if is_local(src) and is_local(dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return
  dst.mkdir(parents=True, exist_ok=True)
  children = sorted(src.iterdir(), key=lambda p: (p.name == COMMIT_FILE, p.name))
  for child in children:
    if child.is_dir():
      copy_tree(child, dst / child.name)
    else:
      with child.open("rb") as reader, (dst / child.name).open("wb") as writer:
        shutil.copyfileobj(reader, writer)


def fetch(cache_dir: str | os.PathLike, stage: str, key: str, dest: str | os.PathLike) -> bool:
  """Copies the cached stage into `dest` if `dest` does not exist yet; True if it did."""
  dest, entry = as_path(dest), _entry(cache_dir, stage, key)
  if dest.exists() or not _is_complete(entry):
    return False
  if not is_local(dest):
    copy_tree(entry, dest)
    return True
  tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
  copy_tree(entry, tmp)
  os.replace(tmp, dest)
  return True


def store(cache_dir: str | os.PathLike, stage: str, key: str, src: str | os.PathLike) -> None:
  """Stores the finished stage directory `src` under its key (no-op if present)."""
  entry, src = _entry(cache_dir, stage, key), as_path(src)
  if _is_complete(entry):
    return
  entry.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(entry):
    # Runs storing the same key at once write the same content; the marker comes last.
    copy_tree(src, entry)
    _marker(entry).write_text(f"{src}\n")
    return
  tmp = entry.with_name(f".{entry.name}.tmp-{uuid.uuid4().hex[:8]}")
  copy_tree(src, tmp)
  try:
    os.rename(tmp, entry)
  except OSError:  # Another run stored the same entry first.
    shutil.rmtree(tmp, ignore_errors=True)
