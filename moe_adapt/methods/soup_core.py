"""The adapter soup's shared pieces: K stacked adapters, their mixtures and cached scores.

`Soup` holds one run's K adapters (+ heads), all trained from the same initialisation and
stacked along a leading axis K, and evaluates mixtures of them in weight space (a uniform
average, `core.merging.weighted_average`; LoRA soups optionally as the average of the
updates B·A). Every score is cached in `<workdir>/mixture_evals.json` (`EvalCache`) and the
per-example outcomes of reported variants in `<workdir>/mixture_outcomes.json`, so a
resumed run evaluates nothing twice. Both papers' studies use it: AdapterSoup
(`adapter_soup`) and the signed-weight-direction study (`sign_mixing`, `sign_pruning`,
`soup_merges`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.core import merging
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import artifacts
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib

PyTree = Any

CACHE_FILE = "mixture_evals.json"
OUTCOMES_FILE = "mixture_outcomes.json"


def stack_trees(trees: Sequence[PyTree]) -> PyTree:
  """K >= 1 trees of one structure and leaf shapes -> one tree of [K, ...] leaves.

  Raises:
    ValueError: naming the first tree and leaf path that differ from `trees[0]`.
  """
  if not trees:
    raise ValueError("trees is empty; accepted: K >= 1 trees of one structure")
  first = dict(jax.tree_util.tree_flatten_with_path(trees[0])[0])
  for i, tree in enumerate(trees[1:], 1):
    leaves = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    if leaves.keys() != first.keys():
      extra = ", ".join(sorted(map(jax.tree_util.keystr, leaves.keys() - first.keys())))
      missing = ", ".join(sorted(map(jax.tree_util.keystr, first.keys() - leaves.keys())))
      raise ValueError(
        f"trees[{i}] has another structure than trees[0] (extra leaves: {extra or 'none'}; "
        f"missing leaves: {missing or 'none'}); accepted: trees of one structure (e.g. the "
        "adapters of one AdapterConfig)"
      )
    for path, leaf in leaves.items():
      if jnp.shape(leaf) != jnp.shape(first[path]):
        raise ValueError(
          f"trees[{i}]{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; accepted: "
          f"{jnp.shape(first[path])}, the shape in trees[0]"
        )
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def lora_product_average(stacked: PyTree, weights: jax.Array) -> PyTree:
  """The weighted average of K LoRA adapters' updates ΔW_k = A_k·B_k, as one LoRA of rank K·r.

  Averaging the factors (`weighted_average`) gives mean(A)·mean(B), whose cross terms
  A_j·B_k (j ≠ k) belong to no adapter. Here the factors are concatenated along the rank:
  A = [A_1 … A_K] ([in, K·r]) and B = [c_1·B_1; …; c_K·B_K] ([K·r, out]), c_k = w_k / Σw,
  so A·B = Σ_k c_k·A_k·B_k exactly. Evaluate it with `lora_rank` K·r and `lora_alpha`
  K·α, which keeps the update's scale α / r. Other leaves (heads, biases) are averaged.

  Args:
    stacked: [K, ...] adapter trees whose LoRA leaves are `lora_a` [K, in, r] and `lora_b`
      [K, r, out].
    weights: [K] non-negative weights, not all zero.

  Returns:
    a tree like one member, its `lora_a` [in, K·r] and `lora_b` [K·r, out].
  """
  w = jnp.asarray(weights, jnp.float32)
  c = w / jnp.sum(w)
  averaged = merging.weighted_average(stacked, w)

  def leaf(path, x, avg):
    name = getattr(path[-1], "key", None)
    if name == "lora_a":
      k, n_in, r = x.shape
      return jnp.moveaxis(x, 0, -2).reshape(n_in, k * r)
    if name == "lora_b":
      k, r, n_out = x.shape
      return (x * c[:, None, None].astype(x.dtype)).reshape(k * r, n_out)
    return avg

  return jax.tree_util.tree_map_with_path(leaf, stacked, averaged)


def without_head(tree: Mapping[str, Any]) -> dict[str, Any]:
  """`tree` without its top-level 'head' subtree (adapter weights only)."""
  return {k: v for k, v in tree.items() if k != adapters_lib.HEAD_KEY}


def macro_f1(pred: Sequence[int], label: Sequence[int]) -> float:
  """Macro-averaged F1 over the classes present in `label` or `pred` (sklearn's default).

  Per class c: F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c); the unweighted mean over classes.
  A majority-class predictor scores 1/C_present·F1 of that class, so unlike accuracy it
  does not reward matching the label prior.
  """
  pred, label = np.asarray(pred, np.int64), np.asarray(label, np.int64)
  if pred.shape != label.shape or pred.ndim != 1 or not len(pred):
    raise ValueError(
      f"pred of shape {pred.shape} and label of shape {label.shape}; accepted: two [N >= 1]"
    )
  f1 = []
  for c in np.union1d(pred, label):
    tp = np.sum((pred == c) & (label == c))
    wrong = np.sum(pred != label, where=(pred == c) | (label == c))
    f1.append(2 * tp / (2 * tp + wrong))
  return float(np.mean(f1))


def scores(outcomes: Mapping[str, Sequence[int]]) -> dict[str, float]:
  """{'accuracy', 'macro_f1'} of a per-example entry (`results_lib.outcomes`)."""
  return {
    "accuracy": results_lib.accuracy(outcomes),
    "macro_f1": macro_f1(outcomes["pred"], outcomes["label"]),
  }


class EvalCache(artifacts.JsonCache):
  """Scores ({'accuracy', 'macro_f1'}) by key ('<domain>|<what>'), persisted to
  `<workdir>/mixture_evals.json` (`artifacts.JsonCache`: a resumed run evaluates nothing
  twice; a remote object is rewritten at most every `remote_flush_s` seconds).
  """

  def __init__(
    self, workdir: str | os.PathLike, *, remote_flush_s: float = metrics_lib.REMOTE_FLUSH_S
  ):
    super().__init__(workdir, CACHE_FILE, remote_flush_s=remote_flush_s)
    # Entries of an older format (a bare accuracy) are evaluated again.
    self.values = {k: v for k, v in self.values.items() if isinstance(v, dict)}

  def get(
    self, domain: str, what: str, compute: Callable[[], Mapping[str, float]]
  ) -> dict[str, float]:
    """The scores of `what` on `domain`, computed (and stored) the first time."""
    return super().get(f"{domain}|{what}", lambda: {k: float(v) for k, v in compute().items()})


def eval_subsets(setup: ft.Setup, domains: Sequence[str]) -> dict[str, ft.Examples]:
  """Test examples of each domain (already cut to `eval.max_examples` by the harness, with
  a subset fixed by `data.benchmark_seed`: every seed of a sweep sees the same examples)."""
  return {d: setup.task.test[d] for d in domains}


def val_subsets(setup: ft.Setup, domains: Sequence[str]) -> dict[str, ft.Examples]:
  """Validation examples of each domain, at most `eval.max_val_examples` (0 = all): a
  subset fixed by `data.benchmark_seed`, the same for every seed."""
  cap = setup.config.eval.max_val_examples
  rng = np.random.default_rng(setup.config.data.benchmark_seed)
  out = {}
  for d in domains:
    ex = setup.task.val[d]
    out[d] = ex.take(np.sort(rng.permutation(len(ex))[:cap])) if 0 < cap < len(ex) else ex
  return out


def evaluate_outcomes(setup: ft.Setup, model, params: PyTree, examples: ft.Examples) -> dict:
  """Per-example outcomes (`results_lib.outcomes`) of `model` with `params` on `examples`."""
  logits = ft.predict_logits(model, params, examples, batch_size=setup.config.eval_batch_size)
  return results_lib.outcomes(logits, examples.labels)


def with_mean(per_domain: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
  """{domain: scores, 'mean': the mean of each score over the given domains}."""
  out = {d: {k: float(v) for k, v in sc.items()} for d, sc in per_domain.items()}
  keys = list(next(iter(per_domain.values())))
  out["mean"] = {k: float(np.mean([sc[k] for sc in per_domain.values()])) for k in keys}
  return out


@jax.jit
def _take(stacked: PyTree, idx: jax.Array) -> PyTree:
  # One compiled gather per tree and index shape (eager indexing compiles one per leaf).
  return jax.tree.map(lambda x: x[idx], stacked)


def member(stacked: PyTree, i: int) -> PyTree:
  """Member i of a stacked tree."""
  return _take(stacked, jnp.int32(i))


@dataclasses.dataclass(frozen=True)
class Soup:
  """The K trained adapters of one run and cached evaluations of their mixtures.

  Attributes:
    setup: the harness setup.
    names: the K adapter domains (stack order).
    model: the classifier with adapters; `model_plain` the one without.
    base: backbone params without adapters and head (shared by every mixture).
    stacked: [K, ...] adapter + head trees.
    init_adapters: the shared initial adapter weights (no head).
    tests: domain -> test examples evaluated (`eval_subsets`).
    vals: domain -> validation examples (`val_subsets`), where merge hyper-parameters are
      chosen.
    cache: the scores computed so far.
    model_product: for LoRA adapters with `mixing.lora='product'`, the model of rank K·r
      that evaluates mixtures as the average of the updates B·A (`lora_product_average`);
      None: mixtures average the factors A and B.
    outcomes: '<domain>|<what>' -> per-example outcomes evaluated in this process.
    per_example: variant -> domain -> per-example outcomes of what the results report.
    outcome_cache: where the per-example outcomes of reported variants persist
      (`<workdir>/mixture_outcomes.json`, keys as `cache`), so that a resumed run need
      not evaluate them again; None: in memory only.
  """

  setup: ft.Setup
  names: tuple[str, ...]
  model: Any
  model_plain: Any
  base: PyTree
  stacked: PyTree
  init_adapters: PyTree
  tests: Mapping[str, ft.Examples]
  vals: Mapping[str, ft.Examples]
  cache: EvalCache
  model_product: Any = None
  outcomes: dict[str, dict] = dataclasses.field(default_factory=dict)
  per_example: dict[str, dict] = dataclasses.field(default_factory=dict)
  outcome_cache: artifacts.JsonCache | None = None

  def index(self, members: Sequence[str]) -> np.ndarray:
    """Stack indices of `members`, ascending."""
    return np.asarray(sorted(self.names.index(d) for d in members))

  def ordered(self, members: Sequence[str]) -> list[str]:
    """`members` in stack order."""
    return [self.names[i] for i in self.index(members)]

  def key(self, members: Sequence[str]) -> str:
    """Canonical name of a mixture: its members in stack order, joined by '+'."""
    return "+".join(self.ordered(members))

  def weights(self, members: Sequence[str]) -> jax.Array:
    """[K] weights: 1 for members, 0 otherwise."""
    w = np.zeros(len(self.names), np.float32)
    w[self.index(members)] = 1.0
    return jnp.asarray(w)

  def subset(self, tree: PyTree, members: Sequence[str]) -> PyTree:
    """The [k, ...] slices of `members` of a stacked tree."""
    return _take(tree, jnp.asarray(self.index(members), jnp.int32))

  def params(self, adapter_tree: PyTree) -> PyTree:
    """Full params: the backbone plus an adapters + head tree."""
    return adapters_lib.merge_params(self.base, adapter_tree)

  def head_of(self, domain: str) -> PyTree:
    """{'head': domain's trained head} ([...] leaves)."""
    heads = {adapters_lib.HEAD_KEY: self.stacked[adapters_lib.HEAD_KEY]}
    return member(heads, self.names.index(domain))

  def head_tree(self, head: str | None) -> PyTree:
    """{'head': `head`'s trained head}, or (None) the uniform average of all K heads."""
    if head is None:
      return merging.weighted_average({adapters_lib.HEAD_KEY: self.stacked[adapters_lib.HEAD_KEY]})
    return self.head_of(head)

  def with_head(self, adapters: PyTree, head: str | None) -> PyTree:
    """Full params: `adapters` (no head) with `head_tree(head)`."""
    return self.params({**adapters, **self.head_tree(head)})

  def mixture(self, members: Sequence[str], *, head: str | None = None) -> PyTree:
    """Full params of the uniform average of `members`' adapters.

    Args:
      members: the mixed domains.
      head: None: the members' heads are averaged with their adapters (novel domains,
        which have no head of their own, and the `study.average_heads` ablation); a
        domain: its own trained head, unaveraged (Nguyen & Le: adapters only).
    """
    # Zero weights on the full stack: one compiled average for every subset, and exactly
    # the subset's uniform average (0·x only adds exact zeros).
    if self.model_product is not None:
      averaged = lora_product_average(self.stacked, self.weights(members))
    else:
      averaged = merging.weighted_average(self.stacked, self.weights(members))
    if head is None:
      return self.params(averaged)
    return self.params({**without_head(averaged), **self.head_of(head)})

  def score(
    self,
    domain: str,
    what: str,
    params_fn: Callable[[], PyTree],
    *,
    plain: bool = False,
    variant: str | None = None,
    split: str = "test",
    model: Any = None,
  ) -> dict[str, float]:
    """Cached {'accuracy', 'macro_f1'} on `domain`'s `split` examples of `params_fn()`.

    With `variant` (test split only), its per-example outcomes go into
    `per_example[variant][domain]` (evaluated again when the scores came from an earlier
    process's cache).
    """
    model = model or (self.model_plain if plain else self.model)
    examples = self.tests[domain] if split == "test" else self.vals[domain]
    what = what if split == "test" else f"{split}:{what}"
    key = f"{domain}|{what}"

    def outcomes() -> dict:
      self.outcomes[key] = evaluate_outcomes(self.setup, model, params_fn(), examples)
      return self.outcomes[key]

    value = self.cache.get(domain, what, lambda: scores(outcomes()))
    if variant is not None:
      entry = self.outcomes.get(key)
      if self.outcome_cache is not None:
        entry = self.outcome_cache.get(key, lambda: entry or outcomes())
      self.per_example.setdefault(variant, {})[domain] = entry or outcomes()
    return value

  def single_score(
    self, domain: str, adapter: str, *, variant: str | None = None
  ) -> dict[str, float]:
    """Scores on `domain` of `adapter`'s trained params as they are (no averaging)."""
    i = self.names.index(adapter)
    return self.score(
      domain,
      f"adapter:{adapter}",
      lambda: self.params(member(self.stacked, i)),
      variant=variant,
    )

  def mix_score(
    self,
    domain: str,
    members: Sequence[str],
    *,
    own_head: bool = False,
    variant: str | None = None,
  ) -> dict[str, float]:
    """Scores on `domain` of the uniform mixture of `members`: with `own_head`, adapters
    only and `domain`'s own head; else adapters and heads averaged (`mixture`)."""
    if len(members) == 1 and (members[0] == domain or not own_head):
      # One member's average is its own adapter and head: the same params exactly.
      return self.single_score(domain, members[0], variant=variant)
    what = f"{'mixown' if own_head else 'mix'}:{self.key(members)}"
    if self.model_product is not None:
      what = f"product{what}"
    head = domain if own_head else None
    return self.score(
      domain,
      what,
      lambda: self.mixture(members, head=head),
      variant=variant,
      model=self.model_product,
    )


def hp_name(hp: Mapping[str, float]) -> str:
  """A merge setting as a cache-key part: {'density': 0.5, 'lambda': 1.0} ->
  'density=0.5,lambda=1'."""
  return ",".join(f"{k}={v:g}" for k, v in hp.items())
