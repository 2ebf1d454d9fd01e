"""Pruning before averaging, TIES and its magnitude control (the signed-weight-direction paper).

Nguyen & Le, ACL 2024, Alg. 2 and 4: magnitude pruning of each adapter (head dense) at each
sparsity s before averaging — d's own adapter alone (`prune_own_<s>`) and the all-K mixture
(`prune_<s>`); only each member's layers of highest mean FSD to the other adapters
(`prune_fsd_<s>`); TIES merging of the all-K mixture at density 1-s on the deltas from the
shared initialisation (`ties_<s>`) and its magnitude control, the uniform average rescaled
to TIES' norm (`avg_like_ties_<s>`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.core import merging
from moe_adapt.methods import soup_core

PyTree = Any


def layer_names(tree: PyTree) -> list[str]:
  """Per leaf of `tree` (flattening order), its layer: the first two keys of its path.

  For adapter trees ({'backbone'|'encoder': {'block_i'|'layer_i': ...}}) this is one
  layer per transformer block, e.g. "['backbone']['block_0']".
  """
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return [jax.tree_util.keystr(tuple(p[:2])) for p in paths]


def layer_fsd(stacked: PyTree) -> tuple[list[str], np.ndarray]:
  """(layer names, [L, K, K] pairwise FSD per layer) of stacked adapter weights."""
  leaves = jax.tree.leaves(stacked)
  per_leaf = layer_names(stacked)
  names = list(dict.fromkeys(per_leaf))
  mats = [
    np.asarray(
      merging.pairwise_sign_disagreement([x for x, n in zip(leaves, per_leaf) if n == name])
    )
    for name in names
  ]
  return names, np.stack(mats)


def high_fsd_layers(per_layer: np.ndarray, member: int, *, fraction: float) -> list[int]:
  """Indices of `member`'s ceil(fraction·L) layers of highest mean FSD to the others.

  Args:
    per_layer: [L, K, K] per-layer pairwise FSD (`layer_fsd`).
    member: the adapter's index k.
    fraction: share of the L layers to return (at least one).
  """
  num_layers, k = per_layer.shape[0], per_layer.shape[1]
  others = [j for j in range(k) if j != member]
  score = per_layer[:, member, others].mean(axis=1)
  count = max(1, math.ceil(fraction * num_layers - 1e-9))
  return sorted(int(i) for i in np.argsort(-score, kind="stable")[:count])


def prune_layers(tree: PyTree, density: float, layers: Sequence[str] | None = None) -> PyTree:
  """`magnitude_prune(tree, density)` applied only to the leaves in `layers` (None = all)."""
  pruned = merging.magnitude_prune(tree, density)
  if layers is None:
    return pruned
  names = layer_names(tree)
  dense_leaves, treedef = jax.tree.flatten(tree)
  pruned_leaves = jax.tree.leaves(pruned)
  chosen = set(layers)
  return jax.tree.unflatten(
    treedef,
    [p if n in chosen else d for n, d, p in zip(names, dense_leaves, pruned_leaves)],
  )


def sparsity_name(sparsity: float) -> str:
  """Variant suffix of a sparsity: 0.8 -> '80' (percent)."""
  return format(100 * sparsity, "g")


def rescaled_like(tree: PyTree, reference: PyTree) -> PyTree:
  """`tree` times ‖reference‖₂ / ‖tree‖₂ (norms over all leaves): `tree`'s direction at
  `reference`'s magnitude (`tree` unchanged when its norm is 0)."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
  ref = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(reference)))
  factor = jnp.where(norm > 0, ref / jnp.where(norm > 0, norm, 1.0), 1.0)
  return jax.tree.map(lambda x: (x * factor).astype(x.dtype), tree)


def _fsd_of(stacked: PyTree) -> dict[str, float]:
  """The set FSD of K stacked trees and their mean pairwise FSD."""
  k = jax.tree.leaves(stacked)[0].shape[0]
  pair = np.asarray(merging.pairwise_sign_disagreement(stacked))
  return {
    "fsd": float(merging.sign_disagreement(stacked)),
    "mean_pairwise_fsd": float(pair[~np.eye(k, dtype=bool)].mean()),
  }


