"""Tests for moe_adapt.train.loop on a tiny optax regression problem."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_adapt.train import checkpoint as ckpt_lib
from moe_adapt.train import loop as loop_lib
from moe_adapt.train import metrics as metrics_lib

TX = optax.adam(0.05)
W_TRUE = jnp.array([1.0, -2.0, 0.5, 3.0])
DATA_KEY = jax.random.key(42)
NAN_STEP = 7


def init_state() -> dict:
  """Everything the loop carries: params, optimizer state, a PRNG key, a bf16 leaf."""
  params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
  return {
    "params": params,
    "opt_state": TX.init(params),
    "key": jax.random.key(0),
    "ema": jnp.zeros(4, jnp.bfloat16),
  }


def _step(state, step, *, nan_at=None):
  key, noise_key = jax.random.split(state["key"])
  # The batch depends on the step index only; the noise on the carried key.
  x = jax.random.normal(jax.random.fold_in(DATA_KEY, step), (16, 4))
  y = x @ W_TRUE + 0.1 * jax.random.normal(noise_key, (16,))

  def loss_fn(p):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  if nan_at is not None:
    poison = jnp.where(step == nan_at, jnp.nan, 1.0)
    loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
  updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema = (0.9 * state["ema"] + 0.1 * params["w"]).astype(jnp.bfloat16)
  new = {"params": params, "opt_state": opt_state, "key": key, "ema": ema}
  return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


STEP = jax.jit(_step, donate_argnums=0)
NAN_STEP_FN = jax.jit(lambda s, i: _step(s, i, nan_at=NAN_STEP), donate_argnums=0)


class Counting:
  """Wraps a step function: counts calls, optionally stops (like a kill) before a step."""

  def __init__(self, fn, stop_at=None):
    self.fn, self.stop_at, self.steps = fn, stop_at, []

  def __call__(self, state, step):
    assert isinstance(step, jax.Array) and step.dtype == jnp.int32 and step.shape == ()
    if self.stop_at is not None and int(step) == self.stop_at:
      raise KeyboardInterrupt
    self.steps.append(int(step))
    return self.fn(state, step)


def reference(num_steps: int, step_fn=STEP) -> dict:
  state = init_state()
  for i in range(num_steps):
    state, _ = step_fn(state, jnp.int32(i))
  return state


def assert_bitwise_equal(a, b):
  def data(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(data(x), data(y))


def run(workdir, step_fn, *, num_steps=12, checkpoint_every=5, log_every=2, state=None):
  with ckpt_lib.Checkpointer(workdir / "checkpoints" / "fit") as ckpt:
    with metrics_lib.MetricWriter(workdir) as writer:
      return loop_lib.train_loop(
        step_fn,
        init_state() if state is None else state,
        num_steps=num_steps,
        checkpointer=ckpt,
        stage="fit",
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        writer=writer,
        progress=False,
      )


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """A straight-through run of 12 steps: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("straight")
  fn = Counting(STEP)
  final = run(workdir, fn)
  assert fn.steps == list(range(12))
  return workdir, final


def test_straight_run_matches_a_plain_loop_and_learns(straight):
  workdir, final = straight
  assert_bitwise_equal(final, reference(12))
  records = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, 12, 2))
  assert records[-1]["loss"] < records[0]["loss"]
  with ckpt_lib.Checkpointer(workdir / "checkpoints" / "fit") as ckpt:
    assert ckpt.is_finished()
    assert ckpt.all_steps() == [10, 12]


def test_resume_after_a_stop_is_bitwise_identical(straight, tmp_path):
  straight_dir, final = straight
  first = Counting(STEP, stop_at=8)
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path, first)
  assert first.steps == list(range(8))
  second = Counting(STEP)
  resumed = run(tmp_path, second)
  assert second.steps == list(range(5, 12))  # From the checkpoint of step 5.
  assert_bitwise_equal(resumed, final)
  # Steps 5 and 7 were logged by both runs; one record each, equal to the straight run's.
  drop_time = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]
  assert drop_time(metrics_lib.read_metrics(tmp_path)) == drop_time(
    metrics_lib.read_metrics(straight_dir)
  )
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 6 + 2


def test_finished_stage_returns_without_calling_step_fn(straight):
  workdir, final = straight

  def never(state, step):
    raise AssertionError("step_fn must not be called")

  out = run(workdir, never)
  assert_bitwise_equal(out, final)
  with pytest.raises(ValueError, match=r"stage 'fit' finished at step 12 .* but num_steps=30"):
    run(workdir, never, num_steps=30)


