"""The streaming path's setup: the domains' examples on disk, opened as streams.

`StreamSetup` is `meta_dmoe_setup.Setup` without images: each domain's train / val / test
split is an index into a TFDS array_record dataset, read, decoded and augmented as the
steps need it (`data.streaming`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from moe_adapt.data import streaming
from moe_adapt.methods import meta_dmoe_checks as checks
from moe_adapt.methods import meta_dmoe_setup as setup_lib
from moe_adapt.train import benchmarks
from moe_adapt.train import mesh as mesh_lib


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
class StreamSetup(setup_lib.Setup):
  """`meta_dmoe_setup.Setup` without images: `x`, `y`, `index`, `expert_pools` and `pool_sizes`
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


def _open_sources(config, benchmark) -> dict:
  """domain -> `streaming.DomainSources` of the `tfds` benchmark's dataset."""
  opts = benchmark.options
  if opts["domain_key"] is None:
    raise ValueError(
      "data.options.domain_key=None: Meta-DMoE streams one domain per expert and episode; "
      "accepted: the dataset's domain feature"
    )
  return streaming.open_domain_splits(
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


def _transform(config, opts: dict, augment) -> Callable:
  """`(example, rng) -> {'image', 'label'}` with `augment`: in [0, 1] as the in-memory
  benchmark (a checkpoint's normalisation is applied after)."""
  return streaming.image_transform(
    image_size=config.data.options.image_size,
    augment=tuple(augment),
    normalize="unit",
    image_key=opts["image_key"],
    label_key=opts["label_key"],
  )


def make_stream_setup(config) -> StreamSetup:
  """Opens the streams' sources (indices only: no image is read) and builds the models.

  Raises:
    ValueError: naming the field: the options of the `tfds` benchmark (e.g.
      data.options.domain_key not a feature), domains, sizes (as `meta_dmoe_setup.make_setup`).
  """
  validate_stream_config(config)
  benchmark = benchmarks.benchmark(config.data)
  sources, targets = setup_lib.resolve_domains(config, benchmark)
  domain_sources = _open_sources(config, benchmark)
  checks.check_sizes(
    config,
    min(len(domain_sources[d].train.indices) for d in sources),
    {d: len(domain_sources[d].whole().indices) for d in targets},
  )
  opts = benchmark.options
  train_transform, eval_transform = (
    _transform(config, opts, config.data.augment),
    _transform(config, opts, config.data.eval_augment),
  )
  base = setup_lib.make_models(config, benchmark)
  if base.checkpoint is not None:
    mean, std = base.checkpoint.mean, base.checkpoint.std
    train_transform = _normalized(train_transform, mean, std)
    eval_transform = _normalized(eval_transform, mean, std)
  groups = setup_lib.SuperDomains.make(sources, config.experts.num_experts, config.seed)
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
    expert_of_domain=groups.expert_of_domain,
    expert_pools=None,
    pool_sizes=None,
    super_domains=groups.groups,
    checkpoint_info=None
    if base.checkpoint is None
    else base.checkpoint.info(config.backbone.checkpoint),
    expert_mesh=setup_lib.make_expert_mesh(config),
    domain_sources=domain_sources,
    train_transform=train_transform,
    eval_transform=eval_transform,
  )


def to_device(setup: StreamSetup, x: np.ndarray, leading: int = 0) -> jax.Array:
  """This host's part of a batch as a global array, split over `data` when it divides."""
  if setup.mesh.size == 1 or (x.shape[leading] * jax.process_count()) % setup.mesh.size:
    return jax.device_put(x, mesh_lib.replicated(setup.mesh))
  return jax.make_array_from_process_local_data(setup.batch_sharding(x.ndim, leading), x)


def replicated_batch(setup: StreamSetup, x: np.ndarray) -> jax.Array:
  """A batch every host holds whole, on every device (steps constrain it over `data`)."""
  return jax.device_put(x, mesh_lib.replicated(setup.mesh))
