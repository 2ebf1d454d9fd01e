"""Loading `configs/<name>.py` in tests (config files are loaded by path, as the CLI does)."""

from __future__ import annotations

import importlib.util
import pathlib
import types

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[2]


def config_module(name: str) -> types.ModuleType:
  """The module of `configs/<name>.py`."""
  spec = importlib.util.spec_from_file_location(f"_{name}_config", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def with_overrides(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """`config` with dotted-key overrides applied in place, e.g. `**{"adamix.share": "x"}`."""
  for name, value in overrides.items():
    *groups, field = name.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[field] = value
  return config


def check_per_example(results: dict, variants) -> None:
  """`results['per_example']` holds exactly `variants`, each consistent with its metrics.

  Every entry pairs up: the same labels in the same order for every variant of a domain,
  `correct` = (pred == label), and its mean is the reported accuracy of that domain.
  """
  per_example = results["per_example"]
  assert set(per_example) == set(variants)
  labels = {}
  for variant, domains in per_example.items():
    for domain, entry in domains.items():
      assert len(entry["correct"]) == len(entry["pred"]) == len(entry["label"]) > 0
      assert entry["correct"] == [int(p == y) for p, y in zip(entry["pred"], entry["label"])]
      accuracy = results["metrics"][variant][domain]["accuracy"]
      assert sum(entry["correct"]) / len(entry["correct"]) == accuracy, (variant, domain)
      assert labels.setdefault(domain, entry["label"]) == entry["label"], (variant, domain)
