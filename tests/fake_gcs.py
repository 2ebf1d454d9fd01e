"""An in-memory stand-in for GCS (`gs://`) for tests: no network, no credentials.

epath sends `gs://` paths to fsspec when TensorFlow is absent. `install` registers an
in-memory fsspec filesystem for the `gs` / `gcs` protocols that behaves like an object
store where it matters to moe_adapt: no folders (a prefix exists only while objects lie
under it, mkdir does nothing, so a rename into a fresh folder fails as with gcsfs) and no
appends or in-place updates. Use it from a fixture in the same process as the code under
test:

  @pytest.fixture
  def gcs(monkeypatch):
    yield from fake_gcs.install(monkeypatch)

Not faked: orbax writes array data through tensorstore's own GCS driver, which never
sees fsspec (see `local_checkpoints`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import ClassVar

import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import stringify_path

from moe_adapt.train import checkpoint as ckpt_lib


def fake_gcs_class() -> type:
  """A fresh fake filesystem class with its own (empty) store and write log."""

  class FakeGCS(MemoryFileSystem):
    """gs:// in memory: objects only (no folders), whole-object writes only."""

    protocol = ("gs", "gcs")
    store: ClassVar[dict] = {}  # Own store and write log per class (one class per test).
    pseudo_dirs: ClassVar[list] = [""]
    writes: ClassVar[list] = []  # Object names in the order they were opened for writing.

    @classmethod
    def _strip_protocol(cls, path):
      path = stringify_path(path)
      for prefix in ("gs://", "gcs://"):
        path = path.removeprefix(prefix)
      path = path.strip("/")
      return "/" + path if path else ""

    def mkdir(self, path, create_parents=True, **kwargs):
      del path, create_parents, kwargs  # An object store has no folders.

    def makedirs(self, path, exist_ok=False):
      del path, exist_ok

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode or "+" in mode:
        raise OSError(f"{path}: an object cannot be appended to or updated (mode {mode!r})")
      if "w" in mode or "x" in mode:
        self.writes.append(self._strip_protocol(path))
      return super()._open(path, mode, **kwargs)

  return FakeGCS


def install(monkeypatch: pytest.MonkeyPatch) -> Iterator[type]:
  """Registers a fresh fake GCS for `gs://` and `gcs://`; yields its class (`store`, `writes`).

  Skips the test where epath sends `gs://` to TensorFlow rather than to fsspec.
  """
  fake = fake_gcs_class()
  registry = sys.modules["fsspec.registry"]._registry
  for name in ("gs", "gcs"):
    monkeypatch.setitem(registry, name, fake)
  # epath caches one fsspec filesystem per protocol: drop the cached one before and after.
  cached = type(epath_backend.fsspec_backend)._get_filesystem
  cached.cache_clear()
  if epath.Path("gs://bucket")._backend is not epath_backend.fsspec_backend:
    pytest.skip("epath sends gs:// to TensorFlow here, not to fsspec")
  yield fake
  cached.cache_clear()


def objects(fake: type, prefix: str) -> dict[str, bytes]:
  """Object name (relative to `prefix`, e.g. '/bucket/run/') -> bytes."""
  return {k[len(prefix) :]: v.getvalue() for k, v in fake.store.items() if k.startswith(prefix)}


def local_checkpoints(monkeypatch: pytest.MonkeyPatch, root: os.PathLike) -> None:
  """Sends every `Checkpointer` of a `gs://...` folder to `<root>/<bucket>/...` instead.

  orbax writes arrays through tensorstore's GCS driver (network), so runs on the fake
  GCS keep their checkpoints locally; everything else of the workdir stays on `gs://`.
  """
  real = ckpt_lib.Checkpointer

  def checkpointer(directory, **kwargs):
    name = os.fspath(directory)
    if name.startswith("gs://"):
      directory = os.path.join(os.fspath(root), name.removeprefix("gs://"))
    return real(directory, **kwargs)

  monkeypatch.setattr(ckpt_lib, "Checkpointer", checkpointer)