def test_unfinished_checkpoint_at_the_last_step_is_marked_finished(tmp_path):
  state = reference(4)
  with ckpt_lib.Checkpointer(tmp_path / "checkpoints" / "fit") as ckpt:
    ckpt.save(4, state)
  fn = Counting(STEP)
  out = run(tmp_path, fn, num_steps=4)
  assert fn.steps == []
  assert_bitwise_equal(out, reference(4))
  with ckpt_lib.Checkpointer(tmp_path / "checkpoints" / "fit") as ckpt:
    assert ckpt.is_finished() and ckpt.all_steps() == [4]
  with pytest.raises(ValueError, match=r"checkpoint at step 4 .* beyond num_steps=3"):
    with ckpt_lib.Checkpointer(tmp_path / "other") as ckpt:
      ckpt.save(4, reference(4))
      loop_lib.train_loop(
        STEP,
        init_state(),
        num_steps=3,
        checkpointer=ckpt,
        stage="fit",
        checkpoint_every=1,
        log_every=1,
        progress=False,
      )


def test_nan_loss_raises_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  fn = Counting(NAN_STEP_FN)
  with pytest.raises(loop_lib.TrainingDivergedError) as info:
    run(tmp_path, fn, log_every=100)
  err = info.value
  ckpt_dir = tmp_path / "checkpoints" / "fit"
  assert str(err) == (
    f"stage 'fit': non-finite loss at step {NAN_STEP}; the last good checkpoint (step 5) "
    f"is kept in {ckpt_dir}"
  )
  assert (err.step, err.last_good_step) == (NAN_STEP, 5)
  # No host sync per step: noticed at the next boundary (the checkpoint of step 10),
  # and the diverged state was not saved.
  assert fn.steps == list(range(10))
  with ckpt_lib.Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.all_steps() == [5] and not ckpt.is_finished()
    step, restored, _ = ckpt.restore(init_state())
  assert step == 5
  assert_bitwise_equal(restored, reference(5, NAN_STEP_FN))


def test_nan_loss_is_noticed_at_a_log_boundary_and_logged(tmp_path):
  fn = Counting(NAN_STEP_FN)
  with pytest.raises(loop_lib.TrainingDivergedError, match=r"at step 7; the last good .*step 5"):
    run(tmp_path, fn, log_every=4)
  assert fn.steps == list(range(8))
  last = metrics_lib.read_metrics(tmp_path)[-1]
  assert last["step"] == 7 and np.isnan(last["loss"])


def test_nan_before_any_checkpoint(tmp_path):
  with pytest.raises(loop_lib.TrainingDivergedError, match=r"no checkpoint had been saved yet"):
    run(tmp_path, NAN_STEP_FN, checkpoint_every=50, log_every=50)


def test_step_fn_is_traced_once(tmp_path):
  traces = []

  @jax.jit
  def step_fn(state, step):
    traces.append(step)  # Runs at trace time only.
    return _step(state, step)

  run(tmp_path, step_fn, num_steps=6, checkpoint_every=2, log_every=1)
  assert len(traces) == 1


def test_progress_bar_and_no_writer(tmp_path, capsys):
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    loop_lib.train_loop(
      STEP,
      init_state(),
      num_steps=3,
      checkpointer=ckpt,
      stage="bar",
      checkpoint_every=2,
      log_every=1,
      progress=True,
    )
  err = capsys.readouterr().err
  assert "bar" in err and "3/3" in err and "loss=" in err
  assert not (tmp_path / "metrics.jsonl").exists()
  # A line as the stage starts; the bar appears once the first (compiling) step is done,
  # so that its rate and ETA count compiled steps only: it never shows 0/3.
  assert err.startswith("stage 'bar': 3 steps, starting (the first step compiles)\n"), err
  assert "1/3" in err and "0/3" not in err


