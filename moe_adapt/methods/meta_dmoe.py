"""Meta-DMoE: meta-distillation from a mixture of domain experts.

Zhong, Chi, Gu, Wang, Yu, Tang. "Meta-DMoE: Adapting to Domain Shift by
Meta-Distillation from Mixture-of-Experts", NeurIPS 2022.

Stages (each checkpointed under `<workdir>/checkpoints/<stage>` and skipped
when finished):

1. `experts`: N experts, one per super-domain (a seeded random partition of
   the source domains), stored stacked on a leading axis and trained together
   in one compiled step by a map over the expert axis.
2. `aggregator`: the aggregator (a transformer over the N expert feature
   tokens of one example) pretrained with CE through a temporary head.
3. `student`: the student pretrained by ERM on all source data.
4. `meta`: bi-level training on single-domain episodes. The in-domain expert is
   masked; one (or more) inner SGD step(s) on the unlabeled support distil the
   aggregated expert features into the student's feature extractor; the outer
   CE on the labeled query after adaptation is differentiated to second order
   into the student (θ_e, θ_c) and the aggregator φ, which have separate Adam
   optimisers. BatchNorm statistics stay frozen (running averages).
5. Test-time adaptation on k unlabeled samples of each held-out domain, then
   prediction of the domain's test split with the adapted student.

The experts are frozen after stage 1, so their features on all data are
computed once and cached on device: a meta-step runs only the student and the
aggregator (the official code re-runs every expert on every episode).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_adapt import core, data, models
from moe_adapt.methods import _checks
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import stages

PyTree = Any

_DISTILL = ("features", "logits", "both")
_STACK_MAPS = ("auto", "unrolled", "map", "vmap")


# ----------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------


def validate_config(config) -> None:
  """Checks every field this method reads; raises ValueError naming the field."""

  def positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}={value!r} is invalid; accepted: an integer >= 1")

  def positive_float(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
      raise ValueError(f"{name}={value!r} is invalid; accepted: a number > 0")

  if not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f"seed={config.seed!r} is invalid; accepted: an integer >= 0")
  for name in (
    "experts.num_experts",
    "experts.steps",
    "experts.batch_size",
    "aggregator.pretrain_steps",
    "aggregator.batch_size",
    "aggregator.depth",
    "aggregator.num_heads",
    "student.steps",
    "student.batch_size",
    "meta.steps",
    "meta.support_size",
    "meta.query_size",
    "meta.inner_steps",
    "adapt.support_size",
    "adapt.repeats",
    "eval_batch_size",
    "checkpoint_every",
    "log_every",
  ):
    group, _, field = name.rpartition(".")
    value = config[group][field] if group else config[field]
    positive_int(name, value)
  for name in ("experts.lr", "aggregator.lr", "student.lr", "meta.inner_lr", "meta.student_lr"):
    group, field = name.split(".")
    positive_float(name, config[group][field])
  if not isinstance(config.meta.aggregator_lr, (int, float)) or config.meta.aggregator_lr < 0:
    raise ValueError(
      f"meta.aggregator_lr={config.meta.aggregator_lr!r} is invalid; accepted: a number >= 0"
    )
  if config.meta.distill not in _DISTILL:
    raise ValueError(
      f"meta.distill={config.meta.distill!r} is unknown; accepted: {', '.join(_DISTILL)}"
    )
  if config.experts.stack_map not in _STACK_MAPS:
    raise ValueError(
      f"experts.stack_map={config.experts.stack_map!r} is unknown; "
      f"accepted: {', '.join(_STACK_MAPS)}"
    )
  if config.aggregator.kind not in ("transformer", "mean", "max"):
    raise ValueError(
      f"aggregator.kind={config.aggregator.kind!r} is unknown; accepted: transformer, mean, max"
    )
  _checks.compute_dtype(config)
  if not isinstance(config.num_devices, int) or config.num_devices < 0:
    raise ValueError(
      f"num_devices={config.num_devices!r} is invalid; accepted: 0 (all devices) or a count"
    )


# ----------------------------------------------------------------------------
# Setup: data on device, models, super-domains
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the stages share, derived from the config and the data."""

  config: Any
  benchmark: Any
  sources: tuple[str, ...]
  targets: tuple[str, ...]
  splits: dict  # domain -> data.DomainSplits (host NumPy)
  mesh: jax.sharding.Mesh
  model: models.Classifier
  agg_model: models.AggregatorClassifier
  x: jax.Array  # [N_src, H, W, C] source training images, replicated
  y: jax.Array  # [N_src] int32
  index: Any  # data.DomainIndex over the source domains
  expert_of_domain: jax.Array  # [D_src] int32: the expert whose super-domain holds each domain
  expert_pools: jax.Array  # [E, max_pool] int32 example indices per expert (padded)
  pool_sizes: jax.Array  # [E] int32
  super_domains: tuple[tuple[str, ...], ...]

  @property
  def num_experts(self) -> int:
    return self.config.experts.num_experts

  def key(self, stage: str) -> jax.Array:
    """The PRNG key of a stage; steps fold their index into it."""
    stage_ids = {"init": 0, "experts": 1, "aggregator": 2, "student": 3, "meta": 4, "adapt": 5}
    return jax.random.fold_in(jax.random.key(self.config.seed), stage_ids[stage])

  def batch_sharding(self, ndim: int, leading: int = 0) -> NamedSharding:
    """Shards axis `leading` of a rank-`ndim` batch over the data axis."""
    spec = [None] * ndim
    spec[leading] = "data"
    return NamedSharding(self.mesh, P(*spec))

  def constrain(self, x: jax.Array, leading: int = 0) -> jax.Array:
    if self.mesh.size == 1 or x.shape[leading] % self.mesh.size:
      return x
    return jax.lax.with_sharding_constraint(x, self.batch_sharding(x.ndim, leading))


