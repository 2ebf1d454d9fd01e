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
- Evaluation: `meta_dmoe_eval.evaluate_variants`, the in-memory path's, over a
  `StreamSource`: every split is read once per pass in fixed-size padded batches
  (`eval_batches`, transform `data.eval_augment`); the unlabeled supports (test-time
  adaptation, source-side selection) are read by random access at the first k positions of
  the same seeded permutations as the in-memory path.

The examples of each domain's train / val / test split are the in-memory `tfds`
benchmark's (`streaming.open_domain_splits`); the images differ by the augmentation and by
the resize (PIL's antialiased bilinear here).

The setup is in `meta_dmoe_stream_setup`, the steps in `meta_dmoe_stream_steps` (both
re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

from moe_adapt import models
from moe_adapt.data import streaming
from moe_adapt.methods import meta_dmoe
from moe_adapt.methods import meta_dmoe_eval as eval_lib
from moe_adapt.methods import meta_dmoe_stages as stages_lib
from moe_adapt.methods.meta_dmoe_checks import streaming as is_streaming
from moe_adapt.methods.meta_dmoe_experts import expert_tokens
from moe_adapt.methods.meta_dmoe_stream_setup import StreamSetup as StreamSetup
from moe_adapt.methods.meta_dmoe_stream_setup import make_stream_setup as make_stream_setup
from moe_adapt.methods.meta_dmoe_stream_setup import replicated_batch, validate_stream_config
from moe_adapt.methods.meta_dmoe_stream_steps import EpisodePlan as EpisodePlan
from moe_adapt.methods.meta_dmoe_stream_steps import EpisodeStreams as EpisodeStreams
from moe_adapt.methods.meta_dmoe_stream_steps import StreamedStep as StreamedStep
from moe_adapt.methods.meta_dmoe_stream_steps import (
  make_expert_step,
  make_student_step,
  stream_steps,
)
from moe_adapt.methods.meta_dmoe_stream_steps import make_meta_step as make_meta_step
from moe_adapt.train import mesh as mesh_lib
from moe_adapt.train import metrics as metrics_lib

PyTree = Any


def validate_config(config) -> None:
  """`meta_dmoe.validate_config`, and the streaming fields with `data.streaming=True`."""
  meta_dmoe.validate_config(config)
  if is_streaming(config):
    validate_stream_config(config)


def make_setup(config) -> meta_dmoe.Setup:
  """`make_stream_setup` with `data.streaming=True`, else `meta_dmoe.make_setup`."""
  if is_streaming(config):
    return make_stream_setup(config)
  return meta_dmoe.make_setup(config)


def run(config, workdir: str, *, setup: meta_dmoe.Setup | None = None) -> dict:
  """`run_stream` with `data.streaming=True`, else `meta_dmoe.run`."""
  if is_streaming(config):
    return run_stream(config, workdir, setup=setup)
  return meta_dmoe.run(config, workdir, setup=setup)


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
  run_ = stages_lib.StageRun(config, workdir, writer)
  experts = run_.stage("experts", make_expert_step(setup, tx), experts, config.experts.steps)
  # The later stages run every expert on every batch, on the data-parallel mesh.
  frozen = {"params": experts["params"], "batch_stats": experts["batch_stats"]}
  frozen = mesh_lib.replicate(frozen, setup.mesh)
  feature_dim = int(frozen["params"]["head"]["kernel"].shape[-2])
  steps = stream_steps(setup, frozen)
  trained = meta_dmoe.train_stages(
    config, workdir, setup, steps, feature_dim, writer=writer, backbone=backbone
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
  alpha = meta_dmoe.inner_lr(config, feature_dim)
  streamed = {
    "augment": list(config.data.augment),
    "eval_augment": list(config.data.eval_augment),
    "image_size": config.data.options.image_size,
  }
  return stages_lib.results(config, setup, alpha, metrics, details, streaming=streamed)


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
  splits (`meta_dmoe_eval.evaluate_variants` over a `StreamSource`).

  Returns:
    variant -> {domain: {'accuracy', ...}, 'mean': {'accuracy'}}; `details` receives
    'per_example' and 'selection'.
  """
  variants, found = eval_lib.evaluate_variants(
    setup,
    StreamSource(setup, experts),
    adapt=meta_dmoe.make_adapt_fn(setup),
    inner_lr=lambda feature_dim: meta_dmoe.inner_lr(setup.config, feature_dim),
    aggregator_pre=aggregator_pre,
    student_erm=student_erm,
    candidates=candidates,
  )
  details.update(found)
  return variants


# ----------------------------------------------------------------------------
# Streamed splits
# ----------------------------------------------------------------------------


class StreamSource:
  """`meta_dmoe_eval.EvalSource` of the streamed splits, with frozen `experts` [E, ...]."""

  def __init__(self, setup: StreamSetup, experts: PyTree):
    self._setup, self._experts = setup, experts
    self._experts_out = _experts_out(setup)

  def split(self, domain: str, part: str) -> StreamSplit:
    sources = self._setup.domain_sources[domain]
    source = sources.val if part == "val" else sources.whole()
    return StreamSplit(self._setup, self._experts, self._experts_out, source)


class StreamSplit:
  """One streamed split: read in padded batches, supports by random access."""

  def __init__(self, setup: StreamSetup, experts: PyTree, experts_out, source):
    self._setup, self._experts, self._experts_out = setup, experts, experts_out
    self.source = source
    self.size = len(source.indices)

  def support(self, key: jax.Array, k: int) -> tuple[np.ndarray, jax.Array]:
    _, xs = read_support(self._setup, self.source, key, k)
    return xs, self._experts_out(self._experts, xs)[0]

  def predict(self, students: eval_lib.Students, on_tokens: eval_lib.OnTokens):
    """One pass over the split (as `meta_dmoe_eval.EvalSplit.predict`)."""
    student = eval_lib.make_predictors(self._setup).student
    outs: dict[Any, list] = {}
    labels = []
    for xb, yb, mask in eval_passes(self._setup, self.source):
      row = {name: student(p, s, xb) for name, (p, s) in students.items()}
      row.update(on_tokens(*self._experts_out(self._experts, xb)))
      for name, value in row.items():
        outs.setdefault(name, []).append(np.asarray(value)[mask])
      labels.append(yb[mask])
    return {k: np.concatenate(v) for k, v in outs.items()}, np.concatenate(labels)


def _experts_out(setup: StreamSetup) -> Callable:
  """The jitted `(experts, xb) -> (tokens [B, E, D], expert logits [E, B, C])`."""
  model = setup.model

  @jax.jit
  def experts_out(experts, xb):
    tokens = expert_tokens(setup, experts, xb)  # [B, E, D]
    logits = jax.vmap(
      lambda head, f: model.apply({"params": {"head": head}}, f, method=models.Classifier.classify),
      in_axes=(0, 1),
    )(experts["params"]["head"], tokens)
    return tokens, logits

  return experts_out


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
    yield replicated_batch(setup, b["image"]), b["label"], b["mask"]


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
