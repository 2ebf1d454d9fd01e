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
aggregator (the official code re-runs every expert on every episode). For datasets that do
not fit in memory, `meta_dmoe_stream` (`data.streaming=True`) streams the images and runs
the experts inside the steps, reusing this module's updates.
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
from moe_adapt.models import backbone_io
from moe_adapt.train import evaluation, stages
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib

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
  for name in (
    "experts.lr",
    "aggregator.lr",
    "student.lr",
    "meta.inner_lr",
    "meta.student_lr",
    "backbone.lr",
  ):
    group, field = name.split(".")
    positive_float(name, config[group][field])
  for name in ("backbone.steps", "backbone.batch_size", "selection.meta_checkpoints"):
    _checks.integer(config, name, 1)
  _checks.integer(config, "meta.inner_lr_dim", 1)
  _checks.integer(config, "meta.steps_per_epoch", 0)
  _checks.number(config, "meta.lr_decay", low=0.0, high=1.0, high_open=False)
  _checks.number(config, "meta.logits_weight", low=0.0)
  for name in (
    "model.shared_init",
    "meta.mask_in_domain_expert",
    "meta.first_order",
    "meta.remat",
  ):
    if not isinstance(_checks.field(config, name), bool):
      raise ValueError(
        f"{name}={_checks.field(config, name)!r} is invalid; accepted: True or False"
      )
  if not isinstance(config.backbone.checkpoint, str):
    raise ValueError(
      f"backbone.checkpoint={config.backbone.checkpoint!r} is invalid; accepted: a path "
      "(a file written by models.backbone_io.save_backbone, or a Hugging Face / timm ResNet "
      "checkpoint directory) or '' (train the backbone stage)"
    )
  factors = config.selection.inner_lr_factors
  if (
    isinstance(factors, str)
    or not isinstance(factors, tuple | list)
    or not factors
    or not all(isinstance(f, int | float) and not isinstance(f, bool) and f > 0 for f in factors)
  ):
    raise ValueError(
      f"selection.inner_lr_factors={factors!r} is invalid; accepted: a non-empty tuple of "
      "numbers > 0 (multiples of the meta-trained inner step size)"
    )
  if config.selection.meta_checkpoints > config.meta.steps:
    raise ValueError(
      f"selection.meta_checkpoints={config.selection.meta_checkpoints} exceeds "
      f"meta.steps={config.meta.steps}; accepted: 1..{config.meta.steps}"
    )
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
  shape = config.experts.mesh_shape
  if shape != () and (
    isinstance(shape, str)
    or not isinstance(shape, tuple | list)
    or len(shape) != 2
    or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
  ):
    raise ValueError(
      f"experts.mesh_shape={shape!r} is invalid; accepted: () (the data-parallel mesh) or "
      "(data, expert), two ints >= 1, e.g. (2, 4)"
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
  streaming(config)


def streaming(config) -> bool:
  """`data.streaming` (False when the preset has no such field).

  Raises:
    ValueError: naming data.streaming when it is not a bool.
  """
  value = config.data.get("streaming", False)
  if not isinstance(value, bool):
    raise ValueError(f"data.streaming={value!r} is invalid; accepted: True or False")
  return value


def _check_in_memory(config) -> None:
  """The in-memory path's entry points refuse a streaming config (meta_dmoe_stream runs it,
  and is what the method name 'meta_dmoe' resolves to)."""
  if streaming(config):
    raise ValueError(
      "data.streaming=True is the streaming path: run it with moe_adapt.methods."
      "meta_dmoe_stream (make_setup, run), which the CLI's method 'meta_dmoe' uses; this "
      "module's make_setup and run hold the data in memory"
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
  # The backbone checkpoint directory's record (BackboneCheckpoint.info), or None.
  checkpoint_info: dict | None = None
  # The (data, expert) mesh of the experts stage (experts.mesh_shape), or None.
  expert_mesh: jax.sharding.Mesh | None = None

  @property
  def num_experts(self) -> int:
    return self.config.experts.num_experts

  @property
  def num_source_train(self) -> int:
    """N_src, the number of source training examples."""
    return int(self.y.shape[0])

  def key(self, stage: str) -> jax.Array:
    """The PRNG key of a stage; steps fold their index into it."""
    stage_ids = {
      "init": 0,
      "experts": 1,
      "aggregator": 2,
      "student": 3,
      "meta": 4,
      "adapt": 5,
      "backbone": 6,
      "select": 7,
    }
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
  """Loads data, checks sizes against the config, builds models and device arrays.

  `data.streaming=True` is refused (`meta_dmoe_stream.make_setup` streams).
  """
  _check_in_memory(config)
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
  expert_mesh = make_expert_mesh(config)
  model, agg_model, checkpoint = make_models(config, benchmark)
  if checkpoint is not None:
    # The checkpoint's input normalisation is applied once to every image on the host.
    splits = {
      d: backbone_io.normalize_splits(s, checkpoint.mean, checkpoint.std) for d, s in splits.items()
    }

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
    checkpoint_info=None if checkpoint is None else checkpoint.info(config.backbone.checkpoint),
    expert_mesh=expert_mesh,
  )


class Models(NamedTuple):
  """The networks of a run (`make_models`)."""

  model: models.Classifier  # the experts' and the student's architecture
  agg_model: models.AggregatorClassifier
  checkpoint: backbone_io.BackboneCheckpoint | None  # backbone.checkpoint's header (a directory)


def make_models(config, benchmark) -> Models:
  """The student / expert network and the aggregator for `benchmark`'s inputs and classes.

  With a `backbone.checkpoint` directory its network is the architecture (its input
  normalisation is the caller's to apply); `model.dtype` is the compute dtype.
  """
  # model.dtype: the backbones and the aggregator compute in it; parameters, BatchNorm
  # statistics, optimiser state, heads (float32 logits) and losses stay float32.
  dtype = _checks.compute_dtype(config)
  checkpoint = backbone_io.backbone_checkpoint(config.backbone.checkpoint)
  if checkpoint is not None:
    checkpoint.check_input(benchmark.input_shape)
    backbone = checkpoint.module.clone(dtype=dtype)
    logging.info(
      "backbone.checkpoint: %s (%s) replaces model.backbone=%r / model.options; inputs "
      "normalised with mean %s, std %s",
      config.backbone.checkpoint,
      checkpoint.architecture,
      config.model.backbone,
      checkpoint.mean.tolist(),
      checkpoint.std.tolist(),
    )
  else:
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
  return Models(model, agg_model, checkpoint)


def make_expert_mesh(config) -> jax.sharding.Mesh | None:
  """The (data, expert) mesh of `experts.mesh_shape`, or None for () (data parallel).

  Raises:
    ValueError: naming experts.mesh_shape when data * expert does not divide the device
      count or expert does not divide experts.num_experts, and experts.batch_size when
      data does not divide it.
  """
  shape = tuple(config.experts.mesh_shape)
  if not shape:
    return None
  mesh = mesh_lib.make_expert_mesh(
    shape, num_experts=config.experts.num_experts, field="experts.mesh_shape"
  )
  if config.experts.batch_size % shape[0]:
    raise ValueError(
      f"experts.batch_size={config.experts.batch_size} does not divide over the data axis "
      f"of experts.mesh_shape={shape}; accepted: a multiple of {shape[0]}"
    )
  return mesh


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
  return _stack_map_of(setup.config.experts.stack_map)


def _stack_map_of(choice: str) -> Callable:
  """`_stack_map` for an `experts.stack_map` value."""
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


def init_experts(
  setup: Setup, tx: optax.GradientTransformation, backbone: PyTree | None = None
) -> PyTree:
  """Stacked expert variables [E, ...] and their optimiser state.

  With `backbone` ({'params', 'batch_stats'} of one model) every expert starts from
  those weights (the paper: one ImageNet network fine-tuned per super-domain);
  without, each from its own random initialisation (the `model.shared_init=False`
  ablation).
  """
  if backbone is None:
    sample = jnp.zeros((1, *setup.benchmark.input_shape), jnp.float32)
    keys = jax.random.split(setup.key("init"), setup.num_experts)
    variables = jax.jit(jax.vmap(lambda k: setup.model.init(k, sample, train=False)))(keys)
  else:
    variables = jax.tree.map(lambda a: jnp.broadcast_to(a, (setup.num_experts, *a.shape)), backbone)
  params, stats = variables["params"], variables.get("batch_stats", {})
  return {"params": params, "batch_stats": stats, "opt_state": tx.init(params)}


# ----------------------------------------------------------------------------
# Stage 0: the shared backbone (ERM on the pooled sources), saved and loaded
# ----------------------------------------------------------------------------


@functools.cache
def _init_fn(model: models.Classifier) -> Callable:
  """`model.init` jitted once per model: run eagerly, every initialiser and layer of a deep
  network compiles on its own (minutes for a ResNet on CPU)."""
  return jax.jit(functools.partial(model.init, train=False))


def init_model(setup: Setup, key: jax.Array) -> PyTree:
  """{'params', 'batch_stats'} of one randomly initialised student-architecture model."""
  sample = jnp.zeros((1, *setup.benchmark.input_shape), jnp.float32)
  variables = _init_fn(setup.model)(key, sample)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def init_student(setup: Setup, tx: optax.GradientTransformation, backbone: PyTree) -> PyTree:
  """The ERM student's initial state: a copy of `backbone` ({'params', 'batch_stats'}).

  A copy, on the mesh: the student's step donates its state, and the backbone also
  starts the experts.
  """
  state = {**backbone, "opt_state": tx.init(backbone["params"])}
  return jax.tree.map(jnp.copy, mesh_lib.replicate(state, setup.mesh))


def make_expert_update(setup: Setup, tx: optax.GradientTransformation) -> Callable:
  """`update(state, xb [E, B, ...], yb [E, B]) -> (state, metrics)`: one SGD step of all
  experts, expert k on batch k (traced inside a jitted step; the data-parallel mesh).

  Shared by the in-memory step (`make_expert_step`, batches sampled from the pools) and the
  streaming one (`meta_dmoe_stream`, one stream per super-domain).
  """
  loss_one, stack_map = expert_loss(setup), _stack_map(setup)

  def update(state, xb, yb):
    def total(params):
      losses, stats = stack_map(loss_one, (params, state["batch_stats"], xb, yb))
      return losses.sum(), (losses, stats)

    (_, (losses, stats)), grads = jax.value_and_grad(total, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "batch_stats": stats, "opt_state": opt_state}
    return new, {"loss": losses.mean(), "loss_max": losses.max()}

  return update


def expert_loss(setup: Setup) -> Callable:
  """`loss_one((params, stats, xb, yb)) -> (mean CE, new batch_stats)` of one expert."""
  model = setup.model

  def loss_one(args):
    params, stats, xb, yb = args
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
    )
    return core.losses.cross_entropy(logits, yb).mean(), updates["batch_stats"]

  return loss_one


