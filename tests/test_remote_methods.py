"""Method runs with a `gs://` workdir, on the in-memory fake GCS of tests/fake_gcs.py.

One tiny in-process run (`moe_adapt.main.run(config, "gs://bucket/<method>")`) for each
method that writes files of its own into the workdir: muka (`confidences.npz`), co_tuning
(relationship heat maps), adamix (evaluation cache, routing-spread plot) and adapter_soup
(mixture evaluation cache, plots). Each run must leave exactly `config.json`,
`metrics.jsonl`, `results.json` and the method's own files as objects under
`gs://bucket/<method>/` (no temporary objects), one metrics stage per checkpointed stage,
and nothing in the local working directory (a `pathlib.Path` of a `gs://` string is the
local folder `gs:/...`); the caches read back from `gs://`. finetune and meta_dmoe write
only the shared workdir files (tested in tests/train/test_remote_workdir.py) and are not
run here, to keep this file fast.

Checkpoints go to a local folder (`fake_gcs.local_checkpoints`): orbax writes array data
through tensorstore's own GCS driver, which an fsspec fake does not reach.
"""

import io
import json
import os

import jax
import numpy as np
import pytest
from etils import epath

from moe_adapt import main as main_lib
from moe_adapt.methods import adapter_soup, co_tuning, muka
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import workdir as wd
from tests import fake_gcs
from tests.methods import configs_util

# The adapter harness (adamix, adapter_soup) at its smallest: one ViT block, two steps.
_HARNESS = {
  "model.options.depth": 1,
  "model.dropout": 0.0,
  "pretrain.steps": 2,
  "train.steps": 2,
  "eval.max_examples": 32,
}
# method -> (config argument, overrides, the method's own files in the workdir).
RUNS = {
  "muka": ("fmnist,tiny", {"variants": ("muki",)}, ("confidences.npz",)),
  "co_tuning": (
    "fmnist,tiny",
    {"variants": ("co_tuning_direct",), "source.steps": 2, "finetune.steps": 2},
    ("relationship_direct.png",),
  ),
  "adamix": (
    "digits,tiny",
    {"variants": ("adamix",), "eval.routing_samples": 1, **_HARNESS},
    ("adamix_eval.json", "plots/routing_spread.png"),
  ),
  "adapter_soup": (
    "digits,tiny",
    {
      "data.domains": ("rot0", "rot45"),
      "selection.top_k": 1,
      "study.max_mixtures": 2,
      "pruning.sparsities": (0.5,),
      **_HARNESS,
    },
    (
      "merge_learned.json",
      "mixture_evals.json",
      "mixture_outcomes.json",
      "plots/fsd_accuracy.png",
      "plots/fsd_matrix.png",
      "plots/greedy.png",
      "plots/sparsity.png",
    ),
  ),
}
_PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def gcs(monkeypatch):
  """The fake GCS class (its `store` and `writes` are this test's)."""
  yield from fake_gcs.install(monkeypatch)


def _config(method: str):
  arg, overrides, _ = RUNS[method]
  config = configs_util.config_module(method).get_config(arg)
  return configs_util.with_overrides(config, num_devices=1, **overrides)


def _fail(*args, **kwargs):
  raise AssertionError("computed again although the workdir holds the result")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RUNS))
