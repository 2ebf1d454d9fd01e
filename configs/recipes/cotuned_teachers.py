r"""Recipe 3 of issue #11: teachers obtained by Co-Tuning on different label sets, merged by MUKI.

Embedded experiment (Fashion-MNIST; the Co-Tuning task of docs/co_tuning.md):

  export JAX_COMPILATION_CACHE_DIR=runs/jax_cache
  for seed in 0 1 2; do
    moe-adapt --config=configs/recipes/cotuned_teachers.py:fmnist \
        --workdir=runs/recipes/cotuned_teachers/s$seed --config.seed=$seed \
        --config.stage_cache=runs/recipes/cotuned_teachers/_stage_cache
  done

  source: T-shirt/top, Trouser, Pullover, Sandal, Sneaker, Bag on upright images (domain
          rot0 of `fmnist_rot`), pre-trained inside the run (co_tuning's `source` stage,
          shared through `stage_cache`);
  teachers: K = 2 label sets of the rot45 target task, {Dress, Coat} and {Shirt, Ankle boot};
          teacher k is transferred from the source model by Co-Tuning (`co_tuning_direct`)
          and, as the control, by plain fine-tuning (`fine_tune`), each with the labels of
          its classes in the union's stratified subset at `data.sampling_rate` (15 %: 24 of
          160 images per class);
  student: one model over the 4 classes, trained by MUKI (and vanilla KD) on the
          unlabeled rot45 training images (600 per class), from the pre-trained source
          backbone; oracles: the same student with the union's labels
          at the same rate (`oracle`) and with every transfer label (`oracle_all`);
  single task: co_tuning's `fine_tune` and `co_tuning_direct` on all 4 classes, same labels.

Runtime: about 15 minutes for the first seed on a 2-core machine shared with other jobs
(the source stage about 4 of them; later seeds copy it from the stage cache). The argument
is `<preset>[,tiny]`; `tiny` shrinks every stage to a few steps (tests, smoke runs). Seeds
draw the labeled subset, the heads' initialisation, batch order and MC-dropout masks; the
images and the source model are fixed (`data.benchmark_seed`, `source.seed`).
"""

import ml_collections

from configs import _shared as config_presets

_PRESETS = ("fmnist",)

