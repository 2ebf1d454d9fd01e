"""Two JAX processes × 2 CPU devices stream one dataset: each reads its own half, and the
per-host batches assemble into global batches on the 4-device mesh.

Each process opens the mock DomainNet (prepared by the test), streams one epoch with the
default shard (`jax.process_index()` of `jax.process_count()`), turns every host batch into
a global batch (`train.mesh.host_batch_to_global`) and gathers its `index` leaf back; it
also counts its evaluation batches.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from moe_adapt.data import tfds_builders

SCRIPT = textwrap.dedent(
  """
  import json, sys
  from moe_adapt import train
  train.initialize_distributed("auto")  # Before anything touches a device.
  import jax
  from jax.experimental import multihost_utils
  from moe_adapt.data import streaming
  from moe_adapt.train import mesh as mesh_lib

  source = streaming.open_split(sys.argv[1], split="train", data_dir=sys.argv[2])
  transform = streaming.image_transform(image_size=8, augment=("resize",))
  mesh = mesh_lib.make_mesh()
  local, global_ = [], []
  for batch in streaming.train_batches(source, transform, batch_size=6, seed=0, num_epochs=1):
    local.append(batch["index"].tolist())
    placed = mesh_lib.host_batch_to_global({"index": batch["index"]}, mesh)
    gathered = multihost_utils.process_allgather(placed["index"], tiled=True)
    global_.append(gathered.tolist())
  evals = list(streaming.eval_batches(source, transform, batch_size=4))
  print("RESULT " + json.dumps({
    "process": jax.process_index(), "devices": jax.device_count(), "local": local,
    "global": global_, "eval_batches": len(evals),
    "eval_index": [i for b in evals for i, m in zip(b["index"].tolist(), b["mask"]) if m],
  }))
  """
)


@pytest.mark.slow  # Two JAX processes: ~20 s on 2 idle cores.
def test_two_hosts_stream_disjoint_halves_into_global_batches(tmp_path):
  builder = tfds_builders.prepare_mock("domainnet", tmp_path / "data")
  name = f"{builder.name}/{builder.builder_config.name}"
  script = tmp_path / "stream_script.py"
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
    cmd = [sys.executable, str(script), name, str(tmp_path / "data")]
    procs.append(
      subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-3000:]
      results.append(json.loads(out.split("RESULT ", 1)[1]))
  finally:
    for p in procs:
      p.kill()

  assert [r["process"] for r in results] == [0, 1] and results[0]["devices"] == 4
  halves = [np.concatenate(r["local"]) for r in results]
  assert sorted(halves[0]) == list(range(0, 36, 2)) and sorted(halves[1]) == list(range(1, 36, 2))
  # 18 examples per host: 3 batches of 6 on both hosts.
  assert [len(r["local"]) for r in results] == [3, 3]
  for step in range(3):
    expected = results[0]["local"][step] + results[1]["local"][step]
    assert results[0]["global"][step] == results[1]["global"][step] == expected
  # Evaluation: the same number of batches on both hosts, every example once overall.
  assert results[0]["eval_batches"] == results[1]["eval_batches"] == 5
  assert sorted(results[0]["eval_index"] + results[1]["eval_index"]) == list(range(36))