def resolve_domains(config, benchmark) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(sources, targets) from the config, validated against the benchmark."""
  targets = tuple(config.data.target_domains) or tuple(benchmark.default_targets)
  sources = tuple(config.data.source_domains) or tuple(
    d for d in benchmark.domains if d not in targets
  )
  benchmark.check_domains(sources, targets)
  if config.experts.num_experts > len(sources):
    raise ValueError(
      f"experts.num_experts={config.experts.num_experts} exceeds the number of source "
      f"domains ({len(sources)}: {', '.join(sources)}); accepted: 1..{len(sources)}"
    )
  return sources, targets


def whole_domain(splits) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) of all of a domain's images: train, val and test splits together."""
  x = np.concatenate([splits.train.x, splits.val.x, splits.test.x])
  y = np.concatenate([splits.train.y, splits.val.y, splits.test.y])
  return x, y


def partition_domains(sources: tuple[str, ...], num_experts: int, seed: int):
  """Random partition of the source domains into `num_experts` super-domains.

  As in the official code: shuffle with the seed, cut into nearly equal
  contiguous chunks.
  """
  order = np.random.default_rng(seed).permutation(len(sources))
  chunks = np.array_split(order, num_experts)
  return tuple(tuple(sources[i] for i in sorted(c)) for c in chunks)


