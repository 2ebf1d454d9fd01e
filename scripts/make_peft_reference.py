"""Writes three PEFT LoRA adapters on the tiny BERT fixture, and PEFT's logits with each.

The base is `tests/models/fixtures/hf/bert/` (a `BertForSequenceClassification`, made by
`scripts/make_hf_reference.py`). Each adapter gets random A and B (PEFT's
`init_lora_weights=False`, so that B != 0 and the adapters differ from the base) and is
saved by PEFT (`adapter_config.json` + `adapter_model.safetensors`) into
`tests/models/fixtures/peft/<name>/`, beside `reference.safetensors`: the BERT fixture's
inputs and the logits of the base with that adapter, computed by PEFT.

  lora_a: r=4, lora_alpha=8,  target_modules=[query, value]
  lora_b: r=4, lora_alpha=16, target_modules=[query, value]
  lora_c: r=2, lora_alpha=4,  target_modules=[query, key, value, dense]  ('dense' matches
          the attention output, intermediate, output and pooler Linears)

Run it in the same throwaway virtualenv as `make_hf_reference.py` (torch==2.13.0,
transformers==5.25.0, peft==0.22.0):

  /tmp/hfref/bin/python scripts/make_peft_reference.py

`--check DIR` instead checks what `moe-adapt-merge --out=DIR --merged_model` wrote: PEFT
loads `DIR/adapter` onto the base, transformers loads the merged full model `DIR/model`, and
their logits on the fixed inputs go to `DIR/peft_logits.safetensors` ('adapter_logits',
'model_logits'), which `tests/models/test_peft_lora.py` reproduces with our code:

  /tmp/hfref/bin/python scripts/make_peft_reference.py \
    --check tests/models/fixtures/peft/merged_ties
"""

import argparse
import json
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ROOT / "tests/models/fixtures/hf/bert"
OUT = ROOT / "tests/models/fixtures/peft"
ADAPTERS = {
  "lora_a": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
  "lora_b": dict(r=4, lora_alpha=16, target_modules=["query", "value"]),
  "lora_c": dict(r=2, lora_alpha=4, target_modules=["query", "key", "value", "dense"]),
}


def _logits(torch, model, ref) -> "object":
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ref["input_ids"]),
      attention_mask=torch.from_numpy(ref["attention_mask"]),
    )
  return out.logits.numpy()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  parser.add_argument("--check", type=pathlib.Path, default=None)
  args = parser.parse_args()

  # Imported here so that `--help` works without the reference stack installed.
  import peft
  import safetensors.numpy
  import torch
  import transformers

  torch.set_num_threads(1)
  ref = safetensors.numpy.load_file(str(BASE / "reference.safetensors"))
  inputs = {k: ref[k] for k in ("input_ids", "attention_mask")}

  def base():
    return transformers.BertForSequenceClassification.from_pretrained(BASE).eval()

  if args.check is not None:
    adapter = peft.PeftModel.from_pretrained(base(), args.check / "adapter").eval()
    merged = transformers.BertForSequenceClassification.from_pretrained(args.check / "model")
    logits = {
      "adapter_logits": _logits(torch, adapter, ref),
      "model_logits": _logits(torch, merged.eval(), ref),
    }
    safetensors.numpy.save_file(logits, str(args.check / "peft_logits.safetensors"))
    print(f"PEFT {peft.__version__} / transformers {transformers.__version__}: {logits}")
    return

  args.out.mkdir(parents=True, exist_ok=True)
  for seed, (name, options) in enumerate(ADAPTERS.items()):
    torch.manual_seed(seed)
    config = peft.LoraConfig(**options, lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(base(), config).eval()
    out = args.out / name
    if out.exists():
      shutil.rmtree(out)
    model.save_pretrained(out)
    # Keep the committed fixture free of machine paths and of PEFT's model-card template.
    (out / "README.md").unlink()
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "tests/models/fixtures/hf/bert"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    safetensors.numpy.save_file(
      {**inputs, "logits": _logits(torch, model, ref)}, str(out / "reference.safetensors")
    )
    print(f"{name}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
  main()
