"""Meta-DMoE's source-side selection: checkpoints and inner step sizes chosen on the sources.

Each source domain's validation split (never trained on) plays an unseen target: its own
expert is masked, k of its images are the unlabeled support, and all of them are predicted
by every candidate (adapted at every factor of `selection.inner_lr_factors`). The choice is
the candidate with the best mean accuracy over the sources; target data is never touched.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moe_adapt.train import stages

PyTree = Any


def score_on_sources(
  setup, source, predict, adapt, aggregator_pre, student_erm, metas, candidates
) -> tuple[tuple | None, dict]:
  """One pass over the sources' validation splits (`source`'s 'val' parts): the
  selection's scores and the aggregated features of each meta candidate (`metas`).

  Returns:
    ((meta_scores, pre_scores, cont_scores) as `choose_on_sources` takes them, or None
    without candidates; {step: [aggregated features [N_i, D] of each source]}).
  """
  factors = tuple(float(f) for f in setup.config.selection.inner_lr_factors)
  accs: dict = {}
  aggregated: dict = {step: [] for step, _ in metas}
  for i, domain in enumerate(setup.sources):
    split = source.split(domain, "val")
    k = min(setup.config.adapt.support_size, split.size)
    xs, tokens = split.support(jax.random.fold_in(setup.key("select"), i), k)
    mask = jnp.arange(setup.num_experts) != setup.expert_of_domain[i]
    students = {}
    if candidates:
      students = _selection_students(
        adapt, candidates, aggregator_pre, student_erm, factors, (xs, tokens, mask)
      )

    def on_tokens(tokens, logits):
      del logits
      return {("agg", step): predict.aggregate(m["aggregator"], tokens) for step, m in metas}

    preds, y = split.predict(students, on_tokens)
    for step, _ in metas:
      aggregated[step].append(preds.pop(("agg", step)))
    for name, value in preds.items():
      accs.setdefault(name, []).append(float(np.mean(value == y)))
  if not candidates:
    return None, aggregated
  mean = {name: float(np.mean(v)) for name, v in accs.items()}
  meta_scores = {(s, f): mean[("meta", s, f)] for s, _ in candidates["meta"] for f in factors}
  pre_scores = {f: mean[("pre", f)] for f in factors}
  cont = candidates.get("erm_continued") or ()
  return (meta_scores, pre_scores, {s: mean[("cont", s)] for s, _ in cont}), aggregated


def _selection_students(adapt, candidates, aggregator_pre, student_erm, factors, support):
  """The students one source's validation split scores: each meta candidate and the ERM
  student adapted at each factor on `support` (images, tokens, expert mask), and the
  `erm_continued` candidates as they are."""
  xs, tokens, mask = support
  students: dict = {}
  for step, m in candidates["meta"]:
    for f in factors:
      params = adapt(
        m["student"], m["batch_stats"], m["aggregator"], xs, tokens, mask=mask, lr_factor=f
      )
      students[("meta", step, f)] = (params, m["batch_stats"])
  erm_params, erm_stats = student_erm["params"], student_erm["batch_stats"]
  for f in factors:
    params = adapt(erm_params, erm_stats, aggregator_pre, xs, tokens, mask=mask, lr_factor=f)
    students[("pre", f)] = (params, erm_stats)
  for step, c in candidates.get("erm_continued") or ():
    students[("cont", step)] = (c["params"], c["batch_stats"])
  return students


def choose_on_sources(
  alpha: float, candidates: dict, meta_scores: dict, pre_scores: dict, cont_scores: dict
):
  """The checkpoints and inner step sizes with the best mean source-validation accuracy.

  meta_dmoe: the meta checkpoint and the factor of `selection.inner_lr_factors` (× the
  meta-trained α) over the leave-one-source-out episodes (adapted as at test time, the
  episode's own expert masked); aggregator_pretrained: the factor likewise, for the ERM
  student; erm_continued: the checkpoint (no adaptation). Ties go to the earlier candidate.

  Args:
    alpha: the meta-trained inner step size.
    candidates: as `evaluate_variants` takes them.
    meta_scores: {(step, factor): score} over `candidates['meta']` × the factors.
    pre_scores: {factor: score}.
    cont_scores: {step: score} over `candidates['erm_continued']` (empty: none).

  Returns:
    ((meta_state, factor_meta, factor_pretrained, continued_state), selection dict).
  """
  m_step, m_factor = stages.choose(meta_scores)
  p_factor = stages.choose(pre_scores)
  selection = {
    "meta_dmoe": {
      "checkpoint_step": m_step,
      "inner_lr_factor": m_factor,
      "inner_lr": alpha * m_factor,
      "source_val_accuracy": meta_scores[(m_step, m_factor)],
      "scores": {f"step{s}_x{f:g}": v for (s, f), v in meta_scores.items()},
    },
    "aggregator_pretrained": {
      "inner_lr_factor": p_factor,
      "inner_lr": alpha * p_factor,
      "source_val_accuracy": pre_scores[p_factor],
      "scores": {f"x{f:g}": v for f, v in pre_scores.items()},
    },
  }
  continued = None
  if cont_scores:
    c_step = stages.choose(cont_scores)
    continued = dict(candidates["erm_continued"])[c_step]
    selection["erm_continued"] = {
      "checkpoint_step": c_step,
      "source_val_accuracy": cont_scores[c_step],
      "scores": {f"step{s}": v for s, v in cont_scores.items()},
    }
  for choice in selection.values():
    logging.info("selected on the sources' validation splits: %s", choice)
  meta_state = dict(candidates["meta"])[m_step]
  return (meta_state, m_factor, p_factor, continued), selection
