"""MUKA's text setting from a Hugging Face BERT-family checkpoint (issue #23 item 3).

The frozen encoder that every teacher and the student start from
(`data.options.encoder` of the `embedded` benchmark) is a checkpoint directory: the
embeddings equal the checkpoint's own masked-mean hidden states, the `newsgroups,tiny`
preset runs on them, and checkpoints that do not fit are refused by name. The text
benchmarks' WordPiece ids need the tokenizer's vocabulary, so the tests widen the tiny
BERT fixture's 64-entry vocabulary to cover the fake newsgroups tokenizer (as
tests/methods/test_finetune_init.py keeps its fake ids under 64).
"""

import json
import pathlib
import shutil

import numpy as np
import pytest
import safetensors.numpy

from moe_adapt import data
from moe_adapt.methods import muka
from moe_adapt.models import bert, checkpoints, encoders, hf_io
from tests.data import test_embedded
from tests.methods import configs_util

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "models" / "fixtures" / "hf"
CONFIGS = configs_util.config_module("muka")
VOCAB = 512  # > the fake newsgroups tokenizer's ~430 WordPiece ids


def wide_vocab_bert(tmp_path, name: str = "bert") -> pathlib.Path:
  """The tiny `name` fixture with its word embeddings grown to VOCAB rows (random)."""
  out = pathlib.Path(shutil.copytree(FIXTURES / name, tmp_path / f"{name}_wide"))
  tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
  key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
  rows, dim = tensors[key].shape
  extra = np.random.default_rng(0).normal(0, 0.02, (VOCAB - rows, dim)).astype(np.float32)
  tensors[key] = np.concatenate([tensors[key], extra])
  hf_io.save_file(tensors, out / "model.safetensors")
  config = json.loads((out / "config.json").read_text())
  config["vocab_size"] = VOCAB
  (out / "config.json").write_text(json.dumps(config))
  return out


def embedded_options(data_dir, encoder) -> dict:
  return {
    "base": "newsgroups",
    "base_options": test_embedded.base_options(data_dir),
    "encoder": str(encoder),
    "encoder_backend": encoders,
    "max_len": 16,
    "train_per_class": 2,
    "val_per_class": 1,
    "test_per_class": 1,
    "batch_size": 16,
  }


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_embeddings_are_the_checkpoint_mean_pooled_states(tmp_path, monkeypatch, name):
  data_dir = test_embedded.fake_newsgroups(tmp_path, monkeypatch)
  encoder = wide_vocab_bert(tmp_path, name)
  bench = data.get_benchmark("embedded", **embedded_options(data_dir, encoder))
  ckpt = checkpoints.load_checkpoint(encoder)
  assert bench.input_shape == (ckpt.module.config.hidden_size,)
  splits = bench.load(seed=0)["all"]
  text = data.get_benchmark("newsgroups", max_len=16, **test_embedded.base_options(data_dir))
  ids = text.load(seed=0)["all"].train
  keep = np.concatenate([np.flatnonzero(ids.labels == c)[:2] for c in range(text.num_classes)])
  keep.sort()
  hidden = ckpt.module.apply(
    {"params": ckpt.params}, ids.token_ids[keep], ids.attention_mask[keep], deterministic=True
  ).hidden
  want = np.asarray(bert.mean_pool(hidden, ids.attention_mask[keep]))
  np.testing.assert_allclose(splits.train.x, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(splits.train.y, ids.labels[keep])


def test_checkpoints_that_do_not_fit_are_refused(tmp_path, monkeypatch):
  data_dir = test_embedded.fake_newsgroups(tmp_path, monkeypatch)
  bench = data.get_benchmark("embedded", **embedded_options(data_dir, FIXTURES / "bert"))
  with pytest.raises(ValueError, match=r"encoder='.*bert' has vocab_size=64, but base 'newsg"):
    bench.load(seed=0)
  for name in ("roberta", "resnet50"):
    with pytest.raises(ValueError, match=rf"encoder='.*{name}' holds a '\w+' checkpoint; accep"):
      data.get_benchmark("embedded", **embedded_options(data_dir, FIXTURES / name))
  with pytest.raises(
    ValueError, match=r"encoder='bert-base' is unknown \(and not a checkpoint directory"
  ):
    data.get_benchmark("embedded", **embedded_options(data_dir, "bert-base"))


@pytest.mark.slow
def test_newsgroups_tiny_runs_from_a_bert_checkpoint(tmp_path, monkeypatch):
  """`muka.py:newsgroups,tiny` end to end with teachers and student on the checkpoint."""
  from moe_adapt import main as main_lib

  data_dir = test_embedded.fake_newsgroups(tmp_path, monkeypatch)
  encoder = wide_vocab_bert(tmp_path)
  config = CONFIGS.get_config("newsgroups,tiny")
  config.data.options.base_options.data_dir = str(data_dir)
  config.data.options.base_options.tokenizer = str(data_dir / "tokenizer.json")
  config.data.options.encoder = str(encoder)
  muka.validate_config(config)
  setup = muka.make_setup(config)
  assert setup.input_shape == (16,)  # the fixture's hidden size, not tiny_random's 32
  results = main_lib.run(config, str(tmp_path / "run"))
  assert results["num_examples"] == {"transfer": 80, "test": 40}
  for variant in ("muki", "vanilla_kd", "oracle"):
    assert 0.0 <= results["metrics"][variant]["union"]["accuracy"] <= 1.0
