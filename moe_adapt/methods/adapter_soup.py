"""AdapterSoup and the signed-weight-direction study of adapter mixtures: `adapter_soup`.

One adapter (+ head) is trained per domain, every one from the SAME initialisation (stages
`adapter_<domain>`; AdapterSoup found that averaging adapters from different seeds fails).
Their K trees are stacked (leading axis K, `soup_core.Soup`) and mixed in weight space by a
uniform average (`core.merging.weighted_average`), merged into the frozen backbone and
evaluated. This module is the AdapterSoup paper's part and the run's stage list:

a) Novel domains (AdapterSoup, Chronopoulou et al., Findings of EACL 2023): for each target
   t of `data.target_domains`, the candidates are the adapters of the other domains, mixed
   as chosen by (`soup_selection`)

   - `similarity`: mean cosine similarity between sampled sentence embeddings (the
     pretrained backbone without adapters) of t and of each candidate; top `selection.top_k`
     with score >= `selection.threshold` (at least the best one); `similarity_t<x>` the same
     at each threshold x of `selection.threshold_sweep` (evaluation only);
   - `clustering`: a Gaussian mixture (one component per candidate) fitted on the
     candidates' sampled embeddings; each component belongs to the domain most of its
     members come from; domains holding >= `selection.cluster_min_share` of t's samples
     are averaged (at most top_k, at least one);
   - `all`: every candidate (the uniform soup);
   - `best_single`: the candidate with the best accuracy on t's TEST split — an ORACLE;
   - `zero_shot`: the frozen backbone with a head trained on the candidates' pooled
     training splits (stage `zero_shot_head_<t>`), no adapter;

   and `single_<d>`: each candidate alone. A novel target has no head: its soups average
   the members' heads with their adapters. Each selector's scores carry `num_adapters`, and
   results.json `selections` what it chose.

The sign paper (Nguyen & Le, ACL 2024) runs on the same adapters: b) the in-domain study of
the mixtures holding each domain's own adapter, FSD and its correlations, and c) greedy
mixing (`sign_mixing`); d) pruning before averaging, TIES and its magnitude control
(`sign_pruning`); e) the merge family on all K adapters, hyper-parameters chosen on
validation (`soup_merges`, `soup_learned`). In-domain rows keep each domain's own head and
average adapters only (`study.average_heads=True` averages the heads too, an ablation).

LoRA soups (`mixing.lora='product'`, the default) average the updates ΔW = B·A, evaluated
as one LoRA of rank K·r; `'factors'` averages A and B separately. Merges and pruning act
on the factors either way. Every score is accuracy and macro-F1.

Every score is cached in `<workdir>/mixture_evals.json`, so a resumed run evaluates
nothing twice for its scores; the per-example outcomes of the reported variants
(results.json `per_example`) persist in `<workdir>/mixture_outcomes.json` (a run resumed
from a workdir written before that file existed evaluates the reported variants once
more to recover them). The trained stages are shared through `stage_cache`
(`ADAPTER_FIELDS`, `ZERO_SHOT_FIELDS`): a run that only evaluates differently trains
nothing. Plots go to `<workdir>/plots/` (`soup_plots`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from moe_adapt.methods import adapter_harness as ft
from moe_adapt.methods import (
  adapter_soup_checks,
  sign_mixing,
  sign_pruning,
  soup_core,
  soup_learned,
  soup_merges,
  soup_plots,
  soup_selection,
)
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import artifacts
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train import workdir as workdir_lib

PyTree = Any

# The method's interface (moe_adapt.main), and names other modules import from here.
validate_config = adapter_soup_checks.validate_config
make_setup = adapter_soup_checks.make_setup
resolve_domains = adapter_soup_checks.resolve_domains
number_tuple = adapter_soup_checks.number_tuple
select_by_similarity = soup_selection.select_by_similarity
stack_trees = soup_core.stack_trees
without_head = soup_core.without_head
EvalCache = soup_core.EvalCache
CACHE_FILE = soup_core.CACHE_FILE
MERGE_METHODS = soup_merges.MERGE_METHODS
merge_candidates = soup_merges.merge_candidates
merged_delta = soup_merges.merged_delta

NOVEL_VARIANTS = ("zero_shot", "similarity", "clustering", "all", "best_single")
BEST_SINGLE_NOTE = (
  "best_single is an ORACLE: the candidate adapter with the best accuracy on the target's "
  "test split"
)


def soup_adapter_config(config) -> adapters_lib.AdapterConfig:
  """`AdapterConfig(**config.adapter)`, kind included (the harness takes it separately)."""
  return ft.adapter_config(config, config.adapter.kind)


def product_model(setup: ft.Setup, k: int):
  """The model of rank K·r that evaluates LoRA mixtures as averaged updates B·A
  (`lora_product_average`), or None: not LoRA, or `mixing.lora='factors'`."""
  config = setup.config
  if config.adapter.kind != "lora" or config.mixing.lora != "product":
    return None
  overrides = {
    "lora_rank": k * config.adapter.lora_rank,
    "lora_alpha": k * config.adapter.lora_alpha,
  }
  return ft.build_model(setup, ft.adapter_config(config, "lora", **overrides))


_TRAIN_FIELDS = (
  "seed",
  "data.benchmark",
  "data.benchmark_seed",
  "data.options",
  "model",
  "pretrain",
  "train",
  "num_devices",
)
ADAPTER_FIELDS = (*_TRAIN_FIELDS, "adapter")
# A target's zero-shot head trains on the other adapter domains' pooled data.
ZERO_SHOT_FIELDS = (*_TRAIN_FIELDS, "data.domains")


def train_adapters(
  setup: ft.Setup, workdir: str, writer, backbone: PyTree, domains: Sequence[str]
) -> tuple[Any, PyTree, list[PyTree], dict[str, float]]:
  """One adapter (+ head) per domain, all from the same initialisation (same key).

  Returns:
    (model, initial full params, per domain its adapters + head tree, stage -> s/step).
  """
  config = setup.config
  model = ft.build_model(setup, soup_adapter_config(config))
  init = ft.init_params(setup, model, setup.key("adapter_init"), backbone)
  trees, step_time = [], {}
  for d in domains:
    stage = f"adapter_{d}"
    result = ft.train(
      setup,
      workdir,
      writer,
      stage=stage,
      model=model,
      params=init,
      train_mode="adapters",
      examples=setup.task.train[d],
      steps=config.train.steps,
      lr=config.train.lr,
      batch_size=config.train.batch_size,
      stage_fields={stage: ADAPTER_FIELDS},
    )
    # Keep only the adapters + head: the frozen backbone is the same for every domain.
    trees.append(adapters_lib.split_params(result.params, include_head=True)[1])
    step_time[stage] = result.step_time_s
  return model, init, trees, step_time


def train_zero_shot_head(
  setup: ft.Setup,
  workdir: str,
  writer,
  model_plain,
  plain_params: PyTree,
  target: str,
  candidates: Sequence[str],
) -> ft.Trained:
  """Stage `zero_shot_head_<target>`: the frozen backbone, a head on the candidates' data."""
  stage = f"zero_shot_head_{target}"
  cfg = setup.config
  return ft.train(
    setup,
    workdir,
    writer,
    stage=stage,
    model=model_plain,
    params=plain_params,
    train_mode="head",
    examples=setup.task.pooled("train", candidates),
    steps=cfg.train.steps,
    lr=cfg.train.lr,
    batch_size=cfg.train.batch_size,
    stage_fields={stage: ZERO_SHOT_FIELDS},
  )


