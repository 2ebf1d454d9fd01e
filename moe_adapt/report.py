"""The results table `moe-adapt` prints at the end of a run.

One row per variant of `results["metrics"]` and one column per target domain (then
`mean`), accuracy in %. The method's own rows come first, marked `*`; every other row is a
baseline or ablation that the same run trained, named in the last column. Rows come in the
same order on every run and rerun (the method's rows, then its named baselines, both in the
order listed here, then the others sorted by name), whatever the order of the keys in
`results.json`. Top-level keys other than
`metrics`, `method`, `benchmark`, `seed` and `target_domains` are not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Per method: (the method's own variants, in display order; {variant: what it is}).
# A note key ending in '_' names every variant starting with it; a variant matching no
# note is shown without one.
VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
  "meta_dmoe": (
    ("meta_dmoe",),
    {
      "meta_dmoe": "Meta-DMoE: meta-trained student adapted on unlabeled target images",
      "meta_unadapted": "ablation: the meta-trained student before adaptation",
      "erm": "baseline: one model trained on the pooled source domains (ERM)",
      "expert_average": "baseline: the experts' predictions averaged",
      "aggregator_head": "baseline: the aggregator's own classifier over the experts",
      "aggregator_pretrained": "ablation: ERM student adapted with the aggregator, no meta",
      "erm_continued": "control: ERM student trained on the meta stage's batches at its lr",
      "meta_dmoe_target_zeros": "control: the same adaptation step toward zero features",
      "meta_dmoe_target_source_mean": "control: adaptation toward the source-mean feature",
      "meta_dmoe_target_shuffled": "control: adaptation toward another image's features",
    },
  ),
  "adapter_experts": (
    ("meta_dmoe",),
    {
      "meta_dmoe": "Meta-DMoE with adapter experts on one frozen backbone",
      "meta_unadapted": "ablation: the meta-trained student before adaptation",
      "erm": "baseline: one model trained on the pooled source domains (ERM)",
      "expert_average": "baseline: the experts' predictions averaged",
      "aggregator_head": "baseline: the aggregator's own classifier over the experts",
      "aggregator_pretrained": "ablation: ERM student adapted with the aggregator, no meta",
    },
  ),
  "co_tuning": (
    ("co_tuning_direct", "co_tuning_reverse"),
    {
      "co_tuning_direct": "Co-Tuning, category relationship learned directly",
      "co_tuning_reverse": "Co-Tuning, category relationship by the reverse route",
      "fine_tune": "baseline: plain fine-tuning of the pretrained model",
      "l2_sp": "baseline: fine-tuning with L2-SP (pull towards the pretrained weights)",
    },
  ),
  "muka": (
    ("muki", "uhc"),
    {
      "muki": "MUKI: soft integration of MC-dropout-scored teachers + margin weights",
      "uhc": "UHC: student renormalised over each teacher's labels (Vongkulbhisal 2019)",
      "hard": "MUKA-style hard integration (most confident teacher)",
      "no_margin": "ablation: muki without the margin weights",
      "single_pass": "ablation: muki with single-pass (no MC dropout) scores",
      "vanilla_kd": "baseline: distillation from the teachers' concatenated logits",
      "oracle": "upper bound: trained with the labels (not annotation-free)",
      "teachers": "the teachers, each on its own classes",
    },
  ),
  "adamix": (
    ("adamix", "adamix_lora"),
    {
      "adamix": "AdaMix, merged (one module's inference cost)",
      "adamix_lora": "AdaMix-LoRA, merged",
      "adamix_random": "AdaMix: mean of random sub-models, each fixed for the whole test set",
      "adamix_random_example": "AdaMix: a fresh expert per example and forward (official)",
      "adamix_fixed": "AdaMix: expert 0 everywhere",
      "adamix_no_consistency": "ablation: no consistency regularisation",
      "adamix_no_sharing": "ablation: up-projections routed too",
      "adapter": "baseline: one adapter of the same size at the same place",
      "lora": "baseline: LoRA",
      "full": "baseline: full fine-tuning",
    },
  ),
  "finetune": (
    (),
    {
      "full": "full fine-tuning",
      "head": "linear probe (head only)",
      "houlsby": "Houlsby adapters",
      "pfeiffer": "Pfeiffer adapters",
      "lora": "LoRA",
    },
  ),
  "adapter_soup": (
    ("similarity", "clustering"),
    {
      "similarity": "AdapterSoup: adapters chosen by sentence similarity, averaged",
      "clustering": "AdapterSoup: adapters chosen by clustering, averaged",
      "all": "baseline: every other domain's adapter averaged",
      "best_single": "oracle: the best single adapter on the test split",
      "zero_shot": "baseline: frozen backbone, head trained on the other domains",
      "own": "in-domain: the domain's own adapter",
      # Families of variants, by prefix (the first matching prefix names the row).
      "greedy_": "in-domain: own adapter + the others of lowest FSD, averaged (l in all)",
      "mix_size_": "in-domain: mixtures holding the own adapter, by size",
      "prune_own_": "in-domain: own adapter magnitude-pruned at s %",
      "prune_fsd_": "in-domain: all-K mixture, highest-FSD layers pruned at s %",
      "prune_": "in-domain: all-K mixture, each adapter pruned at s %",
      "ties_": "in-domain: TIES merge of all K adapters at density 1 - s",
      "single_": "one other domain's adapter alone",
    },
  ),
}
# Variants shown at most; the rest are counted, and all are in results.json.
MAX_ROWS = 30


def _accuracies(per_domain: Any) -> dict[str, float]:
  """{domain: accuracy} of one variant's metrics (domains without a scalar accuracy dropped)."""
  if not isinstance(per_domain, Mapping):
    return {}
  out = {}
  for domain, metrics in per_domain.items():
    value = metrics.get("accuracy") if isinstance(metrics, Mapping) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
      out[str(domain)] = float(value)
  return out


