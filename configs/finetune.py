r"""Fine-tuning with adapters: full vs head vs Houlsby vs Pfeiffer vs LoRA on one run.

Leave-one-domain-out on VADER with MiniLM (fetch the data and weights first):

  moe-adapt-data fetch vader_sentiment && moe-adapt-data fetch minilm
  moe-adapt --config=configs/finetune.py:vader --workdir=runs/finetune/vader

  trains on three VADER domains and tests on the held-out one (`data.target_domains`,
  default amazon); five variants of 150 steps of batch 32. Runtime: 18 minutes on a 2-core
  CPU shared with other jobs (measured). Every target and three seeds:

  python -m launch.sweep launch --config=configs/finetune.py:vader \
      --sweep_dir=runs/finetune/vader --seeds=0,1,2 --workers=1
  python -m launch.collect --sweep_dir=runs/finetune/vader

Image presets (`digits`, `fmnist`) pre-train a small ViT on the source domains in the
pipeline (stage `pretrain`, shared through `stage_cache`) and fine-tune it on the targets.
The argument is `<preset>[,tiny]`, preset in vader, tweets, digits, fmnist; `tiny` shrinks
everything for tests (a random 2-layer BERT for text presets).
"""

import ml_collections

from configs import _shared as config_presets

VARIANTS = ("full", "head", "houlsby", "pfeiffer", "lora")
LODO_TARGETS = {
  "vader": ("tweets", "movies", "amazon", "nyt"),
  "tweets": ("driverless", "airline", "coachella", "deflategate", "apple", "claritin"),
  "digits": ("rot0", "rot75"),
  "fmnist": ("rot0", "rot75"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `<preset>[,tiny]`."""
  preset, flags = config_presets.parse_config_arg(arg, presets=tuple(LODO_TARGETS))
  c = config_presets.adapter_harness(preset, tiny="tiny" in flags)
  c.method = "finetune"
  # 'lodo': train on every domain but the targets, test on the targets; 'pooled': train on
  # `data.domains` (() = all) and test on each of them.
  c.data.protocol = "lodo"
  c.data.target_domains = (LODO_TARGETS[preset][2 if preset == "vader" else -1],)
  c.data.domains = ()
  c.variants = VARIANTS
  # Epoch training with best-epoch selection on the training domains' validation splits
  # (docs/finetune.md); 0 = `train.steps` steps and the last step, every example.
  c.train.epochs = 0
  c.train.subsample = 0  # training examples per domain (0 = all)
  c.train.dev_examples = 0  # validation examples per domain for the selection (0 = all)
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """Leave each domain out in turn (seeds come from the sweep runner)."""
  preset, _ = config_presets.parse_config_arg(arg, presets=tuple(LODO_TARGETS))
  return [{"data.target_domains": (d,)} for d in LODO_TARGETS[preset]]
