"""PEFT LoRA adapters: reading against PEFT's logits, merge maths, sign analysis, writing back.

Fixtures: `fixtures/peft/lora_{a,b,c}` (PEFT adapters on the tiny BERT fixture, with PEFT's
logits; `scripts/make_peft_reference.py`), and `fixtures/peft/merged_ties` (written by
`moe-adapt-merge` from those three, with the logits PEFT and transformers give for it:
`make_peft_reference.py --check`).
"""

import json
import pathlib
import shutil

import numpy as np
import pytest
import safetensors.numpy

from moe_adapt.core import merging
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.models import checkpoints, peft_lora, text_classifier

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
BASE = FIXTURES / "hf" / "bert"
PEFT = FIXTURES / "peft"
NAMES = ("lora_a", "lora_b", "lora_c")


@pytest.fixture(scope="module")
def layers():
  return peft_lora.linear_layers(BASE)


@pytest.fixture(scope="module")
def adapters():
  return [peft_lora.read_adapter(PEFT / n) for n in NAMES]


@pytest.fixture(scope="module")
def base_inputs():
  ref = safetensors.numpy.load_file(str(BASE / "reference.safetensors"))
  return ref["input_ids"], ref["attention_mask"]


def logits(checkpoint, inputs):
  module, variables = checkpoints.classifier(checkpoint)
  return np.asarray(module.apply(variables, *inputs))


def assert_close(actual, expected, rtol=1e-5):
  scale = np.max(np.abs(expected))
  assert np.max(np.abs(np.asarray(actual) - expected)) <= rtol * scale


def test_read_adapter_fields(adapters):
  a, _, c = adapters
  assert (a.rank, a.alpha, sorted(a.target_modules)) == (4, 8.0, ["query", "value"])
  assert len(a.factors) == 4  # query and value of 2 layers
  assert c.rank == 2 and len(c.factors) == 13  # q, k, v, 3 dense per layer, pooler
  a_f, b_f = a.factors["bert.encoder.layer.0.attention.self.query"]
  assert a_f.shape == (4, 16) and b_f.shape == (16, 4)
  np.testing.assert_allclose(
    a.delta("bert.encoder.layer.0.attention.self.query"), 2.0 * b_f @ a_f, rtol=1e-6
  )


@pytest.mark.parametrize("name", NAMES)
def test_adapter_logits_match_peft(name, base_inputs):
  want = safetensors.numpy.load_file(str(PEFT / name / "reference.safetensors"))["logits"]
  assert_close(logits(peft_lora.apply_adapter(BASE, PEFT / name), base_inputs), want)


def test_merge_maths_against_numpy(adapters, layers):
  query = "bert.encoder.layer.1.attention.self.query"
  key = "bert.encoder.layer.1.attention.self.key"  # only lora_c adapts it
  d = np.stack([a.delta(query) for a in adapters])
  average = peft_lora.merge(adapters, layers, method="average", weights=[1.0, 2.0, 1.0])
  np.testing.assert_allclose(average.deltas[query], (d[0] + 2 * d[1] + d[2]) / 4, atol=1e-7)
  np.testing.assert_allclose(average.deltas[key], adapters[2].delta(key) / 4, atol=1e-7)
  ties = peft_lora.merge(adapters, layers, method="ties", density=0.2)
  stacked = peft_lora.stack_deltas(adapters, layers)
  want = merging.ties_merge(stacked, density=0.2)
  np.testing.assert_array_equal(ties.deltas[query], np.asarray(want[query]))
  # Signs: lora_a vs lora_b on the raw ΔW, over every adapted position of all three.
  fsd, pairwise = peft_lora.sign_analysis(adapters, layers)
  total = sum(v[0].size for v in stacked.values())
  opposite = sum(int(np.sum(np.asarray(v[0]) * np.asarray(v[1]) < 0)) for v in stacked.values())
  assert pairwise.shape == (3, 3) and np.allclose(np.diag(pairwise), 0)
  assert pairwise[0, 1] == pytest.approx(opposite / total, rel=1e-6)
  assert fsd >= pairwise.max()


def test_written_adapter_round_trip(adapters, layers, tmp_path):
  merged = peft_lora.merge(adapters, layers, method="average")
  info = peft_lora.write_adapter(merged, tmp_path / "avg", default_rank=10)
  assert info["rank"] == 10 and info["relative_error"] < 1e-6  # Σ ranks: exact
  back = peft_lora.read_adapter(tmp_path / "avg")
  assert back.rank == 10 and back.alpha == 10.0
  for module, delta in merged.deltas.items():
    np.testing.assert_allclose(back.delta(module), delta, atol=1e-6)
  low = peft_lora.write_adapter(merged, tmp_path / "r2", rank=2)
  assert low["rank"] == 2 and 0 < low["relative_error"] < 1


