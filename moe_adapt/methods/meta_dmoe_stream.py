"""Meta-DMoE on the streaming path (`data.streaming=True`): datasets that do not fit in memory.

This module is what the method name 'meta_dmoe' resolves to (`methods.get_method`): its
`validate_config`, `make_setup` and `run` take either path, the in-memory one
(`meta_dmoe`) unless `data.streaming` is set.

The in-memory path (`meta_dmoe`) holds every source image on every device and caches the
frozen experts' features of all of them. Here the images stay on disk (a TFDS dataset
prepared as array_record, `data.benchmark='tfds'`) and are read, decoded and augmented as
the steps need them (`data.streaming.StepBatches`: seeded shuffle, per-host sharding,
prefetch; a stage resumed from its checkpoint reads exactly the batches the interrupted run
would have, from the checkpointed step alone). Nothing is cached, in memory or on disk:

- `experts`: one stream per super-domain, stacked into `[E, B, ...]` and fed to the same
  update as the in-memory step (`meta_dmoe.make_expert_update`), or to the (data, expert)
  mesh step (`meta_dmoe.ExpertMeshStep`, `experts.mesh_shape`).
- `aggregator`: the pooled source stream; the frozen experts' tokens [B, E, D] are computed
  inside the jitted step (`meta_dmoe.expert_tokens`), then `make_aggregator_update`.
- `shared_backbone` (without `backbone.checkpoint`) and `student`: the pooled stream,
  `make_student_update`.
- `meta`: one stream per source domain of `meta.support_size + meta.query_size` examples;
  the episode's domain is drawn from (seed, step) on the host (`EpisodePlan`), the batch is
  that domain's next one; the support's tokens come from the experts inside the step, the
  mask from `expert_of_domain`; then `make_meta_update` (the in-memory maths).
  `erm_continued` reads the same episodes and steps on their query halves.
- Evaluation: every split is read once per pass in fixed-size padded batches
  (`eval_batches`, transform `data.eval_augment`); the unlabeled supports (test-time
  adaptation, source-side selection) are read by random access at the first k positions of
  the same seeded permutations as the in-memory path. The variants and the results.json keys
  (`metrics`, `per_example`, `selection`) are the in-memory path's.

The examples of each domain's train / val / test split are the in-memory `tfds`
benchmark's (`streaming.open_domain_splits`); the images differ by the augmentation and by
the resize (PIL's antialiased bilinear here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from moe_adapt import data, models
from moe_adapt.data import streaming
from moe_adapt.methods import meta_dmoe
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import stages

PyTree = Any

# Seeds of the streams: (config.seed, tag[, index]) -> one stream's shuffle and augmentation.
_STREAM_TAGS = {"experts": 1, "aggregator": 2, "student": 3, "meta": 4, "backbone": 6}


# ----------------------------------------------------------------------------
# Config and setup
# ----------------------------------------------------------------------------


def validate_config(config) -> None:
  """`meta_dmoe.validate_config`, and the streaming fields with `data.streaming=True`."""
  meta_dmoe.validate_config(config)
  if meta_dmoe.streaming(config):
    validate_stream_config(config)


def make_setup(config) -> meta_dmoe.Setup:
  """`make_stream_setup` with `data.streaming=True`, else `meta_dmoe.make_setup`."""
  if meta_dmoe.streaming(config):
    return make_stream_setup(config)
  return meta_dmoe.make_setup(config)


def run(config, workdir: str, *, setup: meta_dmoe.Setup | None = None) -> dict:
  """`run_stream` with `data.streaming=True`, else `meta_dmoe.run`."""
  if meta_dmoe.streaming(config):
    return run_stream(config, workdir, setup=setup)
  return meta_dmoe.run(config, workdir, setup=setup)


def validate_stream_config(config) -> None:
  """Checks the streaming fields; raises ValueError naming the field."""
  if config.data.benchmark != "tfds":
    raise ValueError(
      f"data.streaming=True needs data.benchmark='tfds' (a TFDS dataset prepared as "
      f"array_record); got data.benchmark={config.data.benchmark!r}: set "
      "data.streaming=False for the in-memory benchmarks"
    )
  streaming.check_augment(config.data.augment, field="data.augment")
  streaming.check_augment(config.data.eval_augment, field="data.eval_augment")
  size = config.data.options.get("image_size", None)
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ValueError(
      f"data.options.image_size={size!r} is invalid with data.streaming=True; accepted: an "
      "int >= 1 (the side of the decoded, augmented images)"
    )
  # Split over hosts (meta episodes and evaluation batches are read whole on every host).
  for stage in ("experts", "aggregator", "student", "backbone"):
    _per_host(config[stage].batch_size, f"{stage}.batch_size")


def _per_host(batch_size: int, field: str) -> int:
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(
      f"{field}={batch_size} does not divide over {count} hosts; accepted: a multiple of {count}"
    )
  return batch_size // count


@dataclasses.dataclass(frozen=True)
class StreamSetup(meta_dmoe.Setup):
  """`meta_dmoe.Setup` without images: `x`, `y`, `index`, `expert_pools` and `pool_sizes`
  are None and `splits` is empty; the examples are streamed from `domain_sources`."""

  domain_sources: dict = dataclasses.field(default_factory=dict)  # domain -> DomainSources
  train_transform: Callable | None = None  # (example, rng) -> {'image', 'label'}
  eval_transform: Callable | None = None

  @property
  def num_source_train(self) -> int:
    return sum(len(self.domain_sources[d].train.indices) for d in self.sources)

  def stream(
    self, source: streaming.Source, batch_size: int, *seed: int, every_host: bool = False
  ) -> streaming.StepBatches:
    """The training stream of `source`, seeded by (config.seed, seed...): `StepBatches` of
    this host's share of `batch_size`, or (`every_host`) of the whole batch on every host."""
    rng_seed = int(np.random.SeedSequence([self.config.seed, *seed]).generate_state(1)[0])
    if every_host:
      return streaming.StepBatches(
        source, self.train_transform, batch_size=batch_size, seed=rng_seed, shard=(0, 1)
      )
    return streaming.StepBatches(
      source,
      self.train_transform,
      batch_size=_per_host(batch_size, "batch_size"),
      seed=rng_seed,
    )

  def pooled(self, domains: tuple[str, ...]) -> streaming.Source:
    """The training examples of `domains` together, as one source."""
    parts = [self.domain_sources[d].train for d in domains]
    indices = np.concatenate([p.indices for p in parts])
    return parts[0]._replace(indices=indices, domains=tuple(domains))


