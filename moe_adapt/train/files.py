"""Local or remote paths, atomic writes and JSON files, for the workdir and its artifacts.

Paths are local or remote (`gs://bucket/dir`, or any other scheme `etils.epath`
knows): every file operation goes through `epath.Path`. Atomic writes differ by
kind: a local file is written to a temporary file, fsynced and renamed over the
destination (`os.replace`); a remote object is written directly, because an
object store replaces an object in one step (a reader sees the old or the new
object, never a part), and a rename there would be a copy and a delete.
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from typing import Any

from etils import epath


def _json_default(obj: Any) -> Any:
  """Converts NumPy/JAX scalars and arrays and paths so that `json` can write them."""
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # NumPy / JAX arrays and scalars.
    return obj.tolist()
  raise TypeError(f"object of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def is_local(path: str | os.PathLike) -> bool:
  """Whether `path` is on a local filesystem, i.e. has no URL scheme such as `gs://`."""
  return "://" not in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: a local one with `~` expanded and made absolute.

  A remote path (`gs://bucket/dir`) is kept as it is. Never use `pathlib.Path` on
  such a string: it would collapse `gs://b` into the local relative path `gs:/b`.
  """
  path = epath.Path(path)
  return path.expanduser().absolute() if is_local(path) else path


def native_path(path: str | os.PathLike) -> pathlib.Path | epath.Path:
  """`as_path(path)`, as a `pathlib.Path` when local (with pathlib's whole API, e.g. rglob)."""
  path = as_path(path)
  return pathlib.Path(path) if is_local(path) else path


def to_json_compatible(obj: Any) -> Any:
  """`obj` after a JSON round trip (tuples become lists, NumPy scalars numbers)."""
  return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old or the new content, never a part.

  Local: into a temporary file in the same directory, flushed and fsynced, then
  renamed over `path` (`os.replace` is atomic on POSIX). Remote (e.g. `gs://`): the
  object is written directly, since an object write is atomic.

  Args:
    path: the destination file; its directory must exist (locally).
    data: the new content.

  Raises:
    OSError: if the file cannot be written.
  """
  path = as_path(path)
  if not is_local(path):
    path.write_bytes(data)
    return
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  # os.open with mode 0o666 lets the umask decide permissions, as for a plain open().
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.unlink(tmp)
    raise
  _fsync_dir(os.fspath(path.parent))


def _format_json(value: Any, indent: str) -> str:
  """`value` (JSON-compatible) as JSON text, objects indented, lists of scalars on one line."""
  inner = indent + "  "
  if isinstance(value, dict) and value:
    items = [f"{inner}{json.dumps(k)}: {_format_json(v, inner)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + f"\n{indent}}}"
  if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
    items = [f"{inner}{_format_json(v, inner)}" for v in value]
    return "[\n" + ",\n".join(items) + f"\n{indent}]"
  return json.dumps(value)


def dumps_json(obj: Any) -> str:
  """`obj` as JSON: sorted keys, indent 2, each list of scalars on one line.

  One line per list keeps files with per-example outcomes (thousands of 0/1 entries)
  short and readable. NumPy/JAX scalars and arrays are converted.

  Raises:
    ValueError: if `obj` is not JSON-serialisable.
  """
  try:
    plain = json.loads(json.dumps(obj, sort_keys=True, default=_json_default))
  except TypeError as e:
    raise ValueError(str(e)) from e
  return _format_json(plain, "") + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as JSON (`dumps_json`: sorted keys, indent 2) with `write_bytes_atomic`.

  Args:
    path: the destination file (local or remote); its directory must exist.
    obj: anything `json` can write; NumPy/JAX scalars and arrays are converted.

  Raises:
    ValueError: if `obj` is not JSON-serialisable.
    OSError: if the file cannot be written.
  """
  try:
    text = dumps_json(obj)
  except ValueError as e:
    raise ValueError(f"cannot write {path}: {e}") from e
  write_bytes_atomic(path, text.encode("utf-8"))


def _fsync_dir(directory: str) -> None:
  """Makes a rename inside `directory` durable (best effort; not all systems allow it)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
