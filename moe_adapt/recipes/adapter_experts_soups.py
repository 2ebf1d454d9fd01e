"""Recipe 2's weight space: soups of the adapter experts on each held-out domain.

The variants (see `adapter_experts`): `soup_uniform` (all N adapter sets and heads
averaged), `soup_ties_<d>` (TIES on the deltas from the shared initialisation at density
d, heads averaged), the merge family `soup_<method>` (hyper-parameters chosen on the pooled
source validation images), `expert_<k>` (each expert alone), `best_single_oracle` (the
best expert on the domain's labels) and the label-free FSD-greedy soups `soup_greedy_<l>`
built from Meta-DMoE's unlabeled support draws.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.core import merging
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.methods import adapter_soup as soup_lib
from moe_adapt.methods import meta_dmoe
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.recipes.adapter_experts_train import AdapterExperts, Setup, expert_outputs
from moe_adapt.train import results as results_lib

PyTree = Any


def greedy_members(
  target_emb: np.ndarray,
  candidate_emb: Sequence[np.ndarray],
  adapters: PyTree,
  *,
  max_size: int,
) -> tuple[list[int], list[float]]:
  """Label-free FSD-greedy soup order from unlabeled target embeddings.

  Args:
    target_emb: [k, D] embeddings of the unlabeled target images.
    candidate_emb: per expert, [M_i, D] embeddings of its super-domain's images.
    adapters: [N, ...] stacked adapter weights (no head) the FSD is computed on.
    max_size: members to choose, 1..N.

  Returns:
    (member indices in the order added: the most similar expert first, then each time the
    one of lowest FSD to the current soup's average; ties by index), (the similarity score
    of every expert).
  """
  n = len(candidate_emb)
  if not 1 <= max_size <= n:
    raise ValueError(f"max_size={max_size!r} is invalid; accepted: an integer in [1, {n}]")
  names = [str(i) for i in range(n)]
  sel = soup_lib.select_by_similarity(
    target_emb, dict(zip(names, candidate_emb)), top_k=1, threshold=-1.0
  )
  members = [int(sel.selected[0])]
  while len(members) < max_size:
    weights = np.zeros(n, np.float32)
    weights[members] = 1.0
    soup = merging.weighted_average(adapters, jnp.asarray(weights))
    fsd = {j: float(_fsd_to(soup, _member(adapters, j))) for j in range(n) if j not in members}
    members.append(min(fsd, key=lambda j: (fsd[j], j)))
  return members, [sel.scores[name] for name in names]


@jax.jit
def _take(stacked: PyTree, i: jax.Array) -> PyTree:
  return jax.tree.map(lambda x: x[i], stacked)


def _member(stacked: PyTree, i: int) -> PyTree:
  """Slice i of a stacked tree (one compiled gather for every i)."""
  return _take(stacked, jnp.int32(i))


@jax.jit
def _fsd_to(a: PyTree, b: PyTree) -> jax.Array:
  """FSD of two trees (share of positions of opposite strict sign)."""
  return merging.sign_disagreement(soup_lib.stack_trees([a, b]))


def support_draws(setup: Setup, d_idx: int, pool_size: int) -> list[np.ndarray]:
  """The unlabeled support indices of each adaptation draw: exactly Meta-DMoE's draws."""
  cfg = setup.meta.config
  draws = []
  for r in range(cfg.adapt.repeats):
    key = jax.random.fold_in(jax.random.fold_in(setup.meta.key("adapt"), d_idx), r)
    draws.append(np.asarray(jax.random.permutation(key, pool_size)[: cfg.adapt.support_size]))
  return draws


def source_samples(setup: Setup) -> list[np.ndarray]:
  """Per expert, `soup.num_samples` training images of its super-domain (seeded)."""
  cfg = setup.meta.config
  out = []
  for k, group in enumerate(setup.meta.super_domains):
    x = setup.harness.task.pooled("train", group).inputs[0]
    rng = np.random.default_rng([cfg.seed, zlib.crc32(f"soup_{k}".encode())])
    n = min(cfg.soup.num_samples, len(x))
    out.append(x[np.sort(rng.choice(len(x), n, replace=False))])
  return out


@dataclasses.dataclass
class _Table:
  """variant -> {domain: {'accuracy', ...}}, and variant -> {domain: per-example outcomes}."""

  per: dict[str, dict] = dataclasses.field(default_factory=dict)
  per_example: dict[str, dict] = dataclasses.field(default_factory=dict)

  def record(self, name: str, domain: str, outcomes: dict, **extra) -> float:
    acc = results_lib.accuracy(outcomes)
    self.per.setdefault(name, {})[domain] = {"accuracy": acc, **extra}
    self.per_example.setdefault(name, {})[domain] = outcomes
    return acc