def _normalized(transform: Callable, mean: np.ndarray, std: np.ndarray) -> Callable:
  """`transform` with (image - mean) / std (a checkpoint's input normalisation)."""
  mean, std = mean.astype(np.float32), std.astype(np.float32)

  def apply(example, rng):
    out = transform(example, rng)
    out["image"] = ((out["image"] - mean) / std).astype(np.float32)
    return out

  return apply


def make_stream_setup(config) -> StreamSetup:
  """Opens the streams' sources (indices only: no image is read) and builds the models.

  Raises:
    ValueError: naming the field: the options of the `tfds` benchmark (e.g.
      data.options.domain_key not a feature), domains, sizes (as `meta_dmoe.make_setup`).
  """
  validate_stream_config(config)
  options = {k: v for k, v in config.data.options.to_dict().items() if v != ""}
  benchmark = data.get_benchmark(config.data.benchmark, **options)
  sources, targets = meta_dmoe.resolve_domains(config, benchmark)
  opts = benchmark.options
  if opts["domain_key"] is None:
    raise ValueError(
      "data.options.domain_key=None: Meta-DMoE streams one domain per expert and episode; "
      "accepted: the dataset's domain feature"
    )
  domain_sources = streaming.open_domain_splits(
    opts["tfds_name"],
    data_dir=opts["data_dir"],
    domain_key=opts["domain_key"],
    domains=benchmark.domains,
    seed=config.seed,
    split_names=opts["split_names"],
    splits=opts["splits"],
    val_fraction=opts["val_fraction"],
    test_fraction=opts["test_fraction"],
    max_per_domain=opts["max_per_domain"],
    required_keys=[("image_key", opts["image_key"]), ("label_key", opts["label_key"])],
  )
  smallest = min(len(domain_sources[d].train.indices) for d in sources)
  episode = config.meta.support_size + config.meta.query_size
  if episode > smallest:
    raise ValueError(
      f"meta.support_size + meta.query_size = {episode} exceeds the smallest source domain "
      f"({smallest} training examples); accepted: at most {smallest}"
    )
  for d in targets:
    n = len(domain_sources[d].whole().indices)
    if config.adapt.support_size > n:
      raise ValueError(
        f"adapt.support_size={config.adapt.support_size} exceeds target domain {d!r} "
        f"({n} unlabeled examples); accepted: at most {n}"
      )

  def transform(augment):
    # In [0, 1] as the in-memory benchmark; a checkpoint's normalisation is applied after.
    return streaming.image_transform(
      image_size=config.data.options.image_size,
      augment=tuple(augment),
      normalize="unit",
      image_key=opts["image_key"],
      label_key=opts["label_key"],
    )

  train_transform, eval_transform = (
    transform(config.data.augment),
    transform(config.data.eval_augment),
  )
  base = meta_dmoe.make_models(config, benchmark)
  if base.checkpoint is not None:
    mean, std = base.checkpoint.mean, base.checkpoint.std
    train_transform = _normalized(train_transform, mean, std)
    eval_transform = _normalized(eval_transform, mean, std)
  super_domains = meta_dmoe.partition_domains(sources, config.experts.num_experts, config.seed)
  expert_of = {d: k for k, group in enumerate(super_domains) for d in group}
  return StreamSetup(
    config=config,
    benchmark=benchmark,
    sources=sources,
    targets=targets,
    splits={},
    mesh=mesh_lib.make_mesh(config.num_devices or None),
    model=base.model,
    agg_model=base.agg_model,
    x=None,
    y=None,
    index=None,
    expert_of_domain=jnp.asarray([expert_of[d] for d in sources], jnp.int32),
    expert_pools=None,
    pool_sizes=None,
    super_domains=super_domains,
    checkpoint_info=None
    if base.checkpoint is None
    else base.checkpoint.info(config.backbone.checkpoint),
    expert_mesh=meta_dmoe.make_expert_mesh(config),
    domain_sources=domain_sources,
    train_transform=train_transform,
    eval_transform=eval_transform,
  )