def make_setup(config) -> Setup:
  """Loads data, checks sizes against the config, builds models and device arrays."""
  options = {k: v for k, v in config.data.options.to_dict().items() if v != ""}
  benchmark = data.get_benchmark(config.data.benchmark, **options)
  sources, targets = resolve_domains(config, benchmark)
  splits = benchmark.load(seed=config.seed)

  smallest = min(len(splits[d].train.y) for d in sources)
  episode = config.meta.support_size + config.meta.query_size
  if episode > smallest:
    raise ValueError(
      f"meta.support_size + meta.query_size = {episode} exceeds the smallest source domain "
      f"({smallest} training examples); accepted: at most {smallest}"
    )
  for d in targets:
    n = len(whole_domain(splits[d])[1])
    if config.adapt.support_size > n:
      raise ValueError(
        f"adapt.support_size={config.adapt.support_size} exceeds target domain {d!r} "
        f"({n} unlabeled examples); accepted: at most {n}"
      )

  mesh = mesh_lib.make_mesh(config.num_devices or None)
  # model.dtype: the backbones and the aggregator compute in it; parameters, BatchNorm
  # statistics, optimiser state, heads (float32 logits) and losses stay float32.
  dtype = _checks.compute_dtype(config)
  options = config.model.options.to_dict()
  if dtype != jnp.float32:
    options["dtype"] = dtype
  backbone = models.get_backbone(config.model.backbone, **options)
  model = models.Classifier(backbone=backbone, num_classes=benchmark.num_classes)
  agg_model = models.AggregatorClassifier(
    aggregator=models.Aggregator(
      kind=config.aggregator.kind,
      depth=config.aggregator.depth,
      num_heads=config.aggregator.num_heads,
      mlp_ratio=config.aggregator.mlp_ratio,
      dropout=config.aggregator.dropout,
      dtype=dtype,
    ),
    num_classes=benchmark.num_classes,
  )

  source, domain_ids, index = data.concat_domains([splits[d].train for d in sources])
  super_domains = partition_domains(sources, config.experts.num_experts, config.seed)
  expert_of = {d: k for k, group in enumerate(super_domains) for d in group}
  expert_of_domain = np.array([expert_of[d] for d in sources], np.int32)
  pools = [
    np.flatnonzero(np.isin(domain_ids, [sources.index(d) for d in g])) for g in super_domains
  ]
  max_pool = max(len(p) for p in pools)
  padded = np.stack([np.pad(p, (0, max_pool - len(p))) for p in pools]).astype(np.int32)

  rep = mesh_lib.replicated(mesh)
  return Setup(
    config=config,
    benchmark=benchmark,
    sources=sources,
    targets=targets,
    splits=splits,
    mesh=mesh,
    model=model,
    agg_model=agg_model,
    x=jax.device_put(source.x, rep),
    y=jax.device_put(source.y.astype(np.int32), rep),
    index=index,
    expert_of_domain=jnp.asarray(expert_of_domain),
    expert_pools=jnp.asarray(padded),
    pool_sizes=jnp.asarray([len(p) for p in pools], jnp.int32),
    super_domains=super_domains,
  )


def _unrolled_map(fn: Callable, xs):
  """`jax.lax.map` as an unrolled scan: one traced body, straight-line code."""
  _, ys = jax.lax.scan(lambda carry, x: (carry, fn(x)), None, xs, unroll=True)
  return ys


def _stack_map(setup: Setup) -> Callable:
  """`fn, xs -> stacked outputs` over the expert axis.

  Measured on XLA:CPU (2 cores, 5 ConvNet experts, batch 64; see
  benchmarks/stacked_experts.py): vmap over convolution kernels becomes a
  grouped convolution (~12x slower than a map, reference/performance_notes.md
  §2), and the *gradient* of a rolled `lax.map` (a while loop) is 14-20x slower
  than the same scan unrolled, so 'auto' picks the unrolled scan on CPU and vmap
  on accelerators, where grouped convolutions are fast.
  """
  choice = setup.config.experts.stack_map
  if choice == "auto":
    choice = "unrolled" if jax.default_backend() == "cpu" else "vmap"
  if choice == "unrolled":
    return _unrolled_map
  if choice == "map":
    return jax.lax.map
  return lambda fn, xs: jax.vmap(fn)(xs)


# ----------------------------------------------------------------------------
# Stage 1: experts, trained together
# ----------------------------------------------------------------------------


def init_experts(setup: Setup, tx: optax.GradientTransformation) -> PyTree:
  """Stacked expert variables [E, ...] and their optimiser state."""
  sample = jnp.zeros((1, *setup.benchmark.input_shape), jnp.float32)
  keys = jax.random.split(setup.key("init"), setup.num_experts)
  variables = jax.vmap(lambda k: setup.model.init(k, sample, train=False))(keys)
  params, stats = variables["params"], variables.get("batch_stats", {})
  return {"params": params, "batch_stats": stats, "opt_state": tx.init(params)}