def _outcomes(experts: AdapterExperts, tree: PyTree, examples: ft.Examples, bs: int) -> dict:
  """Per-example outcomes of the classifier with the adapters + head `tree` merged in."""
  logits = ft.predict_logits(experts.model, experts.params(tree), examples, batch_size=bs)
  return results_lib.outcomes(logits, examples.labels)


def merged_soups(setup: Setup, experts: AdapterExperts) -> tuple[dict[str, PyTree], dict]:
  """The domain-independent soups: `soup_uniform`, `soup_ties_<d>` and the merge family.

  Returns:
    (variant -> adapters + head tree, variant -> hyper-parameters chosen on the source
    validation split (`merge_family`)).
  """
  cfg = setup.meta.config
  mean_head = merging.weighted_average(
    {adapters_lib.HEAD_KEY: experts.stacked[adapters_lib.HEAD_KEY]}
  )
  adapters = soup_lib.without_head(experts.stacked)
  init_adapters = soup_lib.without_head(experts.init)
  soups: dict[str, PyTree] = {"soup_uniform": merging.weighted_average(experts.stacked)}
  deltas = jax.tree.map(lambda x, x0: x - x0[None], adapters, init_adapters)
  for density in cfg.soup.ties_densities:
    merged = merging.ties_merge(deltas, density=density, scale=cfg.soup.ties_scale)
    tag = format(100 * density, "g")
    soups[f"soup_ties_{tag}"] = {**jax.tree.map(jnp.add, init_adapters, merged), **mean_head}
  family, selection = merge_family(setup, experts, deltas, init_adapters, mean_head)
  soups.update(family)
  return soups, selection


def greedy_soups(
  setup: Setup,
  experts: AdapterExperts,
  d_idx: int,
  x: np.ndarray,
  examples: ft.Examples,
  singles: Sequence[float],
  *,
  embed: Callable[[np.ndarray], np.ndarray],
  candidate_emb: Sequence[np.ndarray],
) -> tuple[dict[int, list[float]], list[dict]]:
  """The FSD-greedy soups of held-out domain `d_idx` from each of Meta-DMoE's draws.

  Args:
    setup, experts: the recipe's setup and the trained experts.
    d_idx: the domain's position among the targets (it seeds the support draws).
    x: [M, H, W, C] the domain's images; `examples` the same with their labels.
    singles: [N] each expert's accuracy on the domain (a one-member soup is that expert).
    embed: images -> [M, D] embeddings of the backbone without adapters.
    candidate_emb: per expert, [M_i, D] embeddings of its super-domain's images.

  Returns:
    (soup size -> accuracy of each draw's soup, each draw's member order and similarities).
  """
  cfg = setup.meta.config
  adapters = soup_lib.without_head(experts.stacked)
  by_members: dict[tuple[int, ...], float] = {(k,): acc for k, acc in enumerate(singles)}
  accs: dict[int, list[float]] = {s: [] for s in cfg.soup.greedy_sizes}
  chosen = []
  for idx in support_draws(setup, d_idx, len(x)):
    order, scores = greedy_members(
      embed(x[idx]), candidate_emb, adapters, max_size=max(cfg.soup.greedy_sizes)
    )
    chosen.append({"order": order, "similarity": scores})
    for size in cfg.soup.greedy_sizes:
      members = tuple(sorted(order[:size]))
      if members not in by_members:
        weights = np.zeros(setup.num_experts, np.float32)
        weights[list(members)] = 1.0
        soup = merging.weighted_average(experts.stacked, jnp.asarray(weights))
        outcomes = _outcomes(experts, soup, examples, cfg.eval_batch_size)
        by_members[members] = results_lib.accuracy(outcomes)
      accs[size].append(by_members[members])
  return accs, chosen


