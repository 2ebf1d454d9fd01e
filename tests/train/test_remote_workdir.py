"""Remote (`gs://`) workdirs: workdir, metrics and stage cache on an in-memory fake GCS.

The fixture `gcs` registers the in-memory object store of `tests/fake_gcs.py` for the
`gs` / `gcs` protocols (no folders, no appends or in-place updates, no network). Not
covered here: orbax writing checkpoints to GCS (tensorstore's own GCS driver); the
Checkpointer's object-store rule (step folders without `commit_success.txt` are
unfinished saves) is tested on a local folder treated as remote. Whole method runs on a
`gs://` workdir are in tests/test_remote_methods.py.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from moe_adapt.train import checkpoint as ckpt_lib
from moe_adapt.train import loop as loop_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import stage_cache
from moe_adapt.train import workdir as wd
from tests import fake_gcs

CONFIG = {"method": "muka", "seed": 0, "model": {"dims": (1, 2)}}
_objects = fake_gcs.objects


@pytest.fixture
def gcs(monkeypatch):
  """The fake GCS class (its `store` and `writes` are this test's)."""
  yield from fake_gcs.install(monkeypatch)


def test_paths():
  assert not wd.is_local("gs://bucket/x") and not wd.is_local(epath.Path("gs://bucket/x"))
  assert wd.is_local("/tmp/x") and wd.is_local("runs/x")
  assert os.fspath(wd.as_path("gs://bucket/x")) == "gs://bucket/x"
  assert os.fspath(wd.as_path("~/x")) == os.path.expanduser("~/x")
  assert os.fspath(wd.as_path("runs/x")) == os.path.join(os.getcwd(), "runs/x")


def test_workdir_lifecycle_on_gs(gcs):
  path = wd.prepare_workdir("gs://bucket/runs/a", CONFIG)
  assert isinstance(path, epath.Path) and os.fspath(path) == "gs://bucket/runs/a"
  stored = json.loads(_objects(gcs, "/bucket/runs/a/")["config.json"])
  assert stored == {"method": "muka", "seed": 0, "model": {"dims": [1, 2]}}
  # Written directly (an object write is atomic): no temporary object.
  assert gcs.writes == ["/bucket/runs/a/config.json"]
  # Same config: resumed, nothing written. Another config: refused, nothing written.
  assert wd.prepare_workdir("gs://bucket/runs/a/", CONFIG) == path
  with pytest.raises(wd.ConfigMismatchError, match=r"seed: stored=0 new=1"):
    wd.prepare_workdir(path, dict(CONFIG, seed=1))
  assert len(gcs.writes) == 1

  assert wd.read_results(path) is None
  wd.write_json_atomic(path / "results.json", {"acc": np.float32(0.5)})
  assert wd.read_results("gs://bucket/runs/a") == {"acc": 0.5}
  assert gcs.writes[-1] == "/bucket/runs/a/results.json"
  (path / "checkpoints" / "s" / "1" / "data").write_bytes(b"\x00\x01")
  before = _objects(gcs, "/bucket/runs/a/")

  # --overwrite moves every object under previous-<time>/, byte for byte.
  assert wd.prepare_workdir(path, dict(CONFIG, seed=1), overwrite=True) == path
  [moved] = [p for p in path.iterdir() if p.name.startswith(wd.PREVIOUS_PREFIX)]
  after = _objects(gcs, "/bucket/runs/a/")
  for name, data in before.items():
    assert after[f"{moved.name}/{name}"] == data
  assert (moved / wd.MOVED_NOTE).is_file()
  assert json.loads((path / "config.json").read_text())["seed"] == 1
  assert sorted(p.name for p in path.iterdir()) == ["config.json", moved.name]


def test_metrics_on_gs_rewrite_one_object(gcs):
  run = "gs://bucket/run"

  def read():
    return [(r["stage"], r["step"], r["loss"]) for r in metrics_lib.read_metrics(run)]

  assert read() == []
  with metrics_lib.MetricWriter(run, remote_flush_s=0) as w:
    w.write("a", 0, {"loss": 1.0})
    assert read() == [("a", 0, 1.0)]  # remote_flush_s=0: visible after each write.
    w.write("a", 1, {"loss": 2.0})
    assert read() == [("a", 0, 1.0), ("a", 1, 2.0)]
  # A resumed run keeps the old lines and logs step 1 again; with a long flush interval
  # readers see the previous object, whole, until the next rewrite.
  with metrics_lib.MetricWriter(run, remote_flush_s=3600) as w:
    w.write("a", 1, {"loss": 5.0})
    w.write("b", 0, {"loss": 3.0})
    assert read() == [("a", 0, 1.0), ("a", 1, 2.0)]
    w.flush()
    assert read() == [("a", 0, 1.0), ("a", 1, 5.0), ("b", 0, 3.0)]
    w.write("b", 1, {"loss": 4.0})
  assert read()[-1] == ("b", 1, 4.0)  # close() flushes.
  lines = _objects(gcs, "/bucket/run/")["metrics.jsonl"].decode().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [0, 1, 1, 0, 1]
  # Every write replaced the whole object (the fake refuses appends).
  assert set(gcs.writes) == {"/bucket/run/metrics.jsonl"}


def test_metrics_on_gs_isolate_a_partial_last_line(gcs):
  (epath.Path("gs://bucket/run") / "metrics.jsonl").write_text('{"stage": "a", "step": 0}\n{"st')
  with metrics_lib.MetricWriter("gs://bucket/run") as w:
    w.write("a", 1, {"loss": 2.0})
  with pytest.warns(RuntimeWarning, match="skipped 1 unparsable"):
    records = metrics_lib.read_metrics("gs://bucket/run")
  assert [r["step"] for r in records] == [0, 1]


def test_metric_writer_rejects_a_bad_flush_interval(tmp_path):
  with pytest.raises(ValueError, match=r"remote_flush_s=-1 is invalid; accepted: a number >= 0"):
    metrics_lib.MetricWriter(tmp_path, remote_flush_s=-1)


class _SpyCheckpointer:
  """Records, at every save, the metric steps that readers of the workdir can see."""

  directory = "spy"

  def __init__(self, visible):
    self.visible, self.saves = visible, []

  def restore(self, template):
    del template
    return None

  def save(self, step, tree, *, finished=False):
    del tree
    self.saves.append((step, finished, self.visible()))


def test_train_loop_flushes_remote_metrics_before_each_save_and_a_divergence(gcs):
  def visible(run):
    return lambda: [r["step"] for r in metrics_lib.read_metrics(run)]

  def step_fn(state, step):  # Loss NaN at step 5.
    return state, {"loss": jnp.where(step == 5, jnp.nan, state)}

  def train(run, num_steps, checkpointer, writer):
    return loop_lib.train_loop(
      step_fn,
      jnp.float32(1.0),
      num_steps=num_steps,
      checkpointer=checkpointer,
      stage="s",
      checkpoint_every=2,
      log_every=1,
      writer=writer,
      progress=False,
    )

  # remote_flush_s=3600: without the loop's flushes readers would see no line until close().
  spy = _SpyCheckpointer(visible("gs://bucket/a"))
  with metrics_lib.MetricWriter("gs://bucket/a", remote_flush_s=3600) as writer:
    train("gs://bucket/a", 5, spy, writer)
    assert spy.saves == [(2, False, [0, 1]), (4, False, [0, 1, 2, 3]), (5, True, [0, 1, 2, 3, 4])]

  spy = _SpyCheckpointer(visible("gs://bucket/b"))
  with metrics_lib.MetricWriter("gs://bucket/b", remote_flush_s=3600) as writer:
    with pytest.raises(loop_lib.TrainingDivergedError, match=r"non-finite loss at step 5"):
      train("gs://bucket/b", 8, spy, writer)
    assert visible("gs://bucket/b")() == [0, 1, 2, 3, 4, 5]  # Before close(): flushed.
  assert [s[0] for s in spy.saves] == [2, 4]


def _stage_folder(root) -> dict[str, bytes]:
  """A finished stage's checkpoint folder, as orbax lays it out (two steps)."""
  files = {}
  for step in ("2", "4"):
    files[f"{step}/state/d/abc"] = f"weights {step}".encode()
    files[f"{step}/meta/metadata"] = b"{}"
    files[f"{step}/commit_success.txt"] = b"ok"
  for name, data in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  return files


def test_stage_cache_on_gs(gcs, tmp_path):
  src = tmp_path / "run1" / "experts"
  files = _stage_folder(src)
  cache = "gs://bucket/cache"
  stage_cache.store(cache, "experts", "k", src)
  assert _objects(gcs, "/bucket/cache/experts-k/") == files
  assert "/bucket/cache/experts-k.complete" in gcs.store  # Written after the copy.
  assert gcs.writes[-1] == "/bucket/cache/experts-k.complete"
  # In each step folder the commit file comes last: a copy cut short leaves no step
  # that orbax (on an object store) would take for complete.
  for step in ("2", "4"):
    step_writes = [w for w in gcs.writes if w.startswith(f"/bucket/cache/experts-k/{step}/")]
    assert len(step_writes) == 3 and step_writes[-1].endswith("/commit_success.txt")
  n = len(gcs.writes)
  stage_cache.store(cache, "experts", "k", src)  # Present: a no-op.
  assert len(gcs.writes) == n

  # Fetched into a gs:// workdir and into a local one.
  assert stage_cache.fetch(cache, "experts", "k", "gs://bucket/run2/checkpoints/experts")
  assert _objects(gcs, "/bucket/run2/checkpoints/experts/") == files
  local = tmp_path / "run3" / "checkpoints" / "experts"
  assert stage_cache.fetch(cache, "experts", "k", local)
  assert {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()} == (
    files
  )
  assert not list(local.parent.glob(".*tmp*"))
  # Never over an existing stage; nothing for a missing key or an entry without its
  # marker (a store cut short).
  assert not stage_cache.fetch(cache, "experts", "k", "gs://bucket/run2/checkpoints/experts")
  assert not stage_cache.fetch(cache, "experts", "zzz", "gs://bucket/run4/x")
  (epath.Path(cache) / "experts-cut" / "2" / "state").write_text("part")
  assert not stage_cache.fetch(cache, "experts", "cut", "gs://bucket/run4/x")
  assert not epath.Path("gs://bucket/run4").exists()


def test_stage_cache_from_gs_into_a_local_cache(gcs, tmp_path):
  src = epath.Path("gs://bucket/run1/experts")
  files = _stage_folder(src)
  stage_cache.store(tmp_path / "cache", "experts", "k", src)
  entry = tmp_path / "cache" / "experts-k"
  assert {str(p.relative_to(entry)): p.read_bytes() for p in entry.rglob("*") if p.is_file()} == (
    files
  )
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["experts-k"]  # Renamed in.


def test_checkpointer_drops_uncommitted_steps_on_object_stores(tmp_path, monkeypatch):
  tree = {"w": np.arange(3, dtype=np.float32)}
  with ckpt_lib.Checkpointer(tmp_path / "s") as ckpt:
    ckpt.save(1, tree)
    ckpt.save(2, {"w": tree["w"] + 1})
  # On an object store orbax writes <step>/ in place and commit_success.txt last: a step
  # without it is a save cut short by a kill.
  (tmp_path / "s" / "2" / ckpt_lib.COMMIT_FILE).unlink()
  with ckpt_lib.Checkpointer(tmp_path / "s") as ckpt:  # Local: orbax's own rules apply.
    assert ckpt.all_steps() == [1, 2]
  monkeypatch.setattr(wd, "is_local", lambda path: False)
  with ckpt_lib.Checkpointer(tmp_path / "s") as ckpt:
    assert ckpt.all_steps() == [1]
    step, restored, _ = ckpt.restore(tree)
  assert step == 1 and np.array_equal(restored["w"], tree["w"])
  assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["1"]