def make_expert_step(setup: Setup, tx: optax.GradientTransformation) -> Callable:
  """One jitted SGD step of all experts, each on a batch from its super-domain."""
  cfg = setup.config.experts
  model, stack_map = setup.model, _stack_map(setup)

  def loss_one(args):
    params, stats, xb, yb = args
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
    )
    return core.losses.cross_entropy(logits, yb).mean(), updates["batch_stats"]

  def step(state, step, x, y, pools, pool_sizes):
    key = jax.random.fold_in(setup.key("experts"), step)
    u = jax.random.randint(key, (setup.num_experts, cfg.batch_size), 0, pool_sizes[:, None])
    idx = jnp.take_along_axis(pools, u, axis=1)  # [E, B]
    xb = setup.constrain(x[idx], leading=1)
    yb = y[idx]

    def total(params):
      losses, stats = stack_map(loss_one, (params, state["batch_stats"], xb, yb))
      return losses.sum(), (losses, stats)

    (_, (losses, stats)), grads = jax.value_and_grad(total, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "batch_stats": stats, "opt_state": opt_state}
    return new, {"loss": losses.mean(), "loss_max": losses.max()}

  return stages.bind(
    jax.jit(step, donate_argnums=0), setup.x, setup.y, setup.expert_pools, setup.pool_sizes
  )


def expert_features(setup: Setup, experts: PyTree, x: np.ndarray) -> jax.Array:
  """Features of every expert on `x`: [E, N, D], computed in eval batches."""
  model, stack_map = setup.model, _stack_map(setup)

  @jax.jit
  def features(params, stats, xb):
    def one(args):
      p, s = args
      return model.apply(
        {"params": p, "batch_stats": s}, xb, train=False, method=models.Classifier.features
      )

    return stack_map(one, (params, stats))

  outs = [
    features(experts["params"], experts["batch_stats"], xb)
    for xb in _eval_batches(x, setup.config.eval_batch_size)
  ]
  return jnp.concatenate(outs, axis=1)[:, : len(x)]


def _eval_batches(x: np.ndarray, batch_size: int):
  """Fixed-size batches (the last one padded) so evaluation compiles once."""
  for start in range(0, len(x), batch_size):
    xb = x[start : start + batch_size]
    if len(xb) < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - len(xb), *xb.shape[1:]), xb.dtype)])
    yield xb


# ----------------------------------------------------------------------------
# Stage 2: aggregator pretraining; stage 3: ERM student
# ----------------------------------------------------------------------------


