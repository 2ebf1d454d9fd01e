r"""MUKA / MUKI (Li et al.): a student over the union of teachers' label sets, no labels.

Embedded experiment (Fashion-MNIST; see docs/muka.md for the protocol and the numbers):

  moe-adapt --config=configs/muka.py:fmnist --workdir=runs/muka_fmnist

  data: the upright images (domain rot0 of `fmnist_rot`), at most 600 training images per
        class (the transfer set, 6,000 images) and the whole test split (~3,500 images);
  teachers: K = 2 (teachers.num_teachers; 4 also works) CNNs, teacher k trained on the
        training images of the k-th contiguous chunk of the 10 classes (stage
        `teacher_<k>`, shared by the runs of a sweep through `stage_cache`);
  students: the variants muki, hard, no_margin, single_pass, vanilla_kd, uhc, oracle (one
        stage each, 400 steps) and the teachers alone on their own classes.

Runtime: about 4 minutes on a 2-core machine shared with other jobs (docs/muka.md).
Three seeds and K = 2, 4 (`get_sweep`):

  python -m launch.sweep launch --config=configs/muka.py:fmnist \
      --sweep_dir=runs/muka_fmnist --seeds=0,1,2 --workers=1 \
      --set stage_cache=runs/muka_fmnist/_stage_cache
  python -m launch.collect --sweep_dir=runs/muka_fmnist

The argument is `<preset>[,tiny]`; `tiny` shrinks every stage to a few steps (for tests
and smoke runs). Any field can be overridden, e.g. `--config.teachers.num_teachers=4
--config.muki.integration=hard --config.variants="('muki','oracle')"`.
"""

import ml_collections

from moe_adapt import config_presets

_PRESETS = ("fmnist",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `<preset>[,tiny]` (preset: fmnist)."""
  _, flags = config_presets.parse_config_arg(arg, presets=_PRESETS)
  tiny = "tiny" in flags
  c = ml_collections.ConfigDict()
  c.method = "muka"
  c.seed = 0  # student initialisation, batch order, MC-dropout masks

  c.data = ml_collections.ConfigDict()
  c.data.benchmark = "fmnist_rot"
  # Options passed to moe_adapt.data.get_benchmark ('' = the benchmark's default). 12000
  # exceeds every rot domain's 11,667 images: all are kept.
  c.data.options = ml_collections.ConfigDict(
    {"data_dir": "", "max_per_domain": 12000, "test_fraction": 0.3}
  )
  c.data.benchmark_seed = 0  # fixed: every run sees the same images, teachers are shared
  c.data.domain = "rot0"  # MUKA is about label sets, not domains: one domain ('' = first)
  c.data.train_per_class = 600  # cap on the transfer set per class (0 = all)
  c.data.test_per_class = 0  # cap on the test split per class (0 = all)

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "convnet"  # teachers and student alike (see moe_adapt.models.BACKBONES)
  c.model.options = ml_collections.ConfigDict({"width": 16, "feature_dim": 128})
  c.model.dropout = 0.1  # on the features before the head; the official --dropout default

  # Stage `teacher_<k>`: CE on the training images of teacher k's classes (Adam).
  c.teachers = ml_collections.ConfigDict()
  c.teachers.num_teachers = 2  # K contiguous chunks of ⌊10 / K⌋ classes, the last + remainder
  c.teachers.seed = 0  # teachers are fixed across runs, as released fine-tuned models
  c.teachers.steps = 1000
  c.teachers.batch_size = 64
  c.teachers.lr = 2e-3

  # Student stages, one per variant, without labels (but `oracle`), Adam.
  c.student = ml_collections.ConfigDict()
  c.student.steps = 800
  c.student.batch_size = 64
  c.student.lr = 2e-3

  # MUKI (official defaults): scores from muki.num_mc_samples MC-dropout passes; targets
  # from the teachers' softmax at kd_temperature; soft integration weights
  # softmax(s / score_temperature); margin re-weighting of each example's KL.
  c.muki = ml_collections.ConfigDict()
  c.muki.integration = "soft"  # 'soft' or 'hard' (the `hard` variant always uses 'hard')
  c.muki.score_temperature = 0.2
  c.muki.kd_temperature = 1.0
  c.muki.margin = True
  c.muki.num_mc_samples = 16

  # Baselines: vanilla KD on the concatenated teacher logits (the official model class's
  # T = 5, KL × T²); UHC (the official script's T = 1, × T²).
  c.vanilla_kd = ml_collections.ConfigDict({"temperature": 5.0})
  c.uhc = ml_collections.ConfigDict({"temperature": 1.0})

  # What to compare; `teachers` reports teacher_<k> (each teacher on its own classes).
  c.variants = (
    "muki",
    "hard",
    "no_margin",
    "single_pass",
    "vanilla_kd",
    "uhc",
    "teachers",
    "oracle",
  )

  c.eval_batch_size = 500
  c.checkpoint_every = 200
  c.log_every = 50
  c.num_devices = 0  # 0 = all local devices (data parallel)
  # A directory shared by the runs of a sweep: finished `teacher_<k>` stages are reused by
  # runs whose config fields for them agree (moe_adapt/train/stage_cache.py). Empty = off.
  c.stage_cache = ""

  if tiny:
    c.data.options.max_per_domain = 300
    c.data.train_per_class = 12
    c.data.test_per_class = 8
    c.model.options = ml_collections.ConfigDict({"width": 4, "feature_dim": 8})
    c.teachers.steps = 3
    c.teachers.batch_size = 8
    c.student.steps = 3
    c.student.batch_size = 8
    c.muki.num_mc_samples = 4
    c.checkpoint_every = 2
    c.log_every = 1
    c.eval_batch_size = 64
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """K = 2 and 4 teachers (seeds come from the sweep runner)."""
  del arg
  return [{"teachers.num_teachers": k} for k in (2, 4)]