def _to_device(setup: StreamSetup, x: np.ndarray, leading: int = 0) -> jax.Array:
  """This host's part of a batch as a global array, split over `data` when it divides."""
  if setup.mesh.size == 1 or (x.shape[leading] * jax.process_count()) % setup.mesh.size:
    return jax.device_put(x, mesh_lib.replicated(setup.mesh))
  return jax.make_array_from_process_local_data(setup.batch_sharding(x.ndim, leading), x)


def _frozen(experts: PyTree) -> PyTree:
  """The experts' variables the later stages run: no optimiser state."""
  return {"params": experts["params"], "batch_stats": experts["batch_stats"]}


# ----------------------------------------------------------------------------
# Training steps: streamed batches into meta_dmoe's updates
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamedStep:
  """`step(state, step) = compute(state, step, *read(step))`.

  `read` is the host's part (read, decode, augment, place on the mesh; the stream reads
  ahead on its threads), `compute` the jitted step; apart, so that a benchmark can time
  each (`benchmarks/stream.py --meta_step`).
  """

  read: Callable[[Any], tuple]
  compute: Callable

  def __call__(self, state: PyTree, step: jax.Array):
    return self.compute(state, step, *self.read(step))


def make_expert_step(setup: StreamSetup, tx: optax.GradientTransformation) -> Callable:
  """All experts, expert k on the next batch of super-domain k's stream."""
  cfg = setup.config.experts
  streams = [
    setup.stream(setup.pooled(group), cfg.batch_size, _STREAM_TAGS["experts"], k)
    for k, group in enumerate(setup.super_domains)
  ]

  def batch(step) -> tuple[np.ndarray, np.ndarray]:
    batches = [s(step) for s in streams]
    return np.stack([b["image"] for b in batches]), np.stack([b["label"] for b in batches])

  if setup.expert_mesh is not None:
    return meta_dmoe.ExpertMeshStep(setup, tx, batch)
  update = meta_dmoe.make_expert_update(setup, tx)

  def compute(state, step, xb, yb):
    del step
    return update(state, setup.constrain(xb, leading=1), yb)

  def read(step):
    xb, yb = batch(step)
    return _to_device(setup, xb, leading=1), _to_device(setup, yb, leading=1)

  return StreamedStep(read, jax.jit(compute, donate_argnums=0))


