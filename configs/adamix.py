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
`<preset>[,converged][,tiny]`; `tiny` shrinks everything for tests.

`converged` is the regime where training converges on 2 CPU cores, as the paper trains
(20+ epochs, the best epoch on a dev set): a fixed subsample of each domain's training
split (`train.subsample` per domain), `train.epochs` passes over it, and after every epoch
the merged model's accuracy on `train.dev_examples` validation examples per domain (never
test) picks the epoch reported (results.json `selection`). Bottleneck 16 (on MiniLM's 384,
near the paper's 48 on BERT-base's 768). Its sweep is the paired ablation table (3 seeds
share the subsample, so seeds pair up too):

  python -m launch.sweep launch --config=configs/adamix.py:vader,converged \
      --sweep_dir=runs/adamix/vader_converged --seeds=0,1,2 --workers=1
"""

import ml_collections

from configs import _shared as config_presets

# The converged regime, sized so that its sweep (3 seeds) runs in about an hour on a
# shared 2-core CPU (docs/adamix.md): per domain 32 training, 25 dev and 150 test
# examples of 32 tokens, batch 16, 20 epochs (160 steps).
CONVERGED_SUBSAMPLE = 32
CONVERGED_DEV = 25
CONVERGED_TEST = 150
CONVERGED_EPOCHS = 20

_PRESETS = ("vader", "tweets", "digits", "fmnist")
_FLAGS = ("tiny", "converged")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `<preset>[,converged][,tiny]`."""
  preset, flags = config_presets.parse_config_arg(arg, presets=_PRESETS, flags=_FLAGS)
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
  # The official AdaMix code adapts before the sublayer's dropout (every variant here, so
  # that the single adapter sits at the same place); 'after_dropout' is Houlsby's order.
  c.adapter.position = "before_dropout"
  # AdaMix-LoRA with share='none': 'independent' (official) or 'paired' routing of A and B.
  c.adapter.lora_pairing = "independent"
  # Epoch training with best-epoch selection on dev (0 = `train.steps` steps, last step).
  c.train.epochs = 0
  c.train.subsample = 0  # training examples per domain (0 = all)
  c.train.dev_examples = 0  # validation examples per domain for the selection (0 = all)
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
  if "converged" in flags:
    c.train.epochs = 2 if tiny else CONVERGED_EPOCHS
    c.train.subsample = 16 if tiny else CONVERGED_SUBSAMPLE
    c.train.dev_examples = 16 if tiny else CONVERGED_DEV
    c.eval.routing_samples = 2
    if not tiny:
      c.adapter.bottleneck = 16
      c.train.batch_size = 16
      c.data.options.max_len = 32
      c.eval.max_examples = CONVERGED_TEST
      c.eval_batch_size = 25  # divides the dev and test sets: no padded forwards
      c.log_every = 4  # the consistency KL twice per epoch
    c.variants = ("adapter", "adamix", "adamix_no_consistency")
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """The base run, and the paper's ablation of the number of modules (M = 2, 8; AdaMix only).

  Seeds come from the sweep runner; the other ablations (consistency, sharing, routing at
  inference) are variants of every run. With `converged`: one factor at a time around the
  base run (bottleneck 16, weight 1, whose variants give weight 0): consistency weight 10
  and 100 (AdaMix), bottleneck 8 and 48 (the single adapter and AdaMix).
  """
  _, flags = config_presets.parse_config_arg(arg, presets=_PRESETS, flags=_FLAGS)
  if "converged" in flags:
    no_routing = {"eval.routing_variants": ()}
    weights = [
      {"adamix.consistency_weight": w, "variants": ("adamix",), **no_routing} for w in (10.0, 100.0)
    ]
    widths = [
      {"adapter.bottleneck": r, "variants": ("adapter", "adamix"), **no_routing} for r in (8, 48)
    ]
    return [{}, *weights, *widths]
  return [{}] + [{"adamix.num_experts": m, "variants": ("adamix",)} for m in (2, 8)]
