"""The workdir: the unit of resumption of a run.

A workdir holds `config.json` (the resolved config), `metrics.jsonl`,
`checkpoints/<stage>/` and, once the run has finished, `results.json`.
`prepare_workdir` decides whether a command may run in a directory: a new or
empty one is initialised, one holding the same config is resumed, and one
holding another config is refused unless `overwrite=True`, which moves the old
contents aside (into `previous-<UTC time>/`) rather than deleting them.

Paths are local or remote (`gs://bucket/dir`); paths, atomic writes and JSON files are
`moe_adapt.train.files`, whose names stay importable here.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from etils import epath

from moe_adapt.train.files import (
  as_path,
  dumps_json,
  is_local,
  native_path,
  to_json_compatible,
  write_bytes_atomic,
  write_json_atomic,
)

__all__ = [
  "CONFIG_FILE",
  "LOCK_FILE",
  "MOVED_NOTE",
  "PREVIOUS_PREFIX",
  "RESULTS_FILE",
  "ConfigMismatchError",
  "WorkdirError",
  "as_path",
  "config_diff",
  "dumps_json",
  "finished_results",
  "flatten_dict",
  "is_local",
  "native_path",
  "prepare_workdir",
  "read_json",
  "read_results",
  "to_json_compatible",
  "write_bytes_atomic",
  "write_json_atomic",
]

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
PREVIOUS_PREFIX = "previous-"
# The lock of the process using the workdir (`workdir_lock`): never moved aside.
LOCK_FILE = "LOCK.json"
# Written into previous-<time>/ on object stores, which have no empty folders: it makes
# the folder exist before the old entries are renamed into it.
MOVED_NOTE = "MOVED_ASIDE.txt"
# Files and directories that only a run writes: a workdir holding any of them but
# no config.json cannot be told apart from a run of an unknown config.
_RUN_ARTEFACTS = ("checkpoints", "metrics.jsonl", RESULTS_FILE)


class WorkdirError(ValueError):
  """The workdir cannot be used (not creatable, not writable, or holds other contents)."""


class ConfigMismatchError(WorkdirError):
  """The workdir holds a run of a different config."""


def read_json(path: str | os.PathLike) -> Any:
  """Parses the JSON file at `path`; `WorkdirError` naming the file if it is not valid JSON."""
  path = as_path(path)
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{path} is not valid JSON ({e})") from e


def read_results(workdir: str | os.PathLike) -> dict | None:
  """The run's `results.json` as a dict, or None if the run has not finished."""
  path = as_path(workdir) / RESULTS_FILE
  if not path.is_file():
    return None
  return read_json(path)


def flatten_dict(d: Mapping, prefix: str = "") -> dict[str, Any]:
  """Flattens nested mappings into one level with dotted keys.

  `{"a": {"b": 1, "c": [2]}, "d": {}}` -> `{"a.b": 1, "a.c": [2], "d": {}}`:
  lists and other values are leaves, and an empty mapping stays a leaf so that
  it differs from an absent key.
  """
  out: dict[str, Any] = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(flatten_dict(value, prefix=f"{name}."))
    else:
      out[name] = value
  return out


_ABSENT = "<absent>"


def config_diff(stored: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
  """(dotted key, stored value, new value) for every key whose values differ, sorted."""
  a, b = flatten_dict(stored), flatten_dict(new)
  return [
    (k, a.get(k, _ABSENT), b.get(k, _ABSENT))
    for k in sorted(set(a) | set(b))
    if a.get(k, _ABSENT) != b.get(k, _ABSENT)
  ]


def _is_primary() -> bool:
  import jax  # Deferred: the workdir helpers are also useful without a backend.

  return jax.process_index() == 0


def _failed_on_primary(failed: bool) -> bool:
  """Process 0's `failed`, sent to every process (also a barrier: the others wait for it)."""
  import jax

  if jax.process_count() == 1:
    return failed
  import numpy as np
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))


def _utc_stamp() -> str:
  return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def _move_contents_aside(path: epath.Path) -> epath.Path | None:
  """Moves every entry of `path` but older `previous-*` folders and the lock aside."""
  entries = [
    p for p in path.iterdir() if not p.name.startswith(PREVIOUS_PREFIX) and p.name != LOCK_FILE
  ]
  if not entries:
    return None
  stamp = _utc_stamp()
  target = path / f"{PREVIOUS_PREFIX}{stamp}"
  n = 1
  while target.exists():  # Two overwrites within one second.
    target = path / f"{PREVIOUS_PREFIX}{stamp}-{n}"
    n += 1
  target.mkdir()
  if not is_local(path):
    (target / MOVED_NOTE).write_text(f"Moved aside from {path} at {stamp} by --overwrite.\n")
  for entry in entries:
    # Local: a rename on the same filesystem, never a copy. Remote: the object store's
    # move (copies and deletes, entry by entry).
    entry.rename(target / entry.name)
  return target


