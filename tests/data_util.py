"""The pinned archives in tests: present (fetched by the session start, tests/conftest.py)
or the test fails."""

from __future__ import annotations

import os
import pathlib

import pytest

from moe_adapt.data import fetch

FETCH_ERROR_ENV = "MOE_ADAPT_TEST_FETCH_ERROR"  # Set by tests/conftest.py on a failed fetch.


def require_archive(name: str) -> pathlib.Path:
  """The verified archive `name` in `$MOE_ADAPT_DATA`; fails (never skips) if it is missing.

  Raises:
    fetch.ArchiveHashError: a corrupt or wrong copy (a failure too).
  """
  try:
    return fetch.archive_path(name)
  except fetch.ArchiveHashError:
    raise
  except fetch.ArchiveError as e:
    error = os.environ.get(FETCH_ERROR_ENV)
    why = f"; the session's fetch failed: {error}" if error else ""
    pytest.fail(f"archive {name!r} is missing ({e}){why}")