def selection_sample(setup: ft.Setup, domain: str) -> ft.Examples:
  """`selection.num_samples` training examples of `domain`, seeded by the run's seed."""
  ex = setup.task.train[domain]
  n = min(setup.config.selection.num_samples, len(ex))
  rng = np.random.default_rng([setup.config.seed, zlib.crc32(domain.encode())])
  return ex.take(np.sort(rng.choice(len(ex), n, replace=False)))


def _choose(cfg, embeddings: dict[str, np.ndarray], t: str, candidates: list[str]):
  """(similarity selection, clustering selection, selector -> chosen members) on target t;
  the similarity selector also at each threshold of `selection.threshold_sweep` (the same
  scores, another cut)."""
  cand_emb = {d: embeddings[d] for d in candidates}
  sim = soup_selection.select_by_similarity(
    embeddings[t], cand_emb, top_k=cfg.selection.top_k, threshold=cfg.selection.threshold
  )
  clu = soup_selection.select_by_clustering(
    embeddings[t],
    cand_emb,
    top_k=cfg.selection.top_k,
    min_share=cfg.selection.cluster_min_share,
    covariance_type=cfg.selection.covariance,
    pca_dim=cfg.selection.pca_dim,
    seed=cfg.seed,
  )
  chosen = {"similarity": sim.selected, "clustering": clu.selected, "all": tuple(candidates)}
  for thr in cfg.selection.threshold_sweep:
    chosen[f"similarity_t{soup_selection.threshold_name(float(thr))}"] = (
      soup_selection.select_at_threshold(
        sim.scores, candidates, top_k=cfg.selection.top_k, threshold=float(thr)
      )
    )
  return sim, clu, chosen