def _note(notes: Mapping[str, str], variant: str) -> str:
  if variant in notes:
    return notes[variant]
  prefixes = [k for k in notes if k.endswith("_") and variant.startswith(k)]
  return notes[prefixes[0]] if prefixes else ""


def ordered_variants(method: str, variants: list[str]) -> list[str]:
  """`variants` in display order: the method's own, its named baselines, the rest by name.

  Own variants and baselines come in the order `VARIANTS` lists them.
  """
  own, notes = VARIANTS.get(method, ((), {}))
  first = [v for v in dict.fromkeys([*own, *notes]) if v in variants]
  return first + sorted(v for v in variants if v not in first)


def _columns(target_domains: list[str], rows: dict[str, dict[str, float]]) -> list[str]:
  seen = {d for accs in rows.values() for d in accs}
  columns = [d for d in target_domains if d in seen]
  others = sorted(seen - set(columns) - {"mean"})
  return columns + others + (["mean"] if "mean" in seen else [])


def _title(results: Mapping[str, Any], method: str, targets: list[str]) -> str:
  title = f"Results: {method or 'run'}"
  if results.get("benchmark"):
    title += f" on {results['benchmark']}"
  if "seed" in results:
    title += f", seed {results['seed']}"
  if targets:
    title += f", target domain{'s' if len(targets) > 1 else ''} {', '.join(targets)}"
  return title


def _table(method: str, rows: dict[str, dict[str, float]], targets: list[str]) -> list[str]:
  """The header, one line per shown variant (at most `MAX_ROWS`) and the table's notes."""
  own, notes = VARIANTS.get(method, ((), {}))
  order = ordered_variants(method, list(rows))
  shown, hidden = order[:MAX_ROWS], order[MAX_ROWS:]
  columns = _columns(targets, rows)
  name_width = max(len("variant"), *(len(v) for v in shown))
  widths = [max(6, len(c)) for c in columns]
  header = "  " + "variant".ljust(name_width)
  header += "".join(f"  {c:>{w}}" for c, w in zip(columns, widths))
  lines = [header + "  what it is" if any(_note(notes, v) for v in shown) else header]
  previous = ""
  for variant in shown:
    accs = rows[variant]
    cells = "".join(
      f"  {accs[c] * 100:>{w}.1f}" if c in accs else f"  {'-':>{w}}"
      for c, w in zip(columns, widths)
    )
    mark = "*" if variant in own else " "
    # A family of variants shares one note: shown on its first row only.
    note = _note(notes, variant)
    note, previous = (f"  {note}" if note and note != previous else ""), note
    lines.append(f"{mark} {variant.ljust(name_width)}{cells}{note}".rstrip())
  if hidden:
    lines.append(f"  ... and {len(hidden)} more variants (all in results.json)")
  if any(v in own for v in shown):
    lines.append(f"* = {method} itself; the other rows are baselines and ablations of this run.")
  return lines


def format_results(
  results: Mapping[str, Any], *, results_path: str | None = None, smoke_test: bool = False
) -> str:
  """The results table of one run (see the module docstring), with a title and a footer.

  Args:
    results: a run's results (`results.json`); unknown top-level keys are ignored.
    results_path: where the results were saved, named in the footer.
    smoke_test: add a line saying that the numbers come from a smoke test.

  Returns:
    Text lines without a trailing newline.
  """
  method = str(results.get("method", ""))
  metrics = results.get("metrics") or {}
  rows = {str(v): _accuracies(m) for v, m in metrics.items()}
  rows = {v: accs for v, accs in rows.items() if accs}
  targets = [str(d) for d in results.get("target_domains") or []]

  lines = [_title(results, method, targets) + " (accuracy, %)"]
  if not rows:
    lines.append("  (no accuracies in these results)")
  else:
    lines += _table(method, rows, targets)
  if smoke_test:
    lines.append("Smoke test (',tiny'): a few steps on tiny models; the numbers mean nothing.")
  if "wall_time_s" in results:
    lines.append(f"Wall time of the run: {float(results['wall_time_s']):.0f} s.")
  if results_path:
    lines.append(f"Saved: {results_path} (print it with --print_json).")
  return "\n".join(lines)
