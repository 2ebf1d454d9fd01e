"""Two JAX processes × 2 CPU devices: the train pieces in a real multi-process run.

Each process calls `initialize_distributed('auto')` (detected from
JAX_COORDINATOR_ADDRESS), prepares the shared workdir, shards a global batch
over the 4-device mesh and trains with checkpoints and metrics; then a rerun of
the finished stage restores without calling the step function.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
  """
  import json, sys
  from moe_adapt import train
  train.initialize_distributed("auto")  # Before anything touches a device.
  import jax, jax.numpy as jnp, numpy as np, optax

  path = train.prepare_workdir(sys.argv[1], {"seed": 0})
  mesh = train.make_mesh()
  x_all = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  x, y = train.shard_batch((x_all, x_all @ np.array([1.0, 2.0, 3.0], np.float32)), mesh)
  tx = optax.sgd(0.1)

  @jax.jit
  def step(state, i, x, y):
    loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(state["w"])
    u, opt = tx.update(g, state["opt"], state["w"])
    key = jax.random.split(state["key"])[0]
    return {"w": optax.apply_updates(state["w"], u), "opt": opt, "key": key}, {"loss": loss}

  w = jnp.zeros(3)
  state = train.replicate({"w": w, "opt": tx.init(w), "key": jax.random.key(0)}, mesh)
  def run(step_fn):
    with train.Checkpointer(path / "checkpoints" / "fit") as ckpt, train.MetricWriter(path) as mw:
      out = train.train_loop(step_fn, state, num_steps=6, checkpointer=ckpt, stage="fit",
                             checkpoint_every=2, log_every=2, writer=mw, progress=False)
    return np.asarray(jax.device_get(out["w"])).tolist()

  first = run(lambda s, i: step(s, i, x, y))
  again = run(lambda s, i: 1 / 0)  # Finished: restored, step_fn not called.
  print("RESULT " + json.dumps({"process": jax.process_index(), "devices": mesh.size,
                                "x_sharding": str(x.sharding.spec), "first": first,
                                "again": again}), flush=True)
  """
)


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  script = tmp_path / "mp_script.py"
  script.write_text(SCRIPT)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(i),
    )
    cmd = [sys.executable, str(script), str(tmp_path / "wd")]
    procs.append(
      subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=180)
      assert p.returncode == 0, err[-3000:]
      results.append(json.loads(out.split("RESULT ", 1)[1]))
  finally:
    for p in procs:
      p.kill()

  # Full-batch gradient descent, in NumPy.
  x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  y = x @ np.array([1.0, 2.0, 3.0], np.float32)
  w = np.zeros(3, np.float32)
  for _ in range(6):
    w = w - 0.1 * (2 * x.T @ (x @ w - y) / len(y))
  assert [r["process"] for r in results] == [0, 1]
  for r in results:
    assert r["devices"] == 4 and r["x_sharding"] == "P('data',)"
    np.testing.assert_allclose(r["first"], w, rtol=1e-5)
    assert r["again"] == r["first"]
  # One writer (process 0), one line per logged step; checkpoints shared by both.
  lines = (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 3, 5]
  assert sorted(p.name for p in (tmp_path / "wd" / "checkpoints" / "fit").iterdir()) == ["4", "6"]
  assert json.loads((tmp_path / "wd" / "config.json").read_text()) == {"seed": 0}
