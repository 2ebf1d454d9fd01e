"""Meta-DMoE's setup: the domains, their super-domains, the networks and the data on device.

`Setup` is what every stage shares; `make_setup` builds it for the in-memory path (every
source image on every device). The streaming path (`meta_dmoe_stream`) subclasses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_adapt import data, models
from moe_adapt.methods import _checks
from moe_adapt.methods import meta_dmoe_checks as checks
from moe_adapt.models import backbone_io
from moe_adapt.train import benchmarks
from moe_adapt.train import mesh as mesh_lib


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
  checks.check_in_memory(config)
  benchmark = benchmarks.benchmark(config.data)
  sources, targets = resolve_domains(config, benchmark)
  splits = benchmark.load(seed=config.seed)
  checks.check_sizes(
    config,
    min(len(splits[d].train.y) for d in sources),
    {d: len(whole_domain(splits[d])[1]) for d in targets},
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
  groups = SuperDomains.make(sources, config.experts.num_experts, config.seed)
  pools, pool_sizes = groups.pools(sources, domain_ids)
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
    expert_of_domain=groups.expert_of_domain,
    expert_pools=pools,
    pool_sizes=pool_sizes,
    super_domains=groups.groups,
    checkpoint_info=None if checkpoint is None else checkpoint.info(config.backbone.checkpoint),
    expert_mesh=expert_mesh,
  )


class SuperDomains(NamedTuple):
  """The source domains' partition into one super-domain per expert."""

  groups: tuple[tuple[str, ...], ...]  # the super-domains, each in the sources' order
  expert_of_domain: jax.Array  # [D_src] int32: the expert whose super-domain holds each domain

  @classmethod
  def make(cls, sources: tuple[str, ...], num_experts: int, seed: int) -> SuperDomains:
    groups = partition_domains(sources, num_experts, seed)
    expert_of = {d: k for k, group in enumerate(groups) for d in group}
    return cls(groups, jnp.asarray([expert_of[d] for d in sources], jnp.int32))

  def pools(self, sources: tuple[str, ...], domain_ids: np.ndarray):
    """(pools [E, max_pool] int32 example indices per expert, zero-padded; sizes [E] int32)
    over the pooled source examples of domains `domain_ids` [N_src]."""
    pools = [
      np.flatnonzero(np.isin(domain_ids, [sources.index(d) for d in g])) for g in self.groups
    ]
    max_pool = max(len(p) for p in pools)
    padded = np.stack([np.pad(p, (0, max_pool - len(p))) for p in pools]).astype(np.int32)
    return jnp.asarray(padded), jnp.asarray([len(p) for p in pools], jnp.int32)


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