def make_expert_step(setup: Setup, tx: optax.GradientTransformation) -> Callable:
  """One jitted SGD step of all experts, each on a batch from its super-domain."""
  cfg = setup.config.experts

  def sample(step, pools, pool_sizes):
    key = jax.random.fold_in(setup.key("experts"), step)
    u = jax.random.randint(key, (setup.num_experts, cfg.batch_size), 0, pool_sizes[:, None])
    return jnp.take_along_axis(pools, u, axis=1)  # [E, B]

  if setup.expert_mesh is not None:
    take = jax.jit(lambda step, x, y, pools, sizes: _take(x, y, sample(step, pools, sizes)))
    return ExpertMeshStep(
      setup,
      tx,
      lambda step: take(step, setup.x, setup.y, setup.expert_pools, setup.pool_sizes),
    )
  update = make_expert_update(setup, tx)

  def step(state, step, x, y, pools, pool_sizes):
    idx = sample(step, pools, pool_sizes)
    return update(state, setup.constrain(x[idx], leading=1), y[idx])

  return stages.bind(
    jax.jit(step, donate_argnums=0), setup.x, setup.y, setup.expert_pools, setup.pool_sizes
  )


@functools.cache
def _features_fn(model: models.Classifier, stack_map: str) -> Callable:
  """The jitted `(params [E, ...], stats, xb [B, ...]) -> [E, B, D]`, one per model.

  Cached so that the features of every split (sources, their validation, each target)
  reuse one compiled function instead of compiling a new closure per call.
  """
  stack = _stack_map_of(stack_map)

  @jax.jit
  def features(params, stats, xb):
    def one(args):
      p, s = args
      return model.apply(
        {"params": p, "batch_stats": s}, xb, train=False, method=models.Classifier.features
      )

    return stack(one, (params, stats))

  return features


