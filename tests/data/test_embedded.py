"""Tests of moe_adapt.data.embedded on the fake 20 Newsgroups archive of test_text.py.

The encoder is the 'tiny_random' BERT (no download) of `models.encoders`, passed as the
benchmark's `encoder_backend`. Checked: the embeddings are the encoder's masked mean of its
last hidden states, the per-class caps, the cache round trip (a second load never runs the
encoder), and one ValueError naming each bad option. The encoders themselves:
tests/models/test_encoders.py.
"""

import dataclasses

import numpy as np
import pytest

from moe_adapt import data
from moe_adapt.data import fetch, text, text_corpora
from moe_adapt.models import bert, encoders
from tests.data import test_text

MAX_LEN = 16


def fake_newsgroups(tmp_path, monkeypatch):
  """A data dir with a fake, pinned newsgroups archive + tokenizer; the cache in tmp_path."""
  archives = tmp_path / "archives"
  archives.mkdir()
  path = archives / fetch.ARCHIVES["newsgroups"].filename
  test_text.write_newsgroups(path)
  pinned = dataclasses.replace(fetch.ARCHIVES["newsgroups"], sha256=fetch.sha256_file(path))
  monkeypatch.setitem(fetch.ARCHIVES, "newsgroups", pinned)
  rows = {p: 20 * n for p, n in test_text.NEWSGROUP_DOCS.items()}
  monkeypatch.setattr(text_corpora, "NEWSGROUPS_RAW_ROWS", rows)
  test_text.write_tokenizer(tmp_path / "tokenizer.json")
  monkeypatch.setenv("MOE_ADAPT_CACHE", str(tmp_path / "cache"))
  return tmp_path


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
  return fake_newsgroups(tmp_path, monkeypatch)


def base_options(data_dir, **extra):
  return {
    "data_dir": str(data_dir),
    "tokenizer": str(data_dir / "tokenizer.json"),
    "grouping": "single",
    "val_fraction": 0.2,
    **extra,
  }


def bench(data_dir, **options):
  options = {
    "encoder": "tiny_random",
    "encoder_backend": encoders,
    "max_len": MAX_LEN,
    "batch_size": 16,
    **options,
  }
  return data.get_benchmark("embedded", base_options=base_options(data_dir), **options)


@pytest.fixture
def count_encodes(monkeypatch):
  calls = []
  original = encoders.encode

  def counting(name, minilm_dir, token_ids, *args, **kwargs):
    calls.append(len(token_ids))
    return original(name, minilm_dir, token_ids, *args, **kwargs)

  monkeypatch.setattr(encoders, "encode", counting)
  return calls


def test_embeddings_are_the_encoders_mean_pooled_states(data_dir, count_encodes):
  benchmark = bench(data_dir)
  assert benchmark.name == "embedded" and benchmark.domains == ("all",)
  assert benchmark.input_shape == (32,) and benchmark.num_classes == 20
  splits = benchmark.load(seed=0)["all"]
  base = text.newsgroups(**base_options(data_dir), max_len=MAX_LEN).load(seed=0)["all"]
  # Uncapped: every document, in the base's order, with its label.
  assert [len(s.y) for s in splits] == [len(s.labels) for s in base] == [80, 20, 40]
  for split, text_split in zip(splits, base):
    assert split.x.dtype == np.float32 and split.x.shape == (len(split.y), 32)
    np.testing.assert_array_equal(split.y, text_split.labels)
  # An independent forward pass (not jitted, no batching) on a few documents.
  config, params, _ = encoders.load("tiny_random")
  ids, mask = base.test.token_ids[:5], base.test.attention_mask[:5]
  hidden = bert.BertEncoder(config, add_pooler=False).apply({"params": params}, ids, mask).hidden
  m = mask[..., None].astype(np.float32)
  expected = (np.asarray(hidden) * m).sum(axis=1) / m.sum(axis=1)
  np.testing.assert_allclose(splits.test.x[:5], expected, rtol=1e-5, atol=1e-5)
  assert count_encodes == [140]  # all splits in one pass


def test_cache_round_trip_does_not_encode_again(data_dir, count_encodes):
  caps = {"train_per_class": 2, "val_per_class": 1, "test_per_class": 1}
  first = bench(data_dir, **caps).load(seed=0)["all"]
  assert [np.bincount(s.y, minlength=20).tolist() for s in first] == [[2] * 20, [1] * 20, [1] * 20]
  assert count_encodes == [80]
  assert len(list((data_dir / "cache").glob("embedded-newsgroups-*.npz"))) == 1
  # Another batch size does not change the embeddings, so the cache is reused.
  second = bench(data_dir, batch_size=7, **caps).load(seed=0)["all"]
  assert count_encodes == [80]
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
  # Another seed picks other documents: another file.
  bench(data_dir, **caps).load(seed=1)
  assert count_encodes == [80, 80]
  assert len(list((data_dir / "cache").glob("embedded-newsgroups-*.npz"))) == 2
  # The capped documents are the first ones of each class in the uncapped split.
  full = bench(data_dir, use_cache=False).load(seed=0)["all"]
  for capped, whole, cap in zip(first, full, (2, 1, 1)):
    rows = np.concatenate([np.flatnonzero(whole.y == c)[:cap] for c in range(20)])
    np.testing.assert_allclose(capped.x, whole.x[np.sort(rows)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "options, match",
  [
    (
      {"encoder": "bert"},
      r"^encoder='bert' is unknown .*; accepted: minilm, tiny_random, or a BERT / DistilBERT",
    ),
    ({"base": "digits_rot"}, r"^base='digits_rot' is not a text benchmark"),
    ({"base": "embedded"}, r"^base='embedded' is invalid"),
    ({"base": "nope"}, r"^benchmark='nope' is unknown; accepted: "),
    ({"base_options": "grouping=single"}, r"^base_options='grouping=single' is invalid"),
    ({"base_options": {"grouping": "flat"}}, r"^grouping='flat' is unknown"),
    ({"max_len": 1}, r"^max_len=1 is invalid; accepted: None or an int >= 2$"),
    ({"max_len": 8, "base_options": {"max_len": 16}}, r"^max_len=8 differs from base_options"),
    ({"batch_size": 0}, r"^batch_size=0 is invalid; accepted: an int >= 1$"),
    ({"train_per_class": 0}, r"^train_per_class=0 is invalid; accepted: None \(all\)"),
    ({"test_per_class": 2.5}, r"^test_per_class=2\.5 is invalid"),
    ({"pooling": "cls"}, r"^benchmark 'embedded' got unknown option\(s\) \['pooling'\]"),
    ({"encoder_backend": None}, r"^encoder_backend=None is invalid; accepted: moe_adapt.models"),
  ],
)
def test_bad_options_raise_one_value_error_naming_the_field(options, match):
  options = {"encoder": "tiny_random", "encoder_backend": encoders, **options}
  with pytest.raises(ValueError, match=match):
    data.get_benchmark("embedded", **options)
