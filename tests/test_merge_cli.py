"""`moe-adapt-merge` end to end on the PEFT fixtures (tests/models/fixtures/peft)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from moe_adapt import merge_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = "tests/models/fixtures/hf/bert"
ADAPTERS = ",".join(f"tests/models/fixtures/peft/lora_{n}" for n in "abc")


def test_ties_merge_prints_pairwise_fsd_and_writes_adapter(tmp_path):
  out = tmp_path / "merged"
  cmd = [sys.executable, "-m", "moe_adapt.merge_cli", f"--base={BASE}", f"--adapters={ADAPTERS}"]
  cmd += ["--method=ties", "--density=0.2", f"--out={out}", "--merged_model"]
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert lines[1].split() == ["lora_a", "lora_b", "lora_c"]
  assert lines[2].split()[:2] == ["lora_a", "0.0000"]
  record = json.loads((out / "merge.json").read_text())
  committed = json.loads((REPO / "tests/models/fixtures/peft/merged_ties/merge.json").read_text())
  np.testing.assert_allclose(record["pairwise_fsd"], committed["pairwise_fsd"], rtol=1e-6)
  assert record["rank"] == 10  # 4 + 4 + 2
  assert (out / "adapter" / "adapter_model.safetensors").is_file()
  assert (out / "model" / "model.safetensors").is_file()


def test_bad_input_gives_one_message(tmp_path, capsys):
  with pytest.raises(ValueError, match="'lora_a' has rank=4 and 'lora_c' has rank=2"):
    merge_cli.run(
      [f"--base={BASE}", f"--adapters={ADAPTERS}", "--method=factor_average", f"--out={tmp_path}"]
    )
  (tmp_path / "x").write_text("keep")
  with pytest.raises(ValueError, match="is not empty"):
    merge_cli.run([f"--base={BASE}", f"--adapters={ADAPTERS}", f"--out={tmp_path}"])
  with pytest.raises(ValueError, match="does not fit the base model"):
    merge_cli.run(["--base=tests/models/fixtures/hf/roberta", f"--adapters={ADAPTERS}"])
  # Without --out: only the sign analysis.
  record = merge_cli.run([f"--base={BASE}", f"--adapters={ADAPTERS}"])
  assert len(record["pairwise_fsd"]) == 3 and "rank" not in record
  assert "pairwise FSD" in capsys.readouterr().out
