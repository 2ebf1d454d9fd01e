r"""Meta-DMoE (Zhong et al., NeurIPS 2022) on the embedded domain-shift benchmarks.

Run (the embedded default, about 2 minutes on 2 CPU cores):

  moe-adapt --config=configs/meta_dmoe.py:digits_rot --workdir=runs/meta_dmoe_digits

Other presets (each a few minutes on 2 CPU cores; Fashion-MNIST needs
`apt-get install dataset-fashion-mnist`):

  moe-adapt --config=configs/meta_dmoe.py:fmnist_rot   --workdir=runs/mdmoe_fmnist_rot
  moe-adapt --config=configs/meta_dmoe.py:fmnist_shift --workdir=runs/mdmoe_fmnist_shift

Accelerator preset (ResNet-50 experts and student, 224 px; a TFDS dataset with a
domain feature that the user prepared, e.g. DomainNet or PACS as array_record):

  moe-adapt --config=configs/meta_dmoe.py:tfds --workdir=runs/mdmoe_pacs \
    --config.data.options.tfds_name=pacs --config.data.options.data_dir=/data/tfds \
    --config.data.target_domains="('sketch',)"

The argument is `<benchmark>[,tiny]`; `tiny` shrinks every stage to a few steps
(for tests and smoke runs). Any field can be overridden on the command line, e.g.
`--config.seed=1 --config.data.target_domains="('rot0',)" --config.aggregator.kind=mean`.
The ablations of the paper are declared in `get_sweep`.
"""

import ml_collections

from moe_adapt import config_presets

_BENCHMARKS = ("digits_rot", "fmnist_rot", "fmnist_shift", "tfds")


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
  elif benchmark == "tfds":
    c.data.options.tfds_name = ""
    c.data.options.data_dir = ""
    c.data.options.domain_key = "domain"
    c.data.options.image_key = "image"
    c.data.options.label_key = "label"
    c.data.options.image_size = 224
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

  c.experts = ml_collections.ConfigDict()
  c.experts.num_experts = 5
  c.experts.steps = 1500
  c.experts.batch_size = 64
  c.experts.lr = 1e-3
  # How stacked experts are run: 'unrolled' (an unrolled lax.scan: fastest on
  # CPU, also for gradients), 'map' (rolled lax.map), 'vmap' (grouped
  # convolutions, for GPU/TPU) or 'auto' (unrolled on CPU, vmap elsewhere).
  c.experts.stack_map = "auto"

  c.aggregator = ml_collections.ConfigDict()
  c.aggregator.kind = "transformer"  # 'transformer' | 'mean' | 'max'
  c.aggregator.depth = 1
  c.aggregator.num_heads = 4
  c.aggregator.mlp_ratio = 2.0
  c.aggregator.dropout = 0.1
  c.aggregator.pretrain_steps = 1000
  c.aggregator.batch_size = 64
  c.aggregator.lr = 1e-3

  c.student = ml_collections.ConfigDict()
  c.student.steps = 2000
  c.student.batch_size = 64
  c.student.lr = 1e-3

  c.meta = ml_collections.ConfigDict()
  c.meta.steps = 2000
  c.meta.support_size = 32
  c.meta.query_size = 32
  c.meta.inner_lr = 3e-3
  c.meta.inner_steps = 1
  c.meta.student_lr = 1e-4
  c.meta.aggregator_lr = 1e-5
  c.meta.distill = "features"  # 'features' | 'logits' | 'both'
  c.meta.mask_in_domain_expert = True
  c.meta.first_order = False
  c.meta.remat = False

  # Test-time adaptation; inner_lr and inner_steps are the meta-training ones.
  c.adapt = ml_collections.ConfigDict()
  c.adapt.support_size = 32
  c.adapt.repeats = 3  # independent unlabeled support draws per target domain

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
    c.experts.steps = 600
    c.aggregator.pretrain_steps = 400
    c.student.steps = 800
    c.meta.steps = 800
  elif benchmark == "tfds":
    c.model.backbone = "resnet50"
    c.model.options = ml_collections.ConfigDict({"num_filters": 64, "small_input": False})
    c.model.dtype = "bfloat16"  # an accelerator preset: bf16 compute, float32 parameters
    c.experts.steps = c.student.steps = 20000
    c.aggregator.pretrain_steps = 5000
    c.meta.steps = 20000
    c.meta.inner_lr = 3e-4  # the official iWildCam value
    c.meta.student_lr, c.meta.aggregator_lr = 3e-5, 1e-6
    c.meta.support_size = c.adapt.support_size = 24
    c.meta.query_size = 16
    c.aggregator.num_heads = 16
    c.eval_batch_size = 128
    c.checkpoint_every = 1000
  else:
    # Sized so that a run takes ~5 minutes on 2 CPU cores.
    c.experts.steps = 1000
    c.student.steps = 1500
    c.meta.steps = 1500
    if benchmark == "fmnist_rot":
      c.data.target_domains = ("rot75",)

  if tiny:
    c.experts.num_experts = 2
    c.experts.steps = c.aggregator.pretrain_steps = c.student.steps = c.meta.steps = 4
    c.experts.batch_size = c.aggregator.batch_size = c.student.batch_size = 16
    c.meta.support_size = c.meta.query_size = c.adapt.support_size = 8
    c.adapt.repeats = 1
    if c.model.backbone == "convnet":
      c.model.options.width = 8
      c.model.options.feature_dim = 16
    else:
      c.model.options.num_filters = 8
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
  sweep += [{"meta.inner_steps": 3}]
  sweep += [{"adapt.support_size": k, "meta.support_size": k} for k in (16, 64)]
  sweep += [{"experts.num_experts": k} for k in (2, 3)]
  return sweep