def make_student_step(setup: StreamSetup, tx, *, stage: str = "student") -> Callable:
  """ERM on the pooled source stream (`stage` 'student' or 'backbone')."""
  stream = setup.stream(
    setup.pooled(setup.sources), setup.config[stage].batch_size, _STREAM_TAGS[stage]
  )
  update = meta_dmoe.make_student_update(setup, tx)

  def compute(state, step, xb, yb):
    del step
    return update(state, setup.constrain(xb), yb)

  return StreamedStep(_reader(setup, stream), jax.jit(compute, donate_argnums=0))


def make_aggregator_step(setup: StreamSetup, tx, experts: PyTree) -> Callable:
  """CE through the aggregator's pretraining head on the pooled stream, the frozen
  experts' tokens computed in the step."""
  stream = setup.stream(
    setup.pooled(setup.sources), setup.config.aggregator.batch_size, _STREAM_TAGS["aggregator"]
  )
  update = meta_dmoe.make_aggregator_update(setup, tx)

  def compute(state, step, xb, yb, experts):
    # The in-memory step's key split: its first half drew the batch indices.
    _, k_drop = jax.random.split(jax.random.fold_in(setup.key("aggregator"), step))
    tokens = setup.constrain(meta_dmoe.expert_tokens(setup, experts, setup.constrain(xb)))
    return update(state, tokens, yb, k_drop)

  read = _reader(setup, stream)
  return StreamedStep(lambda step: (*read(step), experts), jax.jit(compute, donate_argnums=0))


def _reader(setup: StreamSetup, stream: streaming.StepBatches) -> Callable:
  """`step -> (images, labels)` of `stream`'s batch `step`, on the mesh."""

  def read(step):
    b = stream(step)
    return _to_device(setup, b["image"]), _to_device(setup, b["label"])

  return read


@dataclasses.dataclass(frozen=True)
class EpisodePlan:
  """Which source domain each meta step draws, and where in that domain's stream.

  The domain of step t is draw t of a generator seeded by (seed, 'meta'), uniform over the
  source domains (as `data.sample_episode`); `position[t]` counts the earlier steps of the
  same domain, so each domain's stream is read in order (one prefetching iterator) and a
  resumed stage reads from the checkpointed step alone.
  """

  domain: np.ndarray  # [T] int32 index into setup.sources
  position: np.ndarray  # [T] int64 batch of that domain's stream

  @classmethod
  def make(cls, seed: int, num_domains: int, num_steps: int) -> EpisodePlan:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_TAGS["meta"]]))
    domain = rng.integers(0, num_domains, size=num_steps).astype(np.int32)
    position = np.zeros(num_steps, np.int64)
    counts = np.zeros(num_domains, np.int64)
    for t, d in enumerate(domain):
      position[t] = counts[d]
      counts[d] += 1
    return cls(domain, position)


class EpisodeStreams:
  """Step t's episode: the next S + Q examples of the planned domain's stream."""

  def __init__(self, setup: StreamSetup):
    cfg = setup.config.meta
    self._plan = EpisodePlan.make(setup.config.seed, len(setup.sources), cfg.steps)
    size = cfg.support_size + cfg.query_size
    # Every host reads the whole episode (it is small, and split into support and query).
    self._streams = [
      setup.stream(setup.domain_sources[d].train, size, _STREAM_TAGS["meta"], i, every_host=True)
      for i, d in enumerate(setup.sources)
    ]

  def __call__(self, step) -> tuple[int, dict[str, np.ndarray]]:
    step = int(step)
    domain = int(self._plan.domain[step])
    return domain, self._streams[domain](int(self._plan.position[step]))


