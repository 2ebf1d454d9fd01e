"""`configs/meta_dmoe.py:text,tiny` end to end through the CLI: Meta-DMoE on the
`text_hidden` benchmark (tweets_topics, 60 texts per domain, the tiny random BERT's first
layer frozen and cached) with the `text_top` backbone (its second layer, random). No
network: tweets_topics is fetched by the session start (tests/data_util.py)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import data_util

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_text_tiny_preset_runs_end_to_end(tmp_path):
  """~90 CPU-seconds, nearly all XLA compiles of the pipeline's programs."""
  data_util.require_archive("tweets_topics")
  workdir = tmp_path / "run"
  env = {
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "JAX_PLATFORMS": "cpu",
    "MOE_ADAPT_CACHE": str(tmp_path / "cache"),
  }
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "moe_adapt.main",
      "--config=configs/meta_dmoe.py:text,tiny",
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  targets = ["apple", "claritin", "coachella"]
  assert results["target_domains"] == targets
  assert results["source_domains"] == ["driverless", "airline", "deflategate"]
  assert (workdir / "backbone.msgpack").exists()
  expected = {"erm", "erm_continued", "meta_dmoe", "aggregator_pretrained"}
  expected |= {f"meta_dmoe_target_{t}" for t in ("zeros", "source_mean", "shuffled")}
  assert expected <= set(results["metrics"])
  assert set(results["per_example"]) == set(results["metrics"])
  for variant, metrics in results["metrics"].items():
    for domain in targets:
      assert len(results["per_example"][variant][domain]["correct"]) == 60  # the whole domain
      assert 0.0 <= metrics[domain]["accuracy"] <= 1.0, variant


@pytest.mark.parametrize("arg", ["text", "text,tiny"])
def test_text_presets_validate(arg):
  from configs import meta_dmoe as presets
  from moe_adapt.methods import meta_dmoe

  config = presets.get_config(arg)
  meta_dmoe.validate_config(config)
  assert config.data.benchmark == "text_hidden" and config.model.backbone == "text_top"
  assert (config.model.options.weights == "") == ("tiny" in arg)