def make_aggregator_step(setup: Setup, tx, feats: jax.Array) -> Callable:
  """CE through the aggregator's pretraining head, all experts, all source data."""
  cfg = setup.config.aggregator

  def step(state, step, y, feats):
    key = jax.random.fold_in(setup.key("aggregator"), step)
    k_idx, k_drop = jax.random.split(key)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, y.shape[0])
    tokens = setup.constrain(jnp.swapaxes(feats[:, idx], 0, 1))  # [B, E, D]

    def loss_fn(params):
      logits = setup.agg_model.apply(
        {"params": params}, tokens, deterministic=False, rngs={"dropout": k_drop}
      )
      return core.losses.cross_entropy(logits, y[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, {"loss": loss}

  return stages.bind(jax.jit(step, donate_argnums=0), setup.y, feats)


def make_student_step(setup: Setup, tx) -> Callable:
  """ERM on all source data (BatchNorm in training mode)."""
  cfg = setup.config.student

  def step(state, step, x, y):
    key = jax.random.fold_in(setup.key("student"), step)
    idx = jax.random.randint(key, (cfg.batch_size,), 0, y.shape[0])
    xb = setup.constrain(x[idx])

    def loss_fn(params):
      logits, updates = setup.model.apply(
        {"params": params, "batch_stats": state["batch_stats"]},
        xb,
        train=True,
        mutable=["batch_stats"],
      )
      return core.losses.cross_entropy(logits, y[idx]).mean(), updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": stats, "opt_state": opt_state}, {"loss": loss}

  return stages.bind(jax.jit(step, donate_argnums=0), setup.x, setup.y)


# ----------------------------------------------------------------------------
# Stage 4: meta-training, and the distillation loss shared with adaptation
# ----------------------------------------------------------------------------


def make_losses(setup: Setup) -> tuple[Callable, Callable]:
  """(inner_loss, outer_loss) in the `core.meta` signature `fn(params, batch, context)`.

  params: the student's {'backbone', 'head'}; context: the aggregator's params.
  inner batch: {'x', 'tokens' [S, E, D], 'mask' [E], 'batch_stats'};
  outer batch: {'x', 'y', 'batch_stats'}. BatchNorm statistics ride in the
  batch: they are frozen (not adapted, no gradient).
  """
  model, agg_model = setup.model, setup.agg_model
  distill = setup.config.meta.distill

  def inner_loss(params, batch, context):
    variables = {"params": params, "batch_stats": batch["batch_stats"]}
    feats = model.apply(variables, batch["x"], train=False, method=models.Classifier.features)
    target = agg_model.apply(
      {"params": context},
      batch["tokens"],
      batch["mask"],
      method=models.AggregatorClassifier.aggregate,
    )
    loss = 0.0
    if distill in ("features", "both"):
      # In float32 also when the models compute in bfloat16 (model.dtype).
      f32 = jnp.float32
      loss += core.losses.feature_mse(feats.astype(f32), target.astype(f32)).mean()
    if distill in ("logits", "both"):
      # The teacher's logits: the aggregator's pretraining head on the aggregated feature.
      teacher = agg_model.apply(
        {"params": context}, batch["tokens"], batch["mask"], deterministic=True
      )
      student = model.apply({"params": params}, feats, method=models.Classifier.classify)
      loss += core.losses.kl_divergence(teacher, student).mean()
    return loss

  def outer_loss(params, batch, context):
    del context  # The aggregator reaches the outer loss only through the inner step.
    variables = {"params": params, "batch_stats": batch["batch_stats"]}
    logits = model.apply(variables, batch["x"], train=False)
    return core.losses.cross_entropy(logits, batch["y"]).mean()

  return inner_loss, outer_loss


def make_meta_step(setup: Setup, tx_student, tx_agg, feats: jax.Array) -> Callable:
  """One second-order meta-step on one single-domain episode."""
  cfg = setup.config.meta
  inner_loss, outer_loss = make_losses(setup)
  experts = jnp.arange(setup.num_experts)

  def step(state, step, x, y, feats, offsets, sizes, expert_of_domain):
    key = jax.random.fold_in(setup.key("meta"), step)
    index = setup.index._replace(offsets=offsets, sizes=sizes)
    ep = data.sample_episode(key, index, support_size=cfg.support_size, query_size=cfg.query_size)
    if cfg.mask_in_domain_expert:
      mask = experts != expert_of_domain[ep.domain]
    else:
      mask = jnp.ones_like(experts, dtype=bool)
    stats = state["batch_stats"]
    support = {
      "x": setup.constrain(x[ep.support_idx]),
      "tokens": setup.constrain(jnp.swapaxes(feats[:, ep.support_idx], 0, 1)),
      "mask": mask,
      "batch_stats": stats,
    }
    query = {
      "x": setup.constrain(x[ep.query_idx]),
      "y": y[ep.query_idx],
      "batch_stats": stats,
    }
    loss, (g_student, g_agg) = core.meta.meta_value_and_grad(
      outer_loss,
      inner_loss,
      state["student"],
      support,
      query,
      lr=cfg.inner_lr,
      steps=cfg.inner_steps,
      first_order=cfg.first_order,
      context=state["aggregator"],
      remat=cfg.remat,
    )
    upd_s, opt_s = tx_student.update(g_student, state["opt_student"], state["student"])
    upd_a, opt_a = tx_agg.update(g_agg, state["opt_aggregator"], state["aggregator"])
    new = {
      "student": optax.apply_updates(state["student"], upd_s),
      "aggregator": optax.apply_updates(state["aggregator"], upd_a),
      "batch_stats": stats,
      "opt_student": opt_s,
      "opt_aggregator": opt_a,
    }
    agg_norm = optax.tree.norm(g_agg) if jax.tree.leaves(g_agg) else jnp.zeros(())
    return new, {"loss": loss, "grad_norm_aggregator": agg_norm}

  return stages.bind(
    jax.jit(step, donate_argnums=0),
    setup.x,
    setup.y,
    feats,
    setup.index.offsets,
    setup.index.sizes,
    setup.expert_of_domain,
  )


# ----------------------------------------------------------------------------
# Stage 5: test-time adaptation and evaluation
# ----------------------------------------------------------------------------


def make_adapt_fn(setup: Setup) -> Callable:
  """(student, batch_stats, aggregator, x_support, tokens) -> adapted student params."""
  cfg = setup.config.meta
  inner_loss, _ = make_losses(setup)
  all_experts = jnp.ones((setup.num_experts,), bool)  # no masking at test time

  @jax.jit
  def adapt(student, stats, aggregator, xs, tokens):
    batch = {"x": xs, "tokens": tokens, "mask": all_experts, "batch_stats": stats}
    return core.meta.inner_adapt(
      inner_loss,
      student,
      batch,
      lr=cfg.inner_lr,
      steps=cfg.inner_steps,
      first_order=True,  # no meta-gradient needed at test time
      context=aggregator,
    )

  return adapt


def _accuracy(predict: Callable, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
  preds = [np.asarray(predict(xb)) for xb in _eval_batches(x, batch_size)]
  return float(np.mean(np.concatenate(preds)[: len(y)] == y))


def evaluate(setup: Setup, experts, aggregator_pre, student_erm, meta_state) -> dict:
  """Accuracy of every variant on every target domain (all of its images)."""
  model = setup.model
  head_of_experts = jax.jit(
    lambda heads, f: jax.vmap(
      lambda h, fe: model.apply({"params": {"head": h}}, fe, method=models.Classifier.classify)
    )(heads, f)
  )

  def expert_outputs(x: np.ndarray) -> tuple[jax.Array, jax.Array]:
    f = expert_features(setup, experts, x)  # [E, N, D]
    return f, head_of_experts(experts["params"]["head"], f)

  return evaluate_with(setup, expert_outputs, aggregator_pre, student_erm, meta_state)


def evaluate_with(
  setup: Setup,
  expert_outputs: Callable[[np.ndarray], tuple[jax.Array, jax.Array]],
  aggregator_pre,
  student_erm,
  meta_state,
) -> dict:
  """`evaluate` with the frozen experts given as a function.

  Args:
    setup: the run's setup.
    expert_outputs: images [N, H, W, C] -> (features [E, N, D], logits [E, N, C]) of the
      E experts (any kind of expert: the features feed the aggregator, the logits the
      `expert_average` variant).
    aggregator_pre: the pretrained aggregator's params.
    student_erm: the ERM student's {'params', 'batch_stats', ...}.
    meta_state: the meta-training state ({'student', 'aggregator', 'batch_stats', ...}).

  Returns:
    variant -> {domain: {'accuracy', ...}, 'mean': {'accuracy'}}.
  """
  cfg = setup.config
  model, agg_model = setup.model, setup.agg_model
  adapt = make_adapt_fn(setup)

  @jax.jit
  def student_predict(params, stats, xb):
    logits = model.apply({"params": params, "batch_stats": stats}, xb, train=False)
    return jnp.argmax(logits, -1)

  @jax.jit
  def expert_predict(tokens_logits):
    return jnp.argmax(jax.nn.softmax(tokens_logits, -1).mean(0), -1)

  agg_predict = jax.jit(
    lambda params, tokens: jnp.argmax(agg_model.apply({"params": params}, tokens), -1)
  )

  variants: dict[str, dict] = {
    k: {}
    for k in (
      "erm",
      "expert_average",
      "aggregator_head",
      "aggregator_pretrained",
      "meta_unadapted",
      "meta_dmoe",
    )
  }
  erm_stats = student_erm["batch_stats"]
  for d_idx, domain in enumerate(setup.targets):
    # The whole target domain is predicted (its labels are never used for
    # training), as in the paper's protocol; the unlabeled support for
    # adaptation is drawn from the same images (transductive, as in the
    # official evaluator).
    x_test, y_test = whole_domain(setup.splits[domain])
    f_test, expert_logits = expert_outputs(x_test)  # [E, N, D], [E, N, C]
    variants["expert_average"][domain] = {
      "accuracy": float(np.mean(np.asarray(expert_predict(expert_logits)) == y_test))
    }
    tokens_test = jnp.swapaxes(f_test, 0, 1)
    variants["aggregator_head"][domain] = {
      "accuracy": float(np.mean(np.asarray(agg_predict(aggregator_pre, tokens_test)) == y_test))
    }

    def acc_of(params, stats, x=x_test, y=y_test):
      return _accuracy(functools.partial(student_predict, params, stats), x, y, cfg.eval_batch_size)

    variants["erm"][domain] = {"accuracy": acc_of(student_erm["params"], erm_stats)}
    variants["meta_unadapted"][domain] = {
      "accuracy": acc_of(meta_state["student"], meta_state["batch_stats"])
    }

    pool, f_pool = x_test, f_test
    runs = {"aggregator_pretrained": [], "meta_dmoe": []}
    for r in range(cfg.adapt.repeats):
      key = jax.random.fold_in(jax.random.fold_in(setup.key("adapt"), d_idx), r)
      idx = np.asarray(jax.random.permutation(key, len(pool))[: cfg.adapt.support_size])
      xs, tokens = pool[idx], jnp.swapaxes(f_pool[:, idx], 0, 1)
      adapted = adapt(student_erm["params"], erm_stats, aggregator_pre, xs, tokens)
      runs["aggregator_pretrained"].append(acc_of(adapted, erm_stats))
      adapted = adapt(
        meta_state["student"], meta_state["batch_stats"], meta_state["aggregator"], xs, tokens
      )
      runs["meta_dmoe"].append(acc_of(adapted, meta_state["batch_stats"]))
    for name, accs in runs.items():
      variants[name][domain] = {"accuracy": float(np.mean(accs)), "accuracy_per_draw": accs}

  for per_domain in variants.values():
    per_domain["mean"] = {
      "accuracy": float(np.mean([per_domain[d]["accuracy"] for d in setup.targets]))
    }
  return variants


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


# The config fields each reusable stage depends on (see train/stage_cache.py);
# meta-training, the last stage, is what ablations vary and is never shared.
STAGE_FIELDS = {
  "experts": ("seed", "data", "model", "experts", "num_devices"),
  "aggregator": (
    "seed",
    "data",
    "model",
    "experts",
    "aggregator",
    "eval_batch_size",
    "num_devices",
  ),
  "student": ("seed", "data", "model", "student", "num_devices"),
}


class Trained(NamedTuple):
  """The states of stages 2-4 (each as `stages.run_stage` returns it)."""

  aggregator: PyTree  # {'params', 'opt_state'}
  student: PyTree  # the ERM student: {'params', 'batch_stats', 'opt_state'}
  meta: PyTree  # {'student', 'aggregator', 'batch_stats', 'opt_student', 'opt_aggregator'}


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md.

  `setup` (from `make_setup(config)`) may be passed when the caller already
  built it to check the inputs.
  """
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  logging.info("super-domains: %s", setup.super_domains)
  writer = metrics_lib.MetricWriter(workdir)

  # 1. Experts.
  tx = optax.adam(config.experts.lr)
  experts = mesh_lib.replicate(init_experts(setup, tx), setup.mesh)
  experts = stages.run_stage(
    config,
    workdir,
    "experts",
    make_expert_step(setup, tx),
    experts,
    config.experts.steps,
    writer=writer,
    stage_fields=STAGE_FIELDS,
  )
  feats = expert_features(setup, experts, np.asarray(setup.x))  # [E, N_src, D], cached

  trained = train_from_features(config, workdir, setup, feats, writer=writer)
  writer.close()

  # 5. Adaptation and evaluation.
  metrics = evaluate(setup, experts, trained.aggregator["params"], trained.student, trained.meta)
  return {
    "method": "meta_dmoe",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "source_domains": list(setup.sources),
    "target_domains": list(setup.targets),
    "super_domains": [list(g) for g in setup.super_domains],
    "metrics": metrics,
  }


def train_from_features(
  config,
  workdir: str,
  setup: Setup,
  feats: jax.Array,
  *,
  writer: metrics_lib.MetricWriter | None,
  stage_fields: dict[str, tuple[str, ...]] = STAGE_FIELDS,
) -> Trained:
  """Stages 2-4 (aggregator, ERM student, meta-training) driven by cached expert features.

  Args:
    config: the run's config (the fields `validate_config` checks).
    workdir: the run's directory.
    setup: from `make_setup(config)`.
    feats: [E, N_src, D] the frozen experts' features of every source training image
      (`setup.x`), from any kind of expert; D must be the student's feature size.
    writer: where the stages' metrics go.
    stage_fields: the config fields each shareable stage depends on (stage cache).
  """
  # 2. Aggregator pretraining.
  tx = optax.adam(config.aggregator.lr)
  tokens = jnp.zeros((1, setup.num_experts, feats.shape[-1]), jnp.float32)
  agg_params = setup.agg_model.init(setup.key("init"), tokens)["params"]
  aggregator = mesh_lib.replicate(
    {"params": agg_params, "opt_state": tx.init(agg_params)}, setup.mesh
  )
  aggregator = stages.run_stage(
    config,
    workdir,
    "aggregator",
    make_aggregator_step(setup, tx, feats),
    aggregator,
    config.aggregator.pretrain_steps,
    writer=writer,
    stage_fields=stage_fields,
  )

  # 3. ERM student.
  tx = optax.adam(config.student.lr)
  sample = jnp.zeros((1, *setup.benchmark.input_shape), jnp.float32)
  variables = setup.model.init(jax.random.fold_in(setup.key("init"), 1), sample, train=False)
  student = mesh_lib.replicate(
    {
      "params": variables["params"],
      "batch_stats": variables["batch_stats"],
      "opt_state": tx.init(variables["params"]),
    },
    setup.mesh,
  )
  student = stages.run_stage(
    config,
    workdir,
    "student",
    make_student_step(setup, tx),
    student,
    config.student.steps,
    writer=writer,
    stage_fields=stage_fields,
  )

  # 4. Meta-training from the pretrained aggregator and the ERM student.
  tx_s, tx_a = optax.adam(config.meta.student_lr), optax.adam(config.meta.aggregator_lr)
  meta = mesh_lib.replicate(
    {
      "student": student["params"],
      "aggregator": aggregator["params"],
      "batch_stats": student["batch_stats"],
      "opt_student": tx_s.init(student["params"]),
      "opt_aggregator": tx_a.init(aggregator["params"]),
    },
    setup.mesh,
  )
  # The initial state is built from arrays the earlier stages own; copy so that
  # donation inside the meta loop never invalidates them (they are evaluated later).
  meta = jax.tree.map(jnp.copy, meta)
  meta = stages.run_stage(
    config,
    workdir,
    "meta",
    make_meta_step(setup, tx_s, tx_a, feats),
    meta,
    config.meta.steps,
    writer=writer,
    stage_fields=stage_fields,
  )
  return Trained(aggregator, student, meta)