def prepare_workdir(
  workdir: str | os.PathLike, config: Mapping, *, overwrite: bool = False
) -> pathlib.Path | epath.Path:
  """Creates, resumes or (with `overwrite`) restarts the workdir of a run.

  - New or empty directory: created, `config.json` written.
  - `config.json` present and equal to `config` (after a JSON round trip, so
    tuples equal lists): the run resumes; nothing is written.
  - `config.json` present and different: `ConfigMismatchError` listing the
    differing dotted keys.
  - `overwrite=True` on a non-empty directory: everything in it (except older
    `previous-*` folders) is moved into `<workdir>/previous-<UTC time>/`, then
    the directory starts fresh. Nothing is ever deleted.

  With several JAX processes only process 0 touches the files (call this after
  `mesh.initialize_distributed`); the others wait for it.

  Args:
    workdir: the directory of the run: local, or remote such as `gs://bucket/dir`.
    config: the resolved config as a plain nested dict (e.g. `config.to_dict()`).
    overwrite: move existing contents aside instead of refusing a different config.

  Returns:
    The workdir: an absolute `pathlib.Path` when local, else an `epath.Path`.

  Raises:
    WorkdirError: (a ValueError) the directory cannot be created or written, its
      config.json is unreadable, or it holds run outputs but no config.json.
    ConfigMismatchError: (a WorkdirError) it holds a different config.
    ValueError: `config` is not a mapping or not JSON-serialisable.
  """
  if not isinstance(config, Mapping):
    raise ValueError(f"config must be a mapping (e.g. config.to_dict()); got {type(config)}")
  try:
    new = to_json_compatible(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config is not JSON-serialisable: {e}") from e
  path = as_path(workdir)
  error = None
  if _is_primary():
    try:
      _prepare(path, workdir, new, overwrite=overwrite)
    except WorkdirError as e:
      error = e
  if _failed_on_primary(error is not None) and error is None:
    raise WorkdirError(
      f"workdir={os.fspath(workdir)!r} could not be prepared by process 0 (see its error)"
    )
  if error is not None:
    raise error
  return native_path(path)


def _holds_config(path: epath.Path, where: str, new: dict) -> bool:
  """Whether `path` holds config `new` (True) or nothing of a run (False); read-only.

  Raises:
    ConfigMismatchError: it holds another config.
    WorkdirError: it holds run outputs but no config.json.
  """
  config_path = path / CONFIG_FILE
  if config_path.exists():
    stored = read_json(config_path)
    if stored == new:
      return True
    diff = config_diff(stored if isinstance(stored, Mapping) else {}, new)
    lines = "\n".join(f"  {k}: stored={a!r} new={b!r}" for k, a, b in diff)
    raise ConfigMismatchError(
      f"{where} holds a run with a different config ({len(diff)} differing keys):\n{lines}\n"
      "Pass --overwrite to start over (the old contents are moved to "
      f"{path}/{PREVIOUS_PREFIX}<time>/, nothing is deleted), or choose another --workdir."
    )
  found = [name for name in _RUN_ARTEFACTS if (path / name).exists()]
  if found:
    raise WorkdirError(
      f"{where} holds run outputs ({', '.join(found)}) but no {CONFIG_FILE}, so they cannot "
      "be matched to this config. Pass --overwrite to move them aside, or choose another "
      "--workdir."
    )
  return False


def finished_results(workdir: str | os.PathLike, config: Mapping) -> dict | None:
  """The stored results of a finished run of `config` in `workdir`, else None; read-only.

  Lets a command answer a finished run, or refuse a workdir of another config, before it
  takes the workdir's lock (`workdir_lock`), so that such a command changes nothing.

  Raises:
    ConfigMismatchError: the workdir holds a run of another config.
    WorkdirError: it holds run outputs but no config.json, or a file is not valid JSON.
    ValueError: `config` is not JSON-serialisable.
  """
  path = as_path(workdir)
  try:
    new = to_json_compatible(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config is not JSON-serialisable: {e}") from e
  try:
    if not path.is_dir() and is_local(path):
      return None
  except OSError:
    return None
  if not _holds_config(path, f"workdir={os.fspath(workdir)!r}", new):
    return None
  return read_results(path)


def _prepare(path: epath.Path, workdir: Any, new: dict, *, overwrite: bool) -> None:
  """The file operations of `prepare_workdir` (process 0 only)."""
  where = f"workdir={os.fspath(workdir)!r}"
  try:
    path.mkdir(parents=True, exist_ok=True)
  except FileExistsError as e:
    raise WorkdirError(f"{where} cannot be created: {path} exists and is not a directory") from e
  except OSError as e:
    raise WorkdirError(f"{where} cannot be created: {e.strerror or e}") from e
  if is_local(path) and not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f"{where} is not writable; choose another --workdir")

  config_path = path / CONFIG_FILE
  if overwrite:
    try:
      _move_contents_aside(path)
    except OSError as e:
      raise WorkdirError(f"{where}: cannot move its contents aside: {e}") from e
  elif _holds_config(path, where, new):
    return
  try:
    write_json_atomic(config_path, new)
  except OSError as e:
    raise WorkdirError(f"{where} is not writable: {e.strerror or e}") from e
