"""Writes tiny Hugging Face checkpoints and their reference outputs, made by transformers.

For each architecture the loaders in `moe_adapt.models.checkpoints` read (BERT, RoBERTa,
DistilBERT, ViT, ResNet-50; `resnet_tiny`: two stages of one basic block, for fast
end-to-end tests), a model with a small random config is built by transformers (the reference
implementation) and saved with `save_pretrained` (`model.safetensors` +
`config.json`) into `tests/models/fixtures/hf/<name>/`, beside `reference.safetensors`:
the fixed inputs and the model's float32 outputs on them. `tests/models/test_checkpoints.py`
loads each checkpoint into Flax and matches the outputs.

timm cannot run in the reference venv: timm imports torchvision, and the torchvision that
pip pairs with torch 2.13.0 fails to import (`operator torchvision::nms does not exist`).
So `resnet50_timm/` is derived, not made by timm: the ResNet fixture's tensors renamed to
timm's documented ResNet-50 state-dict names (`conv1`, `bn1`, `layer{1-4}.{j}.conv{1-3}`,
`.bn{1-3}`, `.downsample.{0,1}`, `fc`; timm's `resnet50` is the v1.5 bottleneck network,
stride in the 3×3 conv, as transformers' with `downsample_in_bottleneck=False`), with a
timm-style `config.json` (`architecture`, `num_classes`, `num_features`). Its reference
outputs are those of the transformers model it was renamed from.

Run it in a throwaway virtualenv, never in the project's (an unpinned torch would pull a
multi-GB CUDA build); versions used for the committed fixtures:

  python3 -m venv /tmp/hfref
  /tmp/hfref/bin/pip install torch==2.13.0        # first: the local CPU wheel
  /tmp/hfref/bin/pip install transformers==5.25.0 safetensors==0.8.0 peft==0.22.0
  /tmp/hfref/bin/python scripts/make_hf_reference.py

The output is deterministic for given versions (fixed seeds, one thread).
"""

import argparse
import json
import pathlib
import shutil

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests/models/fixtures/hf"
# ResNet-50's block counts; tiny widths keep the fixture small.
RESNET50_DEPTHS = [3, 4, 6, 3]


