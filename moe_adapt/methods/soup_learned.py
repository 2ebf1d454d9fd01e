"""The soup's merges that use data besides the weights: Fisher merging, RegMean, AdaMerging.

Rows `merge_<method>` of the merge family (`soup_merges`): Fisher merging (Matena & Raffel;
diagonal Fisher of each adapter on its own domain's training examples, labels sampled from
the model; ε relative to the mean Fisher entry, chosen on validation), RegMean (Jin et al.;
input Gram matrices of the adapters' linear layers on each domain's training examples; α
chosen on validation) and AdaMerging (Yang et al.; coefficients learned by entropy
minimisation on each target domain's UNLABELLED test inputs: a test-time method).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_adapt.core import merging
from moe_adapt.methods import adapter_harness as ft
from moe_adapt.methods import soup_core
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import artifacts

PyTree = Any

# Merges that use data besides the weights (`merge.learned`, rows `merge_<method>`).
LEARNED_METHODS = ("fisher", "regmean", "adamerging")
ADAMERGING_GRANULARITY = ("task", "layer")
LEARNED_CACHE = "merge_learned.json"
ADAMERGING_NOTE = (
  "merge_adamerging is a TEST-TIME method: its coefficients are learned by entropy "
  "minimisation on each target domain's unlabelled test inputs (no test labels)"
)

# Examples per vmapped batch of per-example Fisher gradients (memory only; the estimate is
# the mean over all examples whatever the batching).
FISHER_BATCH_SIZE = 16


def domain_sample(setup: ft.Setup, domain: str, n: int, purpose: str) -> ft.Examples:
  """n training examples of `domain` (all when fewer): a subset seeded by the run's seed,
  the domain and `purpose` (e.g. 'fisher'), in the split's order."""
  ex = setup.task.train[domain]
  seed = [setup.config.seed, zlib.crc32(domain.encode()), zlib.crc32(purpose.encode())]
  return ex.take(np.sort(np.random.default_rng(seed).permutation(len(ex))[:n]))


def indexed_logits(
  model, base: PyTree, head: PyTree, inputs: Sequence[np.ndarray]
) -> Callable[[PyTree, jax.Array], jax.Array]:
  """`fn(adapters, idx) -> [B, C]` eval-mode logits of `model` with the backbone `base`,
  `adapters` (no head) and `head` ({'head': ...}) on the examples `idx` [B] of `inputs`
  (arrays [N, ...]). Indices stand in for the inputs so that the core's data-driven merges
  (`diagonal_fisher`, `adamerging`), which take one input array, serve any modality."""
  arrays = tuple(jnp.asarray(a) for a in inputs)

  def fn(adapters: PyTree, idx: jax.Array) -> jax.Array:
    params = adapters_lib.merge_params(base, {**adapters, **head})
    return model.apply({"params": params}, *(a[idx] for a in arrays), train=False)

  return fn


def member_fishers(soup: soup_core.Soup, *, examples: int) -> PyTree:
  """[K, ...] diagonal Fishers of the K adapters (no head), each on `examples` training
  examples of its own domain (`domain_sample`) with its own head, labels drawn from the
  model's predictive distribution (`core.merging.diagonal_fisher`, Matena & Raffel)."""
  adapters = soup_core.without_head(soup.stacked)
  out = []
  for i, d in enumerate(soup.names):
    sample = domain_sample(soup.setup, d, examples, "fisher")
    fn = indexed_logits(soup.model, soup.base, soup.head_of(d), sample.inputs)
    n = len(sample)
    batches = [
      jnp.arange(s, min(s + FISHER_BATCH_SIZE, n), dtype=jnp.int32)
      for s in range(0, n, FISHER_BATCH_SIZE)
    ]
    key = soup.setup.key("merge_fisher", i)
    out.append(merging.diagonal_fisher(fn, soup_core.member(adapters, i), batches, key=key))
  return soup_core.stack_trees(out)


def fisher_delta(deltas: PyTree, fishers: PyTree, epsilon: float) -> PyTree:
  """Fisher merging of the [K, ...] task vectors, ε = `epsilon` × the mean Fisher entry
  (over all members and leaves: a scale-free ε; large ε tends to the uniform average).

  Fisher merging of the adapters θ_k = θ_0 + τ_k is θ_0 + the Fisher merge of the τ_k: the
  per-entry weights are normalised, so the shared θ_0 passes through."""
  leaves = jax.tree.leaves(fishers)
  mean = float(sum(jnp.sum(f) for f in leaves) / sum(f.size for f in leaves))
  return merging.fisher_merge(deltas, fishers, epsilon=epsilon * mean)