def _selection_record(cfg, candidates, sim, clu, best: str, chosen: dict) -> dict:
  """What each selector chose on one target (results.json `selections`)."""
  record = {
    "candidates": candidates,
    "similarity": {"selected": list(sim.selected), "scores": sim.scores},
    "clustering": {"selected": list(clu.selected), "shares": clu.scores},
    "all": {"selected": candidates},
    "best_single": {"selected": [best], "note": BEST_SINGLE_NOTE},
  }
  for thr in cfg.selection.threshold_sweep:
    name = f"similarity_t{soup_selection.threshold_name(float(thr))}"
    record[name] = {"selected": list(chosen[name]), "threshold": float(thr)}
  return record


def novel_domains(
  soup: soup_core.Soup, targets: Sequence[str], backbone: PyTree, workdir, writer
) -> dict:
  """Part (a): each selection method on each novel target.

  Novel targets have no head of their own: a soup averages its members' adapters and heads.

  Returns:
    {'metrics': variant -> per-target scores (selectors also `num_adapters`),
     'selections': target -> what each selector chose, 'step_time_s': zero-shot head
     stage -> seconds per step}.
  """
  setup = soup.setup
  cfg = setup.config
  # The plain model: its features are the selection embeddings, and its (random) head is
  # where every target's zero-shot head starts.
  plain_params = ft.init_params(setup, soup.model_plain, setup.key("zero_shot_init"), backbone)
  embeddings = {
    d: ft.embed(setup, soup.model_plain, plain_params, selection_sample(setup, d))
    for d in dict.fromkeys((*targets, *soup.names))
  }
  per_target: dict[str, dict[str, dict]] = {}
  singles_by_adapter: dict[str, dict[str, dict]] = {}
  selections, step_time = {}, {}
  for t in targets:
    candidates = [d for d in soup.names if d != t]
    singles = {d: soup.single_score(t, d, variant=f"single_{d}") for d in candidates}
    for d, sc in singles.items():
      singles_by_adapter.setdefault(d, {})[t] = sc
    sim, clu, chosen = _choose(cfg, embeddings, t, candidates)
    # The oracle ranks by accuracy on the target's test split.
    best = max(candidates, key=lambda d: (singles[d]["accuracy"], -candidates.index(d)))
    for name, members in chosen.items():
      sc = soup.mix_score(t, members, variant=name)
      per_target.setdefault(name, {})[t] = {**sc, "num_adapters": len(members)}
    per_target.setdefault("best_single", {})[t] = {
      **soup.single_score(t, best, variant="best_single"),
      "num_adapters": 1,
    }
    if cfg.selection.zero_shot_head:
      head = train_zero_shot_head(
        setup, workdir, writer, soup.model_plain, plain_params, t, candidates
      )
      step_time[f"zero_shot_head_{t}"] = head.step_time_s
      per_target.setdefault("zero_shot", {})[t] = soup.score(
        t, "zero_shot", lambda head=head: head.params, plain=True, variant="zero_shot"
      )
    selections[t] = _selection_record(cfg, candidates, sim, clu, best, chosen)
  with_mean = soup_core.with_mean
  metrics = {v: with_mean(per_target[v]) for v in NOVEL_VARIANTS if v in per_target}
  metrics.update({v: with_mean(m) for v, m in per_target.items() if v not in metrics})
  metrics.update({f"single_{d}": with_mean(m) for d, m in singles_by_adapter.items()})
  return {"metrics": metrics, "selections": selections, "step_time_s": step_time}