def test_progress_line_of_a_resumed_and_of_a_finished_stage(tmp_path, capsys):
  class Interrupted(Exception):
    pass

  def interrupted_at_2(state, step):
    if int(step) == 2:  # After the checkpoint of step 2.
      raise Interrupted
    return STEP(state, step)

  kwargs = dict(stage="s", num_steps=3, checkpoint_every=2, log_every=1, progress=True)
  for step_fn in (interrupted_at_2, STEP, STEP):  # killed, resumed, rerun when finished
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
      try:
        loop_lib.train_loop(step_fn, init_state(), checkpointer=ckpt, **kwargs)
      except Interrupted:
        pass
  err = capsys.readouterr().err
  assert "stage 's': 3 steps, resuming at step 2" in err
  assert f"stage 's': finished earlier; restored from {tmp_path}" in err


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"num_steps": -1}, r"num_steps=-1 is invalid; accepted: an int >= 0"),
    ({"checkpoint_every": 0}, r"checkpoint_every=0 is invalid; accepted: an int >= 1"),
    ({"log_every": 1.5}, r"log_every=1.5 is invalid"),
  ],
)
def test_bad_arguments(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    run(tmp_path, STEP, **kwargs)


def test_metrics_without_loss_are_rejected(tmp_path):
  bad = jax.jit(lambda s, i: (s, {"acc": jnp.float32(1.0)}))
  with pytest.raises(
    ValueError, match=r"must return \(state, metrics\) with a 'loss' metric; got \['acc'\]"
  ):
    run(tmp_path, bad)


# --- A real kill ---------------------------------------------------------------

SCRIPT = textwrap.dedent(
  """
  import os, sys, time
  import jax, jax.numpy as jnp, numpy as np, optax
  from moe_adapt.train import Checkpointer, MetricWriter, train_loop

  NUM_STEPS, EVERY = 16, 4
  tx = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def step_fn(state, step):
    key, sub = jax.random.split(state["key"])
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (8, 3))
    y = x @ jnp.array([1.0, 2.0, -1.0]) + 0.1 * jax.random.normal(sub, (8,))
    loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(state["w"])
    updates, opt = tx.update(g, state["opt"], state["w"])
    return {"w": optax.apply_updates(state["w"], updates), "opt": opt, "key": key}, {"loss": loss}

  def main(workdir, sleep, go_file=None, hold_at=None):
    while go_file and not os.path.exists(go_file):  # Let the test get ready first.
      time.sleep(0.01)
    calls = []

    def slow_step(state, step):
      calls.append(1)
      time.sleep(sleep)
      while hold_at is not None and int(step) >= hold_at:  # Sure to be killed mid-run.
        time.sleep(1)
      return step_fn(state, step)

    w = jnp.zeros(3)
    state = {"w": w, "opt": tx.init(w), "key": jax.random.key(0)}
    with Checkpointer(f"{workdir}/checkpoints/fit") as ckpt, MetricWriter(workdir) as writer:
      state = train_loop(slow_step, state, num_steps=NUM_STEPS, checkpointer=ckpt, stage="fit",
                         checkpoint_every=EVERY, log_every=1, writer=writer, progress=False)
    np.save(f"{workdir}/final_w.npy", np.asarray(state["w"]))
    return len(calls)

  if __name__ == "__main__":
    print("calls", main(sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
  """
)


def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path):
  script = tmp_path / "train_script.py"
  script.write_text(SCRIPT)
  go = tmp_path / "go"
  ckpt_dir = tmp_path / "killed" / "checkpoints" / "fit"
  proc = subprocess.Popen(
    [sys.executable, str(script), str(tmp_path / "killed"), "0.02", str(go), "10"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    # While the subprocess starts: the uninterrupted run, in this process.
    namespace = {"__name__": "train_script"}
    exec(compile(SCRIPT, str(script), "exec"), namespace)
    assert namespace["main"](str(tmp_path / "straight"), 0.0) == 16
    go.touch()
    deadline = time.monotonic() + 120
    while not (ckpt_dir / "8").is_dir():  # Committed checkpoints appear by rename.
      assert proc.poll() is None, "the training script ended early"
      assert time.monotonic() < deadline, "no checkpoint appeared"
      time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "killed" / "final_w.npy").exists()

  # The rerun of the same command resumes and ends exactly where the straight run did.
  calls = namespace["main"](str(tmp_path / "killed"), 0.0)
  assert calls == 16 - 8  # Resumed from the checkpoint of step 8.
  straight = np.load(tmp_path / "straight" / "final_w.npy")
  np.testing.assert_array_equal(np.load(tmp_path / "killed" / "final_w.npy"), straight)
  steps = [r["step"] for r in metrics_lib.read_metrics(tmp_path / "killed")]
  assert steps == list(range(16))