def test_factor_average_is_documented_factor_mean(adapters, layers):
  a, b = adapters[0], peft_lora.read_adapter(PEFT / "lora_a")
  merged = peft_lora.merge([a, b], layers, method="factor_average")
  module = "bert.encoder.layer.0.attention.self.value"
  np.testing.assert_allclose(merged.factors[module][0], a.factors[module][0], atol=1e-7)
  with pytest.raises(ValueError, match=r"needs equal shapes.*'lora_a' has rank=4 and 'lora_c'"):
    peft_lora.merge([adapters[0], adapters[2]], layers, method="factor_average")


def test_merged_ties_fixture_matches_peft_and_transformers(adapters, layers, base_inputs, tmp_path):
  ref = safetensors.numpy.load_file(str(PEFT / "merged_ties" / "peft_logits.safetensors"))
  # PEFT's logits with the adapter moe-adapt-merge wrote, reproduced with our loader.
  ours = peft_lora.apply_adapter(BASE, PEFT / "merged_ties" / "adapter")
  assert_close(logits(ours, base_inputs), ref["adapter_logits"])
  # transformers' logits of the merged full model we wrote (exact ΔW, no truncation).
  full = checkpoints.load_checkpoint(PEFT / "merged_ties" / "model")
  assert_close(logits(full, base_inputs), ref["model_logits"])
  # And the same merge made now equals the committed one (products: SVD signs may flip).
  merged = peft_lora.merge(adapters, layers, method="ties", density=0.2)
  fresh = peft_lora.fold(checkpoints.load_checkpoint(BASE), layers, merged.deltas)
  assert_close(logits(fresh, base_inputs), ref["model_logits"])
  peft_lora.write_adapter(merged, tmp_path / "adapter", default_rank=10)
  new = peft_lora.read_adapter(tmp_path / "adapter")
  old = peft_lora.read_adapter(PEFT / "merged_ties" / "adapter")
  for module in old.factors:
    np.testing.assert_allclose(new.delta(module), old.delta(module), atol=1e-6)


def test_adapter_for_another_base_is_refused(adapters):
  distilbert = peft_lora.linear_layers(FIXTURES / "hf" / "distilbert")
  with pytest.raises(ValueError, match=r"target_modules \['value', 'query'\] match no Linear"):
    peft_lora.deltas(adapters[0], distilbert)
  with pytest.raises(
    ValueError, match=r"its layers .*bert\.encoder\.layer\.0\.attention\.self\.query"
  ):
    peft_lora.deltas(adapters[0], distilbert)


def test_bad_adapter_files(tmp_path):
  d = tmp_path / "bad"
  shutil.copytree(PEFT / "lora_a", d)
  config = json.loads((d / "adapter_config.json").read_text())
  (d / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
  with pytest.raises(ValueError, match="use_dora=True is unsupported"):
    peft_lora.read_adapter(d)
  (d / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
  with pytest.raises(ValueError, match="peft_type='IA3'; accepted: 'LORA'"):
    peft_lora.read_adapter(d)
  (d / "adapter_model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"has no adapter_model\.safetensors"):
    peft_lora.read_adapter(d)


def test_to_flax_lora_forward_matches_peft(adapters, layers, base_inputs, tmp_path):
  config, tree = peft_lora.to_flax(adapters[1], layers)
  assert (config.kind, config.lora_rank, config.lora_alpha) == ("lora", 4, 16.0)
  assert config.lora_targets == ("query", "value")
  ckpt = checkpoints.load_checkpoint(BASE)
  model = text_classifier.TextClassifier(ckpt.module.config, 3, adapter=config, pooling="pooler")
  params = {"encoder": adapters_lib.merge_params(ckpt.params, tree), "head": ckpt.head}
  want = safetensors.numpy.load_file(str(PEFT / "lora_b" / "reference.safetensors"))["logits"]
  assert_close(model.apply({"params": params}, *base_inputs), want)
  # And back: the LoRA leaves of our params written as a PEFT adapter.
  written = peft_lora.from_flax(params["encoder"], config, layers, tmp_path / "back")
  back = peft_lora.read_adapter(tmp_path / "back")
  assert written == sorted(adapters[1].factors) and back.alpha == 16.0
  for module, (a, b) in adapters[1].factors.items():
    np.testing.assert_array_equal(back.factors[module][0], a)
    np.testing.assert_array_equal(back.factors[module][1], b)
  with pytest.raises(ValueError, match=r"pooler\.dense is not one of the encoder blocks'"):
    peft_lora.to_flax(adapters[2], layers)
