"""MUKA / MUKI: uncertainty-aware integration of teachers with different label sets.

Li, Lin, Ren, Zhao, Li, Zhou, Sun. "Model Uncertainty-Aware Knowledge Amalgamation for
Pre-Trained Language Models" (MUKA, arXiv 2112.07327) and "From Mimicking to Integrating:
Knowledge Integration for Pre-Trained Language Models" (MUKI, Findings of EMNLP 2022).

K teachers each know a contiguous chunk of the sorted label list (chunk size ⌊C / K⌋, the
last teacher takes the remainder), extended by the first `teachers.overlap` classes of the
next teacher's chunk (cyclically; 0 = disjoint chunks, the default), so that neighbouring
teachers may share classes (the official code's `overlap_class_number`). A student over the
union of the label sets (= range(C), the global label order) is trained without labels on
a transfer set, by distillation from an integrated target. Here on one domain of
a benchmark: Fashion-MNIST's upright images with the CNN, or 20 Newsgroups as frozen MiniLM
sentence embeddings (the `embedded` benchmark) with MLP heads (`mlp` backbone). Stages and
steps (each training stage checkpointed under `<workdir>/checkpoints/<stage>` and skipped
when finished):

1. `teacher_<k>`: teacher k trained by CE on the labeled training images of its classes
   (all of its label set, shared classes included; dropout on its features), frozen
   afterwards. Teachers depend only on the data, model
   and `teachers` fields, so every run of a sweep reuses them through the stage cache.
2. Scores, computed ONCE over the transfer set (the training images of all classes, labels
   ignored) and cached in `<workdir>/confidences.npz`: per teacher and example the
   confidence s_k(x) = 1 − normalised entropy of the mean of S MC-dropout passes (`mc`),
   and of one deterministic pass (`single`, the over-confident baseline), each over the
   teacher's own classes; and the
   teachers' deterministic logits (the distillation targets come from dropout-off passes).
3. One student stage per variant, all from the same initialisation, sharing one compiled
   step (targets, per-example weights, temperature and label grouping are arguments):

   - `muki`: soft integration (softmax(s / τ_s) weights) + margin re-weighting + MC scores;
   - `hard`: hard integration (the most confident teacher's distribution);
   - `no_margin`: `muki` without the margin weights;
   - `single_pass`: `muki` with single-pass entropy scores;
   - `vanilla_kd`: KL to softmax(z / T), × T², z the teachers' logits in the union space
     (concatenated; with overlap, a shared class gets the mean of the logits of the
     teachers that know it: the official VKD "merges overlapping logits");
   - `uhc`: per teacher, the student's probabilities renormalised over that teacher's labels,
     KL to the teacher, summed over teachers, × T² (Vongkulbhisal et al., CVPR 2019);
   - `oracle`: CE with all labels of the transfer set (an upper bound, not annotation-free).

   The integrations (`core.routing.integrate_teachers` with `label_index` = the label sets)
   scatter each teacher's distribution into its union columns, so with overlap a shared
   class collects the weighted mass of every teacher that knows it. Loss of the
   distillation variants: mean_i w_i · KL(q_i ‖ p_student(x_i)); UHC's renormalisation
   groups are a partition of the classes when the label sets are disjoint, else a [K, C]
   membership mask (`masked_kl`).
4. Evaluation on the test split: accuracy over the union labels and on each teacher's
   label set (argmax over all labels; with overlap the subsets overlap too); `teacher_<k>`:
   teacher k's accuracy on the test examples of its own classes (argmax over its classes).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_adapt import core, data, models
from moe_adapt.methods import _checks
from moe_adapt.train import artifacts, benchmarks, evaluation, stages, steps
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import workdir as workdir_lib

PyTree = Any

INTEGRATION_MODES = ("hard", "soft")
STUDENT_VARIANTS = ("muki", "hard", "no_margin", "single_pass", "vanilla_kd", "uhc", "oracle")
VARIANTS = (*STUDENT_VARIANTS, "teachers")
CONFIDENCE_FILE = "confidences.npz"
# The official code adds this to the margin so that no example's weight is exactly 0.
MARGIN_EPSILON = 1e-6


# ----------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------


def _check_variants(variants) -> None:
  if isinstance(variants, str) or not isinstance(variants, Sequence) or not variants:
    raise ValueError(
      f"variants={variants!r} is invalid; accepted: a non-empty tuple of {', '.join(VARIANTS)}"
    )
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"variants has unknown {v!r}; accepted: {', '.join(VARIANTS)}")
  if len(set(variants)) != len(variants):
    raise ValueError(f"variants={tuple(variants)!r} lists a variant twice")


def validate_config(config) -> None:
  """Checks every field this method reads; raises ValueError naming the field."""

  integer = functools.partial(_checks.integer, config)
  number = functools.partial(_checks.number, config)

  for name in ("seed", "teachers.seed", "data.benchmark_seed", "num_devices"):
    integer(name, 0)
  for name in ("data.train_per_class", "data.test_per_class"):
    integer(name, 0)
  if "val_per_class" in config.data:
    integer("data.val_per_class", 0)
  if "select_checkpoints" in config.student:
    integer("student.select_checkpoints", 1)
  integer("teachers.num_teachers", 2)
  if "overlap" in config.teachers:  # its upper bound depends on the class count: make_setup
    integer("teachers.overlap", 0)
  for name in (
    "teachers.steps",
    "teachers.batch_size",
    "student.steps",
    "student.batch_size",
    "muki.num_mc_samples",
    "eval_batch_size",
    "checkpoint_every",
    "log_every",
  ):
    integer(name, 1)
  for name in (
    "teachers.lr",
    "student.lr",
    "muki.score_temperature",
    "muki.kd_temperature",
    "vanilla_kd.temperature",
    "uhc.temperature",
  ):
    number(name, low=0.0)
  number("model.dropout", low=0.0, high=1.0, low_open=False)
  if config.muki.integration not in INTEGRATION_MODES:
    raise ValueError(
      f"muki.integration={config.muki.integration!r} is unknown; accepted: "
      f"{', '.join(INTEGRATION_MODES)}"
    )
  if not isinstance(config.muki.margin, bool):
    raise ValueError(f"muki.margin={config.muki.margin!r} is invalid; accepted: True or False")
  if not isinstance(config.data.domain, str):
    raise ValueError(f"data.domain={config.data.domain!r} is invalid; accepted: a string")
  _check_variants(config.variants)
  _check_teacher_options(config.teachers.get("backbone_options", ()))


def _check_teacher_options(options) -> None:
  """`teachers.backbone_options`: () or a sequence of dicts (one per teacher)."""
  if (
    isinstance(options, str)
    or not isinstance(options, Sequence)
    or not all(isinstance(o, Mapping) for o in options)
  ):
    raise ValueError(
      f"teachers.backbone_options={options!r} is invalid; accepted: () or one dict of "
      "backbone options per teacher, e.g. ({'hidden_dim': 128}, {'hidden_dim': 512})"
    )


# ----------------------------------------------------------------------------
# Data: the teachers' label chunks, the transfer and test sets
# ----------------------------------------------------------------------------


def label_chunks(
  num_classes: int, num_teachers: int, *, overlap: int = 0
) -> tuple[tuple[int, ...], ...]:
  """Teacher label sets: contiguous chunks of range(C), each extended into the next one.

  The base chunks have ⌊C / K⌋ classes each, the last takes the remainder (the official
  split). Teacher k's set is its chunk followed by the first `overlap` classes of teacher
  k+1's chunk (the last teacher's: of teacher 0's chunk, cyclically), so neighbouring
  teachers share `overlap` classes and every class belongs to one or two teachers. Teacher
  k's local class i is global class `chunks[k][i]`. overlap=0 gives the disjoint chunks.

  Raises:
    ValueError: naming teachers.num_teachers unless 2 <= K <= C; naming teachers.overlap
      unless 0 <= overlap <= ⌊C / K⌋ − 1 (every teacher keeps a class of its own).
  """
  if not 2 <= num_teachers <= num_classes:
    raise ValueError(
      f"teachers.num_teachers={num_teachers} is invalid for {num_classes} classes; accepted: "
      f"an integer in [2, {num_classes}] (each teacher needs at least one class)"
    )
  size = num_classes // num_teachers
  if isinstance(overlap, bool) or not isinstance(overlap, int | np.integer):
    raise ValueError(f"teachers.overlap={overlap!r} is invalid; accepted: an integer >= 0")
  if not 0 <= overlap <= size - 1:
    raise ValueError(
      f"teachers.overlap={overlap} is invalid for {num_classes} classes and {num_teachers} "
      f"teachers; accepted: an integer in [0, {size - 1}] (chunks of {size} classes: every "
      "teacher keeps a class of its own)"
    )
  bounds = [k * size for k in range(num_teachers)] + [num_classes]
  base = [tuple(range(bounds[k], bounds[k + 1])) for k in range(num_teachers)]
  return tuple(base[k] + base[(k + 1) % num_teachers][: int(overlap)] for k in range(num_teachers))


def cap_per_class(split: data.Split, num_classes: int, cap: int, *, where: str) -> data.Split:
  """The first `cap` examples of each class (all when cap == 0), in split order.

  Splits are already shuffled by the benchmark, so this is a fixed random subset.

  Raises:
    ValueError: naming `where` and the class when a class has no example.
  """
  keep = np.zeros(len(split.y), bool)
  for c in range(num_classes):
    idx = np.flatnonzero(split.y == c)
    if not len(idx):
      raise ValueError(f"{where} has no example of class {c}; accepted: every class present")
    keep[idx[:cap] if cap else idx] = True
  return data.Split(split.x[keep], split.y[keep])


# ----------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the stages share, derived from the config and the data."""

  config: Any
  domain: str
  class_names: tuple[str, ...]
  chunks: tuple[tuple[int, ...], ...]  # teacher k's global class indices (may overlap)
  train: data.Split  # the transfer set (labels used only by teachers and the oracle)
  test: data.Split
  input_shape: tuple[int, ...]  # of one example: (H, W, C) or (D,)
  mesh: jax.sharding.Mesh
  teacher_models: tuple[models.DropoutClassifier, ...]
  student_model: models.DropoutClassifier
  x_train: jax.Array  # [N, *input_shape] the transfer set's inputs, replicated
  # Labelled validation data for the students' checkpoint selection (None: no selection).
  val: data.Split | None = None

  @property
  def num_teachers(self) -> int:
    return len(self.chunks)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def overlapping(self) -> bool:
    """Whether some class belongs to more than one teacher."""
    return sum(map(len, self.chunks)) != len(set().union(*self.chunks))

  def membership(self) -> np.ndarray:
    """[K, C] float32: 1 where class c is in teacher k's label set."""
    mask = np.zeros((self.num_teachers, self.num_classes), np.float32)
    for k, chunk in enumerate(self.chunks):
      mask[k, list(chunk)] = 1.0
    return mask

  def teacher_examples(self, k: int) -> np.ndarray:
    """Indices into the transfer set of teacher k's classes."""
    return np.flatnonzero(np.isin(self.train.y, self.chunks[k]))

  def teacher_labels(self, k: int) -> np.ndarray:
    """int32 [N_k]: teacher k's local labels (index in chunks[k]) of `teacher_examples(k)`."""
    local = np.full(self.num_classes, -1, np.int32)  # global class -> teacher k's index
    local[list(self.chunks[k])] = np.arange(len(self.chunks[k]), dtype=np.int32)
    return local[self.train.y[self.teacher_examples(k)]]

  def key(self, stage: str, index: int = 0) -> jax.Array:
    """The PRNG key of a stage; steps fold their index into it."""
    if stage == "teacher":  # teachers do not depend on the run's seed
      return jax.random.fold_in(jax.random.key(self.config.teachers.seed), index)
    stage_ids = {"student_init": 1, "student": 2, "mc": 3}
    return jax.random.fold_in(jax.random.key(self.config.seed), stage_ids[stage])

  def constrain(self, x: jax.Array) -> jax.Array:
    """Shards the leading (batch) axis over the mesh when it divides evenly."""
    if self.mesh.size == 1 or x.shape[0] % self.mesh.size:
      return x
    spec = P("data", *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def make_setup(config) -> Setup:
  """Loads the data and builds the models; every data-dependent check happens here.

  Raises:
    ValueError: naming the field: an unknown domain, more teachers than classes, a class
      without training or test examples.
  """
  cfg = config.data
  benchmark = benchmarks.benchmark(cfg)
  domain = cfg.domain or benchmark.domains[0]
  if domain not in benchmark.domains:
    raise ValueError(
      f"data.domain={domain!r} is not a domain of benchmark {benchmark.name!r}; accepted: "
      f"{', '.join(benchmark.domains)}"
    )
  chunks = label_chunks(
    benchmark.num_classes,
    config.teachers.num_teachers,
    overlap=config.teachers.get("overlap", 0),
  )
  splits = benchmark.load(seed=cfg.benchmark_seed)[domain]
  c = benchmark.num_classes
  train = cap_per_class(splits.train, c, cfg.train_per_class, where=f"domain {domain!r} (train)")
  test = cap_per_class(splits.test, c, cfg.test_per_class, where=f"domain {domain!r} (test)")
  val = None
  if config.student.get("select_checkpoints", 1) > 1:
    if not len(splits.val.y):
      raise ValueError(
        f"student.select_checkpoints={config.student.select_checkpoints} needs labelled "
        f"validation data, but domain {domain!r} of {benchmark.name!r} has an empty val "
        "split; accepted: 1 (no selection: the last step) or a benchmark with a val split"
      )
    cap = cfg.get("val_per_class", 0)
    val = cap_per_class(splits.val, c, cap, where=f"domain {domain!r} (val)")
  mesh = mesh_lib.make_mesh(config.num_devices or None)

  # Heterogeneous teachers: teacher k's backbone options are model.options updated by
  # teachers.backbone_options[k] (the student always uses model.options).
  per_teacher = tuple(config.teachers.get("backbone_options", ()))
  if per_teacher and len(per_teacher) != len(chunks):
    raise ValueError(
      f"teachers.backbone_options has {len(per_teacher)} entries for {len(chunks)} teachers; "
      "accepted: () or one dict per teacher"
    )

  def classifier(
    num_classes: int, overrides: Mapping[str, Any] | None = None
  ) -> models.DropoutClassifier:
    options = {**config.model.options.to_dict(), **dict(overrides or {})}
    backbone = models.get_backbone(config.model.backbone, **options)
    return models.DropoutClassifier(
      backbone=backbone, num_classes=num_classes, rate=config.model.dropout
    )

  rep = mesh_lib.replicated(mesh)
  return Setup(
    config=config,
    domain=domain,
    class_names=tuple(benchmark.class_names),
    chunks=chunks,
    train=train,
    test=test,
    input_shape=tuple(benchmark.input_shape),
    mesh=mesh,
    teacher_models=tuple(
      classifier(len(chunk), per_teacher[k] if per_teacher else None)
      for k, chunk in enumerate(chunks)
    ),
    student_model=classifier(c),
    x_train=jax.device_put(train.x, rep),
    val=val,
  )


def init_model(model: models.DropoutClassifier, key: jax.Array, input_shape, tx) -> PyTree:
  """{'params', 'batch_stats', 'opt_state'} of a freshly initialised model."""
  variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  params = variables["params"]
  return {
    "params": params,
    "batch_stats": variables.get("batch_stats", {}),
    "opt_state": tx.init(params),
  }


# ----------------------------------------------------------------------------
# Stage 1: teachers
# ----------------------------------------------------------------------------


def make_teacher_step(setup: Setup, k: int, tx: optax.GradientTransformation) -> Callable:
  """`jitted(state, step, x, y)`: CE on teacher k's classes (y = local index in chunks[k])."""
  cfg, model = setup.config.teachers, setup.teacher_models[k]
  base = setup.key("teacher", k)

  def step(state, step, x, y):
    key = jax.random.fold_in(base, step + 1)
    idx_key, drop_key = jax.random.split(key)
    idx = jax.random.randint(idx_key, (cfg.batch_size,), 0, y.shape[0])
    xb = setup.constrain(x[idx])

    def loss(logits):
      return core.losses.cross_entropy(logits, y[idx]).mean()

    state, value = steps.supervised_update(
      state, model, tx, xb, loss, rngs={"dropout": drop_key}, train=True, stochastic=True
    )
    return state, {"loss": value}

  return jax.jit(step, donate_argnums=0)


def train_teachers(setup: Setup, workdir: str, writer) -> list[dict]:
  """Stages `teacher_<k>`: each teacher's {'params', 'batch_stats'}."""
  cfg = setup.config.teachers
  rep = mesh_lib.replicated(setup.mesh)
  teachers = []
  for k in range(setup.num_teachers):
    tx = optax.adam(cfg.lr)
    state = init_model(setup.teacher_models[k], setup.key("teacher", k), setup.input_shape, tx)
    x = jax.device_put(setup.train.x[setup.teacher_examples(k)], rep)
    y = jax.device_put(setup.teacher_labels(k), rep)
    step = stages.bind(make_teacher_step(setup, k, tx), x, y)
    state = mesh_lib.replicate(state, setup.mesh)
    state = stages.run_stage(
      setup.config,
      workdir,
      f"teacher_{k}",
      step,
      state,
      cfg.steps,
      writer=writer,
      stage_fields={f"teacher_{k}": TEACHER_FIELDS},
    )
    teachers.append({"params": state["params"], "batch_stats": state["batch_stats"]})
  return teachers


# ----------------------------------------------------------------------------
# Stage 2: teacher scores on the transfer set (computed once, cached)
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_batch(model: models.DropoutClassifier, num_samples: int, variables, xb, key):
  """(logits [B, C_k], mean of `num_samples` MC-dropout softmaxes [B, C_k]) of one batch.

  Dropout sits after the deterministic backbone, so the backbone runs once and the S
  MC-dropout passes (`core.routing.mc_dropout_probs`) run over the head on its features:
  the same samples as S full passes, at a fraction of the cost. `model` is static, so
  teachers of one architecture share the compiled function.
  """
  feats = model.apply(variables, xb, train=False, method=models.DropoutClassifier.features)
  head = {"params": {"head": variables["params"]["head"]}}

  def apply_fn(params, f, drop_key):
    return model.apply(
      params,
      f,
      stochastic=True,
      rngs={"dropout": drop_key},
      method=models.DropoutClassifier.classify,
    )

  logits = model.apply(head, feats, method=models.DropoutClassifier.classify)
  probs = core.routing.mc_dropout_probs(apply_fn, head, feats, key, num_samples=num_samples)
  return logits, probs.mean(axis=0)


def compute_scores(setup: Setup, teachers: Sequence[dict]) -> dict[str, np.ndarray]:
  """Teacher logits and confidences over the transfer set.

  Returns:
    {'logits_<k>': [N, C_k] deterministic (dropout off) logits of teacher k,
     'mc': [N, K] 1 − normalised entropy of the MC-dropout mean,
     'single': [N, K] 1 − normalised entropy of softmax(logits / muki.kd_temperature)}.
  """
  x, bs = setup.train.x, setup.config.eval_batch_size
  tau = setup.config.muki.kd_temperature
  out, mc, single = {}, [], []
  for k, variables in enumerate(teachers):
    model, s = setup.teacher_models[k], setup.config.muki.num_mc_samples
    base = jax.random.fold_in(setup.key("mc"), k)
    logits, mean_probs = [], []
    for i, xb in enumerate(evaluation.padded_batches(x, bs)):
      lb, pb = _score_batch(model, s, variables, xb, jax.random.fold_in(base, i))
      logits.append(np.asarray(lb))
      mean_probs.append(np.asarray(pb))
    logits = np.concatenate(logits)[: len(x)]
    mean_probs = np.concatenate(mean_probs)[: len(x)]
    out[f"logits_{k}"] = logits
    mc.append(1.0 - np.asarray(core.routing.normalized_entropy(mean_probs)))
    det = jax.nn.softmax(jnp.asarray(logits) / tau, axis=-1)
    single.append(1.0 - np.asarray(core.routing.normalized_entropy(det)))
  out["mc"] = np.stack(mc, axis=1).astype(np.float32)
  out["single"] = np.stack(single, axis=1).astype(np.float32)
  return out


def teacher_scores(setup: Setup, teachers: Sequence[dict], workdir: str) -> dict[str, np.ndarray]:
  """`compute_scores`, read from `<workdir>/confidences.npz` when it is there.

  The scores of frozen teachers on a fixed transfer set never change, so they are
  computed once and a resumed run reads them back (the official code's "teacher
  weight file").

  Raises:
    ValueError: when the cached file does not match the transfer set and the teachers.
  """
  n, k = len(setup.train.y), setup.num_teachers
  expected = {"mc": (n, k), "single": (n, k)}
  expected.update({f"logits_{j}": (n, len(c)) for j, c in enumerate(setup.chunks)})
  if (workdir_lib.as_path(workdir) / CONFIDENCE_FILE).is_file():
    logging.info("teacher scores: read %s", workdir_lib.as_path(workdir) / CONFIDENCE_FILE)
  return artifacts.cached_arrays(
    workdir, CONFIDENCE_FILE, lambda: compute_scores(setup, teachers), expected_shapes=expected
  )


# ----------------------------------------------------------------------------
# Stage 3: students (all variants share one compiled step)
# ----------------------------------------------------------------------------


def _softmax_np(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def merged_logits(logits: Sequence[np.ndarray], chunks, num_classes: int) -> np.ndarray:
  """Teachers' logits in the union label space: [N, C], a shared class gets their mean.

  Vanilla KD's input. With disjoint chunks in label order this is the concatenation; the
  official VKD "merges overlapping logits": here, per union class, the mean of the logits
  of the teachers whose label set holds it. Every class must be covered by some teacher.

  Args:
    logits: K arrays [N, C_k], teacher k's class i being union class chunks[k][i].
    chunks: K sequences of union class indices.
    num_classes: the union size C.
  """
  total = np.zeros((len(logits[0]), num_classes), np.float64)
  count = np.zeros(num_classes, np.int64)
  for z, chunk in zip(logits, chunks):
    total[:, list(chunk)] += z
    count[list(chunk)] += 1
  if not np.all(count):
    raise ValueError(
      f"classes {np.flatnonzero(count == 0).tolist()} belong to no teacher; accepted: label "
      "sets that cover the union"
    )
  return (total / count).astype(np.float32)


def _stacked(targets: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
  """A whole-row target [N, C] in the masked form: ([N, G, C] in group 0, [G, C] mask)."""
  n, c = targets.shape
  stacked = np.zeros((n, num_groups, c), np.float32)
  stacked[:, 0] = targets
  mask = np.zeros((num_groups, c), np.float32)
  mask[0] = 1.0
  return stacked, mask


def variant_targets(setup: Setup, variant: str, scores: dict[str, np.ndarray]) -> dict:
  """Per-example targets and loss settings of a student variant.

  Two forms, chosen by the setup (so every variant of a run shares one compiled step):
  disjoint label sets give the partition form, overlapping ones the masked form.

  Returns:
    A dict with

    - ``targets``: partition form [N, C] (for 'uhc' each teacher's slot sums to 1, the row
      to K); masked form [N, K, C], row k teacher k's distribution over its classes for
      'uhc', the whole target in row 0 for the other variants;
    - ``groups``: partition form [C] int32 label group of each class (softmax within a
      group); masked form [K, C] float32 0/1 membership (softmax within each row's
      classes);
    - ``weights`` [N]; ``temperature``, the student's softmax temperature; ``scale``, the
      loss factor.
  """
  cfg = setup.config
  n, c, k_num = len(setup.train.y), setup.num_classes, setup.num_teachers
  logits = [scores[f"logits_{k}"] for k in range(k_num)]
  settings = {"weights": np.ones(n, np.float32), "temperature": 1.0, "scale": 1.0}

  def whole_row(targets: np.ndarray, **extra) -> dict:
    """A target over all C classes (one softmax group), in the setup's form."""
    if setup.overlapping:
      stacked, mask = _stacked(targets, k_num)
      return {**settings, **extra, "targets": stacked, "groups": mask}
    return {**settings, **extra, "targets": targets, "groups": np.zeros(c, np.int32)}

  if variant == "oracle":
    return whole_row(np.eye(c, dtype=np.float32)[setup.train.y])
  if variant == "vanilla_kd":
    t = cfg.vanilla_kd.temperature
    targets = _softmax_np(merged_logits(logits, setup.chunks, c) / t)
    return whole_row(targets, temperature=t, scale=t * t)
  if variant == "uhc":
    t = cfg.uhc.temperature
    coefs = {"temperature": t, "scale": t * t}
    if setup.overlapping:
      targets = np.zeros((n, k_num, c), np.float32)
      for k, chunk in enumerate(setup.chunks):
        targets[:, k, list(chunk)] = _softmax_np(logits[k] / t)
      return {**settings, **coefs, "targets": targets, "groups": setup.membership()}
    targets = np.zeros((n, c), np.float32)
    groups = np.zeros(c, np.int32)
    for k, chunk in enumerate(setup.chunks):
      targets[:, list(chunk)] = _softmax_np(logits[k] / t)
      groups[list(chunk)] = k
    return {**settings, **coefs, "targets": targets, "groups": groups}
  if variant not in ("muki", "hard", "no_margin", "single_pass"):
    raise ValueError(f"variant={variant!r} is unknown; accepted: {', '.join(STUDENT_VARIANTS)}")
  m = cfg.muki
  mode = "hard" if variant == "hard" else m.integration
  conf = scores["single" if variant == "single_pass" else "mc"]
  probs = [jax.nn.softmax(jnp.asarray(z) / m.kd_temperature, axis=-1) for z in logits]
  targets = np.asarray(
    core.routing.integrate_teachers(
      probs,
      conf,
      mode=mode,
      temperature=m.score_temperature,
      label_index=[np.asarray(chunk) for chunk in setup.chunks],
      num_labels=c,
    )
  )
  weights = settings["weights"]
  if m.margin and variant != "no_margin":
    weights = np.asarray(core.routing.margin_weights(conf)) + MARGIN_EPSILON
  return whole_row(targets, weights=weights.astype(np.float32), temperature=m.kd_temperature)


def make_student_step(setup: Setup, tx: optax.GradientTransformation) -> Callable:
  """`jitted(state, step, x, targets, weights, groups, coefs)`, shared by every variant.

  loss = mean_i w_i · scale · KL(q_i, z_i / T); coefs: {'temperature', 'scale'}. Either the
  partition form (targets [N, C], groups [C] int32: `grouped_kl`) or the masked form
  (targets [N, K, C], groups [K, C] 0/1 mask: `masked_kl`), as `variant_targets` returns
  them; each form compiles once.
  """
  cfg, model = setup.config.student, setup.student_model
  base, num_groups = setup.key("student"), setup.num_teachers

  def step(state, step, x, targets, weights, groups, coefs):
    key = jax.random.fold_in(base, step)
    idx_key, drop_key = jax.random.split(key)
    idx = jax.random.randint(idx_key, (cfg.batch_size,), 0, x.shape[0])
    xb = setup.constrain(x[idx])

    def loss(logits):
      z = logits / coefs["temperature"]
      if groups.ndim == 1:  # static: the form is fixed by the argument shapes
        kl = core.losses.grouped_kl(targets[idx], z, groups, num_groups)
      else:
        kl = core.losses.masked_kl(targets[idx], z, groups)
      return jnp.mean(weights[idx] * kl) * coefs["scale"]

    state, value = steps.supervised_update(
      state, model, tx, xb, loss, rngs={"dropout": drop_key}, train=True, stochastic=True
    )
    return state, {"loss": value}

  return jax.jit(step, donate_argnums=0)


def train_student(
  setup: Setup, workdir: str, stage: str, step_fn: Callable, start: PyTree, writer
) -> tuple[dict, dict | None]:
  """Stage `<stage>`: one student from `start`; its checkpoint chosen on validation.

  With `student.select_checkpoints` = n > 1 the stage runs in n segments and keeps the
  checkpoint (of the n segment ends) with the best accuracy on the labelled validation
  split (`setup.val`; ties to the earlier), as the official code keeps its best evaluated
  checkpoint. Target test data is never looked at.

  Returns:
    ({'params', 'batch_stats'} of the chosen checkpoint, the selection record or None).
  """
  cfg = setup.config
  n = cfg.student.get("select_checkpoints", 1)
  # Copies: donation inside the loop must not invalidate the shared starting point.
  state = jax.tree.map(jnp.copy, start)
  _, kept = stages.run_in_segments(
    cfg,
    workdir,
    stage,
    step_fn,
    state,
    cfg.student.steps,
    n,
    writer=writer,
    stage_fields={},
    keep=lambda st: {"params": st["params"], "batch_stats": st["batch_stats"]},
  )
  if n == 1:
    return kept[-1][1], None
  scores = {
    step: float(np.mean(_predict(setup, setup.student_model, v, setup.val.x) == setup.val.y))
    for step, v in kept
  }
  best = stages.choose(scores)
  record = {
    "checkpoint_step": best,
    "val_accuracy": scores[best],
    "scores": {f"step{step}": acc for step, acc in scores.items()},
  }
  return dict(kept)[best], record


# ----------------------------------------------------------------------------
# Stage 4: evaluation
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _predict_batch(model: models.DropoutClassifier, variables: dict, xb: jax.Array) -> jax.Array:
  # `model` is static (Linen modules hash by their fields): one compile per architecture.
  return jnp.argmax(model.apply(variables, xb, train=False), axis=-1)


def _predict(
  setup: Setup, model: models.DropoutClassifier, variables: dict, x: np.ndarray
) -> np.ndarray:
  """Argmax predictions [N] of `model` (eval mode, dropout off)."""
  predict = functools.partial(_predict_batch, model, variables)
  return evaluation.map_batched(predict, x, setup.config.eval_batch_size)


def evaluate_student_outcomes(setup: Setup, variables: dict) -> tuple[dict, dict]:
  """`evaluate_student`'s metrics and per-example outcomes ({'union', 'subset_k'}: outcomes)."""
  y = setup.test.y
  pred = _predict(setup, setup.student_model, variables, setup.test.x)
  per_example = {"union": results_lib.outcomes(pred, y)}
  for k, chunk in enumerate(setup.chunks):
    mask = np.isin(y, chunk)
    per_example[f"subset_{k}"] = results_lib.outcomes(pred[mask], y[mask])
  out = {name: {"accuracy": results_lib.accuracy(o)} for name, o in per_example.items()}
  out["mean"] = {"accuracy": out["union"]["accuracy"]}
  return out, per_example


def evaluate_student(setup: Setup, variables: dict) -> dict:
  """Accuracy over the union labels and on each teacher's label set (test split).

  With overlapping label sets the subsets overlap (a shared class counts in both).
  """
  return evaluate_student_outcomes(setup, variables)[0]


def evaluate_teacher_outcomes(setup: Setup, k: int, variables: dict) -> tuple[dict, dict]:
  """`evaluate_teacher`'s metrics and per-example outcomes ({'subset_k': outcomes})."""
  chunk = np.asarray(setup.chunks[k])
  mask = np.isin(setup.test.y, chunk)
  pred = _predict(setup, setup.teacher_models[k], variables, setup.test.x[mask])
  outcomes = results_lib.outcomes(chunk[pred], setup.test.y[mask])
  acc = results_lib.accuracy(outcomes)
  return {f"subset_{k}": {"accuracy": acc}, "mean": {"accuracy": acc}}, {f"subset_{k}": outcomes}


def evaluate_teacher(setup: Setup, k: int, variables: dict) -> dict:
  """Teacher k's accuracy on the test examples of its own classes (argmax over them)."""
  return evaluate_teacher_outcomes(setup, k, variables)[0]


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


# The config fields each reusable stage depends on (see train/stage_cache.py). Teachers do
# not depend on the run's seed nor on anything about the student.
TEACHER_FIELDS = (
  "data.benchmark",
  "data.options",
  "data.benchmark_seed",
  "data.domain",
  "data.train_per_class",
  "model",
  "teachers",
  "num_devices",
)


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md.

  `setup` (from `make_setup(config)`) may be passed when the caller already built it.
  """
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  logging.info(
    "muka: %d teachers on %s, %d transfer / %d test examples of %s",
    setup.num_teachers,
    setup.chunks,
    len(setup.train.y),
    len(setup.test.y),
    setup.domain,
  )
  writer = metrics_lib.MetricWriter(workdir)

  # 1-2. Teachers, then their scores on the transfer set (once).
  teachers = train_teachers(setup, workdir, writer)
  scores = teacher_scores(setup, teachers, workdir)

  # 3. Students, one stage per variant, all from the same initialisation.
  tx = optax.adam(config.student.lr)
  start = init_model(setup.student_model, setup.key("student_init"), setup.input_shape, tx)
  start = mesh_lib.replicate(start, setup.mesh)
  step_fn = make_student_step(setup, tx)
  rep = mesh_lib.replicated(setup.mesh)
  metrics, per_example, selection = {}, {}, {}
  for variant in config.variants:
    if variant == "teachers":
      for k, variables in enumerate(teachers):
        name = f"teacher_{k}"
        metrics[name], per_example[name] = evaluate_teacher_outcomes(setup, k, variables)
      continue
    t = variant_targets(setup, variant, scores)
    arrays = jax.device_put(
      (
        t["targets"].astype(np.float32),
        t["weights"].astype(np.float32),
        t["groups"],
        {"temperature": np.float32(t["temperature"]), "scale": np.float32(t["scale"])},
      ),
      rep,
    )
    bound = stages.bind(step_fn, setup.x_train, *arrays)
    variables, chosen = train_student(setup, workdir, variant, bound, start, writer)
    if chosen is not None:
      selection[variant] = chosen
    metrics[variant], per_example[variant] = evaluate_student_outcomes(setup, variables)
  writer.close()

  mc, single = scores["mc"], scores["single"]
  return {
    "method": "muka",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "target_domains": [setup.domain],
    "teacher_classes": [[setup.class_names[c] for c in chunk] for chunk in setup.chunks],
    "teacher_labels": [list(chunk) for chunk in setup.chunks],  # global class indices
    "overlap": config.teachers.get("overlap", 0),
    "num_examples": {"transfer": len(setup.train.y), "test": len(setup.test.y)},
    "confidences": {
      # How often the most confident teacher is one that owns (knows) the gold label.
      "mc_selects_owner": _owner_rate(setup, mc),
      "single_selects_owner": _owner_rate(setup, single),
      "mc_mean": [float(v) for v in mc.mean(axis=0)],
      "single_mean": [float(v) for v in single.mean(axis=0)],
    },
    "metrics": metrics,
    "selection": selection,
    results_lib.PER_EXAMPLE: per_example,
  }


def _owner_rate(setup: Setup, confidences: np.ndarray) -> float:
  """Fraction of transfer examples whose most confident teacher knows the gold label."""
  knows = setup.membership() > 0  # [K, C]
  return float(np.mean(knows[np.argmax(confidences, axis=1), setup.train.y]))
