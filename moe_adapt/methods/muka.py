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

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from moe_adapt import core, models
from moe_adapt.methods.muka_setup import INTEGRATION_MODES as INTEGRATION_MODES
from moe_adapt.methods.muka_setup import (
  STUDENT_VARIANTS,
  PyTree,
  Setup,
  init_model,
  make_setup,
  validate_config,
)
from moe_adapt.methods.muka_stages import (
  evaluate_student_outcomes,
  evaluate_teacher_outcomes,
  merged_logits,
  owner_rate,
  softmax_np,
  train_student,
  train_teachers,
  uhc_targets,
)
from moe_adapt.train import artifacts, evaluation, stages, steps
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import workdir as workdir_lib

CONFIDENCE_FILE = "confidences.npz"
# The official code adds this to the margin so that no example's weight is exactly 0.
MARGIN_EPSILON = 1e-6


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


def _stacked(targets: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
  """A whole-row target [N, C] in the masked form: ([N, G, C] in group 0, [G, C] mask)."""
  n, c = targets.shape
  stacked = np.zeros((n, num_groups, c), np.float32)
  stacked[:, 0] = targets
  mask = np.zeros((num_groups, c), np.float32)
  mask[0] = 1.0
  return stacked, mask


def integrated_targets(
  setup: Setup, variant: str, scores: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray | None]:
  """MUKI's integration for 'muki', 'hard', 'no_margin', 'single_pass': (targets [N, C],
  margin weights [N] or None), from the teachers' softened logits and their scores."""
  m = setup.config.muki
  mode = "hard" if variant == "hard" else m.integration
  conf = scores["single" if variant == "single_pass" else "mc"]
  logits = [scores[f"logits_{k}"] for k in range(setup.num_teachers)]
  probs = [jax.nn.softmax(jnp.asarray(z) / m.kd_temperature, axis=-1) for z in logits]
  targets = np.asarray(
    core.routing.integrate_teachers(
      probs,
      conf,
      mode=mode,
      temperature=m.score_temperature,
      label_index=[np.asarray(chunk) for chunk in setup.chunks],
      num_labels=setup.num_classes,
    )
  )
  if not m.margin or variant == "no_margin":
    return targets, None
  return targets, np.asarray(core.routing.margin_weights(conf)) + MARGIN_EPSILON


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
    targets = softmax_np(merged_logits(logits, setup.chunks, c) / t)
    return whole_row(targets, temperature=t, scale=t * t)
  if variant == "uhc":
    return uhc_targets(setup, logits, settings)
  if variant not in ("muki", "hard", "no_margin", "single_pass"):
    raise ValueError(f"variant={variant!r} is unknown; accepted: {', '.join(STUDENT_VARIANTS)}")
  targets, margins = integrated_targets(setup, variant, scores)
  weights = settings["weights"] if margins is None else margins
  return whole_row(targets, weights=weights.astype(np.float32), temperature=cfg.muki.kd_temperature)


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
    xb = mesh_lib.constrain_batch(x[idx], setup.mesh)

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


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


def train_students(
  setup: Setup,
  workdir: str,
  writer,
  teachers: Sequence[dict],
  scores: dict[str, np.ndarray],
  *,
  init: Callable[[optax.GradientTransformation], PyTree] | None = None,
) -> tuple[dict, dict, dict]:
  """Stage 3 and 4: one student stage per variant, all from the same initialisation, and
  the evaluations (`teachers`: each teacher's). Returns (metrics, per_example, selection).

  `init(tx)` gives the students' common starting state ({'params', 'batch_stats',
  'opt_state'}; e.g. pretrained layers, `methods.muka_ft`); None = a fresh initialisation.
  """
  config = setup.config
  tx = optax.adam(config.student.lr)
  if init is None:
    start = init_model(setup.student_model, setup.key("student_init"), setup.input_shape, tx)
  else:
    start = init(tx)
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
  return metrics, per_example, selection


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
  teachers = train_teachers(setup, workdir, writer)  # 1. teachers
  scores = teacher_scores(setup, teachers, workdir)  # 2. their scores (once)
  metrics, per_example, selection = train_students(setup, workdir, writer, teachers, scores)
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
      "mc_selects_owner": owner_rate(setup, mc),
      "single_selects_owner": owner_rate(setup, single),
      "mc_mean": [float(v) for v in mc.mean(axis=0)],
      "single_mean": [float(v) for v in single.mean(axis=0)],
    },
    "metrics": metrics,
    "selection": selection,
    results_lib.PER_EXAMPLE: per_example,
  }