def build_soup(
  setup: ft.Setup, workdir: str, writer, domains: adapter_soup_checks.Domains, backbone: PyTree
) -> tuple[soup_core.Soup, dict[str, float]]:
  """Trains (or restores) the K adapters and stacks them: (the run's `Soup`, stage -> s/step)."""
  model, init, trees, step_time = train_adapters(setup, workdir, writer, backbone, domains.adapters)
  base, init_tree = adapters_lib.split_params(init, include_head=True)
  soup = soup_core.Soup(
    setup=setup,
    names=domains.adapters,
    model=model,
    model_plain=ft.build_model(setup, adapters_lib.AdapterConfig()),
    base=base,
    stacked=soup_core.stack_trees(trees),
    init_adapters=soup_core.without_head(init_tree),
    tests=soup_core.eval_subsets(setup, list(dict.fromkeys((*domains.adapters, *domains.targets)))),
    vals=soup_core.val_subsets(setup, domains.study),
    cache=soup_core.EvalCache(workdir),
    outcome_cache=artifacts.JsonCache(workdir, soup_core.OUTCOMES_FILE),
    model_product=product_model(setup, len(domains.adapters)),
  )
  return soup, step_time


def run(config, workdir: str, *, setup: ft.Setup | None = None) -> dict:
  """Runs (or resumes) every stage and evaluation; returns the results dict of DESIGN.md."""
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  domains = resolve_domains(config, setup.task)
  logging.info(
    "adapter_soup: adapters %s; novel targets %s; study %s",
    domains.adapters,
    domains.targets,
    domains.study,
  )
  writer = metrics_lib.MetricWriter(workdir)
  backbone = ft.pretrained_backbone(setup, workdir, writer)
  soup, step_time = build_soup(setup, workdir, writer, domains, backbone)
  novel = novel_domains(soup, domains.targets, backbone, workdir, writer)
  step_time.update(novel["step_time_s"])
  writer.close()
  fsd_stacked = soup.stacked if config.study.fsd_include_head else without_head(soup.stacked)
  study = sign_mixing.in_domain_study(soup, domains.study, fsd_stacked)
  pruning = sign_pruning.pruning_study(soup, domains.study)
  merges = soup_merges.merge_study(soup, domains.study)
  soup.cache.flush()
  soup.outcome_cache.flush()
  logging.info("adapter_soup: %d evaluations in this run", soup.cache.computed)

  plots = workdir_lib.as_path(workdir) / soup_plots.PLOTS_DIR
  if jax.process_index() == 0:
    soup_plots.save_plots(plots, config, study, pruning, domains.adapters, domains.study)
  results = {
    "method": "adapter_soup",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "adapter_kind": config.adapter.kind,
    "adapter_domains": list(domains.adapters),
    "target_domains": list(domains.targets),
    "study_domains": list(domains.study),
    "num_examples": {"test_eval": {d: len(ex) for d, ex in soup.tests.items()}},
    "step_time_s": step_time,
    "notes": {"best_single": BEST_SINGLE_NOTE, "merge_adamerging": soup_learned.ADAMERGING_NOTE},
    "metrics": {
      **novel["metrics"],
      **study["metrics"],
      **pruning["metrics"],
      **merges["metrics"],
    },
    # Aggregates over several mixtures (mix_size_*) have no per-example outcomes.
    results_lib.PER_EXAMPLE: soup.per_example,
    "selections": novel["selections"],
  }
  return {**results, **_study_results(config, domains, study, pruning, merges, plots)}


def _study_results(config, domains, study: dict, pruning: dict, merges: dict, plots) -> dict:
  """The sign study's and the merges' parts of results.json, and the plots written."""
  return {
    # Hyper-parameters chosen on the study domains' validation splits (DESIGN.md).
    "selection": merges["selection"],
    "merge_validation": merges["validation"],
    # AdaMerging's declared settings and learned coefficients (test-time, target inputs).
    "adamerging": merges["adamerging"],
    "heads": "averaged (ablation)" if config.study.average_heads else "own head per domain",
    "fsd_matrix": {"domains": list(domains.adapters), "values": study["fsd_matrix"].tolist()},
    "in_domain": study["summary"],
    "greedy": study["greedy"],
    "correlations": study["correlations"],
    "mixtures": study["mixtures"],
    "pruning": pruning["info"],
    "plots": sorted(f"{soup_plots.PLOTS_DIR}/{p.name}" for p in plots.glob("*.png")),
  }
