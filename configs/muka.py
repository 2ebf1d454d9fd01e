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

Text experiment (20 Newsgroups, all 20 labels; 300 train + 100 test documents per class
as frozen all-MiniLM-L6-v2 sentence embeddings at 64 tokens, `moe_adapt.data.embedded`;
teachers, students and oracle are MLP heads on them):

  moe-adapt-data fetch newsgroups && moe-adapt-data fetch minilm
  python -m launch.sweep launch --config=configs/muka.py:newsgroups \
      --sweep_dir=runs/muka_newsgroups --seeds=0,1,2 --workers=1 \
      --set stage_cache=runs/muka_newsgroups/_stage_cache
  python -m launch.collect --sweep_dir=runs/muka_newsgroups

Any BERT-family checkpoint directory can replace MiniLM as the frozen encoder of teachers
and student (Hugging Face naming, with bert-base-uncased's WordPiece vocabulary):
`--config.data.options.encoder=/path/to/bert-base-uncased`.

Runtime: the embedding pass runs once (~15 min on 2 shared cores, then cached under
`$MOE_ADAPT_CACHE`); each run then takes 1.5-2 minutes. `newsgroups,hetero`: K = 2
heterogeneous teachers (a linear probe and a 512-wide MLP; `teachers.backbone_options`).

Overlapping label sets (each teacher also knows the first 2 classes of the next teacher's
chunk; docs/muka.md, "Overlapping label sets"), K = 4:

  python -m launch.sweep launch --config=configs/muka.py:newsgroups --no_sweep \
      --sweep_dir=runs/muka_newsgroups_overlap --seeds=0,1,2 --workers=1 \
      --set teachers.num_teachers=4 --set teachers.overlap=2 \
      --set stage_cache=runs/muka_newsgroups_overlap/_stage_cache

Fine-tuned MiniLM teachers and student (`newsgroups_ft`, `methods.muka_ft`; docs/muka.md,
last section): the top block + a new head fine-tuned on disjoint texts, MC dropout through
the whole network, checkpoint selection on val texts; ~25 min per run for seed 0 on 2
shared cores, a further seed reuses teachers and scores:

  python -m launch.sweep launch --config=configs/muka.py:newsgroups_ft \
      --sweep_dir=runs/muka_ft --seeds=0 --workers=1 \
      --set stage_cache=runs/muka_ft/_stage_cache

The argument is `<preset>[,tiny][,hetero]`; `tiny` shrinks every stage to a few steps (for
tests and smoke runs). Any field can be overridden, e.g. `--config.teachers.num_teachers=4
--config.muki.integration=hard --config.variants="('muki','oracle')"`.
"""

import ml_collections

from configs import _shared as config_presets

_PRESETS = ("fmnist", "newsgroups", "newsgroups_ft")
_FLAGS = ("tiny", "hetero")
# `newsgroups,hetero`: heterogeneous teachers (K = 2), a linear probe and a wide MLP.
_HETERO_TEACHERS = ({"hidden_dim": 0}, {"hidden_dim": 512})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `<preset>[,tiny][,hetero]` (preset: fmnist, newsgroups)."""
  preset, flags = config_presets.parse_config_arg(arg, presets=_PRESETS, flags=_FLAGS)
  if preset == "newsgroups_ft":
    if "hetero" in flags:
      raise ValueError(
        "config argument flag 'hetero' is invalid for preset='newsgroups_ft'; accepted: tiny"
      )
    return _newsgroups_ft(
      get_config("fmnist,tiny" if "tiny" in flags else "fmnist"), tiny="tiny" in flags
    )
  if "hetero" in flags and preset != "newsgroups":
    raise ValueError(
      f"config argument flag 'hetero' is invalid for preset={preset!r}; accepted: newsgroups,hetero"
    )
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
  # Cap on the labelled validation split (0 = all); read only by checkpoint selection.
  c.data.val_per_class = 50

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "convnet"  # teachers and student alike (see moe_adapt.models.BACKBONES)
  c.model.options = ml_collections.ConfigDict({"width": 16, "feature_dim": 128})
  c.model.dropout = 0.1  # on the features before the head; the official --dropout default

  # Stage `teacher_<k>`: CE on the training images of teacher k's classes (Adam).
  c.teachers = ml_collections.ConfigDict()
  c.teachers.num_teachers = 2  # K contiguous chunks of ⌊10 / K⌋ classes, the last + remainder
  c.teachers.seed = 0  # teachers are fixed across runs, as released fine-tuned models
  # Overlapping label sets: teacher k also knows the first `overlap` classes of teacher
  # k+1's chunk (cyclically), so neighbours share classes; 0 = disjoint chunks. Accepted:
  # 0 .. ⌊C / K⌋ − 1 (every teacher keeps a class of its own).
  c.teachers.overlap = 0
  # Heterogeneous teachers: () = all like model.options; else one dict per teacher that
  # updates model.options, e.g. ({'hidden_dim': 0}, {'hidden_dim': 512}) for `mlp`.
  c.teachers.backbone_options = ()
  c.teachers.steps = 1000
  c.teachers.batch_size = 64
  c.teachers.lr = 2e-3

  # Student stages, one per variant, without labels (but `oracle`), Adam.
  c.student = ml_collections.ConfigDict()
  c.student.steps = 800
  c.student.batch_size = 64
  c.student.lr = 2e-3
  # Checkpoint selection: n > 1 keeps, of n equally spaced checkpoints, the one with the best
  # accuracy on the labelled val split (the official code evaluates every 200 steps and
  # keeps the best); 1 = the last step, as the documented tables.
  c.student.select_checkpoints = 1

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
  if preset == "newsgroups":
    _newsgroups(c, tiny=tiny)
  if "hetero" in flags:
    c.teachers.backbone_options = _HETERO_TEACHERS
  return c


def _newsgroups(c: ml_collections.ConfigDict, *, tiny: bool) -> None:
  """20 Newsgroups as frozen MiniLM sentence embeddings; MLP heads as teachers and student.

  Fine-tuning MiniLM once per teacher and variant is out of a shared-CPU budget, so the
  encoder is frozen: every document is embedded once (cached, `moe_adapt.data.embedded`)
  and teachers, students and the oracle are Dense-GELU-dropout-Dense heads on the
  embeddings, with MC dropout on the hidden features as in the image preset.
  """
  c.data.benchmark = "embedded"
  c.data.options = ml_collections.ConfigDict(
    {
      "base": "newsgroups",
      # '' = the base's default (data_dir also locates the MiniLM weights).
      "base_options": {"grouping": "single", "data_dir": "", "tokenizer": "", "val_fraction": 0.1},
      # The frozen encoder every teacher and the student start from: 'minilm', or a
      # Hugging Face BERT / DistilBERT checkpoint directory with the base tokenizer's
      # WordPiece vocabulary (e.g. bert-base-uncased), read by moe_adapt.models.checkpoints.
      "encoder": "minilm",
      # 64 WordPiece tokens (subject line and the post's start): the embedding pass over
      # 8,100 documents takes ~12 min on 2 shared cores; 128 would double it.
      "max_len": 64,
      "batch_size": 64,
      # Caps applied before encoding: 300 train + 100 test documents per class.
      "train_per_class": 300,
      "val_per_class": 5,  # unused by MUKA; kept tiny so it costs no encoding time
      "test_per_class": 100,
    }
  )
  c.data.domain = "all"  # grouping 'single': one domain with all 20 newsgroups
  c.data.train_per_class = 0  # the wrapper caps already
  c.data.test_per_class = 0
  c.model.backbone = "mlp"
  c.model.options = ml_collections.ConfigDict({"hidden_dim": 256, "num_layers": 1})
  c.teachers.steps = 1000
  c.teachers.lr = 1e-3
  c.student.steps = 1500
  c.student.lr = 1e-3
  if tiny:  # a tiny random BERT on few documents; no MiniLM download needed
    c.data.options.encoder = "tiny_random"
    c.data.options.max_len = 16
    c.data.options.base_options.val_fraction = 0.2
    c.data.options.train_per_class = 4
    c.data.options.val_per_class = 1
    c.data.options.test_per_class = 2
    c.data.options.batch_size = 32
    c.model.options = ml_collections.ConfigDict({"hidden_dim": 8, "num_layers": 1})
    c.teachers.steps = 3
    c.student.steps = 3


def _newsgroups_ft(c: ml_collections.ConfigDict, *, tiny: bool) -> ml_collections.ConfigDict:
  """20 Newsgroups with fine-tuned MiniLM teachers and student (`methods.muka_ft`).

  The papers' premises on a 2-core CPU budget (each choice is a cost, measured there:
  MiniLM runs ~19 ms per 32-token text forward and ~0.23 s per text for S = 8 MC passes
  under load):
  - teachers, students and oracle are all-MiniLM-L6-v2 with its TOP block and a new head
    fine-tuned (`model.train_layers = 1`; blocks 0-4 frozen, their hidden states computed
    once); dropout p = 0.1 stays on in that block and before the head while training;
  - MC dropout runs the WHOLE network (embeddings, all 6 blocks, head) with dropout on,
    S = 8 passes vmapped, over the 600 transfer texts, once per K (cached);
  - 32 tokens per text (subject line and the start of the post);
  - disjoint data from the bydate train split: 25 texts per class for the teachers (250
    per teacher at K = 2, 125 at K = 4), the next 30 per class as the unlabelled transfer
    set (600); 10 val texts per class choose the student's checkpoint (5 candidates);
    40 test texts per class (800);
  - teachers: Adam 3e-4, 150 steps of 16 (~10 epochs at K = 2); students: Adam 3e-4, 250
    steps of 16 (~7 epochs of the transfer set), the same batch order for every variant.
  """
  c.method = "muka_ft"
  c.data.benchmark = "newsgroups"
  c.data.options = ml_collections.ConfigDict(
    {
      "grouping": "single",
      "data_dir": "",  # '' = the default (also where MiniLM's weights are)
      "tokenizer": "",
      "val_fraction": 0.1,
      "max_len": 32,
    }
  )
  c.data.domain = "all"
  c.data.teacher_per_class = 25  # the teachers' labelled texts: the first of each class
  c.data.train_per_class = 30  # the transfer set: the next ones (disjoint from the teachers')
  c.data.val_per_class = 10
  c.data.test_per_class = 40
  c.model = ml_collections.ConfigDict(
    {
      "encoder": "minilm",  # models.encoders: 'minilm' or 'tiny_random' (tests)
      "train_layers": 1,  # top blocks fine-tuned (the rest frozen, their outputs cached)
      "dropout": 0.1,  # before the head (the blocks keep the encoder's own 0.1)
      "batch_size": 32,  # texts per call of the lower pass and of the MC passes
    }
  )
  c.teachers.steps = 150
  c.teachers.batch_size = 16
  c.teachers.lr = 3e-4
  c.student.steps = 250
  c.student.batch_size = 16
  c.student.lr = 3e-4
  c.student.select_checkpoints = 5
  c.muki.num_mc_samples = 8
  c.eval_batch_size = 100
  if tiny:  # a tiny random BERT (2 blocks, 32 wide) on a few texts; no MiniLM download
    c.data.options.max_len = 16
    c.data.options.val_fraction = 0.2
    c.data.teacher_per_class = 2
    c.data.train_per_class = 2
    c.data.val_per_class = 1
    c.data.test_per_class = 2
    c.model.encoder = "tiny_random"
    c.model.batch_size = 8
    c.teachers.steps = 3
    c.teachers.batch_size = 8
    c.student.steps = 4
    c.student.batch_size = 8
    c.student.select_checkpoints = 2
    c.muki.num_mc_samples = 4
    c.eval_batch_size = 16
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """K = 2 and 4 teachers (K = 2 only with `hetero`); seeds come from the sweep runner."""
  _, flags = config_presets.parse_config_arg(arg, presets=_PRESETS, flags=_FLAGS)
  ks = (2,) if "hetero" in flags else (2, 4)
  return [{"teachers.num_teachers": k} for k in ks]