def _replicated(setup: StreamSetup, x: np.ndarray) -> jax.Array:
  """A batch every host holds whole, on every device (steps constrain it over `data`)."""
  return jax.device_put(x, mesh_lib.replicated(setup.mesh))


def _split_episode(setup: StreamSetup, x: jax.Array, y: jax.Array):
  """(support x [S, ...], query x [Q, ...], query y [Q]) of an episode batch [S + Q, ...]."""
  s = setup.config.meta.support_size
  return x[:s], x[s:], y[s:]


def make_meta_step(setup: StreamSetup, tx_student, tx_agg, experts: PyTree) -> Callable:
  """One second-order meta-step on a streamed single-domain episode."""
  feature_dim = experts["params"]["head"]["kernel"].shape[-2]
  update = meta_dmoe.make_meta_update(setup, tx_student, tx_agg, feature_dim)
  episodes = EpisodeStreams(setup)

  def compute(state, step, x, y, domain, experts, expert_of_domain):
    del step
    xs, xq, yq = _split_episode(setup, x, y)
    xs = setup.constrain(xs)
    support = {
      "x": xs,
      "tokens": setup.constrain(meta_dmoe.expert_tokens(setup, experts, xs)),
      "mask": meta_dmoe.expert_mask(setup, expert_of_domain, domain),
    }
    return update(state, support, {"x": setup.constrain(xq), "y": yq})

  def read(step):
    domain, b = episodes(step)
    x, y = _replicated(setup, b["image"]), _replicated(setup, b["label"])
    return x, y, jnp.int32(domain), experts, setup.expert_of_domain

  return StreamedStep(read, jax.jit(compute, donate_argnums=0))


def make_continued_step(setup: StreamSetup, tx) -> Callable:
  """The `erm_continued` control on the query halves of the meta stage's episodes."""
  update = meta_dmoe.make_continued_update(setup, tx)
  episodes = EpisodeStreams(setup)

  def compute(state, step, x, y):
    del step
    _, xq, yq = _split_episode(setup, x, y)
    return update(state, setup.constrain(xq), yq)

  def read(step):
    _, b = episodes(step)
    return _replicated(setup, b["image"]), _replicated(setup, b["label"])

  return StreamedStep(read, jax.jit(compute, donate_argnums=0))


def stream_steps(setup: StreamSetup, experts: PyTree) -> meta_dmoe.StepBuilders:
  """The streaming steps of the stages after the experts' (frozen `experts`)."""
  return meta_dmoe.StepBuilders(
    backbone=lambda tx: make_student_step(setup, tx, stage="backbone"),
    aggregator=lambda tx: make_aggregator_step(setup, tx, experts),
    student=lambda tx: make_student_step(setup, tx),
    meta=lambda tx_s, tx_a: make_meta_step(setup, tx_s, tx_a, experts),
    continued=lambda tx: make_continued_step(setup, tx),
  )


# ----------------------------------------------------------------------------
# Evaluation over streamed splits
# ----------------------------------------------------------------------------


def eval_passes(
  setup: StreamSetup, source: streaming.Source
) -> Iterator[tuple[jax.Array, np.ndarray, np.ndarray]]:
  """(x [B, ...] on the mesh, y [B], mask [B]) over the whole split, in order, padded.

  Every host reads the whole split (the predictions of every example are needed on every
  host for results.json).
  """
  batches = streaming.eval_batches(
    source, setup.eval_transform, batch_size=setup.config.eval_batch_size, shard=(0, 1)
  )
  for b in batches:
    yield _replicated(setup, b["image"]), b["label"], b["mask"]


