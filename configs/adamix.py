r"""AdaMix (Wang et al., EMNLP 2022) against a single adapter, LoRA and full fine-tuning.

In-domain on VADER with MiniLM (fetch the data and weights first):

  moe-adapt-data fetch vader_sentiment && moe-adapt-data fetch minilm
  moe-adapt --config=configs/adamix.py:vader --workdir=runs/adamix/vader

  trains on the training splits of the four VADER domains pooled and tests on each
  domain's test split (the same 300 examples each for every seed); seven variants of 150
  steps of batch 32 (adapter, adamix, adamix_no_consistency, adamix_no_sharing, lora,
  adamix_lora, full).
  Runtime: 20–23 minutes per seed on a 2-core CPU (measured, shared machine). Three seeds:

  python -m launch.sweep launch --config=configs/adamix.py:vader --no_sweep \
      --sweep_dir=runs/adamix/vader --seeds=0,1,2 --workers=1
  python -m launch.collect --sweep_dir=runs/adamix/vader

`tweets` is the same on tweets_topics; `digits` / `fmnist` pre-train a small ViT on the
source domains in the pipeline and adapt it to the target domains. The argument is
`<preset>[,tiny]`; `tiny` shrinks everything for tests.
"""

import ml_collections

from moe_adapt import config_presets

_PRESETS = ("vader", "tweets", "digits", "fmnist")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `<preset>[,tiny]`."""
  preset, flags = config_presets.parse_config_arg(arg, presets=_PRESETS)
  tiny = "tiny" in flags
  c = config_presets.adapter_harness(preset, tiny=tiny)
  c.method = "adamix"
  # In-domain: train on the pooled training splits of `data.domains` (() = all), test on
  # each of their test splits. Image presets adapt the ViT pre-trained on the sources to
  # the held-out domain.
  c.data.protocol = "pooled"
  c.data.target_domains = ()
  c.data.domains = ("rot75",) if preset in ("digits", "fmnist") else ()
  # MiniLM evaluates ~50 examples/s on 2 cores: 300 per domain keeps the 7 + 2·5 evaluations
  # of a run to ~6 minutes.
  c.eval.max_examples = 0 if tiny else 300

  # AdaMix (official NLU settings): 4 experts, up-projection shared, consistency weight 1.
  c.adamix = ml_collections.ConfigDict()
  c.adamix.num_experts = 2 if tiny else 4
  c.adamix.share = "up"  # 'up', 'down' or 'none' (the `adamix_no_sharing` variant: none)
  c.adamix.consistency_weight = 1.0
  # Mixture variants also evaluated with random routing (`<variant>_random`: the mean of
  # `routing_samples` single random routing choices, and their spread) and fixed expert 0.
  c.eval.routing_variants = ("adamix",)
  c.eval.routing_samples = 2 if tiny else 5
  c.variants = (
    "adapter",
    "adamix",
    "adamix_no_consistency",
    "adamix_no_sharing",
    "lora",
    "adamix_lora",
    "full",
  )
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """The base run, and the paper's ablation of the number of modules (M = 2, 8; AdaMix only).

  Seeds come from the sweep runner; the other ablations (consistency, sharing, routing at
  inference) are variants of every run.
  """
  config_presets.parse_config_arg(arg, presets=_PRESETS)
  return [{}] + [{"adamix.num_experts": m, "variants": ("adamix",)} for m in (2, 8)]
