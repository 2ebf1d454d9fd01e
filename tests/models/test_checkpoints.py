"""Loaders of HF / timm checkpoints against outputs of the reference implementations.

The fixtures in `fixtures/hf/` were made by transformers (`scripts/make_hf_reference.py`);
each test loads a checkpoint into Flax and matches the reference outputs on the fixed inputs
to 1e-5 relative to the output's largest magnitude (float32).
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from moe_adapt.models import bert, checkpoints, hf_io

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


def reference(name):
  return safetensors.numpy.load_file(str(FIXTURES / name / "reference.safetensors"))


def assert_close(actual, expected, rtol=1e-5):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = np.max(np.abs(expected))
  assert np.max(np.abs(actual - expected)) <= rtol * scale, (
    np.max(np.abs(actual - expected)) / scale
  )


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert"])
def test_text_encoders_match_transformers(name):
  ckpt = checkpoints.load_checkpoint(FIXTURES / name)
  assert ckpt.architecture == name
  ref = reference(name)
  out = ckpt.module.apply(ckpt.variables, ref["input_ids"], ref["attention_mask"])
  mask = ref["attention_mask"][..., None]
  # Padded positions are not compared: they are garbage in both implementations.
  assert_close(out.hidden * mask, ref["last_hidden_state"] * mask)
  if "pooler_output" in ref:
    assert_close(out.pooled, ref["pooler_output"])
  else:
    assert out.pooled is None


def test_bert_sequence_classifier_logits():
  ckpt = checkpoints.load_checkpoint(FIXTURES / "bert")
  assert ckpt.head["kernel"].shape == (16, 3)
  module, variables = checkpoints.classifier(ckpt)
  ref = reference("bert")
  assert_close(module.apply(variables, ref["input_ids"], ref["attention_mask"]), ref["logits"])


def test_vit_matches_transformers():
  ckpt = checkpoints.load_checkpoint(FIXTURES / "vit")
  ref = reference("vit")
  images = ref["pixel_values"].transpose(0, 2, 3, 1)  # NCHW → NHWC
  cls, state = ckpt.module.apply(ckpt.variables, images, capture_intermediates=True)
  tokens = state["intermediates"]["norm"]["__call__"][0]
  assert_close(tokens, ref["last_hidden_state"])
  assert_close(cls, ref["last_hidden_state"][:, 0])
  assert ckpt.head is None  # ViTModel: its tanh pooler is not loaded


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnet50_timm"])
def test_resnet50_matches_transformers(name):
  ckpt = checkpoints.load_checkpoint(FIXTURES / name)
  assert ckpt.architecture == ("resnet" if name == "resnet50" else "timm_resnet")
  assert ckpt.module.stage_sizes == (3, 4, 6, 3)
  ref = reference(name)
  images = ref["pixel_values"].transpose(0, 2, 3, 1)
  module, variables = checkpoints.classifier(ckpt)
  features = module.apply(variables, images, method="features")
  assert_close(features, ref["pooler_output"][:, :, 0, 0])
  assert_close(module.apply(variables, features, method="classify"), ref["logits"])


def test_tiny_resnet_matches_transformers():
  # Basic blocks, two stages: the fixture the accelerator presets' tiny runs start from.
  ckpt = checkpoints.load_checkpoint(FIXTURES / "resnet_tiny")
  assert ckpt.architecture == "resnet"
  assert ckpt.module.stage_sizes == (1, 1)
  assert ckpt.module.block_cls.__name__ == "BasicBlock"
  ref = reference("resnet_tiny")
  module, variables = checkpoints.classifier(ckpt)
  features = module.apply(variables, ref["pixel_values"].transpose(0, 2, 3, 1), method="features")
  assert_close(features, ref["pooler_output"][:, :, 0, 0])
  assert_close(module.apply(variables, features, method="classify"), ref["logits"])


def test_loaded_trees_match_initialised_modules():
  for name in ("distilbert", "vit", "resnet50_timm"):
    ckpt = checkpoints.load_checkpoint(FIXTURES / name)
    x = reference(name).get("input_ids")
    if x is None:
      x = reference(name)["pixel_values"].transpose(0, 2, 3, 1)
    init = jax.eval_shape(ckpt.module.init, jax.random.key(0), x)
    shapes = jax.tree.map(lambda a: a.shape, ckpt.variables)
    assert shapes == jax.tree.map(lambda a: a.shape, dict(init)), name


def copy_fixture(tmp_path, name):
  out = tmp_path / name
  shutil.copytree(FIXTURES / name, out)
  return out


def rewrite(directory, edit):
  tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
  d = copy_fixture(tmp_path, "roberta")

  def edit(t):
    del t["encoder.layer.1.attention.self.key.bias"]
    t["lm_head.dense.weight"] = np.zeros((16, 16), np.float32)
    t["encoder.layer.0.output.dense.weight"] = np.zeros((16, 31), np.float32)

  rewrite(d, edit)
  with pytest.raises(hf_io.WeightLoadError) as info:
    checkpoints.load_checkpoint(d)
  message = str(info.value)
  assert "missing tensors (1):\n    encoder.layer.1.attention.self.key.bias" in message
  assert "unexpected tensors (1):\n    lm_head.dense.weight" in message
  assert "encoder.layer.0.output.dense.weight: checkpoint (16, 31), config expects (16, 32)" in (
    message
  )


def test_checkpoint_of_another_architecture(tmp_path):
  # DistilBERT tensors under a BERT config: every expected tensor is missing.
  d = copy_fixture(tmp_path, "distilbert")
  bert_config = json.loads((FIXTURES / "bert" / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(bert_config))
  with pytest.raises(hf_io.WeightLoadError, match=r"another architecture.*look like distilbert"):
    checkpoints.load_checkpoint(d)
  (d / "config.json").write_text(json.dumps({**bert_config, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type='gpt2' is unsupported; accepted: bert, rob"):
    checkpoints.load_checkpoint(d)
  with pytest.raises(ValueError, match="holds a 'vit' checkpoint, not 'bert'"):
    checkpoints.load_checkpoint(FIXTURES / "vit", architecture="bert")
  with pytest.raises(ValueError, match="has no linear classification head"):
    checkpoints.classifier(checkpoints.load_checkpoint(FIXTURES / "roberta"))


def test_sharded_checkpoint_and_missing_files(tmp_path):
  d = copy_fixture(tmp_path, "distilbert")
  tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
  names = sorted(tensors)
  shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
  for file, keys in shards.items():
    safetensors.numpy.save_file({k: tensors[k] for k in keys}, str(d / file))
  index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  (d / "model.safetensors").unlink()
  a = checkpoints.load_checkpoint(d)
  b = checkpoints.load_checkpoint(FIXTURES / "distilbert")
  assert jax.tree.all(jax.tree.map(np.array_equal, a.variables, b.variables))
  for file in [*shards, "model.safetensors.index.json"]:
    (d / file).unlink()
  with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors"):
    checkpoints.load_checkpoint(d)


def test_bert_config_roberta_positions():
  config = bert.BertConfig.from_json(FIXTURES / "roberta" / "config.json")
  assert config.model_type == "roberta" and config.type_vocab_size == 1
  with pytest.raises(ValueError, match="max_position_embeddings=18 - 2"):
    ids = np.full((1, 17), 5, np.int32)
    ckpt = checkpoints.load_checkpoint(FIXTURES / "roberta")
    jax.eval_shape(ckpt.module.apply, ckpt.variables, ids)


def test_bfloat16_and_float16_checkpoints_load_as_float32(tmp_path):
  # Written as torch writes them: raw bfloat16 bits (NumPy has no bfloat16 dtype).
  d = copy_fixture(tmp_path, "distilbert")
  tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
  bf16 = {k: jax.numpy.asarray(v, jax.numpy.bfloat16) for k, v in tensors.items()}
  half = {k: v.astype(np.float16) for k, v in tensors.items()}
  for name, converted in (("bf16", bf16), ("fp16", half)):
    arrays = {k: np.asarray(v) for k, v in converted.items()}
    out = tmp_path / name
    shutil.copytree(d, out)
    if name == "bf16":
      _save_bfloat16(arrays, out / "model.safetensors")
    else:
      safetensors.numpy.save_file(arrays, str(out / "model.safetensors"))
    ckpt = checkpoints.load_checkpoint(out)
    kernel = ckpt.params["layer_0"]["attention"]["query"]["kernel"]
    want = np.asarray(arrays["transformer.layer.0.attention.q_lin.weight"], np.float32).T
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, want)


def _save_bfloat16(arrays, path):
  """A safetensors file of BF16 tensors (header + raw little-endian bits)."""
  header, offset, blobs = {}, 0, []
  for name, value in arrays.items():
    blob = value.view(np.uint16).astype("<u2").tobytes()
    header[name] = {
      "dtype": "BF16",
      "shape": list(value.shape),
      "data_offsets": [offset, offset + len(blob)],
    }
    offset += len(blob)
    blobs.append(blob)
  encoded = json.dumps(header).encode()
  encoded += b" " * (-len(encoded) % 8)
  path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))
