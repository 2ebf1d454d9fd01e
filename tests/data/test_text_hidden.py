"""Tests of the `text_hidden` benchmark (moe_adapt.data.text_hidden) on the fake 20 Newsgroups
archive of test_text.py.

The encoder is the 'tiny_random' BERT (2 layers, 32 wide; no download). Checked: the
arrays are the first layer's hidden states with the mask as the last channel, the labels
and split sizes are the base's, the cache round trip never runs the encoder again, the
backend may be named by its module, and one ValueError naming each bad option. That the
top layer on these states gives the whole encoder's output: tests/models/test_text_top.py.
"""

import numpy as np
import pytest

from moe_adapt import data
from moe_adapt.data import text
from moe_adapt.models import bert, encoders
from tests.data import test_embedded

MAX_LEN = 16


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
  return test_embedded.fake_newsgroups(tmp_path, monkeypatch)


def bench(data_dir, **options):
  options = {
    "base": "newsgroups",
    "base_options": test_embedded.base_options(data_dir),
    "encoder": "tiny_random",
    "encoder_backend": encoders,
    "frozen_layers": 1,
    "max_len": MAX_LEN,
    "batch_size": 16,
    **options,
  }
  return data.get_benchmark("text_hidden", **options)


@pytest.fixture
def count_calls(monkeypatch):
  calls = []
  original = encoders.hidden_states

  def counting(name, minilm_dir, token_ids, *args, **kwargs):
    calls.append(len(token_ids))
    return original(name, minilm_dir, token_ids, *args, **kwargs)

  monkeypatch.setattr(encoders, "hidden_states", counting)
  return calls


def test_arrays_are_the_first_layers_states_and_the_mask(data_dir, count_calls):
  benchmark = bench(data_dir)
  assert benchmark.name == "text_hidden" and benchmark.domains == ("all",)
  assert benchmark.input_shape == (MAX_LEN, 33) and benchmark.num_classes == 20
  splits = benchmark.load(seed=0)["all"]
  base = text.newsgroups(**test_embedded.base_options(data_dir), max_len=MAX_LEN).load(seed=0)
  base = base["all"]
  assert [len(s.y) for s in splits] == [len(s.labels) for s in base] == [80, 20, 40]
  for split, text_split in zip(splits, base):
    assert split.x.dtype == np.float32 and split.x.shape == (len(split.y), MAX_LEN, 33)
    np.testing.assert_array_equal(split.y, text_split.labels)
    np.testing.assert_array_equal(split.x[..., -1], text_split.attention_mask)
  # An independent forward pass: embeddings + layer 0 of the whole encoder's parameters.
  config, params, _ = encoders.load("tiny_random")
  ids, mask = base.test.token_ids[:5], base.test.attention_mask[:5]
  module = bert.BertEncoder(config, add_pooler=False)
  _, state = module.apply(
    {"params": params}, ids, mask, capture_intermediates=True, mutable=["intermediates"]
  )
  expected = state["intermediates"]["layer_0"]["__call__"][0]
  np.testing.assert_allclose(splits.test.x[:5, :, :-1], expected, rtol=1e-5, atol=1e-5)
  assert count_calls == [140]  # every document of every split, in one call


def test_cache_round_trip_does_not_run_the_encoder_again(data_dir, count_calls):
  first = bench(data_dir).load(seed=0)["all"]
  second = bench(data_dir).load(seed=0)["all"]
  assert count_calls == [140]
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
  bench(data_dir, use_cache=False).load(seed=0)
  assert count_calls == [140, 140]


@pytest.mark.parametrize(
  ("options", "match"),
  [
    ({"frozen_layers": 2}, r"frozen_layers=2 is invalid .* accepted: an int in 1\.\.1"),
    ({"frozen_layers": 0}, r"frozen_layers=0 is invalid"),
    ({"frozen_layers": True}, r"frozen_layers=True is invalid"),
    ({"encoder_backend": None}, r"encoder_backend=None is invalid"),
    ({"encoder": "nope"}, r"encoder='nope' is unknown"),
    (
      {"base": "digits_rot", "base_options": {}, "max_len": None},
      r"base='digits_rot' is not a text benchmark",
    ),
  ],
)
def test_bad_options_are_rejected_by_name(data_dir, options, match):
  with pytest.raises(ValueError, match=match):
    bench(data_dir, **options)
