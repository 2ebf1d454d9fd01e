r"""Co-Tuning (You et al., NeurIPS 2020) with fine-tuning and L2-SP baselines in the same run.

Embedded experiment (Fashion-MNIST; see docs/co_tuning.md for the protocol and why):

  moe-adapt --config=configs/co_tuning.py:fmnist --workdir=runs/co_tuning_fmnist

  source: the 6 classes T-shirt/top, Trouser, Pullover, Sandal, Sneaker, Bag on upright
          images (domain rot0 of `fmnist_rot`), pre-trained inside the run (stage `source`);
  target: the 4 other classes Dress, Coat, Shirt, Ankle boot on images rotated by 45°
          (domain rot45), at most 160 training and 40 validation images per class, of which
          `data.sampling_rate` (15 / 30 / 50 / 100 %) is used.

Runtime, measured on a 2-core machine shared with other jobs (load 5–7): the source stage
3.7 minutes (once; a sweep reuses it through `stage_cache`), then about 3 minutes per run
for the four variants (4 × 1,000 steps); the first run 7 minutes. The table of
docs/co_tuning.md (4 sampling rates × 3 seeds = 12 runs, about 40 minutes there):

  python -m launch.sweep launch --config=configs/co_tuning.py:fmnist \
      --sweep_dir=runs/co_tuning_fmnist --seeds=0,1,2 --workers=1 \
      --set stage_cache=runs/co_tuning_fmnist/_stage_cache
  python -m launch.collect --sweep_dir=runs/co_tuning_fmnist

Every variant is fine-tuned once per candidate of `selection` (learning rates, × λ for
Co-Tuning, × α for L2-SP) and chosen on a validation hold-out fixed per seed
(`data.val_fraction` of the target pool); the timings above predate that grid (14
fine-tunings per fmnist run instead of 4). docs/co_tuning.md has the protocol and tables.

Text preset (20 Newsgroups → BBC News; first `moe-adapt-data fetch NAME` for newsgroups,
bbc_news and minilm):

  moe-adapt --config=configs/co_tuning.py:news --workdir=runs/co_tuning_news_run

  source: MiniLM frozen (mean-pooled embeddings, computed once and cached), an MLP block
          and a 20-way head pre-trained on 20 Newsgroups; target: BBC News' 5 topics.
          About 2–2.5 minutes per run on the loaded 2-core machine (40 fine-tunings of
          300 steps), the sweep of 4 rates × 3 seeds about 30 minutes.

Accelerator preset (the paper's setting; it needs a checkpoint and a prepared dataset):

  moe-adapt --config=configs/co_tuning.py:cub --workdir=runs/co_tuning_cub \
      --config.model.source_checkpoint=/path/to/resnet-50 \
      --config.data.options.data_dir=/path/to/tensorflow_datasets

  source: an ImageNet ResNet-50 checkpoint directory in Hugging Face (`microsoft/resnet-50`)
          or timm (`resnet50`) naming: config.json + model.safetensors, read by
          `moe_adapt.models.checkpoints`; its classification head is the source head and
          its preprocessing (ImageNet mean / std unless preprocessor_config.json says
          otherwise) normalises the images. (A file of
          `moe_adapt.methods.co_tuning.save_source_checkpoint`, .npz or .safetensors,
          still works.) No source data, so the source temperature is the official code's
          constant (T = 1 / 0.8840456604957581, fitted for torchvision's ResNet-50; set
          `calibration.temperature` for another model, or `data.source_domain` to fit T on
          that domain's val split);
  target: a TFDS dataset prepared as array_record (`caltech_birds2011`, which has no
          domain feature: `data.options.domain_key=None`), read through the `tfds`
          benchmark.

  `cub,tiny` (4 steps per stage, 32 px images) runs in CI on a CUB-format mock dataset
  (`moe_adapt.data.tfds_builders.prepare_mock('cub200', ...)`) from the tiny ResNet-50
  fixture checkpoint (tests/methods/test_co_tuning_checkpoint.py).

The argument is `<preset>[,tiny]` (preset: fmnist, news or cub); `tiny` shrinks every stage
to a few steps (for tests and smoke runs). Any field can be overridden, e.g.
`--config.data.sampling_rate=0.15 --config.seed=1
--config.variants="('fine_tune','co_tuning_direct')"`. `get_sweep` declares the sampling
rates.
"""

import ml_collections

from configs import _shared as config_presets

_PRESETS = ("fmnist", "news", "cub")

# Fashion-MNIST class indices (moe_adapt.data.fashion.CLASS_NAMES).
_FMNIST_SOURCE = (0, 1, 2, 5, 7, 8)  # T-shirt/top, Trouser, Pullover, Sandal, Sneaker, Bag
_FMNIST_TARGET = (3, 4, 6, 9)  # Dress, Coat, Shirt, Ankle boot

