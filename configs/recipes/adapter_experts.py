r"""Issue #11 recipes 1 and 2: adapter experts for Meta-DMoE; weight space vs output space.

N per-super-domain experts as adapter sets (+ heads) on one ViT pre-trained on the pooled
source domains, feeding Meta-DMoE's aggregator / student / meta-training unchanged; the same
experts combined in weight space (uniform soup, TIES, label-free FSD-greedy soups). See
`moe_adapt/recipes/adapter_experts.py`. Same data, source/target domains, super-domain
partition, student and Meta-DMoE stages as `configs/meta_dmoe.py`, so the numbers compare
with the full-network experts there.

  export JAX_COMPILATION_CACHE_DIR=runs/jax_cache
  # Optional: a stage cache holding the full-network run's ERM student (the `student`
  # stage keeps meta_dmoe's stage key), e.g. a copy of its entry from
  # runs/meta_dmoe/stage_cache; otherwise the student is trained again.
  mkdir -p runs/recipes/stage_cache
  for b in digits_rot fmnist_shift; do
    moe-adapt --config=configs/recipes/adapter_experts.py:$b \
        --workdir=runs/recipes/adapter_experts/${b}_s0 --config.stage_cache=runs/recipes/stage_cache
  done

Runtime measured on the 2-core CPU shared with ~10 other jobs (load average 15-25), both
runs at once: digits_rot 1,472 s wall (127 s of CPU time), fmnist_shift 2,035 s wall
(262 s of CPU time; its ERM student stage reused from the full-network run's stage cache
with --config.stage_cache). The CPU times suggest a few minutes each on a quiet machine
(not measured).

The argument is `<benchmark>[,tiny]`, benchmark in digits_rot, fmnist_rot, fmnist_shift;
`tiny` shrinks every stage to a few steps (tests, smoke runs).
"""

import ml_collections

from configs import _shared as config_presets
from configs import meta_dmoe as meta_dmoe_config

_BENCHMARKS = ("digits_rot", "fmnist_rot", "fmnist_shift")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `<benchmark>[,tiny]`."""
  benchmark, flags = config_presets.parse_config_arg(arg, presets=_BENCHMARKS, what="benchmark")
  tiny = "tiny" in flags
  # Every Meta-DMoE field (data, student `model`, aggregator, student, meta, adapt) as in
  # the full-network preset; `experts` now describes the adapter experts' training.
  c = meta_dmoe_config.get_config(benchmark + (",tiny" if tiny else ""))
  c.method = "adapter_experts"
  feature_dim = c.model.options.feature_dim

  # The shared backbone: a ViT whose width is the student's feature size (the student
  # distils the aggregated expert feature). 28x28 Fashion-MNIST: 7x7 patches (16 tokens +
  # CLS, ~3x cheaper than 4x4 patches); 16x16 digits: 4x4 patches. Depth 2 and the short
  # stages below keep a run within ~1 h on the shared, heavily loaded 2-core CPU.
  c.vit = ml_collections.ConfigDict()
  c.vit.options = ml_collections.ConfigDict(
    {
      "patch_size": 4 if benchmark == "digits_rot" else 7,
      "hidden_size": feature_dim,
      "depth": 2,
      "num_heads": 4,
      "mlp_dim": 2 * feature_dim,
    }
  )
  c.vit.dropout = 0.1

  # Stage `backbone`: the whole ViT classifier on the pooled source training images.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.steps = 400
  c.pretrain.batch_size = 64
  c.pretrain.lr = 1e-3

  # The adapter of each expert (models.adapters.AdapterConfig fields); Pfeiffer as in the
  # adapter_soup presets.
  c.adapter = ml_collections.ConfigDict()
  c.adapter.kind = "pfeiffer"  # pfeiffer | houlsby | lora
  c.adapter.bottleneck = 16
  c.adapter.activation = "gelu"
  c.adapter.init_scale = 1e-2
  c.adapter.lora_rank = 4
  c.adapter.lora_alpha = 8.0
  c.adapter.lora_targets = ("query", "value")
  c.adapter.lora_dropout = 0.0

  # Stages `adapter_<k>`: experts.steps / batch_size / lr with the harness's AdamW schedule.
  c.experts.steps = 150
  c.experts.lr = 1e-3
  c.train = ml_collections.ConfigDict()
  c.train.warmup_fraction = 0.06
  c.train.weight_decay = 0.01

  # Weight space. TIES densities: 1 - adapter_soup's pruning sparsities (0.5, 0.8, 0.9).
  c.soup = ml_collections.ConfigDict()
  c.soup.num_samples = 100  # source images per expert embedded for the similarity start
  c.soup.ties_densities = (0.5, 0.2, 0.1)
  c.soup.ties_scale = 1.0
  c.soup.greedy_sizes = (1, 2, 3)  # fixed, label-free stopping rule: each size reported
  # Pooled source validation images where the merge family's λ / density are chosen.
  c.soup.max_val_examples = 1000

  # The merge family (variants soup_<method>), as in adapter_soup: each setting scored on
  # the source validation images, the best one evaluated on the held-out domains.
  c.merge = ml_collections.ConfigDict()
  c.merge.methods = ("task_arithmetic", "ties", "ties_member", "dare", "dare_ties", "breadcrumbs")
  c.merge.sum_lambdas = (0.25, 0.5, 1.0)  # summing merges; 1/N = the uniform average
  c.merge.ties_lambdas = (0.5, 1.0, 1.5)  # disjoint-mean merges
  c.merge.densities = (0.2, 0.5)

  c.timing_steps = 20  # timed meta-steps for `meta_step_ms`

  if tiny:
    c.vit.options.depth = 1
    c.vit.options.num_heads = 2
    c.adapter.bottleneck = 4
    c.pretrain.steps = c.experts.steps = 4
    c.pretrain.batch_size = 16
    c.soup.num_samples = 8
    c.soup.greedy_sizes = (1, 2)
    c.soup.ties_densities = (0.5,)
    c.soup.max_val_examples = 64
    c.merge.sum_lambdas = (0.5, 1.0)
    c.merge.ties_lambdas = (1.0,)
    c.merge.densities = (0.5,)
    c.timing_steps = 2
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """One run per seed (the sweep runner adds seeds)."""
  config_presets.parse_config_arg(arg, presets=_BENCHMARKS, flags=("tiny",))
  return [{}]
