"""Test-wide settings.

Tests run on 8 fake CPU devices so that sharded code paths are exercised; the
flag must be set before JAX initialises its backend, hence at import time here.

The text tests need the pinned archives (MiniLM, VADER, tweets_topics, 20 Newsgroups).
The session starts by fetching them with `moe-adapt-data fetch all` into the test suite's
own data dir, `<repo>/.test-data` (gitignored; `$MOE_ADAPT_DATA` points there for the
session and its subprocesses), so that a fresh machine runs every text test and no copy
cached elsewhere (`~/.cache/moe_adapt`) can hide a missing step. Under pytest-xdist the
controller and each worker take a file lock in turn: the first one downloads, the others
find verified copies. A test that needs an archive fails, never skips, when it is missing
(`tests.data_util.require_archive`).
"""

import contextlib
import fcntl
import io
import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA = REPO / ".test-data"
os.environ["MOE_ADAPT_DATA"] = str(TEST_DATA)
FETCH_ERROR_ENV = "MOE_ADAPT_TEST_FETCH_ERROR"  # Why the session's fetch failed, if it did.


def pytest_sessionstart(session):
  """Fetches (or verifies) every pinned archive into TEST_DATA, once across xdist workers."""
  del session
  from moe_adapt.data import fetch

  TEST_DATA.mkdir(parents=True, exist_ok=True)
  progress = io.StringIO()  # fetch's progress bars; shown only if the fetch fails
  with open(TEST_DATA / ".fetch.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    try:
      with contextlib.redirect_stderr(progress):
        fetch.fetch("all", TEST_DATA)
        fetch.minilm_files(TEST_DATA)  # Extracted once here, not by concurrent tests.
    except fetch.ArchiveError as e:  # The tests that need the archives fail, saying why.
      os.environ[FETCH_ERROR_ENV] = str(e)
      print(progress.getvalue(), file=sys.stderr)