# Fashion-MNIST class indices (moe_adapt.data.fashion.CLASS_NAMES).
_FMNIST_SOURCE = (0, 1, 2, 5, 7, 8)  # T-shirt/top, Trouser, Pullover, Sandal, Sneaker, Bag
_FMNIST_LABEL_SETS = ((3, 4), (6, 9))  # {Dress, Coat}, {Shirt, Ankle boot}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `<preset>[,tiny]` (preset: fmnist)."""
  _, flags = config_presets.parse_config_arg(arg, presets=_PRESETS)
  tiny = "tiny" in flags
  c = ml_collections.ConfigDict()
  c.method = "cotuned_teachers"
  c.seed = 0  # labeled subset, head initialisations, batch order, MC-dropout masks

  # The Co-Tuning task (configs/co_tuning.py:fmnist); the target classes are the union of
  # teachers.label_sets.
  c.data = ml_collections.ConfigDict()
  c.data.benchmark = "fmnist_rot"
  c.data.options = ml_collections.ConfigDict(
    {"data_dir": "", "max_per_domain": 12000, "test_fraction": 0.3}
  )
  c.data.benchmark_seed = 0  # fixed: the same images in every run, a shared source stage
  c.data.source_domain = "rot0"
  c.data.target_domain = "rot45"
  c.data.source_classes = _FMNIST_SOURCE
  # The labeled pool per class (first images of the train / val splits), of which
  # data.sampling_rate is used, stratified: co_tuning's protocol.
  c.data.target_train_per_class = 160
  c.data.target_val_per_class = 40
  c.data.sampling_rate = 0.15
  # The student's unlabeled transfer set: the first images of each union class in the
  # target domain's training split (0 = all); it contains the labeled pool.
  c.data.transfer_per_class = 600

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "convnet"  # source, teachers and student alike
  c.model.options = ml_collections.ConfigDict({"width": 32, "feature_dim": 128})

  # co_tuning's source stage, calibration and fine-tuning recipe, unchanged.
  c.source = ml_collections.ConfigDict()
  c.source.seed = 0
  c.source.steps = 2000
  c.source.batch_size = 64
  c.source.lr = 1e-3
  c.calibration = ml_collections.ConfigDict({"temperature": 0.0, "num_bins": 15})
  c.finetune = ml_collections.ConfigDict()
  c.finetune.steps = 1000
  c.finetune.batch_size = 48
  c.finetune.lr = 3e-2
  c.finetune.head_lr_mult = 10.0
  c.finetune.momentum = 0.9
  c.finetune.nesterov = True
  c.finetune.weight_decay = 5e-4
  c.finetune.lr_decay_at = 6000 / 9050
  c.finetune.lr_decay = 0.1
  c.finetune.head_init_std = 0.01
  c.co_tuning = ml_collections.ConfigDict({"trade_off": 2.3, "reverse_max_iter": 100})
  c.l2_sp = ml_collections.ConfigDict({"alpha": 0.01, "beta": 0.01})

  # Teachers: K disjoint label sets (their concatenation is the student's label order),
  # each transferred by every co_tuning variant listed; MC dropout at `dropout` on the
  # teacher's features before its target head gives MUKI's scores.
  c.teachers = ml_collections.ConfigDict()
  c.teachers.label_sets = _FMNIST_LABEL_SETS
  c.teachers.variants = ("co_tuning_direct", "fine_tune")
  c.teachers.dropout = 0.1  # the official MUKI --dropout default

  # co_tuning's single-task models on the whole union (() = none).
  c.union = ml_collections.ConfigDict()
  c.union.variants = ("fine_tune", "co_tuning_direct")

  # Students (muka's step: Adam, dropout on the features), one stage per variant and
  # teacher variant; oracle / oracle_all once.
  c.student = ml_collections.ConfigDict()
  # `hard`, `no_margin`, `single_pass`, `uhc` also work; left out of the preset for time.
  c.student.variants = ("muki", "vanilla_kd", "oracle", "oracle_all")
  c.student.init = "source"  # 'source': pre-trained backbone + new head; 'scratch'
  c.student.dropout = 0.1
  # 400 steps (~10 epochs of the transfer set): the student starts pre-trained, and muka's
  # shorter schedule gave less over-confident students there (docs/muka.md).
  c.student.steps = 400
  c.student.batch_size = 64
  c.student.lr = 2e-3

  # MUKI and the baselines (configs/muka.py, the official defaults).
  c.muki = ml_collections.ConfigDict()
  c.muki.integration = "soft"
  c.muki.score_temperature = 0.2
  c.muki.kd_temperature = 1.0
  c.muki.margin = True
  c.muki.num_mc_samples = 16
  c.vanilla_kd = ml_collections.ConfigDict({"temperature": 5.0})
  c.uhc = ml_collections.ConfigDict({"temperature": 1.0})

  c.eval_batch_size = 500
  c.checkpoint_every = 500
  c.log_every = 50
  c.num_devices = 0  # 0 = all local devices (data parallel)
  # Shared by runs: the `source` stage is reused when its fields agree (co_tuning's too).
  c.stage_cache = ""

  if tiny:
    c.data.options.max_per_domain = 300
    c.data.target_train_per_class = 10
    c.data.target_val_per_class = 4
    c.data.sampling_rate = 0.5
    c.data.transfer_per_class = 0
    c.model.options = ml_collections.ConfigDict({"width": 4, "feature_dim": 8})
    c.source.steps = 3
    c.source.batch_size = 8
    c.finetune.steps = 3
    c.finetune.batch_size = 8
    c.co_tuning.reverse_max_iter = 5
    c.student.steps = 3
    c.student.batch_size = 8
    c.muki.num_mc_samples = 4
    c.checkpoint_every = 2
    c.log_every = 1
    c.eval_batch_size = 64
  return c
