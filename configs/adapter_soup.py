r"""AdapterSoup and the signed-weight-direction study: one adapter per domain, mixed by averaging.

One Pfeiffer adapter (+ head) per domain, all from the same initialisation (stages
`adapter_<domain>`), then in the same run: novel-domain soups (similarity, clustering,
all, the oracle best single adapter, the zero-shot backbone head), the in-domain study of
every mixture holding the own adapter (accuracy vs fraction of sign difference), greedy
mixing, and pruning / TIES before averaging. See `moe_adapt/methods/adapter_soup.py`.

Text presets fine-tune MiniLM (fetch the corpus and the weights first):

  moe-adapt-data fetch vader_sentiment && moe-adapt-data fetch minilm
  moe-adapt --config=configs/adapter_soup.py:vader --workdir=runs/adapter_soup/vader/s0

  Three seeds, then the tables:

  python -m launch.sweep launch --config=configs/adapter_soup.py:vader --no_sweep \
      --sweep_dir=runs/adapter_soup/vader --seeds=0,1,2 --workers=1
  python -m launch.collect --sweep_dir=runs/adapter_soup/vader

  (`tweets` likewise with `moe-adapt-data fetch tweets_topics`.) Every domain is a novel
  target in turn (MiniLM saw none of them) and a study domain.

Image presets (`digits`, `fmnist`) pre-train a small ViT on every domain but rot75 (stage
`pretrain`, shared through `stage_cache`), so rot75 is the novel target:

  moe-adapt --config=configs/adapter_soup.py:digits --workdir=runs/adapter_soup/digits/s0

Runtime on a 2-core CPU shared with other jobs. digits: measured 6 minutes (pre-training
1,500 steps ≈ 2.5 min; six adapter stages of 400 steps ≈ 30 s each, half of it compiling
the step; the zero-shot head and 279 cached evaluations ≈ 35 s). Text presets, ESTIMATED
from the `finetune` runs (≈ 2 min per 200-step MiniLM stage, compilation included) and
the cheap 500-example evaluations: vader ≈ 20 minutes (4 adapter + 4 zero-shot-head
stages, ~110 evaluations), tweets ≈ 30 minutes (6 + 6 stages, ~330 evaluations); those
estimates predate the merge family, whose validation grid adds ~130 small evaluations
(measured: the sized VADER study of docs/adapter_soup.md, adapters from the stage cache,
~250 evaluations, took 78 min at load average ~20 on the shared 2-core CPU). The study is
exhaustive up to K = 7 domains (`study.max_mixtures` = 64), sampled beyond.

The argument is `<preset>[,tiny]`, preset in vader, tweets, digits, fmnist; `tiny`
shrinks everything for tests (a random 2-layer BERT for text presets).
"""

import ml_collections

from configs import _shared as config_presets

