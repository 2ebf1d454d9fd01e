"""Pieces shared by the config files: argument parsing and the adapter methods' defaults.

The config files import it as `from configs import _shared` (the repository root is on the
path: `pip install -e .` puts it there, and `python -m` runs from it); the underscore keeps
it out of `moe-adapt list`, which lists every other file here as a config.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from moe_adapt.config_presets import UnknownPresetError


def parse_config_arg(
  arg: str | None,
  *,
  presets: Sequence[str],
  flags: Sequence[str] = ("tiny",),
  what: str = "preset",
) -> tuple[str, frozenset[str]]:
  """`'<preset>[,flag...]'` -> (preset, flags); the first preset is the default.

  Args:
    arg: the text after ':' in `--config=FILE:arg` (None = the default preset).
    presets: accepted presets.
    flags: accepted flags.
    what: what a preset names, for errors (e.g. 'benchmark').

  Raises:
    UnknownPresetError: a ValueError naming the unknown preset or flag and the accepted ones.
  """
  tokens = [t.strip() for t in (arg or presets[0]).split(",") if t.strip()]
  preset, given = tokens[0], frozenset(tokens[1:])
  if preset not in presets:
    raise UnknownPresetError(
      f"config argument {what}={preset!r} is unknown; accepted: {', '.join(presets)}",
      presets=presets,
      flags=flags,
    )
  unknown = given - set(flags)
  if unknown:
    raise UnknownPresetError(
      f"config argument flags {sorted(unknown)} are unknown; accepted: {', '.join(flags)}",
      presets=presets,
      flags=flags,
    )
  return preset, given


# Benchmarks of the adapter methods, by preset: (benchmark, model kind).
ADAPTER_PRESETS = {
  "vader": ("vader_sentiment", "minilm"),
  "tweets": ("tweets_topics", "minilm"),
  "digits": ("digits_rot", "vit"),
  "fmnist": ("fmnist_rot", "vit"),
}


def adapter_harness(preset: str, *, tiny: bool) -> ml_collections.ConfigDict:
  """Fields read by `moe_adapt.methods.finetune`'s harness (data, model, adapter, train).

  Text presets fine-tune MiniLM (`moe-adapt-data fetch minilm` and the corpus first);
  image presets pre-train a small ViT on the source domains inside the pipeline.
  """
  benchmark, kind = ADAPTER_PRESETS[preset]
  text = kind == "minilm"
  c = ml_collections.ConfigDict()
  c.seed = 0  # adapter/head initialisation, batch order, dropout and routing draws

  c.data = ml_collections.ConfigDict()
  c.data.benchmark = benchmark
  # Options of moe_adapt.data.get_benchmark ('' = the benchmark's default).
  if text:
    # 48 WordPiece tokens hold 97 % of VADER texts and 92 % of the tweets whole; the
    # step costs ~25 % less than at 64. max_per_domain '' = every text.
    options = {"data_dir": "", "max_per_domain": "", "max_len": 48}
  elif benchmark == "digits_rot":
    options = {"image_size": 16}
  else:
    options = {"data_dir": "", "max_per_domain": 2000}
  c.data.options = ml_collections.ConfigDict(options)
  c.data.benchmark_seed = 0  # which examples fall in which split: fixed across seeds

  c.model = ml_collections.ConfigDict()
  c.model.kind = kind
  c.model.dropout = 0.1  # on the pooled features (text) / inside the blocks (ViT)
  # Computation dtype of the encoder and adapters: 'float32' or 'bfloat16' (parameters,
  # optimiser state and losses stay float32; bfloat16 is for accelerators).
  c.model.dtype = "float32"
  # A Hugging Face checkpoint directory (BERT or DistilBERT, models.checkpoints) to start the
  # text encoder from, instead of model.kind's; '' = off.
  c.model.init = ""
  # Architecture: for 'bert' a BertConfig, for 'vit' the ViT's fields; MiniLM brings its own.
  c.model.options = ml_collections.ConfigDict()
  if not text:
    c.model.options = ml_collections.ConfigDict(
      {"patch_size": 4, "hidden_size": 64, "depth": 4, "num_heads": 4, "mlp_dim": 128}
    )

  # The adapter modules (models.adapters.AdapterConfig fields but `kind`). Bottleneck 48
  # is AdaMix's BERT-base setting; LoRA on query/value with rank 8.
  c.adapter = ml_collections.ConfigDict()
  c.adapter.bottleneck = 48 if text else 16
  c.adapter.activation = "gelu"
  c.adapter.init_scale = 1e-2
  c.adapter.lora_rank = 8 if text else 4
  c.adapter.lora_alpha = 16.0 if text else 8.0
  c.adapter.lora_targets = ("query", "value")
  c.adapter.lora_dropout = 0.0

  # Fine-tuning: AdamW, linear warm-up then linear decay (AdaMix's schedule).
  c.train = ml_collections.ConfigDict()
  c.train.steps = 150 if text else 400
  c.train.batch_size = 32 if text else 64
  c.train.lr = 1e-3  # adapters and head
  c.train.lr_full = 5e-5 if text else 3e-4  # full fine-tuning
  c.train.warmup_fraction = 0.06
  c.train.weight_decay = 0.01

  # ViT only: pre-training of the whole model on the source domains (stage `pretrain`).
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.domains = ()  # () = all but the default targets and (lodo) the held-out ones
  c.pretrain.steps = 1500
  c.pretrain.batch_size = 64
  c.pretrain.lr = 1e-3

  c.eval_batch_size = 256
  # Evaluation on at most this many test examples per domain (a subset fixed by
  # data.benchmark_seed; 0 = all): mixtures are evaluated many times.
  c.eval = ml_collections.ConfigDict({"max_examples": 0})
  c.checkpoint_every = 100
  c.log_every = 25
  c.num_devices = 0  # 0 = all local devices (data parallel)
  # A directory shared by the runs of a sweep: the finished `pretrain` stage is reused by
  # runs whose config fields for it agree (moe_adapt/train/stage_cache.py). Empty = off.
  c.stage_cache = ""

  if tiny:
    c.model.options = ml_collections.ConfigDict(
      {"patch_size": 4, "hidden_size": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}
    )
    if text:
      c.model.kind = "bert"
      c.model.options = ml_collections.ConfigDict(
        {
          "vocab_size": 30522,  # MiniLM's WordPiece vocabulary: real token ids fit
          "hidden_size": 16,
          "num_hidden_layers": 2,
          "num_attention_heads": 2,
          "intermediate_size": 32,
        }
      )
    c.adapter.bottleneck = 4
    c.adapter.lora_rank = 2
    c.train.steps = 4
    c.train.batch_size = 8
    c.pretrain.steps = 4
    c.pretrain.batch_size = 8
    c.eval_batch_size = 64
    c.checkpoint_every = 2
    c.log_every = 1
  return c