def _sparsity_rows(
  soup: soup_core.Soup,
  study: Sequence[str],
  sparsity: float,
  chosen_layers: Mapping[str, Sequence[str]],
  per: dict[str, dict[str, dict]],
) -> dict:
  """Scores the variants of one sparsity into `per` (variant -> domain -> scores); returns
  the FSD statistics of the magnitude-pruned and the layer-pruned adapters."""
  own_head = not soup.setup.config.study.average_heads
  suffix = "" if own_head else ":avghead"
  adapters = soup_core.without_head(soup.stacked)
  members = [soup_core.member(adapters, i) for i in range(len(soup.names))]
  deltas = jax.tree.map(lambda x, x0: x - x0[None], adapters, soup.init_adapters)
  everyone = soup.key(soup.names)
  density, tag = 1.0 - sparsity, sparsity_name(sparsity)
  pruned = soup_core.stack_trees([prune_layers(m, density) for m in members])
  layered = soup_core.stack_trees(
    [prune_layers(m, density, chosen_layers[soup.names[i]]) for i, m in enumerate(members)]
  )
  ties = functools.cache(
    lambda: merging.ties_merge(deltas, density=density, scale=soup.setup.config.pruning.ties_scale)
  )

  def on_init(delta: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, soup.init_adapters, delta)

  # Each params function runs at once (or never, when cached).
  builds = {
    "prune": lambda: merging.weighted_average(pruned),
    "prune_fsd": lambda: merging.weighted_average(layered),
    "ties": lambda: on_init(ties()),
    "avg_like_ties": lambda: on_init(rescaled_like(merging.weighted_average(deltas), ties())),
  }
  for d in study:
    i = soup.names.index(d)
    head = d if own_head else None
    per.setdefault(f"prune_own_{tag}", {})[d] = soup.score(
      d,
      f"prune{tag}:{d}",
      lambda i=i, d=d: soup.with_head(soup_core.member(pruned, i), d),
      variant=f"prune_own_{tag}",
    )
    for name, build in builds.items():
      what = f"{name.replace('_', '')}{tag}:{everyone}{suffix}"
      per.setdefault(f"{name}_{tag}", {})[d] = soup.score(
        d,
        what,
        lambda build=build, head=head: soup.with_head(build(), head),
        variant=f"{name}_{tag}",
      )
  return {"magnitude": _fsd_of(pruned), "highest_fsd_layers": _fsd_of(layered)}


def _curves(soup: soup_core.Soup, study: Sequence[str], per: Mapping[str, Mapping]) -> dict:
  """name -> (sparsities, mean accuracy over `study`) of each pruning variant, for the plot."""
  cfg = soup.setup.config
  own_head = not cfg.study.average_heads
  k = len(soup.names)

  def mean_of(values: Mapping[str, Mapping[str, float]]) -> float:
    return float(np.mean([v["accuracy"] for v in values.values()]))

  sparsities = [float(s) for s in cfg.pruning.sparsities]
  if not sparsities:
    return {}
  tags = [sparsity_name(s) for s in sparsities]
  own_dense = mean_of({d: soup.single_score(d, d) for d in study})
  all_dense = mean_of({d: soup.mix_score(d, soup.names, own_head=own_head) for d in study})
  xs = [0.0, *sparsities]
  return {
    "own adapter, magnitude": (xs, [own_dense, *(mean_of(per[f"prune_own_{t}"]) for t in tags)]),
    f"all {k}, magnitude": (xs, [all_dense, *(mean_of(per[f"prune_{t}"]) for t in tags)]),
    f"all {k}, highest-FSD layers": (
      xs,
      [all_dense, *(mean_of(per[f"prune_fsd_{t}"]) for t in tags)],
    ),
    f"all {k}, TIES": (sparsities, [mean_of(per[f"ties_{t}"]) for t in tags]),
    f"all {k}, average at TIES' norm": (
      sparsities,
      [mean_of(per[f"avg_like_ties_{t}"]) for t in tags],
    ),
  }


def pruning_study(soup: soup_core.Soup, study: Sequence[str]) -> dict:
  """Magnitude pruning, highest-FSD-layer pruning and TIES at each sparsity.

  Pruning acts on adapter weights only; each domain is evaluated with its own head (the
  heads averaged with `study.average_heads`). FSD statistics are on adapter weights only.
  `avg_like_ties_<s>` is TIES' magnitude control: the uniform average of the deltas
  rescaled to the norm of TIES' merged delta at the same density (TIES' disjoint mean
  divides by the agreeing members, not K, which scales the deltas up).

  Returns:
    {'metrics': variant -> per-domain scores, 'info': FSD before/after, layers pruned,
     'curves': name -> (sparsities, mean accuracy) for the plot}.
  """
  cfg = soup.setup.config
  k = len(soup.names)
  adapters = soup_core.without_head(soup.stacked)
  layers, per_layer = layer_fsd(adapters)
  fraction = cfg.pruning.fsd_layer_fraction
  chosen_layers = {
    soup.names[i]: [layers[j] for j in high_fsd_layers(per_layer, i, fraction=fraction)]
    for i in range(k)
  }
  per: dict[str, dict[str, dict]] = {}
  fsd_stats = {"dense": _fsd_of(adapters)}
  for s in cfg.pruning.sparsities:
    fsd_stats[sparsity_name(s)] = _sparsity_rows(soup, study, s, chosen_layers, per)
  curves = _curves(soup, study, per)
  others = [[j for j in range(k) if j != i] for i in range(k)]
  info = {
    "fsd": fsd_stats,
    "layers": layers,
    # Per adapter and layer: mean FSD of the layer to the same layer of the other adapters.
    "layer_fsd": {
      soup.names[i]: [float(per_layer[j, i, others[i]].mean()) for j in range(len(layers))]
      for i in range(k)
    },
    "pruned_layers": chosen_layers,
    "ties": "TIES (per-tensor trim, λ = pruning.ties_scale) on the deltas from the shared "
    "initialisation; avg_like_ties: the uniform average of the deltas at TIES' norm",
    "heads": "own head of each domain" if not cfg.study.average_heads else "heads averaged",
  }
  metrics = {v: soup_core.with_mean(m) for v, m in per.items()}
  return {"metrics": metrics, "info": info, "curves": curves}