def _token_inputs(np, *, vocab_size: int, pad_id: int, low: int):
  """ids [3, 7] and mask [3, 7]: a full row and two padded rows (pad positions hold pad_id)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(low, vocab_size, (3, 7)).astype(np.int64)
  mask = np.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], np.int64)
  return np.where(mask > 0, ids, pad_id), mask


def _save(model, out: pathlib.Path, tensors: dict) -> None:
  import numpy as np
  import safetensors.numpy

  if out.exists():
    shutil.rmtree(out)
  model.save_pretrained(out)
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  safetensors.numpy.save_file(arrays, str(out / "reference.safetensors"))
  print(f"{out.name}: {sorted(p.name for p in out.iterdir())}")


def _randomize_batch_norm(torch, model) -> None:
  """Non-trivial running statistics and affine params, so that loading them is tested."""
  gen = torch.Generator().manual_seed(1)
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      n = module.num_features
      module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
      module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
      module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
      module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def _timm_names(hf_names: list[str], depths: list[int]) -> dict[str, str]:
  """transformers ResNet tensor name → timm ResNet-50 name (documented timm layout)."""
  out = {}
  bn = {"weight": "weight", "bias": "bias", "running_mean": "running_mean"}
  bn |= {"running_var": "running_var", "num_batches_tracked": "num_batches_tracked"}
  for name in hf_names:
    parts = name.removeprefix("resnet.").split(".")
    if name.startswith("classifier.1."):
      out[name] = f"fc.{parts[-1]}"
    elif parts[:2] == ["embedder", "embedder"]:
      out[name] = "conv1.weight" if parts[2] == "convolution" else f"bn1.{bn[parts[-1]]}"
    elif parts[:2] == ["encoder", "stages"]:
      stage, block = int(parts[2]), int(parts[4])
      assert block < depths[stage]
      prefix = f"layer{stage + 1}.{block}"
      if parts[5] == "shortcut":
        sub = "0.weight" if parts[6] == "convolution" else f"1.{parts[-1]}"
        out[name] = f"{prefix}.downsample.{sub}"
      else:
        conv = int(parts[6]) + 1
        kind = "conv" if parts[7] == "convolution" else "bn"
        out[name] = f"{prefix}.{kind}{conv}.{parts[-1]}"
    else:
      raise ValueError(f"no timm name for {name}")
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=FIXTURES)
  args = parser.parse_args()

  # Imported here so that `--help` works without the reference stack installed.
  import numpy as np
  import safetensors.numpy
  import torch
  import transformers

  torch.set_num_threads(1)
  args.out.mkdir(parents=True, exist_ok=True)

  def text_model(name, cls, config, *, pad_id, low, outputs):
    torch.manual_seed(0)
    model = cls(config).eval()
    ids, mask = _token_inputs(np, vocab_size=64, pad_id=pad_id, low=low)
    with torch.no_grad():
      result = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    tensors = {"input_ids": ids, "attention_mask": mask}
    tensors |= {k: fn(model, result).numpy() for k, fn in outputs.items()}
    _save(model, args.out / name, tensors)

  bert_like = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=32,
    max_position_embeddings=16,
  )
  # BERT with a sequence-classification head: the base of the PEFT LoRA fixtures too.
  with torch.no_grad():
    text_model(
      "bert",
      transformers.BertForSequenceClassification,
      transformers.BertConfig(**bert_like, num_labels=3),
      pad_id=0,
      low=1,
      outputs={"logits": lambda m, r: r.logits},
    )
  # Hidden states and pooler of the BERT fixture, from its own `bert` submodule.
  bert = transformers.BertForSequenceClassification.from_pretrained(args.out / "bert").eval()
  ref = safetensors.numpy.load_file(str(args.out / "bert/reference.safetensors"))
  with torch.no_grad():
    r = bert.bert(
      input_ids=torch.from_numpy(ref["input_ids"]),
      attention_mask=torch.from_numpy(ref["attention_mask"]),
    )
  ref |= {
    "last_hidden_state": r.last_hidden_state.numpy(),
    "pooler_output": r.pooler_output.numpy(),
  }
  safetensors.numpy.save_file(ref, str(args.out / "bert/reference.safetensors"))

  text_model(
    "roberta",
    transformers.RobertaModel,
    # RoBERTa's layout: one token type, positions offset by pad_token_id + 1.
    transformers.RobertaConfig(
      **{**bert_like, "max_position_embeddings": 18}, type_vocab_size=1, pad_token_id=1
    ),
    pad_id=1,
    low=2,
    outputs={
      "last_hidden_state": lambda m, r: r.last_hidden_state,
      "pooler_output": lambda m, r: r.pooler_output,
    },
  )
  text_model(
    "distilbert",
    transformers.DistilBertModel,
    transformers.DistilBertConfig(
      vocab_size=64, dim=16, n_layers=2, n_heads=4, hidden_dim=32, max_position_embeddings=16
    ),
    pad_id=0,
    low=1,
    outputs={"last_hidden_state": lambda m, r: r.last_hidden_state},
  )

  # ViT: 16×16 RGB images, 4×4 patches (16 tokens + CLS); pixel_values are NCHW.
  torch.manual_seed(0)
  vit = transformers.ViTModel(
    transformers.ViTConfig(
      hidden_size=16,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=32,
      image_size=16,
      patch_size=4,
      num_channels=3,
    )
  ).eval()
  pixels = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    r = vit(pixel_values=torch.from_numpy(pixels))
  _save(
    vit,
    args.out / "vit",
    {
      "pixel_values": pixels,
      "last_hidden_state": r.last_hidden_state.numpy(),
      "pooler_output": r.pooler_output.numpy(),
    },
  )

  # ResNet-50 structure (3, 4, 6, 3 bottlenecks), widths / 16, with a 5-class head.
  torch.manual_seed(0)
  resnet = transformers.ResNetForImageClassification(
    transformers.ResNetConfig(
      embedding_size=4,
      hidden_sizes=[16, 32, 64, 128],
      depths=RESNET50_DEPTHS,
      layer_type="bottleneck",
      num_labels=5,
    )
  ).eval()
  with torch.no_grad():
    _randomize_batch_norm(torch, resnet)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    r = resnet.resnet(pixel_values=torch.from_numpy(pixels))
    logits = resnet(pixel_values=torch.from_numpy(pixels)).logits
  tensors = {
    "pixel_values": pixels,
    "last_hidden_state": r.last_hidden_state.numpy(),
    "pooler_output": r.pooler_output.numpy(),
    "logits": logits.numpy(),
  }
  _save(resnet, args.out / "resnet50", tensors)

  # A two-stage ResNet of basic blocks (depths 1, 1; widths 8, 16), 3 classes: small enough
  # that the accelerator presets' tiny runs (meta_dmoe.py:tfds,tiny) compile in seconds.
  torch.manual_seed(0)
  tiny = transformers.ResNetForImageClassification(
    transformers.ResNetConfig(
      embedding_size=8,
      hidden_sizes=[8, 16],
      depths=[1, 1],
      layer_type="basic",
      num_labels=3,
    )
  ).eval()
  with torch.no_grad():
    _randomize_batch_norm(torch, tiny)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    r = tiny.resnet(pixel_values=torch.from_numpy(pixels))
    logits = tiny(pixel_values=torch.from_numpy(pixels)).logits
  tiny_tensors = {
    "pixel_values": pixels,
    "pooler_output": r.pooler_output.numpy(),
    "logits": logits.numpy(),
  }
  _save(tiny, args.out / "resnet_tiny", tiny_tensors)

  # The same network in timm's naming (see the module docstring: derived, not run by timm).
  hf = safetensors.numpy.load_file(str(args.out / "resnet50/model.safetensors"))
  names = _timm_names(sorted(hf), RESNET50_DEPTHS)
  timm_dir = args.out / "resnet50_timm"
  if timm_dir.exists():
    shutil.rmtree(timm_dir)
  timm_dir.mkdir()
  safetensors.numpy.save_file(
    {names[k]: v for k, v in hf.items()}, str(timm_dir / "model.safetensors")
  )
  config = {"architecture": "resnet50", "num_classes": 5, "num_features": 128}
  (timm_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  safetensors.numpy.save_file(tensors, str(timm_dir / "reference.safetensors"))
  print(f"{timm_dir.name}: {sorted(p.name for p in timm_dir.iterdir())}")
  versions = {"torch": torch.__version__, "transformers": transformers.__version__}
  (args.out / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")


if __name__ == "__main__":
  main()
