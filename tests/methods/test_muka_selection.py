"""MUKA's student checkpoint selection on the labelled validation split.

`student.select_checkpoints = n` runs the student stage in n segments (one run: the
segments see the global step, so they equal one stage), scores each segment end on the
val split and keeps the best; the choice goes under `selection` in the results.
"""

import dataclasses

import pytest

from moe_adapt import data
from moe_adapt.methods import muka
from moe_adapt.train import benchmarks
from tests.methods.muka_util import tiny_config

STEPS = 6


def run(tmp_path, name, **overrides):
  config = tiny_config(
    **{"variants": ("vanilla_kd",), "student.steps": STEPS, "teachers.steps": 4, **overrides}
  )
  return muka.run(config, str(tmp_path / name))


@pytest.mark.slow
def test_selection_keeps_the_best_val_checkpoint_of_one_paired_run(tmp_path):
  chosen = run(tmp_path, "select", **{"student.select_checkpoints": 2})
  record = chosen["selection"]["vanilla_kd"]
  assert set(record["scores"]) == {"step3", "step6"}
  assert record["checkpoint_step"] in (3, 6)
  assert record["val_accuracy"] == max(record["scores"].values())
  assert sorted(p.name for p in (tmp_path / "select" / "checkpoints").iterdir()) == [
    "teacher_0",
    "teacher_1",
    "vanilla_kd_1of2",
    "vanilla_kd_2of2",
  ]
  # The chosen checkpoint is that step of one straight run: the same test metrics as a
  # run of that many steps without selection (same keys, batches and initialisation).
  plain = run(tmp_path, "plain", **{"student.steps": record["checkpoint_step"]})
  assert plain["selection"] == {}
  assert plain["metrics"]["vanilla_kd"] == chosen["metrics"]["vanilla_kd"]
  assert plain["per_example"]["vanilla_kd"] == chosen["per_example"]["vanilla_kd"]


def test_selection_without_validation_data_is_refused(monkeypatch):
  original = benchmarks.benchmark

  def without_val(cfg):
    bench = original(cfg)

    def loader(seed):
      return {
        domain: data.DomainSplits(s.train, data.Split(s.val.x[:0], s.val.y[:0]), s.test)
        for domain, s in bench.load(seed=seed).items()
      }

    return dataclasses.replace(bench, loader=loader)

  monkeypatch.setattr(benchmarks, "benchmark", without_val)
  with pytest.raises(ValueError, match=r"^student\.select_checkpoints=2 needs labelled validation"):
    muka.make_setup(tiny_config(**{"student.select_checkpoints": 2}))
