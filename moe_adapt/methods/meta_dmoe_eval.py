"""Meta-DMoE's evaluation, written once for both paths over a source of batches.

Every variant is predicted on every target domain, after the checkpoints and the inner step
size are chosen on the sources' validation splits:

- `erm`, `erm_continued` (when its candidates are given), `meta_unadapted`: students as
  trained; `expert_average`: the mean of the experts' softmaxes; `aggregator_head`: the
  pretrained aggregator's head on the experts' tokens;
- adapted on k unlabeled images of the domain (`adapt.repeats` seeded draws, the same
  positions for every adapted variant): `aggregator_pretrained` (the ERM student, the
  pretrained aggregator), `meta_dmoe`, and its content-free targets (`CONTENT_FREE`).

An `EvalSource` gives the splits: in memory (`MemorySource`: arrays, the experts' outputs of
a whole split at once) or streamed (`meta_dmoe_stream.StreamSource`: padded batches read from
disk, supports read by random access). Both give the same results dict.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt import models
from moe_adapt.methods import meta_dmoe_select as select_lib
from moe_adapt.methods.meta_dmoe_setup import Setup, whole_domain
from moe_adapt.train import evaluation

PyTree = Any
# Students to predict with: name -> (params, batch_stats).
Students = dict[Any, tuple[PyTree, PyTree]]
# `(tokens [B, E, D], expert logits [E, B, C]) -> {name: [B, ...]}`: outputs from the tokens.
OnTokens = Callable[[jax.Array, jax.Array], dict]

# Adapted variants and what each distils toward; the last three are content-free controls
# on the meta-trained student (the same support images, step size and draws as meta_dmoe).
CONTENT_FREE = ("target_zeros", "target_source_mean", "target_shuffled")


class EvalSplit(Protocol):
  """One split (a source's validation split, or a whole target domain) to evaluate on."""

  size: int  # N, its number of examples

  def support(self, key: jax.Array, k: int) -> tuple[np.ndarray, jax.Array]:
    """(images [k, ...], tokens [k, E, D]) at the first k positions of the permutation of
    the N examples drawn from `key`."""

  def predict(self, students: Students, on_tokens: OnTokens) -> tuple[dict, np.ndarray]:
    """({name: [N, ...]} of every student's predicted classes and `on_tokens`' outputs, in
    the split's order; labels [N])."""


class EvalSource(Protocol):
  """The splits of a run, by domain: `part` 'val' (a source's validation split) or 'whole'
  (a target domain: all of its images)."""

  def split(self, domain: str, part: str) -> EvalSplit: ...


class Predictors(NamedTuple):
  """The evaluation's jitted functions (`make_predictors`)."""

  student: Callable  # (params, stats, xb) -> [B] classes
  expert_average: Callable  # logits [E, B, C] -> [B]
  aggregator_head: Callable  # (params, tokens [B, E, D]) -> [B]
  aggregate: Callable  # (params, tokens [B, E, D]) -> [B, D]


def make_predictors(setup: Setup) -> Predictors:
  """The predictors of `setup`'s networks (compiled once per pair of networks)."""
  return _predictors(setup.model, setup.agg_model)


@functools.cache
def _predictors(model: models.Classifier, agg_model: models.AggregatorClassifier) -> Predictors:

  def student(params, stats, xb):
    return jnp.argmax(model.apply({"params": params, "batch_stats": stats}, xb, train=False), -1)

  def aggregator_head(params, tokens):
    return jnp.argmax(agg_model.apply({"params": params}, tokens), -1)

  def aggregate(params, tokens):
    return agg_model.apply({"params": params}, tokens, method=models.AggregatorClassifier.aggregate)

  return Predictors(
    jax.jit(student),
    jax.jit(lambda logits: jnp.argmax(jax.nn.softmax(logits, -1).mean(0), -1)),
    jax.jit(aggregator_head),
    jax.jit(aggregate),
  )


class MemorySplit:
  """A split held in memory: the experts' outputs of all its images computed once."""

  def __init__(self, setup: Setup, expert_outputs: Callable, x: np.ndarray, y: np.ndarray):
    self._setup, self._expert_outputs, self.x, self.y = setup, expert_outputs, x, y
    self.size = len(y)

  @functools.cached_property
  def _outputs(self) -> tuple[jax.Array, jax.Array]:
    feats, logits = self._expert_outputs(self.x)  # [E, N, D], [E, N, C]
    return jnp.swapaxes(feats, 0, 1), logits

  def support(self, key: jax.Array, k: int) -> tuple[np.ndarray, jax.Array]:
    idx = np.asarray(jax.random.permutation(key, self.size)[:k])
    return self.x[idx], self._outputs[0][idx]

  def predict(self, students: Students, on_tokens: OnTokens) -> tuple[dict, np.ndarray]:
    student, bs = make_predictors(self._setup).student, self._setup.config.eval_batch_size
    out = {
      name: evaluation.map_batched(functools.partial(student, p, s), self.x, bs)
      for name, (p, s) in students.items()
    }
    out.update({k: np.asarray(v) for k, v in on_tokens(*self._outputs).items()})
    return out, self.y


class MemorySource:
  """The in-memory splits of `setup.splits`; `expert_outputs(x [N, ...]) -> (features
  [E, N, D], logits [E, N, C])` of the frozen experts (any kind of expert)."""

  def __init__(self, setup: Setup, expert_outputs: Callable):
    self._setup, self._expert_outputs = setup, expert_outputs

  def split(self, domain: str, part: str) -> MemorySplit:
    splits = self._setup.splits[domain]
    x, y = (splits.val.x, splits.val.y) if part == "val" else whole_domain(splits)
    return MemorySplit(self._setup, self._expert_outputs, x, y)


def memory_expert_outputs(setup: Setup, experts: PyTree, features: Callable) -> Callable:
  """`x -> (features [E, N, D], logits [E, N, C])` of stacked experts [E, ...];
  `features(setup, experts, x)` gives the features (`expert_features`)."""
  model = setup.model
  head_of_experts = jax.jit(
    lambda heads, f: jax.vmap(
      lambda h, fe: model.apply({"params": {"head": h}}, fe, method=models.Classifier.classify)
    )(heads, f)
  )

  def expert_outputs(x: np.ndarray) -> tuple[jax.Array, jax.Array]:
    f = features(setup, experts, x)  # [E, N, D]
    return f, head_of_experts(experts["params"]["head"], f)

  return expert_outputs


def predictions_tokens(predict: Callable, params, tokens: jax.Array, batch_size: int):
  """`predict(params, tokens_batch)` over fixed-size batches of tokens [N, E, D] -> [N]."""
  n = tokens.shape[0]
  out = []
  for start in range(0, n, batch_size):
    tb = tokens[start : start + batch_size]
    if tb.shape[0] < batch_size:
      tb = jnp.concatenate([tb, jnp.zeros((batch_size - tb.shape[0], *tb.shape[1:]), tb.dtype)])
    out.append(np.asarray(predict(params, tb)))
  return np.concatenate(out)[:n]


def evaluate_variants(
  setup: Setup,
  source: EvalSource,
  *,
  adapt: Callable,
  inner_lr: Callable[[int], float],
  aggregator_pre: PyTree,
  student_erm: PyTree,
  meta_state: PyTree | None = None,
  candidates: dict | None = None,
) -> tuple[dict, dict]:
  """Every variant on every target domain of `source`, after the choices on the sources.

  Args:
    setup: the run's setup.
    source: the splits (`MemorySource`, or the streamed one).
    adapt: the test-time adaptation (`meta_dmoe.make_adapt_fn`).
    inner_lr: D -> the meta-trained inner step size α for features of size D.
    aggregator_pre: the pretrained aggregator's params.
    student_erm: the ERM student's {'params', 'batch_stats', ...}.
    meta_state: the meta-training state ({'student', 'aggregator', 'batch_stats', ...}),
      used when `candidates` is None (then α itself, and no `erm_continued`).
    candidates: {'meta': [(step, meta_state), ...], 'erm_continued': [(step, {'params',
      'batch_stats', ...}), ...]}: checkpoints to choose from on the sources' validation
      splits (`meta_dmoe_select.choose_on_sources`); `erm_continued` only when given.

  Returns:
    (variant -> {domain: {'accuracy', ...}, 'mean': {'accuracy'}}, {'per_example':
    variant -> domain -> {'correct'} [N] 0/1 in the domain's order (adapted: of the first
    draw, all in 'correct_draws'), 'selection': what the sources' validation chose}).
  """
  predict = make_predictors(setup)
  metas = candidates["meta"] if candidates else [(None, meta_state)]
  scores, aggregated = select_lib.score_on_sources(
    setup, source, predict, adapt, aggregator_pre, student_erm, metas, candidates
  )
  chosen = (meta_state, 1.0, 1.0, None)
  selection: dict[str, dict] = {}
  if candidates:
    feature_dim = next(iter(aggregated.values()))[0].shape[-1]  # D, the tokens' size
    chosen, selection = select_lib.choose_on_sources(inner_lr(feature_dim), candidates, *scores)
  step = selection["meta_dmoe"]["checkpoint_step"] if selection else None
  # The content-free 'source mean' target: the mean aggregated feature of the sources'
  # validation images (one vector for every support image).
  source_mean = jnp.mean(jnp.concatenate(aggregated[step]), 0)
  names = variant_names(with_continued=chosen[3] is not None)
  variants: dict[str, dict] = {k: {} for k in names}
  per_example: dict[str, dict] = {k: {} for k in names}
  pretrained = (aggregator_pre, student_erm)
  for d_idx, domain in enumerate(setup.targets):
    split = source.split(domain, "whole")
    outcomes = _on_target(setup, split, d_idx, predict, adapt, pretrained, chosen, source_mean)
    for name in names:
      variants[name][domain], per_example[name][domain] = outcomes[name]
  for per_domain in variants.values():
    per_domain["mean"] = {
      "accuracy": float(np.mean([per_domain[d]["accuracy"] for d in setup.targets]))
    }
  return variants, {"per_example": per_example, "selection": selection}


def _on_target(setup, split, d_idx, predict, adapt, pretrained, chosen, source_mean) -> dict:
  """{variant: (metrics, per-example record)} on target domain `d_idx`'s `split`.

  `pretrained`: (aggregator_pre, student_erm); `chosen`: (meta_state, factor_meta,
  factor_pre, continued state or None), as `meta_dmoe_select.choose_on_sources` returns them.
  """
  aggregator_pre, erm = pretrained
  meta, factor_meta, factor_pre, continued = chosen
  students = {
    "erm": (erm["params"], erm["batch_stats"]),
    "meta_unadapted": (meta["student"], meta["batch_stats"]),
  }
  if continued is not None:
    students["erm_continued"] = (continued["params"], continued["batch_stats"])
  key = jax.random.fold_in(setup.key("adapt"), d_idx)
  pairs = ((aggregator_pre, erm, factor_pre), (meta, factor_meta))
  students.update(_adapted(setup, split, key, predict, adapt, pairs, source_mean))

  def from_tokens(tokens, logits):
    bs = setup.config.eval_batch_size
    return {
      "expert_average": predict.expert_average(logits),
      "aggregator_head": predictions_tokens(predict.aggregator_head, aggregator_pre, tokens, bs),
    }

  preds, y = split.predict(students, from_tokens)
  out = {}
  for name in variant_names(with_continued=continued is not None):
    draws = None
    if (name, 0) in preds:
      draws = [preds[(name, r)] for r in range(setup.config.adapt.repeats)]
    out[name] = _outcome(preds.get(name), draws, y)
  return out


def variant_names(*, with_continued: bool) -> list[str]:
  """The variants in the order of the results dict."""
  names = [
    "erm",
    "expert_average",
    "aggregator_head",
    "aggregator_pretrained",
    "meta_unadapted",
    "meta_dmoe",
    *(f"meta_dmoe_{c}" for c in CONTENT_FREE),
  ]
  if with_continued:
    names.insert(1, "erm_continued")
  return names


def _outcome(preds: np.ndarray | None, draws: list | None, y: np.ndarray) -> tuple[dict, dict]:
  """(metrics, per-example record) of one variant on one domain: of `preds` [N], or of the
  adaptation's `draws` (one [N] per support draw; the record's 'correct' is the first's)."""
  if draws is None:
    correct = (preds == y).astype(int)
    return {"accuracy": float(np.mean(correct))}, {"correct": correct.tolist()}
  metrics = {
    "accuracy": float(np.mean([np.mean(p == y) for p in draws])),
    "accuracy_per_draw": [float(np.mean(p == y)) for p in draws],
  }
  record = {
    "correct": (draws[0] == y).astype(int).tolist(),
    "correct_draws": [(p == y).astype(int).tolist() for p in draws],
  }
  return metrics, record


def _adapted(setup, split, key, predict, adapt, pairs, source_mean) -> Students:
  """The adapted students of one target domain, {(variant, draw r): (params, stats)}.

  Draw r's support is the first `adapt.support_size` of the permutation drawn from
  fold_in(key, r), the same images for every adapted variant. `pairs`: ((aggregator_pre,
  student_erm, factor_pre), (meta_state, factor_meta)).
  """
  (aggregator_pre, erm, factor_pre), (meta, factor_meta) = pairs
  out: Students = {}
  for r in range(setup.config.adapt.repeats):
    xs, tokens = split.support(jax.random.fold_in(key, r), setup.config.adapt.support_size)
    params = adapt(
      erm["params"], erm["batch_stats"], aggregator_pre, xs, tokens, lr_factor=factor_pre
    )
    out[("aggregator_pretrained", r)] = (params, erm["batch_stats"])
    aggregated = predict.aggregate(meta["aggregator"], tokens)
    targets = {
      "meta_dmoe": None,
      "meta_dmoe_target_zeros": jnp.zeros_like(aggregated),
      "meta_dmoe_target_source_mean": jnp.broadcast_to(source_mean, aggregated.shape),
      # Every support image gets another image's aggregated feature.
      "meta_dmoe_target_shuffled": jnp.roll(aggregated, 1, axis=0),
    }
    for name, target in targets.items():
      params = adapt(
        meta["student"],
        meta["batch_stats"],
        meta["aggregator"],
        xs,
        tokens,
        target=target,
        lr_factor=factor_meta,
      )
      out[(name, r)] = (params, meta["batch_stats"])
  return out
