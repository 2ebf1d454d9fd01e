"""One run per workdir at a time: a lock file naming the process that holds it.

`lock(workdir)` is held for the whole of a `moe-adapt` command, from before the workdir is
prepared until the results are written, so a second command on the same workdir refuses
at once (`WorkdirLockedError`, naming the holder's pid, host and start time) and computes
and writes nothing; without it both would train and `metrics.jsonl` would get every line
twice.

- Local workdirs: `<workdir>/LOCK.json` is locked with `flock`, which the kernel releases
  when its process dies in any way, so a lock is never held by a dead process. The file
  names its holder while held and is emptied on release; finding it non-empty means the
  last holder died without releasing (killed, power loss): the lock is taken over with a
  message naming that process.
- Remote workdirs (`gs://...`): an object created only if absent (fsspec's exclusive
  mode 'xb'; atomic where the store supports preconditions, as GCS does), deleted on
  release. An object left by a dead process on this host (its pid is gone) is taken over
  with a message; one from another host is refused, since its process cannot be checked
  from here: remove `LOCK.json` by hand once that process is known to be gone.

With several JAX processes (one job on several hosts) only process 0 takes the lock; the
others learn whether it succeeded.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

from absl import logging

from moe_adapt.train import workdir as workdir_lib

LOCK_FILE = workdir_lib.LOCK_FILE


class WorkdirLockedError(workdir_lib.WorkdirError):
  """Another live process holds the workdir's lock."""


def _holder_info() -> dict[str, Any]:
  return {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "token": uuid.uuid4().hex,
  }


def _describe(holder: dict | None) -> str:
  if not holder:
    return "an unknown process"
  return (
    f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')} UTC)"
  )


def _parse(data: bytes) -> dict | None:
  try:
    holder = json.loads(data.decode("utf-8")) if data.strip() else None
  except (UnicodeDecodeError, json.JSONDecodeError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: Any) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


def _refuse(workdir: Any, path: Any, holder: dict | None) -> WorkdirLockedError:
  return WorkdirLockedError(
    f"workdir={os.fspath(workdir)!r} is in use by {_describe(holder)} (lock {path}). Wait for "
    "it to finish, or choose another --workdir."
  )


def _took_over(path: Any, holder: dict | None) -> None:
  logging.warning(
    "workdir lock %s: taking over the stale lock of %s, which is no longer running.",
    path,
    _describe(holder),
  )


def _read_fd(fd: int) -> bytes:
  os.lseek(fd, 0, os.SEEK_SET)
  chunks = []
  while chunk := os.read(fd, 65536):
    chunks.append(chunk)
  return b"".join(chunks)


def _acquire_local(workdir: Any, path: str) -> int:
  """flock on `path` (created if absent); the locked fd, holding this process's info."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _parse(_read_fd(fd))
      os.close(fd)
      raise _refuse(workdir, path, holder) from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if not same:  # Replaced between open and flock (moved aside): lock the new file.
      os.close(fd)
      continue
    previous = _parse(_read_fd(fd))
    if previous is not None:
      _took_over(path, previous)
    data = json.dumps(_holder_info()).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    return fd


def _release_local(fd: int) -> None:
  try:
    os.ftruncate(fd, 0)  # Empty = released cleanly (a dead holder leaves its info).
  finally:
    os.close(fd)  # Also drops the flock.


def _fs_and_path(path: Any) -> tuple[Any, str]:
  import fsspec  # Deferred: only remote workdirs need it.

  return fsspec.core.url_to_fs(os.fspath(path))


def _acquire_remote(workdir: Any, path: Any) -> dict:
  """Creates the lock object if absent (taking over a dead local holder's); our info."""
  fs, name = _fs_and_path(path)
  info = _holder_info()
  for _ in range(2):
    try:
      with fs.open(name, "xb") as f:
        f.write(json.dumps(info).encode("utf-8"))
      return info
    except FileExistsError:
      try:
        holder = _parse(fs.cat_file(name))
      except FileNotFoundError:  # Released meanwhile: try again.
        continue
      stale = holder and holder.get("host") == info["host"] and not _pid_alive(holder.get("pid"))
      if not stale:
        raise _refuse(workdir, path, holder) from None
      _took_over(path, holder)
      fs.rm_file(name)
  raise _refuse(workdir, path, None)


def _release_remote(path: Any, info: dict) -> None:
  fs, name = _fs_and_path(path)
  with contextlib.suppress(FileNotFoundError):
    if _parse(fs.cat_file(name)) == info:  # Never delete a lock another process took over.
      fs.rm_file(name)


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds the lock of `workdir` (created if absent) for the duration of the block.

  Raises:
    WorkdirLockedError: another live process holds it; the message names that process.
    WorkdirError: the workdir cannot be created.
  """
  path = workdir_lib.as_path(workdir)
  local = workdir_lib.is_local(path)
  lock_path = path / LOCK_FILE
  release = None
  error = None
  where = f"workdir={os.fspath(workdir)!r}"
  if workdir_lib._is_primary():
    try:
      if local:
        try:
          path.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:
          raise workdir_lib.WorkdirError(
            f"{where} cannot be created: {path} exists and is not a directory"
          ) from e
        except OSError as e:
          raise workdir_lib.WorkdirError(f"{where} cannot be created: {e.strerror or e}") from e
        try:
          fd = _acquire_local(workdir, os.fspath(lock_path))
        except OSError as e:
          raise workdir_lib.WorkdirError(
            f"{where} is not writable ({e.strerror or e}); choose another --workdir"
          ) from e
        release = lambda: _release_local(fd)
      else:
        info = _acquire_remote(workdir, lock_path)
        release = lambda: _release_remote(lock_path, info)
    except workdir_lib.WorkdirError as e:
      error = e
  if workdir_lib._failed_on_primary(error is not None) and error is None:
    raise WorkdirLockedError(
      f"workdir={os.fspath(workdir)!r} could not be locked by process 0 (see its error)"
    )
  if error is not None:
    raise error
  try:
    yield
  finally:
    if release is not None:
      release()