def read_support(
  setup: StreamSetup, source: streaming.Source, key: jax.Array, k: int
) -> tuple[np.ndarray, np.ndarray]:
  """(positions [k], images [k, ...]): the first k of a permutation of the split's examples
  drawn from `key` (the in-memory path's draw), read by random access."""
  positions = np.asarray(jax.random.permutation(key, len(source.indices))[:k])
  rng = np.random.default_rng(0)  # evaluation transforms are deterministic
  images = [
    setup.eval_transform(source.data[int(source.indices[p])], rng)["image"] for p in positions
  ]
  return positions, np.stack(images)


class _Predictors(NamedTuple):
  experts_out: Callable  # (experts, xb) -> (tokens [B, E, D], logits [E, B, C])
  student: Callable  # (params, stats, xb) -> [B]
  expert_average: Callable  # logits [E, B, C] -> [B]
  aggregator_head: Callable  # (params, tokens) -> [B]
  aggregate: Callable  # (params, tokens) -> [B, D]


def _predictors(setup: StreamSetup) -> _Predictors:
  """The evaluation's jitted functions."""
  model, agg_model = setup.model, setup.agg_model

  @jax.jit
  def experts_out(experts, xb):
    tokens = meta_dmoe.expert_tokens(setup, experts, xb)  # [B, E, D]
    logits = jax.vmap(
      lambda head, f: model.apply({"params": {"head": head}}, f, method=models.Classifier.classify),
      in_axes=(0, 1),
    )(experts["params"]["head"], tokens)
    return tokens, logits  # logits [E, B, C]

  @jax.jit
  def student(params, stats, xb):
    logits = model.apply({"params": params, "batch_stats": stats}, xb, train=False)
    return jnp.argmax(logits, -1)

  @jax.jit
  def expert_average(logits):
    return jnp.argmax(jax.nn.softmax(logits, -1).mean(0), -1)

  @jax.jit
  def aggregator_head(params, tokens):
    return jnp.argmax(agg_model.apply({"params": params}, tokens), -1)

  @jax.jit
  def aggregate(params, tokens):
    return agg_model.apply({"params": params}, tokens, method=models.AggregatorClassifier.aggregate)

  return _Predictors(experts_out, student, expert_average, aggregator_head, aggregate)


def _predict_split(
  setup: StreamSetup,
  predict: _Predictors,
  experts: PyTree,
  source: streaming.Source,
  students: dict[Any, tuple[PyTree, PyTree]],
  *,
  on_tokens: Callable[[jax.Array, jax.Array, np.ndarray], dict] | None = None,
) -> tuple[dict[Any, np.ndarray], np.ndarray]:
  """One pass over a split: every student's predictions and `on_tokens`' per-batch outputs.

  Args:
    students: name -> (params, batch_stats); predicted on every example.
    on_tokens: `(tokens [B, E, D], expert logits [E, B, C], mask [B]) -> {name: [B]}`,
      more per-example outputs (predictions from the experts' tokens).

  Returns:
    ({name: [N]} in the split's order, labels [N]).
  """
  outs: dict[Any, list] = {}
  labels = []
  for xb, yb, mask in eval_passes(setup, source):
    row = {name: predict.student(p, s, xb) for name, (p, s) in students.items()}
    if on_tokens is not None:
      tokens, logits = predict.experts_out(experts, xb)
      row.update(on_tokens(tokens, logits, mask))
    for name, value in row.items():
      outs.setdefault(name, []).append(np.asarray(value)[mask])
    labels.append(yb[mask])
  return {k: np.concatenate(v) for k, v in outs.items()}, np.concatenate(labels)