class ExpertMeshStep:
  """The experts step on the (data, expert) mesh (`mesh_lib.make_stacked_step`).

  `batch(step) -> (xb [E, B, ...], yb [E, B])` gives step `step`'s batches (the in-memory
  step samples them with the data-parallel step's keys; the streaming one reads one stream
  per super-domain); they are placed split over (expert, data) and the stacked step runs,
  its state (params, BatchNorm statistics, optimiser state) staying split over `expert`.
  The stacked step is built at the first call, from the state it gets.
  """

  def __init__(self, setup: Setup, tx, batch: Callable):
    self._setup, self._tx, self._batch = setup, tx, batch
    self._loss_one = expert_loss(setup)
    self._step = None

  def __call__(self, state: PyTree, step: jax.Array):
    mesh = self._setup.expert_mesh
    xb, yb = self._batch(step)
    batch = {
      name: jax.device_put(a, mesh_lib.expert_batch_sharding(mesh, a.ndim))
      for name, a in (("x", xb), ("y", yb))
    }
    if self._step is None:
      self._step = mesh_lib.make_stacked_step(
        lambda params, stats, b: self._loss_one((params, stats, b["x"], b["y"])),
        self._tx,
        mesh,
        state,
        batch,
      )
    state, losses = self._step(state, batch)
    return state, {"loss": losses.mean(), "loss_max": losses.max()}