SAMPLING_RATES = (0.15, 0.3, 0.5, 1.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `<preset>[,tiny]` (preset: fmnist, news or cub)."""
  preset, flags = config_presets.parse_config_arg(arg, presets=_PRESETS)
  tiny = "tiny" in flags
  c = ml_collections.ConfigDict()
  c.method = "co_tuning"
  c.seed = 0  # target subsample, new head initialisation, batch order

  c.data = ml_collections.ConfigDict()
  c.data.benchmark = "fmnist_rot"
  # Options passed to moe_adapt.data.get_benchmark; an empty string means the benchmark's
  # default (data_dir: Debian's Fashion-MNIST folder). 12000 exceeds every rot domain's
  # 11,667 images: all of them are kept.
  c.data.options = ml_collections.ConfigDict(
    {"data_dir": "", "max_per_domain": 12000, "test_fraction": 0.3}
  )
  # The seed the benchmark is built with: fixed, so that every run sees the same images
  # and the source stage is shared by all runs of a sweep.
  c.data.benchmark_seed = 0
  c.data.source_domain = "rot0"  # '' = no source data (the source is model.source_checkpoint)
  c.data.target_domain = "rot45"  # '' = the benchmark's first default target domain
  c.data.source_classes = _FMNIST_SOURCE  # class indices of the benchmark; () = all
  c.data.target_classes = _FMNIST_TARGET  # class indices of the benchmark; () = all
  # Caps on the target domain's train / val splits, per class (0 = no cap), applied before
  # sampling: the target task is small on purpose (fine-tuning must not be at its ceiling).
  c.data.target_train_per_class = 160
  c.data.target_val_per_class = 40
  # The target training pool is the (capped) train and val splits together; val_fraction of
  # each class is held out once per seed as the validation set (the same at every sampling
  # rate, as the paper's fixed 20 %), and sampling_rate of the rest is the training set.
  c.data.val_fraction = 0.2
  c.data.sampling_rate = 1.0

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "convnet"  # see moe_adapt.models.BACKBONES
  c.model.options = ml_collections.ConfigDict({"width": 32, "feature_dim": 128})
  # A pre-trained source model to start from instead of the `source` stage ('' = train it):
  # a Hugging Face / timm ResNet checkpoint directory (its head is the source head; it
  # replaces model.backbone), or an .npz / .safetensors file of save_source_checkpoint.
  c.model.source_checkpoint = ""
  # With a checkpoint and no data.source_domain: the checkpoint's number of source classes
  # (a .npz / .safetensors file needs it; 0 = a directory's head says it).
  c.model.num_source_classes = 0

  # Stage `source`: ERM on the source training split (Adam), shared across runs.
  c.source = ml_collections.ConfigDict()
  c.source.seed = 0  # the pre-trained model is fixed across runs, as the paper's ImageNet model
  c.source.steps = 2000
  c.source.batch_size = 64
  c.source.lr = 1e-3

  # Temperature scaling of the source head: fitted on the source val split, measured
  # (ECE before / after) on the source test split.
  c.calibration = ml_collections.ConfigDict()
  c.calibration.temperature = 0.0  # 0 = fit on held-out source data; > 0 = use this T
  c.calibration.num_bins = 15

  # Which fine-tuning runs to compare; co_tuning_<kind> uses the <kind> relationship.
  c.variants = ("fine_tune", "l2_sp", "co_tuning_direct", "co_tuning_reverse")

  # Fine-tuning, shared by every variant (the official Co-Tuning recipe): SGD with Nesterov
  # momentum, lr for the backbone and the source head, head_lr_mult × lr for the new target
  # head, the learning rate × lr_decay after lr_decay_at × steps.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.steps = 1000
  c.finetune.batch_size = 48
  # Chosen for the fine_tune baseline on the target val split (100 %, seed 0) from
  # {1e-3, 1e-2, 3e-2, 1e-1}; see docs/co_tuning.md. (The official ResNet-50 value is 1e-3.)
  c.finetune.lr = 3e-2
  c.finetune.head_lr_mult = 10.0
  c.finetune.momentum = 0.9
  c.finetune.nesterov = True
  c.finetune.weight_decay = 5e-4  # all variants but l2_sp, whose penalty replaces it
  c.finetune.lr_decay_at = 6000 / 9050  # the official MultiStepLR milestone / total steps
  c.finetune.lr_decay = 0.1
  c.finetune.head_init_std = 0.01  # new target head: N(0, std²) weights, zero bias

  c.co_tuning = ml_collections.ConfigDict()
  c.co_tuning.trade_off = 2.3  # λ of the source-label term
  c.co_tuning.reverse_max_iter = 100  # L-BFGS iterations per L2 strength (reverse approach)

  # L2-SP (Li et al., ICML 2018): α/2·||w − w0||² on the backbone, β/2·||w||² on the new head.
  c.l2_sp = ml_collections.ConfigDict()
  c.l2_sp.alpha = 0.01
  c.l2_sp.beta = 0.01

  # Model selection on the target validation split: every variant is fine-tuned with each
  # learning rate of lr_grid (λ of trade_off_grid crossed in for Co-Tuning, α of alpha_grid
  # for L2-SP) and the candidate with the best validation accuracy is reported; the choices
  # are in results.json under `selection`. An empty grid = the configured value alone.
  c.selection = ml_collections.ConfigDict()
  c.selection.lr_grid = (1e-2, 3e-2)
  c.selection.trade_off_grid = (1.0, 2.3)
  c.selection.alpha_grid = (0.01, 0.1)

  c.eval_batch_size = 500
  c.checkpoint_every = 500
  c.log_every = 50
  c.num_devices = 0  # 0 = all local devices (data parallel)
  # A directory shared by the runs of a sweep: a finished `source` stage is reused by runs
  # whose config fields for it agree (moe_adapt/train/stage_cache.py). Empty = off.
  c.stage_cache = ""

  if preset == "news":
    # MiniLM frozen (its mean-pooled sentence embeddings computed once and cached), an MLP
    # block + the 20-way source head pre-trained on 20 Newsgroups, transferred to BBC News.
    c.data.benchmark = "embedded"
    c.data.options = ml_collections.ConfigDict(
      {
        "base": "news_transfer",
        "base_options": {"max_len": 128},
        "encoder": "minilm",
        # Per class and split, in every domain: 20 Newsgroups 4,000 / 1,000 / 1,800
        # documents, BBC News 1,000 / 212 / 426 (all of its val and test).
        "train_per_class": 200,
        "val_per_class": 50,
        "test_per_class": 90,
      }
    )
    c.data.source_domain = "newsgroups"
    c.data.target_domain = "bbc"
    c.data.source_classes = tuple(range(20))
    c.data.target_classes = tuple(range(20, 25))
    c.data.target_train_per_class = 0
    c.data.target_val_per_class = 0
    c.model.backbone = "mlp"
    c.model.options = ml_collections.ConfigDict({"hidden_dim": 256, "num_layers": 1})
    c.source.steps = 3000
    c.finetune.steps = 300
    c.selection.lr_grid = (1e-2, 3e-2, 1e-1, 3e-1)
    c.selection.trade_off_grid = (0.5, 1.0, 2.3)
    c.selection.alpha_grid = (0.001, 0.01, 0.1)
    c.checkpoint_every = 300
    c.log_every = 100

  if preset == "cub":
    c.data.benchmark = "tfds"
    # A TFDS dataset prepared as array_record under data_dir ('' = TFDS's default folder).
    # caltech_birds2011 has no domain feature: the whole dataset is one domain.
    c.data.options = ml_collections.ConfigDict(
      {"tfds_name": "caltech_birds2011", "data_dir": "", "image_size": 224, "domain_key": None}
    )
    c.data.source_domain = ""
    c.data.target_domain = ""
    c.data.source_classes = ()
    c.data.target_classes = ()
    c.data.target_train_per_class = 0
    c.data.target_val_per_class = 0
    c.model.backbone = "resnet50"
    c.model.options = ml_collections.ConfigDict()
    c.model.num_source_classes = 0  # the checkpoint's head (1000 for ImageNet)
    c.calibration.temperature = 1.0 / 0.8840456604957581  # the official code's ImageNet constant
    c.finetune.steps = 9050
    c.finetune.batch_size = 48
    c.finetune.lr = 1e-3
    c.selection.lr_grid = (1e-3,)
    c.selection.trade_off_grid = (2.3,)
    c.selection.alpha_grid = ()
    c.checkpoint_every = 1000
    c.eval_batch_size = 100

  if tiny:
    if preset == "cub":
      # Compilation of the 50-layer network dominates; small images keep the steps cheap.
      c.data.options.image_size = 32
    if preset == "fmnist":
      c.data.options.max_per_domain = 300
      c.data.target_train_per_class = 10
      c.data.target_val_per_class = 4
      c.model.options = ml_collections.ConfigDict({"width": 8, "feature_dim": 16})
    if preset == "news":
      c.data.options.encoder = "tiny_random"
      c.data.options.base_options = {"max_len": 16}
      c.data.options.train_per_class = 6
      c.data.options.val_per_class = 2
      c.data.options.test_per_class = 2
      c.model.options = ml_collections.ConfigDict({"hidden_dim": 8, "num_layers": 1})
    c.selection.lr_grid = (1e-2, 3e-2)
    c.selection.trade_off_grid = (2.3,)
    c.selection.alpha_grid = (0.01,)
    c.source.steps = 4
    c.source.batch_size = 16
    c.finetune.steps = 4
    c.finetune.batch_size = 8
    c.co_tuning.reverse_max_iter = 5
    c.checkpoint_every = 2
    c.log_every = 1
    c.eval_batch_size = 64
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """The sampling rates of the paper's protocol (seeds come from the sweep runner)."""
  del arg
  return [{"data.sampling_rate": rate} for rate in SAMPLING_RATES]