PRESETS = ("vader", "tweets", "digits", "fmnist")
# Novel targets: every domain for the text presets (the pretrained encoder saw none of
# them); () = the benchmark's default (rot75, held out of the ViT's pre-training).
TARGETS = {
  "vader": ("tweets", "movies", "amazon", "nyt"),
  "tweets": ("driverless", "airline", "coachella", "deflategate", "apple", "claritin"),
  "digits": (),
  "fmnist": (),
}
# AdapterSoup keeps up to 5 of 21 adapters; with 3-5 candidates here, about half.
TOP_K = {"vader": 2, "tweets": 3, "digits": 3, "fmnist": 3}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `<preset>[,tiny]`."""
  preset, flags = config_presets.parse_config_arg(arg, presets=PRESETS)
  tiny = "tiny" in flags
  c = config_presets.adapter_harness(preset, tiny=tiny)
  c.method = "adapter_soup"
  # Adapter kind of every domain adapter: pfeiffer, houlsby or lora (the sign paper's
  # main analyses use Pfeiffer).
  c.adapter.kind = "pfeiffer"

  # How soups of LoRA adapters mix (other kinds average their weights): 'product' averages
  # the updates ΔW = B·A (evaluated as one LoRA of rank K·r), 'factors' averages A and B
  # separately (mean(B)·mean(A): cross terms of different adapters). Merges (TIES, task
  # arithmetic, ...) and pruning act on the factors in both cases.
  c.mixing = ml_collections.ConfigDict()
  c.mixing.lora = "product"

  c.data.domains = ()  # domains with an adapter; () = all
  c.data.target_domains = TARGETS[preset]  # novel targets; () = the benchmark's default

  # Novel-domain selection (AdapterSoup: 100 samples, up to 5 adapters, cosine > 0.15,
  # clusters holding >= 10% of the novel domain's samples).
  c.selection = ml_collections.ConfigDict()
  c.selection.num_samples = 100  # training examples per domain, embedded without adapters
  c.selection.top_k = TOP_K[preset]
  # Minimum mean cosine similarity: AdapterSoup's 0.15 for sentence embeddings; the ViT's
  # layer-normed CLS features are centred (cosines of domains ≈ ±0.03), so 0 there.
  c.selection.threshold = 0.15 if preset in ("vader", "tweets") else 0.0
  # The threshold's sensitivity, in evaluation only (variants similarity_t<threshold>; the
  # same embeddings and scores, only the cut differs). MiniLM's domain cosines on VADER are
  # 0.03-0.08, below 0.15.
  c.selection.threshold_sweep = (0.0, 0.05, 0.1, 0.15) if preset in ("vader", "tweets") else ()
  c.selection.cluster_min_share = 0.1
  c.selection.covariance = "diag"  # GaussianMixture covariance_type
  c.selection.pca_dim = 16  # PCA of the embeddings before the mixture; 0 = none
  # The zero-shot baseline: a head on the frozen backbone per target (one training stage
  # each); False leaves the `zero_shot` row out.
  c.selection.zero_shot_head = True

  # In-domain study (Nguyen & Le, ACL 2024).
  c.study = ml_collections.ConfigDict()
  c.study.domains = ()  # () = every adapter domain
  c.study.max_mixtures = 64  # per domain; exhaustive when 2^(K-1) fits, else sampled
  c.study.sizes = ()  # mixture sizes studied (own adapter counted); () = 2..K
  c.study.fsd_include_head = False  # FSD on adapter weights only
  # Mixtures average adapters only and each domain keeps its own head (Nguyen & Le); True
  # averages the heads too (an ablation: the head average is then part of the "mixing").
  c.study.average_heads = False
  c.study.greedy_rank = "row_mean"  # Alg. 1's row-mean FSD; 'target': FSD to the own adapter
  # Bootstrap resamples of the FSD-accuracy correlations' 95 % intervals (0 = no intervals).
  c.study.bootstrap_samples = 2000

  # Pruning before averaging (adapter weights; heads stay dense).
  c.pruning = ml_collections.ConfigDict()
  c.pruning.sparsities = (0.5, 0.8, 0.9)
  c.pruning.fsd_layer_fraction = 0.5  # share of layers (highest FSD) pruned by prune_fsd
  c.pruning.ties_scale = 1.0  # TIES λ of the ties_<s> rows (the paper's fixed densities)

  # The merge family on all K adapters (merge_<method> rows), each setting scored on the
  # study domains' validation splits and the best (mean validation accuracy) tested.
  c.merge = ml_collections.ConfigDict()
  c.merge.methods = ("task_arithmetic", "ties", "ties_member", "dare", "dare_ties", "breadcrumbs")
  c.merge.sum_lambdas = (0.25, 0.5, 1.0)  # λ of summing merges; λ = 1/K: the uniform average
  c.merge.ties_lambdas = (0.5, 1.0, 1.5)  # λ of disjoint-mean merges (the TIES code: ~1)
  c.merge.densities = (0.2, 0.5)  # kept fraction of sparsifying merges
  # Merges that use data (rows merge_<method>): Fisher merging (diagonal Fisher of each
  # adapter on its own domain's training examples, labels sampled from the model; ε relative
  # to the mean Fisher entry, chosen on validation), RegMean (input Gram matrices of the
  # adapters' linear layers on each domain's training examples; α chosen on validation) and
  # AdaMerging (layer-wise coefficients learned by entropy minimisation on each target
  # domain's UNLABELLED test inputs: a test-time method). The paper's AdaMerging runs 500
  # Adam steps at lr 1e-3; here 40 steps at lr 1e-2 (the CPU budget), init 0.3 as the paper.
  c.merge.learned = ("fisher", "regmean", "adamerging")
  c.merge.fisher_examples = 256
  c.merge.fisher_epsilons = (1e-3, 1e-1, 10.0)
  c.merge.regmean_examples = 256
  c.merge.regmean_alphas = (0.1, 0.5, 0.9)  # the paper tunes α; 0.9 its usual choice
  c.merge.adamerging_granularity = "layer"  # 'task': one coefficient per adapter
  c.merge.adamerging_init = 0.3
  c.merge.adamerging_steps = 40
  c.merge.adamerging_lr = 1e-2
  c.merge.adamerging_batch_size = 16

  c.eval = ml_collections.ConfigDict()
  # Test examples per domain (a subset fixed by data.benchmark_seed); 0 = all. MiniLM
  # evaluates ~50 examples/s on 2 cores and a text run evaluates ~110 mixtures.
  c.eval.max_examples = 300 if preset in ("vader", "tweets") else 500
  # Validation examples per study domain where merge hyper-parameters are chosen; 0 = all.
  c.eval.max_val_examples = 100

  if tiny:
    c.selection.num_samples = 16
    c.selection.pca_dim = 4
    c.study.max_mixtures = 8
    # The tests check the intervals' presence, not their precision: 2000 resamples of 12
    # correlations were a quarter of this config's CPU time.
    c.study.bootstrap_samples = 200
    c.eval.max_examples = 64
    c.eval.max_val_examples = 32
    c.merge.sum_lambdas = (0.5, 1.0)
    c.merge.ties_lambdas = (1.0,)
    c.merge.densities = (0.5,)
    # One batch of FISHER_BATCH_SIZE = 16: one compiled per-example gradient (24 made two).
    c.merge.fisher_examples = 16
    c.merge.fisher_epsilons = (1e-3, 1.0)
    c.merge.regmean_examples = 24
    c.merge.regmean_alphas = (0.5, 0.9)
    c.merge.adamerging_steps = 3
    c.merge.adamerging_batch_size = 8
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """The base run and the soup size: `selection.top_k` in {1, 2, 3} (seeds from the runner).

  The other studies (selection methods, FSD, greedy mixing, pruning, TIES) run inside
  every run.
  """
  preset, _ = config_presets.parse_config_arg(arg, presets=PRESETS)
  return [{}] + [{"selection.top_k": k} for k in (1, 2, 3) if k != TOP_K[preset]]