@functools.partial(jax.jit, static_argnums=0)
def _adapter_input_grams(model, params: PyTree, weights: jax.Array, *inputs) -> dict:
  """'/'-joined module path -> Σ w·x xᵀ [d_in, d_in] over the inputs x [B, ..., d_in] of
  every adapter linear layer (`adapters_lib.Dense` under an adapter key) in one forward;
  `weights` [B] or [B, T] (0/1: padding examples, padding tokens) broadcast over x."""
  grams: dict[str, jax.Array] = {}

  def capture(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name == "__call__"
      and isinstance(module, adapters_lib.Dense)
      and any(adapters_lib.is_adapter_key(k) for k in module.path)
    ):
      x = args[0]
      if x.shape[: weights.ndim] != weights.shape:
        raise ValueError(
          f"adapter layer {'/'.join(module.path)} has input shape {x.shape}; accepted: "
          f"leading axes {weights.shape} (batch, tokens)"
        )
      w = weights.reshape(weights.shape + (1,) * (x.ndim - weights.ndim)).astype(jnp.float32)
      name = "/".join(module.path)
      g = merging.input_gram(x.astype(jnp.float32) * w)  # w² = w for 0/1 weights
      grams[name] = grams[name] + g if name in grams else g
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    model.apply({"params": params}, *inputs, train=False)
  return grams


def member_grams(soup: soup_core.Soup, *, examples: int) -> PyTree:
  """RegMean's input Gram matrices: a tree like the adapters (no head) whose kernel leaves
  are [K, d_in, d_in] and other leaves None, member k's on `examples` training examples
  of its own domain (`domain_sample`) run through its own adapter.

  The inputs are captured with Flax's `nn.intercept_methods` around every adapter
  `Dense.__call__` (the models are not changed); text padding tokens are left out.
  """
  cfg = soup.setup.config
  text = soup.setup.task.modality == "text"
  bs = cfg.eval_batch_size
  per_member = []
  for i, d in enumerate(soup.names):
    sample = domain_sample(soup.setup, d, examples, "regmean")
    params = soup.params(soup_core.member(soup.stacked, i))
    total: dict[str, jax.Array] = {}
    for start in range(0, len(sample), bs):
      chunk = [a[start : start + bs] for a in sample.inputs]
      valid = np.ones(len(chunk[0]), np.float32)
      pad = bs - len(valid)
      if pad:  # fixed shapes: one compile
        chunk = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in chunk]
        valid = np.concatenate([valid, np.zeros(pad, np.float32)])
      # Text inputs are (token_ids, attention_mask): padding tokens get weight 0.
      weights = valid[:, None] * chunk[1] if text else valid
      grams = _adapter_input_grams(soup.model, params, jnp.asarray(weights), *chunk)
      total = {k: total[k] + g if k in total else g for k, g in grams.items()}
    per_member.append(total)

  def leaf(path, x):
    keys = tuple(getattr(p, "key", str(p)) for p in path)
    if keys[-1] != "kernel":
      return None
    name = "/".join(keys[:-1])
    if name not in per_member[0]:
      raise ValueError(
        f"no input was captured for the adapter kernel {name}; accepted: adapters whose "
        "linear layers are adapters_lib.Dense (pfeiffer, houlsby)"
      )
    return jnp.stack([g[name] for g in per_member])

  return jax.tree_util.tree_map_with_path(leaf, soup_core.without_head(soup.stacked))


def learned_candidates(config) -> dict[str, list[dict[str, float]]]:
  """Per method of `merge.learned` but AdaMerging (test-time, no grid), its grid chosen on
  validation: Fisher's relative ε (`merge.fisher_epsilons`), RegMean's α
  (`merge.regmean_alphas`); each setting also names its declared example count."""
  m = config.merge
  grids = {
    "fisher": [{"examples": m.fisher_examples, "epsilon": e} for e in m.fisher_epsilons],
    "regmean": [{"examples": m.regmean_examples, "alpha": a} for a in m.regmean_alphas],
  }
  return {name: grids[name] for name in m.learned if name in grids}