def _take(x: jax.Array, y: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  return x[idx], y[idx]


def place_experts(setup: Setup, experts: PyTree) -> PyTree:
  """The experts stage's state on its mesh: split over `expert` on the (data, expert) mesh
  (experts.mesh_shape), else replicated on the data-parallel mesh."""
  if setup.expert_mesh is None:
    return mesh_lib.replicate(experts, setup.mesh)
  return mesh_lib.shard_stacked(experts, setup.expert_mesh, num_experts=setup.num_experts)


def expert_tokens(setup: Setup, experts: PyTree, xb: jax.Array) -> jax.Array:
  """Every expert's features of a batch as aggregator tokens: [B, E, D] (traceable: the
  streaming path computes them inside its jitted steps)."""
  features = _features_fn(setup.model, setup.config.experts.stack_map)
  return jnp.swapaxes(features(experts["params"], experts["batch_stats"], xb), 0, 1)


def expert_features(setup: Setup, experts: PyTree, x: np.ndarray) -> jax.Array:
  """Features of every expert on `x`: [E, N, D], computed in eval batches."""
  features = _features_fn(setup.model, setup.config.experts.stack_map)
  outs = [
    features(experts["params"], experts["batch_stats"], xb)
    for xb in evaluation.padded_batches(x, setup.config.eval_batch_size)
  ]
  return jnp.concatenate(outs, axis=1)[:, : len(x)]


# ----------------------------------------------------------------------------
# Stage 2: aggregator pretraining; stage 3: ERM student
# ----------------------------------------------------------------------------


def make_aggregator_update(setup: Setup, tx) -> Callable:
  """`update(state, tokens [B, E, D], y [B], key) -> (state, metrics)`: one CE step through
  the aggregator's pretraining head (dropout drawn from `key`)."""

  def update(state, tokens, y, key):
    def loss_fn(params):
      logits = setup.agg_model.apply(
        {"params": params}, tokens, deterministic=False, rngs={"dropout": key}
      )
      return core.losses.cross_entropy(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, {"loss": loss}

  return update


def make_aggregator_step(setup: Setup, tx, feats: jax.Array) -> Callable:
  """CE through the aggregator's pretraining head, all experts, all source data."""
  cfg = setup.config.aggregator
  update = make_aggregator_update(setup, tx)

  def step(state, step, y, feats):
    key = jax.random.fold_in(setup.key("aggregator"), step)
    k_idx, k_drop = jax.random.split(key)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, y.shape[0])
    tokens = setup.constrain(jnp.swapaxes(feats[:, idx], 0, 1))  # [B, E, D]
    return update(state, tokens, y[idx], k_drop)

  return stages.bind(jax.jit(step, donate_argnums=0), setup.y, feats)


def make_student_update(setup: Setup, tx) -> Callable:
  """`update(state, xb [B, ...], yb [B]) -> (state, metrics)`: one ERM step (BatchNorm in
  training mode)."""

  def update(state, xb, yb):
    def loss_fn(params):
      logits, updates = setup.model.apply(
        {"params": params, "batch_stats": state["batch_stats"]},
        xb,
        train=True,
        mutable=["batch_stats"],
      )
      return core.losses.cross_entropy(logits, yb).mean(), updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": stats, "opt_state": opt_state}, {"loss": loss}

  return update


def make_student_step(setup: Setup, tx, *, stage: str = "student") -> Callable:
  """ERM on all source data (BatchNorm in training mode).

  `stage` ('student' or 'backbone') picks the config group (batch size) and the key.
  """
  cfg = setup.config[stage]
  update = make_student_update(setup, tx)

  def step(state, step, x, y):
    key = jax.random.fold_in(setup.key(stage), step)
    idx = jax.random.randint(key, (cfg.batch_size,), 0, y.shape[0])
    return update(state, setup.constrain(x[idx]), y[idx])

  return stages.bind(jax.jit(step, donate_argnums=0), setup.x, setup.y)


# ----------------------------------------------------------------------------
# Stage 4: meta-training, and the distillation loss shared with adaptation
# ----------------------------------------------------------------------------


def inner_lr(config, feature_dim: int) -> float:
  """The inner step size α for features of size D = `feature_dim`.

  The distillation loss is a mean over the D feature coordinates, so its gradient, and
  the step it makes at a fixed α, shrink as 1/D. `meta.inner_lr` is the step size at
  D = `meta.inner_lr_dim` (the official 3e-4 is for ResNet-50's 2048), and α ∝ D keeps
  the step of each coordinate's squared error the same at any D:
  α = meta.inner_lr · D / meta.inner_lr_dim.
  """
  return config.meta.inner_lr * feature_dim / config.meta.inner_lr_dim


def make_losses(setup: Setup) -> tuple[Callable, Callable]:
  """(inner_loss, outer_loss) in the `core.meta` signature `fn(theta_e, batch, context)`.

  Only the feature extractor θ_e (the student's 'backbone' params) is adapted, in every
  distillation mode (the paper and the official code adapt `student.features`); the
  classifier θ_c and the aggregator φ ride in `context = {'head', 'aggregator'}`, so they
  get the outer gradient (θ_c directly, φ through the inner step) but no inner step.
  inner batch: {'x', 'tokens' [S, E, D], 'mask' [E], 'batch_stats'} and optionally
  'target' [S, D], a distillation target that replaces the aggregated feature (the
  content-free controls); outer batch: {'x', 'y', 'batch_stats'}. BatchNorm statistics
  ride in the batch: they are frozen (not adapted, no gradient).
  """
  model, agg_model = setup.model, setup.agg_model
  distill = setup.config.meta.distill
  w_features = 0.0 if distill == "logits" else 1.0
  w_logits = {"features": 0.0, "logits": 1.0, "both": setup.config.meta.logits_weight}[distill]

  def features(theta_e, batch):
    variables = {"params": {"backbone": theta_e}, "batch_stats": batch["batch_stats"]}
    return model.apply(variables, batch["x"], train=False, method=models.Classifier.features)

  def classify(head, feats):
    return model.apply({"params": {"head": head}}, feats, method=models.Classifier.classify)

  def inner_loss(theta_e, batch, context):
    feats = features(theta_e, batch)
    if "target" in batch:
      target = batch["target"]
    else:
      target = agg_model.apply(
        {"params": context["aggregator"]},
        batch["tokens"],
        batch["mask"],
        method=models.AggregatorClassifier.aggregate,
      )
    loss = 0.0
    if w_features:
      # In float32 also when the models compute in bfloat16 (model.dtype).
      f32 = jnp.float32
      loss += w_features * core.losses.feature_mse(feats.astype(f32), target.astype(f32)).mean()
    if w_logits:
      # The teacher's logits: the aggregator's pretraining head on the target feature.
      teacher = agg_model.apply(
        {"params": context["aggregator"]}, target, method=lambda m, f: m.head(f)
      )
      student = classify(context["head"], feats)
      loss += w_logits * core.losses.kl_divergence(teacher, student).mean()
    return loss

  def outer_loss(theta_e, batch, context):
    logits = classify(context["head"], features(theta_e, batch))
    return core.losses.cross_entropy(logits, batch["y"]).mean()

  return inner_loss, outer_loss


def make_meta_update(setup: Setup, tx_student, tx_agg, feature_dim: int) -> Callable:
  """`update(state, support, query) -> (state, metrics)`: one second-order meta-step.

  support: {'x' [S, ...], 'tokens' [S, E, D], 'mask' [E]}; query: {'x' [Q, ...], 'y' [Q]}
  (one single-domain episode, the in-domain expert masked). BatchNorm statistics are
  frozen. Shared by the in-memory step (`make_meta_step`, tokens from the feature cache)
  and the streaming one (`meta_dmoe_stream`, tokens computed in the step).
  """
  cfg = setup.config.meta
  inner_loss, outer_loss = make_losses(setup)
  alpha = inner_lr(setup.config, feature_dim)

  def update(state, support, query):
    stats = state["batch_stats"]
    support = {**support, "batch_stats": stats}
    query = {**query, "batch_stats": stats}
    student = state["student"]
    loss, (g_backbone, g_context) = core.meta.meta_value_and_grad(
      outer_loss,
      inner_loss,
      student["backbone"],
      support,
      query,
      lr=alpha,
      steps=cfg.inner_steps,
      first_order=cfg.first_order,
      context={"aggregator": state["aggregator"], "head": student["head"]},
      remat=cfg.remat,
    )
    g_student = {"backbone": g_backbone, "head": g_context["head"]}
    g_agg = g_context["aggregator"]
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

  return update


def expert_mask(setup: Setup, expert_of_domain: jax.Array, domain: jax.Array) -> jax.Array:
  """[E] bool: the experts an episode of source domain `domain` (an index into
  `setup.sources`; `expert_of_domain` [D_src] as `setup.expert_of_domain`) distils from:
  all but its own super-domain's expert (`meta.mask_in_domain_expert`), else all."""
  experts = jnp.arange(setup.num_experts)
  if setup.config.meta.mask_in_domain_expert:
    return experts != expert_of_domain[domain]
  return jnp.ones_like(experts, dtype=bool)


def make_meta_step(setup: Setup, tx_student, tx_agg, feats: jax.Array) -> Callable:
  """One second-order meta-step on one single-domain episode."""
  cfg = setup.config.meta
  update = make_meta_update(setup, tx_student, tx_agg, feats.shape[-1])

  def step(state, step, x, y, feats, offsets, sizes, expert_of_domain):
    key = jax.random.fold_in(setup.key("meta"), step)
    index = setup.index._replace(offsets=offsets, sizes=sizes)
    ep = data.sample_episode(key, index, support_size=cfg.support_size, query_size=cfg.query_size)
    support = {
      "x": setup.constrain(x[ep.support_idx]),
      "tokens": setup.constrain(jnp.swapaxes(feats[:, ep.support_idx], 0, 1)),
      "mask": expert_mask(setup, expert_of_domain, ep.domain),
    }
    query = {"x": setup.constrain(x[ep.query_idx]), "y": y[ep.query_idx]}
    return update(state, support, query)

  return stages.bind(
    jax.jit(step, donate_argnums=0),
    setup.x,
    setup.y,
    feats,
    setup.index.offsets,
    setup.index.sizes,
    setup.expert_of_domain,
  )


def make_continued_update(setup: Setup, tx) -> Callable:
  """`update(state, xq [Q, ...], yq [Q]) -> (state, metrics)`: CE on a query batch,
  BatchNorm frozen (the `erm_continued` control's step)."""

  def update(state, xq, yq):
    def loss_fn(params):
      variables = {"params": params, "batch_stats": state["batch_stats"]}
      logits = setup.model.apply(variables, xq, train=False)
      return core.losses.cross_entropy(logits, yq).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {
      "params": optax.apply_updates(state["params"], updates),
      "batch_stats": state["batch_stats"],
      "opt_state": opt_state,
    }
    return new, {"loss": loss}

  return update


def make_continued_step(setup: Setup, tx) -> Callable:
  """The `erm_continued` control: the meta stage without its inner step.

  From the ERM student, CE on the same query batches as `make_meta_step` (the same
  episode keys), at the meta stage's student learning rate and schedule (`tx`), BatchNorm
  frozen as there: what meta-training adds beyond more supervised steps at a small lr.
  """
  cfg = setup.config.meta
  update = make_continued_update(setup, tx)

  def step(state, step, x, y, offsets, sizes):
    key = jax.random.fold_in(setup.key("meta"), step)
    index = setup.index._replace(offsets=offsets, sizes=sizes)
    ep = data.sample_episode(key, index, support_size=cfg.support_size, query_size=cfg.query_size)
    return update(state, setup.constrain(x[ep.query_idx]), y[ep.query_idx])

  return stages.bind(
    jax.jit(step, donate_argnums=0), setup.x, setup.y, setup.index.offsets, setup.index.sizes
  )


# ----------------------------------------------------------------------------
# Stage 5: test-time adaptation and evaluation
# ----------------------------------------------------------------------------


def make_adapt_fn(setup: Setup) -> Callable:
  """The test-time adaptation: a function from the student to its adapted params.

  `adapt(student, batch_stats, aggregator, x_support, tokens, mask=, target=, lr_factor=)`
  returns the adapted student params: one adaptation of the feature extractor on the
  unlabeled support x_support [S, ...] with expert tokens [S, E, D]. `mask` [E] (default:
  every expert, as at test time),
  `target` [S, D] replaces the aggregated feature (content-free controls), `lr_factor`
  multiplies the meta-trained step size (source-side selection).
  """
  cfg = setup.config.meta
  inner_loss, _ = make_losses(setup)
  all_experts = jnp.ones((setup.num_experts,), bool)  # no masking at test time

  @jax.jit
  def adapt_jit(student, stats, aggregator, xs, tokens, mask, target, lr_factor):
    batch = {"x": xs, "tokens": tokens, "mask": mask, "batch_stats": stats}
    if target is not None:
      batch["target"] = target
    backbone = core.meta.inner_adapt(
      inner_loss,
      student["backbone"],
      batch,
      lr=inner_lr(setup.config, tokens.shape[-1]) * lr_factor,
      steps=cfg.inner_steps,
      first_order=True,  # no meta-gradient needed at test time
      context={"aggregator": aggregator, "head": student["head"]},
    )
    return {**student, "backbone": backbone}

  def adapt(student, stats, aggregator, xs, tokens, *, mask=None, target=None, lr_factor=1.0):
    mask = all_experts if mask is None else mask
    return adapt_jit(student, stats, aggregator, xs, tokens, mask, target, lr_factor)

  adapt.jitted = adapt_jit  # one compiled function; tests count its traces
  return adapt


def _predictions(predict: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Predicted classes [N] of `predict(x_batch) -> [B]` over fixed-size batches."""
  return evaluation.map_batched(predict, x, batch_size)


def evaluate(setup: Setup, experts, aggregator_pre, student_erm, meta_state, **kwargs) -> dict:
  """Accuracy of every variant on every target domain (all of its images).

  `kwargs` go to `evaluate_with` (`candidates`, `details`).
  """
  model = setup.model
  head_of_experts = jax.jit(
    lambda heads, f: jax.vmap(
      lambda h, fe: model.apply({"params": {"head": h}}, fe, method=models.Classifier.classify)
    )(heads, f)
  )

  def expert_outputs(x: np.ndarray) -> tuple[jax.Array, jax.Array]:
    f = expert_features(setup, experts, x)  # [E, N, D]
    return f, head_of_experts(experts["params"]["head"], f)

  return evaluate_with(setup, expert_outputs, aggregator_pre, student_erm, meta_state, **kwargs)


# Adapted variants and what each distils toward; the last three are content-free controls
# on the meta-trained student (the same support images, step size and draws as meta_dmoe).
CONTENT_FREE = ("target_zeros", "target_source_mean", "target_shuffled")


def evaluate_with(
  setup: Setup,
  expert_outputs: Callable[[np.ndarray], tuple[jax.Array, jax.Array]],
  aggregator_pre,
  student_erm,
  meta_state,
  *,
  candidates: dict | None = None,
  details: dict | None = None,
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
    candidates: optional {'meta': [(step, meta_state), ...], 'erm_continued':
      [(step, {'params', 'batch_stats', ...}), ...]}: checkpoints to choose from on the
      sources' validation splits (`select_on_sources`); the `erm_continued` variant is
      reported only when given. Without, `meta_state` and the configured α are used.
    details: optional dict that receives 'per_example' (variant -> domain -> {'correct'}
      [N] 0/1 in the domain's fixed order; adapted variants: of the first support draw,
      with every draw's in 'correct_draws') and 'selection' (what the sources' validation chose).

  Returns:
    variant -> {domain: {'accuracy', ...}, 'mean': {'accuracy'}}.
  """
  cfg = setup.config
  model, agg_model = setup.model, setup.agg_model
  adapt = make_adapt_fn(setup)
  bs = cfg.eval_batch_size

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
  aggregate = jax.jit(
    lambda params, tokens: agg_model.apply(
      {"params": params}, tokens, method=models.AggregatorClassifier.aggregate
    )
  )

  def preds_of(params, stats, x):
    return _predictions(functools.partial(student_predict, params, stats), x, bs)

  sources_val = source_validation(setup, expert_outputs)
  selection: dict[str, dict] = {}
  factor_meta = factor_pre = 1.0
  continued = None
  if candidates:
    chosen, selection = select_on_sources(
      setup, sources_val, aggregator_pre, student_erm, candidates, adapt=adapt, preds_of=preds_of
    )
    meta_state, factor_meta, factor_pre, continued = chosen
  for choice in selection.values():
    logging.info("selected on the sources' validation splits: %s", choice)
  meta_student, meta_stats = meta_state["student"], meta_state["batch_stats"]
  # The content-free 'source mean' target: the mean aggregated feature of the sources'
  # validation images (one vector for every support image).
  source_mean = jnp.mean(
    jnp.concatenate([aggregate(meta_state["aggregator"], v.tokens) for v in sources_val]), 0
  )

  names = [
    "erm",
    "expert_average",
    "aggregator_head",
    "aggregator_pretrained",
    "meta_unadapted",
    "meta_dmoe",
    *(f"meta_dmoe_{c}" for c in CONTENT_FREE),
  ]
  if continued is not None:
    names.insert(1, "erm_continued")
  variants: dict[str, dict] = {k: {} for k in names}
  per_example: dict[str, dict] = {k: {} for k in names}
  erm_stats = student_erm["batch_stats"]
  for d_idx, domain in enumerate(setup.targets):
    # The whole target domain is predicted (its labels are never used for
    # training), as in the paper's protocol; the unlabeled support for
    # adaptation is drawn from the same images (transductive, as in the
    # official evaluator).
    x_test, y_test = whole_domain(setup.splits[domain])
    f_test, expert_logits = expert_outputs(x_test)  # [E, N, D], [E, N, C]
    tokens_test = jnp.swapaxes(f_test, 0, 1)

    def record(name, preds, draws=None, domain=domain, y=y_test):
      correct = (preds == y).astype(int)
      entry = {"correct": correct.tolist()}
      if draws is not None:
        entry["correct_draws"] = [(p == y).astype(int).tolist() for p in draws]
        variants[name][domain] = {
          "accuracy": float(np.mean([np.mean(p == y) for p in draws])),
          "accuracy_per_draw": [float(np.mean(p == y)) for p in draws],
        }
      else:
        variants[name][domain] = {"accuracy": float(np.mean(correct))}
      per_example[name][domain] = entry

    record("expert_average", np.asarray(expert_predict(expert_logits)))
    record("aggregator_head", _predictions_tokens(agg_predict, aggregator_pre, tokens_test, bs))
    record("erm", preds_of(student_erm["params"], erm_stats, x_test))
    if continued is not None:
      record("erm_continued", preds_of(continued["params"], continued["batch_stats"], x_test))
    record("meta_unadapted", preds_of(meta_student, meta_stats, x_test))

    runs: dict[str, list] = {k: [] for k in names if k == "aggregator_pretrained" or "dmoe" in k}
    for r in range(cfg.adapt.repeats):
      key = jax.random.fold_in(jax.random.fold_in(setup.key("adapt"), d_idx), r)
      idx = np.asarray(jax.random.permutation(key, len(x_test))[: cfg.adapt.support_size])
      xs, tokens = x_test[idx], tokens_test[idx]
      adapted = adapt(
        student_erm["params"], erm_stats, aggregator_pre, xs, tokens, lr_factor=factor_pre
      )
      runs["aggregator_pretrained"].append(preds_of(adapted, erm_stats, x_test))
      agg = meta_state["aggregator"]
      aggregated = aggregate(agg, tokens)
      targets = {
        "meta_dmoe": None,
        "meta_dmoe_target_zeros": jnp.zeros_like(aggregated),
        "meta_dmoe_target_source_mean": jnp.broadcast_to(source_mean, aggregated.shape),
        # Every support image gets another image's aggregated feature.
        "meta_dmoe_target_shuffled": jnp.roll(aggregated, 1, axis=0),
      }
      for name, target in targets.items():
        adapted = adapt(
          meta_student, meta_stats, agg, xs, tokens, target=target, lr_factor=factor_meta
        )
        runs[name].append(preds_of(adapted, meta_stats, x_test))
    for name, draws in runs.items():
      record(name, draws[0], draws)

  for per_domain in variants.values():
    per_domain["mean"] = {
      "accuracy": float(np.mean([per_domain[d]["accuracy"] for d in setup.targets]))
    }
  if details is not None:
    details["per_example"] = per_example
    details["selection"] = selection
  return variants


def _predictions_tokens(predict: Callable, params, tokens: jax.Array, batch_size: int):
  """`predict(params, tokens_batch)` over fixed-size batches of tokens [N, E, D] -> [N]."""
  n = tokens.shape[0]
  out = []
  for start in range(0, n, batch_size):
    tb = tokens[start : start + batch_size]
    if tb.shape[0] < batch_size:
      tb = jnp.concatenate([tb, jnp.zeros((batch_size - tb.shape[0], *tb.shape[1:]), tb.dtype)])
    out.append(np.asarray(predict(params, tb)))
  return np.concatenate(out)[:n]


class SourceVal(NamedTuple):
  """One source domain's validation split, as seen by source-side selection."""

  x: np.ndarray  # [N, H, W, C]
  y: np.ndarray  # [N]
  tokens: jax.Array  # [N, E, D] every expert's features
  mask: jax.Array  # [E] bool: all but the expert whose super-domain holds this domain
  support: np.ndarray  # [k] indices of the unlabeled adaptation support


def source_validation(setup: Setup, expert_outputs: Callable) -> list[SourceVal]:
  """The sources' validation splits (never trained on), one leave-one-out episode each.

  Each source domain plays an unseen target: its own expert is masked (as in
  meta-training), k of its validation images are the unlabeled support, and all of them
  are predicted. Target data is not touched.
  """
  out = []
  for i, domain in enumerate(setup.sources):
    split = setup.splits[domain].val
    feats, _ = expert_outputs(split.x)
    k = min(setup.config.adapt.support_size, len(split.y))
    key = jax.random.fold_in(setup.key("select"), i)
    support = np.asarray(jax.random.permutation(key, len(split.y))[:k])
    mask = jnp.arange(setup.num_experts) != setup.expert_of_domain[i]
    out.append(SourceVal(split.x, split.y, jnp.swapaxes(feats, 0, 1), mask, support))
  return out


def select_on_sources(
  setup: Setup,
  sources_val: list[SourceVal],
  aggregator_pre,
  student_erm,
  candidates: dict,
  *,
  adapt: Callable,
  preds_of: Callable,
):
  """Chooses checkpoints and the inner step size on the sources' validation splits.

  meta_dmoe: the meta checkpoint and the factor of `selection.inner_lr_factors` (× the
  meta-trained α) with the best mean accuracy over the leave-one-source-out episodes
  (adapted as at test time, the episode's own expert masked); aggregator_pretrained: the
  factor likewise, for the ERM student; erm_continued: the checkpoint with the best mean
  source-validation accuracy (no adaptation). Ties go to the earlier candidate.

  Returns:
    ((meta_state, factor_meta, factor_pretrained, continued_state), selection dict).
  """
  factors = tuple(float(f) for f in setup.config.selection.inner_lr_factors)

  def adapted_score(student, stats, aggregator, factor):
    accs = []
    for v in sources_val:
      xs, tokens = v.x[v.support], v.tokens[v.support]
      params = adapt(student, stats, aggregator, xs, tokens, mask=v.mask, lr_factor=factor)
      accs.append(np.mean(preds_of(params, stats, v.x) == v.y))
    return float(np.mean(accs))

  def plain_score(params, stats):
    return float(np.mean([np.mean(preds_of(params, stats, v.x) == v.y) for v in sources_val]))

  meta_scores = {
    (step, f): adapted_score(m["student"], m["batch_stats"], m["aggregator"], f)
    for step, m in candidates["meta"]
    for f in factors
  }
  pre_scores = {
    f: adapted_score(student_erm["params"], student_erm["batch_stats"], aggregator_pre, f)
    for f in factors
  }
  cont_scores = {
    step: plain_score(c["params"], c["batch_stats"])
    for step, c in candidates.get("erm_continued") or ()
  }
  feature_dim = sources_val[0].tokens.shape[-1]
  return choose_on_sources(setup, feature_dim, candidates, meta_scores, pre_scores, cont_scores)


def choose_on_sources(
  setup: Setup,
  feature_dim: int,
  candidates: dict,
  meta_scores: dict,
  pre_scores: dict,
  cont_scores: dict,
):
  """`select_on_sources`' choice from its scores (mean source-validation accuracies).

  meta_scores: {(step, factor): score} over `candidates['meta']` × the factors;
  pre_scores: {factor: score}; cont_scores: {step: score} over
  `candidates['erm_continued']` (empty: no such candidates). Shared with the streaming
  path, which computes the scores over streamed validation splits.

  Returns:
    as `select_on_sources`.
  """
  m_step, m_factor = stages.choose(meta_scores)
  p_factor = stages.choose(pre_scores)
  alpha = inner_lr(setup.config, feature_dim)
  selection = {
    "meta_dmoe": {
      "checkpoint_step": m_step,
      "inner_lr_factor": m_factor,
      "inner_lr": alpha * m_factor,
      "source_val_accuracy": meta_scores[(m_step, m_factor)],
      "scores": {f"step{s}_x{f:g}": v for (s, f), v in meta_scores.items()},
    },
    "aggregator_pretrained": {
      "inner_lr_factor": p_factor,
      "inner_lr": alpha * p_factor,
      "source_val_accuracy": pre_scores[p_factor],
      "scores": {f"x{f:g}": v for f, v in pre_scores.items()},
    },
  }
  continued = None
  if cont_scores:
    c_step = stages.choose(cont_scores)
    continued = dict(candidates["erm_continued"])[c_step]
    selection["erm_continued"] = {
      "checkpoint_step": c_step,
      "source_val_accuracy": cont_scores[c_step],
      "scores": {f"step{s}": v for s, v in cont_scores.items()},
    }
  meta_state = dict(candidates["meta"])[m_step]
  return (meta_state, m_factor, p_factor, continued), selection


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


# The config fields each reusable stage depends on (see train/stage_cache.py);
# meta-training and its control, the last stages, are what ablations vary and are never shared.
STAGE_FIELDS = {
  "shared_backbone": ("seed", "data", "model", "backbone", "num_devices"),
  "experts": ("seed", "data", "model", "backbone", "experts", "num_devices"),
  "aggregator": (
    "seed",
    "data",
    "model",
    "backbone",
    "experts",
    "aggregator",
    "eval_batch_size",
    "num_devices",
  ),
  "student": ("seed", "data", "model", "backbone", "student", "num_devices"),
}


class Trained(NamedTuple):
  """The states of stages 2-4 (each as `stages.run_stage` returns it)."""

  aggregator: PyTree  # {'params', 'opt_state'}
  student: PyTree  # the ERM student: {'params', 'batch_stats', 'opt_state'}
  meta: PyTree  # {'student', 'aggregator', 'batch_stats', 'opt_student', 'opt_aggregator'}
  # `evaluate_with`'s candidates: {'meta': [(step, state)], 'erm_continued': [(step, state)]}
  candidates: dict | None = None


def meta_schedule(config, lr: float, setup: Setup) -> optax.Schedule:
  """The meta stage's learning rate: ×`meta.lr_decay` after every epoch (official code).

  An epoch is `meta.steps_per_epoch` episodes, or (0) as many as the pooled source
  training set holds: ⌊N_src / (support + query)⌋ (the official epoch is one pass).
  """
  cfg = config.meta
  per_epoch = cfg.steps_per_epoch or max(
    1, setup.num_source_train // (cfg.support_size + cfg.query_size)
  )
  return optax.exponential_decay(lr, per_epoch, cfg.lr_decay, staircase=True)


def train_backbone(
  config,
  workdir: str,
  setup: Setup,
  *,
  writer,
  stage_fields=STAGE_FIELDS,
  step: Callable | None = None,
):
  """The shared starting point of every expert and the student: {'params', 'batch_stats'}.

  Loaded from `backbone.checkpoint` when set (shapes checked), otherwise ERM on the pooled
  source domains (stage 'shared_backbone', the analogue of the paper's ImageNet pre-training),
  written to `<workdir>/backbone.msgpack` for reuse. `step`: `tx -> step` of that stage
  (default: the in-memory `make_student_step(..., stage='backbone')`).
  """
  template = init_model(setup, jax.random.fold_in(setup.key("init"), 2))
  if config.backbone.checkpoint:
    loaded = backbone_io.load_backbone(config.backbone.checkpoint, template)
    return mesh_lib.replicate(loaded, setup.mesh)
  tx = optax.adam(config.backbone.lr)
  state = mesh_lib.replicate({**template, "opt_state": tx.init(template["params"])}, setup.mesh)
  state = stages.run_stage(
    config,
    workdir,
    "shared_backbone",
    (step or memory_steps(setup).backbone)(tx),
    state,
    config.backbone.steps,
    writer=writer,
    stage_fields=stage_fields,
  )
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  if jax.process_index() == 0:
    backbone_io.save_backbone(f"{workdir}/backbone.msgpack", variables)
  return variables


def run(config, workdir: str, *, setup: Setup | None = None) -> dict:
  """Runs (or resumes) every stage and returns the results dict of DESIGN.md.

  `setup` (from `make_setup(config)`) may be passed when the caller already
  built it to check the inputs.
  """
  validate_config(config)
  _check_in_memory(config)
  if setup is None:
    setup = make_setup(config)
  logging.info("super-domains: %s", setup.super_domains)
  writer = metrics_lib.MetricWriter(workdir)

  # 0. The shared backbone (unless the independent-initialisation ablation).
  backbone = None
  if config.model.shared_init:
    backbone = train_backbone(config, workdir, setup, writer=writer)

  # 1. Experts.
  tx = optax.adam(config.experts.lr)
  experts = place_experts(setup, init_experts(setup, tx, backbone))
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
  if setup.expert_mesh is not None:
    # The later stages run every expert on every device of the data-parallel mesh.
    experts = jax.device_put(experts, mesh_lib.replicated(setup.mesh))
  feats = expert_features(setup, experts, np.asarray(setup.x))  # [E, N_src, D], cached

  trained = train_from_features(config, workdir, setup, feats, writer=writer, backbone=backbone)
  writer.close()

  # 5. Selection on the sources, adaptation and evaluation.
  details: dict = {}
  metrics = evaluate(
    setup,
    experts,
    trained.aggregator["params"],
    trained.student,
    trained.meta,
    candidates=trained.candidates,
    details=details,
  )
  return {
    "method": "meta_dmoe",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "source_domains": list(setup.sources),
    "target_domains": list(setup.targets),
    "super_domains": [list(g) for g in setup.super_domains],
    "inner_lr": inner_lr(config, int(feats.shape[-1])),
    "metrics": metrics,
    "selection": details["selection"],
    "per_example": details["per_example"],
    **({"backbone_checkpoint": setup.checkpoint_info} if setup.checkpoint_info else {}),
  }


class StepBuilders(NamedTuple):
  """The steps of the stages after the experts', from their optimisers: what differs
  between the in-memory path (`memory_steps`, batches indexed from device arrays and the
  feature cache) and the streaming one (`meta_dmoe_stream`)."""

  backbone: Callable  # tx -> step (the shared-backbone ERM stage)
  aggregator: Callable  # tx -> step
  student: Callable  # tx -> step
  meta: Callable  # (tx_student, tx_aggregator) -> step
  continued: Callable  # tx -> step (the erm_continued control)


def memory_steps(setup: Setup, feats: jax.Array | None = None) -> StepBuilders:
  """The in-memory path's steps; `feats` [E, N_src, D] (the frozen experts' features of
  `setup.x`) is needed by the aggregator and meta stages only."""
  return StepBuilders(
    backbone=lambda tx: make_student_step(setup, tx, stage="backbone"),
    aggregator=lambda tx: make_aggregator_step(setup, tx, feats),
    student=lambda tx: make_student_step(setup, tx),
    meta=lambda tx_s, tx_a: make_meta_step(setup, tx_s, tx_a, feats),
    continued=lambda tx: make_continued_step(setup, tx),
  )


def train_from_features(
  config,
  workdir: str,
  setup: Setup,
  feats: jax.Array,
  *,
  writer: metrics_lib.MetricWriter | None,
  stage_fields: dict[str, tuple[str, ...]] = STAGE_FIELDS,
  backbone: PyTree | None = None,
) -> Trained:
  """Stages 2-4 (aggregator, ERM student, meta-training and its control) on cached features.

  Args:
    config: the run's config (the fields `validate_config` checks).
    workdir: the run's directory.
    setup: from `make_setup(config)`.
    feats: [E, N_src, D] the frozen experts' features of every source training image
      (`setup.x`), from any kind of expert; D must be the student's feature size.
    writer: where the stages' metrics go.
    stage_fields: the config fields each shareable stage depends on (stage cache).
    backbone: the shared starting point of the student ({'params', 'batch_stats'}); when
      None and `model.shared_init`, the backbone stage is run (or loaded) here.
  """
  return train_stages(
    config,
    workdir,
    setup,
    memory_steps(setup, feats),
    int(feats.shape[-1]),
    writer=writer,
    stage_fields=stage_fields,
    backbone=backbone,
  )


def train_stages(
  config,
  workdir: str,
  setup: Setup,
  steps: StepBuilders,
  feature_dim: int,
  *,
  writer: metrics_lib.MetricWriter | None,
  stage_fields: dict[str, tuple[str, ...]] = STAGE_FIELDS,
  backbone: PyTree | None = None,
) -> Trained:
  """Stages 2-4 with the given steps (`train_from_features`' arguments; `feature_dim` is D,
  the experts' and the student's feature size)."""
  # 2. Aggregator pretraining.
  tx = optax.adam(config.aggregator.lr)
  tokens = jnp.zeros((1, setup.num_experts, feature_dim), jnp.float32)
  agg_params = jax.jit(setup.agg_model.init)(setup.key("init"), tokens)["params"]
  aggregator = mesh_lib.replicate(
    {"params": agg_params, "opt_state": tx.init(agg_params)}, setup.mesh
  )
  aggregator = stages.run_stage(
    config,
    workdir,
    "aggregator",
    steps.aggregator(tx),
    aggregator,
    config.aggregator.pretrain_steps,
    writer=writer,
    stage_fields=stage_fields,
  )

  # 3. ERM student, from the shared backbone (or, as an ablation, a random initialisation).
  if backbone is None and config.model.shared_init:
    backbone = train_backbone(
      config, workdir, setup, writer=writer, stage_fields=stage_fields, step=steps.backbone
    )
  if backbone is None:
    backbone = init_model(setup, jax.random.fold_in(setup.key("init"), 1))
  tx = optax.adam(config.student.lr)
  student = init_student(setup, tx, backbone)
  student = stages.run_stage(
    config,
    workdir,
    "student",
    steps.student(tx),
    student,
    config.student.steps,
    writer=writer,
    stage_fields=stage_fields,
  )

  # 4. Meta-training from the pretrained aggregator and the ERM student, the lrs decayed
  # per epoch; checkpoints at `selection.meta_checkpoints` points are kept for selection.
  tx_s = optax.adam(meta_schedule(config, config.meta.student_lr, setup))
  tx_a = optax.adam(meta_schedule(config, config.meta.aggregator_lr, setup))
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
  meta, meta_kept = stages.run_in_segments(
    config,
    workdir,
    "meta",
    steps.meta(tx_s, tx_a),
    meta,
    config.meta.steps,
    config.selection.meta_checkpoints,
    writer=writer,
    stage_fields=stage_fields,
    keep=lambda st: {k: st[k] for k in ("student", "aggregator", "batch_stats")},
  )

  # 4'. The erm_continued control: the same query batches, lr and schedule, no inner step.
  continued = jax.tree.map(
    jnp.copy,
    {
      "params": student["params"],
      "batch_stats": student["batch_stats"],
      "opt_state": tx_s.init(student["params"]),
    },
  )
  _, continued_kept = stages.run_in_segments(
    config,
    workdir,
    "erm_continued",
    steps.continued(tx_s),
    continued,
    config.meta.steps,
    config.selection.meta_checkpoints,
    writer=writer,
    stage_fields=stage_fields,
    keep=lambda st: {k: st[k] for k in ("params", "batch_stats")},
  )
  candidates = {"meta": meta_kept, "erm_continued": continued_kept}
  return Trained(aggregator, student, meta, candidates)