def test_tiny_run_with_a_gs_workdir(method, gcs, tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  fake_gcs.local_checkpoints(monkeypatch, tmp_path / "orbax")
  setups = []
  if method == "muka":  # Keep the setup to read the scores back afterwards.
    make_setup = muka.make_setup

    def keep_setup(c):
      setups.append(make_setup(c))
      return setups[-1]

    monkeypatch.setattr(muka, "make_setup", keep_setup)
  config = _config(method)
  workdir = f"gs://bucket/{method}"

  results = main_lib.run(config, workdir)

  objects = fake_gcs.objects(gcs, f"/bucket/{method}/")
  own = RUNS[method][2]
  assert sorted(objects) == sorted({"config.json", "metrics.jsonl", "results.json", *own})
  assert json.loads(objects["config.json"]) == wd.to_json_compatible(config.to_dict())
  assert json.loads(objects["results.json"]) == wd.to_json_compatible(results)
  assert results["method"] == method and results["metrics"]
  stages = sorted(os.listdir(tmp_path / "orbax" / "bucket" / method / "checkpoints"))
  assert sorted({r["stage"] for r in metrics_lib.read_metrics(workdir)}) == stages
  assert os.listdir(cwd) == []  # Nothing local, e.g. no `gs:` folder.
  for name in own:
    if name.endswith(".png"):
      assert objects[name].startswith(_PNG), name
    elif name.endswith(".json"):
      assert json.loads(objects[name]), name

  # The caches read back from gs:// (the computation they replace must not run).
  if method == "muka":
    with np.load(io.BytesIO(objects["confidences.npz"])) as f:
      stored = {k: f[k] for k in f.files}
    monkeypatch.setattr(muka, "compute_scores", _fail)
    scores = muka.teacher_scores(setups[0], [], workdir)
    assert sorted(scores) == sorted(stored) and {"mc", "single"} <= set(stored)
    for name, value in stored.items():
      np.testing.assert_array_equal(scores[name], value)
  if method == "adapter_soup":
    cache = adapter_soup.EvalCache(workdir)
    assert cache.values == json.loads(objects["mixture_evals.json"])
    key = next(iter(cache.values))
    assert cache.get(*key.split("|", 1), _fail) == cache.values[key] and cache.computed == 0
  if method == "adamix":
    cached = json.loads(objects["adamix_eval.json"])
    assert results["metrics"]["adamix"] == cached["adamix"]["eval"]["merged"]


def test_eval_cache_rewrites_a_remote_object_at_most_every_flush_interval(gcs, tmp_path):
  cache = adapter_soup.EvalCache("gs://bucket/soup", remote_flush_s=3600)
  assert cache.get("rot0", "a", lambda: {"accuracy": 0.25}) == {"accuracy": 0.25}
  assert cache.get("rot0", "b", lambda: {"accuracy": 0.5}) == {"accuracy": 0.5}
  assert gcs.writes == []  # Within the interval: kept in memory.
  cache.flush()
  cache.flush()  # Nothing new: no rewrite.
  assert gcs.writes == ["/bucket/soup/mixture_evals.json"]
  again = adapter_soup.EvalCache("gs://bucket/soup")
  assert again.values == {"rot0|a": {"accuracy": 0.25}, "rot0|b": {"accuracy": 0.5}}
  # remote_flush_s=0, and any local cache: written at every new value.
  every = adapter_soup.EvalCache("gs://bucket/soup", remote_flush_s=0)
  every.get("rot0", "c", lambda: {"accuracy": 1.0})
  assert len(gcs.writes) == 2
  local = adapter_soup.EvalCache(tmp_path, remote_flush_s=3600)
  local.get("rot0", "a", lambda: {"accuracy": 0.75})
  assert json.loads((tmp_path / adapter_soup.CACHE_FILE).read_text()) == {
    "rot0|a": {"accuracy": 0.75}
  }
  with pytest.raises(ValueError, match=r"remote_flush_s=-1 is invalid; accepted: a number >= 0"):
    adapter_soup.EvalCache(tmp_path, remote_flush_s=-1)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_source_checkpoint_round_trip_on_gs(gcs, suffix):
  template = {
    "params": {"head": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
    "batch_stats": {"bn": {"mean": np.ones(3, np.float32)}},
  }
  path = f"gs://bucket/source/model{suffix}"
  co_tuning.save_source_checkpoint(path, template)
  assert gcs.writes == [f"/bucket/source/model{suffix}"]
  loaded = co_tuning.load_source_checkpoint(epath.Path(path), template)
  assert jax.tree.structure(loaded) == jax.tree.structure(template)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(template)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(
    ValueError, match=r"model\.source_checkpoint='gs://bucket/nope\.npz' does not"
  ):
    co_tuning.load_source_checkpoint("gs://bucket/nope.npz", template)