def adamerging_settings(config) -> dict[str, Any]:
  """The declared AdaMerging settings (`merge.adamerging_*`), as recorded in results.json."""
  m = config.merge
  return {
    "granularity": m.adamerging_granularity,
    "init": float(m.adamerging_init),
    "steps": int(m.adamerging_steps),
    "learning_rate": float(m.adamerging_lr),
    "batch_size": int(m.adamerging_batch_size),
  }


def adamerging_batches(config, domain: str, n: int) -> list[jax.Array]:
  """`merge.adamerging_steps` index batches [b] into `domain`'s n test examples: seeded
  epochs of shuffled indices, b = min(`merge.adamerging_batch_size`, n)."""
  b = min(config.merge.adamerging_batch_size, n)
  rng = np.random.default_rng([config.seed, zlib.crc32(domain.encode()), zlib.crc32(b"adamerging")])
  batches, pool = [], np.zeros(0, np.int64)
  while len(batches) < config.merge.adamerging_steps:
    if len(pool) < b:
      pool = np.concatenate([pool, rng.permutation(n)])
    batches.append(jnp.asarray(pool[:b], jnp.int32))
    pool = pool[b:]
  return batches


def adamerging_on(
  soup: soup_core.Soup, domain: str, deltas: PyTree, head: PyTree
) -> merging.AdaMergingResult:
  """AdaMerging of the K task vectors on `domain`'s UNLABELLED test inputs (its labels are
  never read), with `head` ({'head': ...}); merged adapters in `.params` (no head)."""
  cfg = soup.setup.config
  settings = adamerging_settings(cfg)
  inputs = soup.tests[domain].inputs
  return merging.adamerging(
    indexed_logits(soup.model, soup.base, head, inputs),
    soup.init_adapters,
    deltas,
    adamerging_batches(cfg, domain, len(soup.tests[domain])),
    granularity=settings["granularity"],
    init=settings["init"],
    steps=settings["steps"],
    learning_rate=settings["learning_rate"],
  )


def coefficient_summary(result: merging.AdaMergingResult, names: Sequence[str]) -> dict:
  """Per member its mean learned coefficient (over leaves when layer-wise), with the min
  and max over leaves, and the mean prediction entropy before the first and last steps."""
  per_leaf = np.stack([np.asarray(c) for c in jax.tree.leaves(result.coefficients)])  # [L, K]
  entropy = np.asarray(result.entropy)
  return {
    **{f"mean_{d}": float(per_leaf[:, i].mean()) for i, d in enumerate(names)},
    **{f"min_{d}": float(per_leaf[:, i].min()) for i, d in enumerate(names)},
    **{f"max_{d}": float(per_leaf[:, i].max()) for i, d in enumerate(names)},
    "entropy_first": float(entropy[0]),
    "entropy_last": float(entropy[-1]),
  }


def adamerging_rows(
  soup: soup_core.Soup, study: Sequence[str], deltas: PyTree
) -> tuple[dict, dict]:
  """Row `merge_adamerging`: one AdaMerging of the [K, ...] task vectors per study domain,
  on its unlabelled test inputs, with its own head (the average head with
  `study.average_heads`). AdaMerging runs only when the score is not cached.

  Returns:
    (the row's per-domain scores with their mean, {'settings', 'note', 'coefficients': per
     domain the learned coefficients' summary (`coefficient_summary`)}).
  """
  own_head = not soup.setup.config.study.average_heads
  suffix = "" if own_head else ":avghead"
  settings = adamerging_settings(soup.setup.config)
  declared = {k: v for k, v in settings.items() if k != "granularity"}
  what = f"adamerging[{soup_core.hp_name(declared)},{settings['granularity']}]:"
  what += f"{soup.key(soup.names)}{suffix}"
  info_cache = artifacts.JsonCache(soup.cache.path.parent, LEARNED_CACHE)
  per, coefficients = {}, {}
  for d in study:
    head = soup.head_tree(d if own_head else None)
    result = functools.cache(lambda d=d, head=head: adamerging_on(soup, d, deltas, head))
    per[d] = soup.score(
      d,
      what,
      lambda result=result, head=head: soup.params({**result().params, **head}),
      variant="merge_adamerging",
    )
    coefficients[d] = info_cache.get(
      f"{d}|{what}", lambda result=result: coefficient_summary(result(), soup.names)
    )
  info_cache.flush()
  info = {"settings": settings, "note": ADAMERGING_NOTE, "coefficients": coefficients}
  return soup_core.with_mean(per), info
