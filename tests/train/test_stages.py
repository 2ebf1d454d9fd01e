"""train.stages.run_in_segments: n segments of a stage are one run, with candidates kept."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_adapt.train import stages


def config():
  return ml_collections.ConfigDict({"stage_cache": "", "checkpoint_every": 2, "log_every": 100})


@jax.jit
def step_fn(state, step):
  # The step index enters the update, so a segment that saw the wrong index would differ.
  x = state["x"] * 0.9 + jnp.sin(step.astype(jnp.float32))
  return {"x": x}, {"loss": jnp.sum(x)}


def test_segments_equal_one_stage_and_keep_each_end(tmp_path):
  start = {"x": jnp.arange(3.0)}
  whole = stages.run_stage(
    config(), str(tmp_path / "a"), "s", step_fn, start, 7, writer=None, stage_fields={}
  )
  final, kept = stages.run_in_segments(
    config(),
    str(tmp_path / "b"),
    "s",
    step_fn,
    start,
    7,
    3,
    writer=None,
    stage_fields={},
    keep=lambda st: st["x"],
  )
  np.testing.assert_array_equal(final["x"], whole["x"])
  assert [step for step, _ in kept] == stages.segment_ends(7, 3) == [2, 4, 7]
  np.testing.assert_array_equal(kept[-1][1], whole["x"])
  # Each kept candidate is the state after that many steps of the same run.
  part = stages.run_stage(
    config(), str(tmp_path / "c"), "s", step_fn, start, 4, writer=None, stage_fields={}
  )
  np.testing.assert_array_equal(kept[1][1], part["x"])
  names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
  assert names == ["s_1of3", "s_2of3", "s_3of3"]
  # One segment is the plain stage, under its own name.
  stages.run_in_segments(
    config(),
    str(tmp_path / "d"),
    "s",
    step_fn,
    start,
    7,
    1,
    writer=None,
    stage_fields={},
    keep=lambda st: st,
  )
  assert [p.name for p in (tmp_path / "d" / "checkpoints").iterdir()] == ["s"]


def test_choose_prefers_the_earlier_of_equal_scores():
  assert stages.choose({3: 0.5, 6: 0.5}) == 3
  assert stages.choose({3: 0.4, 6: 0.5}) == 6
  assert stages.choose({("a", 1): 0.2, ("b", 2): 0.1}) == ("a", 1)


def test_stage_key_depends_on_seed_stage_and_index_only():
  import zlib

  want = jax.random.fold_in(
    jax.random.fold_in(jax.random.key(4), zlib.crc32(b"adapter") % 2**31), 2
  )
  got = stages.stage_key(4, "adapter", 2)
  assert jnp.array_equal(jax.random.key_data(got), jax.random.key_data(want))
  data = {
    str(args): tuple(np.asarray(jax.random.key_data(stages.stage_key(*args))).tolist())
    for args in [(4, "adapter", 0), (5, "adapter", 0), (4, "lora", 0), (4, "adapter", 1)]
  }
  assert len(set(data.values())) == 4