def evaluate(
  setup: StreamSetup,
  experts: PyTree,
  aggregator_pre: PyTree,
  student_erm: PyTree,
  candidates: dict,
  *,
  details: dict,
) -> dict:
  """`meta_dmoe.evaluate_with`'s variants, selection and per-example records over streamed
  splits: the same supports, adaptation and choices, each split read in padded batches.

  Returns:
    variant -> {domain: {'accuracy', ...}, 'mean': {'accuracy'}}; `details` receives
    'per_example' and 'selection'.
  """
  cfg = setup.config
  adapt = meta_dmoe.make_adapt_fn(setup)
  predict = _predictors(setup)
  experts_out, aggregate = predict.experts_out, predict.aggregate
  feature_dim = experts["params"]["head"]["kernel"].shape[-2]
  factors = tuple(float(f) for f in cfg.selection.inner_lr_factors)
  erm_stats = student_erm["batch_stats"]

  # Source-side selection: each source's validation split, its own expert masked.
  meta_acc: dict = {}
  pre_acc: dict = {}
  cont_acc: dict = {}
  agg_sum = {step: 0.0 for step, _ in candidates["meta"]}
  count = 0
  for i, domain in enumerate(setup.sources):
    source = setup.domain_sources[domain].val
    k = min(cfg.adapt.support_size, len(source.indices))
    _, xs = read_support(setup, source, jax.random.fold_in(setup.key("select"), i), k)
    tokens, _ = experts_out(experts, xs)
    mask = jnp.arange(setup.num_experts) != setup.expert_of_domain[i]
    students = {}
    for step, m in candidates["meta"]:
      for f in factors:
        params = adapt(
          m["student"], m["batch_stats"], m["aggregator"], xs, tokens, mask=mask, lr_factor=f
        )
        students[("meta", step, f)] = (params, m["batch_stats"])
    for f in factors:
      params = adapt(
        student_erm["params"], erm_stats, aggregator_pre, xs, tokens, mask=mask, lr_factor=f
      )
      students[("pre", f)] = (params, erm_stats)
    for step, c in candidates.get("erm_continued") or ():
      students[("cont", step)] = (c["params"], c["batch_stats"])

    def source_mean(tokens, logits, mask):
      del logits, mask  # padding rows are dropped by _predict_split
      return {("agg", step): aggregate(m["aggregator"], tokens) for step, m in candidates["meta"]}

    preds, y = _predict_split(setup, predict, experts, source, students, on_tokens=source_mean)
    count += len(y)
    for name, value in preds.items():
      if name[0] == "agg":
        agg_sum[name[1]] = agg_sum[name[1]] + value.sum(0)
        continue
      acc = float(np.mean(value == y))
      table = {"meta": meta_acc, "pre": pre_acc, "cont": cont_acc}[name[0]]
      table.setdefault(name[1:] if name[0] == "meta" else name[1], []).append(acc)
  chosen, selection = meta_dmoe.choose_on_sources(
    setup, feature_dim, candidates, _means(meta_acc), _means(pre_acc), _means(cont_acc)
  )
  meta_state, factor_meta, factor_pre, continued = chosen
  for choice in selection.values():
    logging.info("selected on the sources' validation splits: %s", choice)
  meta_step = selection["meta_dmoe"]["checkpoint_step"]
  source_mean_feature = jnp.asarray(agg_sum[meta_step] / count, jnp.float32)

  names = [
    "erm",
    "expert_average",
    "aggregator_head",
    "aggregator_pretrained",
    "meta_unadapted",
    "meta_dmoe",
    *(f"meta_dmoe_{c}" for c in meta_dmoe.CONTENT_FREE),
  ]
  if continued is not None:
    names.insert(1, "erm_continued")
  variants: dict[str, dict] = {k: {} for k in names}
  per_example: dict[str, dict] = {k: {} for k in names}
  meta_student, meta_stats = meta_state["student"], meta_state["batch_stats"]
  for d_idx, domain in enumerate(setup.targets):
    source = setup.domain_sources[domain].whole()
    students = {
      "erm": (student_erm["params"], erm_stats),
      "meta_unadapted": (meta_student, meta_stats),
    }
    if continued is not None:
      students["erm_continued"] = (continued["params"], continued["batch_stats"])
    for r in range(cfg.adapt.repeats):
      key = jax.random.fold_in(jax.random.fold_in(setup.key("adapt"), d_idx), r)
      _, xs = read_support(setup, source, key, cfg.adapt.support_size)
      tokens, _ = experts_out(experts, xs)
      students[("aggregator_pretrained", r)] = (
        adapt(student_erm["params"], erm_stats, aggregator_pre, xs, tokens, lr_factor=factor_pre),
        erm_stats,
      )
      aggregated = aggregate(meta_state["aggregator"], tokens)
      targets = {
        "meta_dmoe": None,
        "meta_dmoe_target_zeros": jnp.zeros_like(aggregated),
        "meta_dmoe_target_source_mean": jnp.broadcast_to(source_mean_feature, aggregated.shape),
        "meta_dmoe_target_shuffled": jnp.roll(aggregated, 1, axis=0),
      }
      for name, target in targets.items():
        params = adapt(
          meta_student,
          meta_stats,
          meta_state["aggregator"],
          xs,
          tokens,
          target=target,
          lr_factor=factor_meta,
        )
        students[(name, r)] = (params, meta_stats)

    def from_tokens(tokens, logits, mask):
      del mask
      return {
        "expert_average": predict.expert_average(logits),
        "aggregator_head": predict.aggregator_head(aggregator_pre, tokens),
      }

    preds, y = _predict_split(setup, predict, experts, source, students, on_tokens=from_tokens)
    for name in names:
      draws = [preds[(name, r)] for r in range(cfg.adapt.repeats)] if (name, 0) in preds else None
      correct = ((draws[0] if draws else preds[name]) == y).astype(int)
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

  for per_domain in variants.values():
    per_domain["mean"] = {
      "accuracy": float(np.mean([per_domain[d]["accuracy"] for d in setup.targets]))
    }
  details["per_example"] = per_example
  details["selection"] = selection
  return variants