def weight_space(
  setup: Setup, experts: AdapterExperts, *, outputs: Callable | None = None
) -> tuple[dict, dict, dict, dict]:
  """Accuracy of every weight-space variant on every held-out domain, and the selections.

  Args:
    setup: the recipe's setup.
    experts: the trained adapter experts.
    outputs: images -> (features, logits [N, M, C]) of the experts (`expert_outputs`), e.g.
      memoised by the caller; the single experts' accuracies come from its logits.

  Returns:
    (variant -> {domain: {'accuracy', ...}}, domain -> what the greedy soups chose per draw,
    variant -> {domain: per-example outcomes}, variant -> hyper-parameters chosen on the
    source validation split (`merge_family`)); the greedy soups, averaged over draws, have
    no per-example outcomes.
  """
  cfg, h = setup.meta.config, setup.harness
  bs = cfg.eval_batch_size
  outputs = outputs or (lambda x: expert_outputs(experts, x, batch_size=bs))

  def embed(x: np.ndarray) -> np.ndarray:
    ex = ft.Examples((np.asarray(x, np.float32),), np.zeros(len(x), np.int32))
    return ft.embed(h, experts.model_plain, experts.plain_params, ex)

  candidate_emb = [embed(x) for x in source_samples(setup)]
  soups, selection = merged_soups(setup, experts)
  table, selections = _Table(), {}
  for d_idx, domain in enumerate(setup.meta.targets):
    x, y = meta_dmoe.whole_domain(setup.meta.splits[domain])
    examples = ft.Examples((x.astype(np.float32),), y.astype(np.int32))
    for name, tree in soups.items():
      table.record(name, domain, _outcomes(experts, tree, examples, bs))
    single_logits = np.asarray(outputs(x)[1])  # [N, M, C]
    single_outcomes = [results_lib.outcomes(lg, y) for lg in single_logits]
    singles = [table.record(f"expert_{k}", domain, o) for k, o in enumerate(single_outcomes)]
    best = int(np.argmax(singles))
    table.record("best_single_oracle", domain, single_outcomes[best], expert=best)
    # Greedy soups from each of Meta-DMoE's unlabeled support draws (images only).
    accs, selections[domain] = greedy_soups(
      setup, experts, d_idx, x, examples, singles, embed=embed, candidate_emb=candidate_emb
    )
    for size, values in accs.items():
      table.per.setdefault(f"soup_greedy_{size}", {})[domain] = {
        "accuracy": float(np.mean(values)),
        "accuracy_per_draw": values,
      }
  for per_domain in table.per.values():
    per_domain["mean"] = {
      "accuracy": float(np.mean([per_domain[d]["accuracy"] for d in setup.meta.targets]))
    }
  return table.per, selections, table.per_example, selection


def source_val(setup: Setup) -> ft.Examples:
  """At most `soup.max_val_examples` (0 = all) validation images of the source domains,
  pooled: where the merge family's hyper-parameters are chosen (no held-out image)."""
  cfg = setup.meta.config
  val = setup.harness.task.pooled("val", setup.meta.sources)
  cap = cfg.soup.max_val_examples
  if 0 < cap < len(val):
    # A fixed subset (seed 0): the same images for every run seed.
    val = val.take(np.sort(np.random.default_rng(0).permutation(len(val))[:cap]))
  return val


def merge_family(
  setup: Setup, experts: AdapterExperts, deltas: PyTree, init_adapters: PyTree, mean_head: PyTree
) -> tuple[dict[str, PyTree], dict[str, dict]]:
  """The merge family (`merge.methods`: task arithmetic, TIES with per-tensor or whole-vector
  trim, DARE, DARE-TIES, Breadcrumbs) on the experts' deltas, heads averaged.

  Each setting of a method's grid (`adapter_soup.merge_candidates`) is scored on the pooled
  source validation images (`source_val`); the best one is the variant `soup_<method>`.

  Returns:
    (variant -> adapters + head tree, variant -> chosen hyper-parameters with their source
    validation accuracy).
  """
  cfg = setup.meta.config
  val = source_val(setup)
  # DARE's drops: a key of their own, from the run's seed.
  key = jax.random.fold_in(jax.random.key(cfg.seed), zlib.crc32(b"merge_dare") % 2**31)
  bs = cfg.eval_batch_size
  trees, selection = {}, {}
  for name, grid in soup_lib.merge_candidates(cfg).items():
    best = None
    for hp in grid:
      delta = soup_lib.merged_delta(name, deltas, hp, key)
      tree = {**jax.tree.map(jnp.add, init_adapters, delta), **mean_head}
      logits = ft.predict_logits(experts.model, experts.params(tree), val, batch_size=bs)
      acc = results_lib.accuracy(results_lib.outcomes(logits, val.labels))
      if best is None or acc > best[0]:
        best = (acc, hp, tree)
    trees[f"soup_{name}"] = best[2]
    selection[f"soup_{name}"] = {**best[1], "source_val_accuracy": best[0]}
  return trees, selection