def _means(table: dict) -> dict:
  """{key: mean of its per-source accuracies}."""
  return {key: float(np.mean(v)) for key, v in table.items()}


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


def run_stream(config, workdir: str, *, setup: StreamSetup | None = None) -> dict:
  """Runs (or resumes) every stage on streamed data; the results dict of `meta_dmoe.run`."""
  validate_config(config)
  if setup is None:
    setup = make_stream_setup(config)
  logging.info("super-domains: %s (streaming)", setup.super_domains)
  writer = metrics_lib.MetricWriter(workdir)

  backbone = None
  if config.model.shared_init:
    backbone = meta_dmoe.train_backbone(
      config,
      workdir,
      setup,
      writer=writer,
      step=lambda tx: make_student_step(setup, tx, stage="backbone"),
    )

  tx = optax.adam(config.experts.lr)
  experts = meta_dmoe.place_experts(setup, meta_dmoe.init_experts(setup, tx, backbone))
  experts = stages.run_stage(
    config,
    workdir,
    "experts",
    make_expert_step(setup, tx),
    experts,
    config.experts.steps,
    writer=writer,
    stage_fields=meta_dmoe.STAGE_FIELDS,
  )
  # The later stages run every expert on every batch, on the data-parallel mesh.
  frozen = mesh_lib.replicate(_frozen(experts), setup.mesh)
  feature_dim = int(frozen["params"]["head"]["kernel"].shape[-2])
  trained = meta_dmoe.train_stages(
    config,
    workdir,
    setup,
    stream_steps(setup, frozen),
    feature_dim,
    writer=writer,
    backbone=backbone,
  )
  writer.close()

  details: dict = {}
  metrics = evaluate(
    setup,
    frozen,
    trained.aggregator["params"],
    trained.student,
    trained.candidates,
    details=details,
  )
  return {
    "method": "meta_dmoe",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "source_domains": list(setup.sources),
    "target_domains": list(setup.targets),
    "super_domains": [list(g) for g in setup.super_domains],
    "inner_lr": meta_dmoe.inner_lr(config, feature_dim),
    "streaming": {
      "augment": list(config.data.augment),
      "eval_augment": list(config.data.eval_augment),
      "image_size": config.data.options.image_size,
    },
    "metrics": metrics,
    "selection": details["selection"],
    "per_example": details["per_example"],
    **({"backbone_checkpoint": setup.checkpoint_info} if setup.checkpoint_info else {}),
  }
