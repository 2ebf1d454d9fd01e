"""Fine-tuning a pretrained transformer with adapters: the `finetune` method.

A pretrained backbone (MiniLM, a small BERT for tests, or a ViT pre-trained on source
domains inside the pipeline; `methods.adapter_harness`) gets adapters and a new linear head
and is trained on labelled examples with only the chosen parameters updated. One run
compares, on the same data, the variants

- `full`: every parameter (its own learning rate, `train.lr_full`);
- `head`: the linear head on the frozen backbone (a linear probe);
- `houlsby`, `pfeiffer`: bottleneck adapters (two per block / one per block) + head;
- `lora`: LoRA on `adapter.lora_targets` + head;

paired: the same batches in the same order, the same head initialisation and the same
dropout streams (`adapter_harness.variant_key`), so that their differences carry no
batch-order noise; with `data.protocol`:

- 'lodo' (leave-domain-out): train on the training splits of every domain but the
  targets, report accuracy on the targets' test splits;
- 'pooled' (in-domain): train on the training splits of `data.domains` (all by default)
  and report accuracy on each of their test splits.

Results also carry, per variant, the parameter counts ({total, trainable, inference}),
the training cost per step (seconds, measured on a few extra compiled steps) and the
per-example test outcomes (`per_example`, for `launch.collect`'s paired intervals).
"""

from __future__ import annotations

from typing import Any

from absl import logging
from flax import linen as nn

from moe_adapt.data.examples import Examples
from moe_adapt.methods import _checks
from moe_adapt.methods import adapter_harness as harness
from moe_adapt.models import adapted
from moe_adapt.models import adapters as adapters_lib
from moe_adapt.train import metrics as metrics_lib
from moe_adapt.train import results as results_lib
from moe_adapt.train.finetuning import Trained

PyTree = Any

# variant -> (adapter kind, what is trained).
VARIANTS: dict[str, tuple[str, str]] = {
  "full": ("none", "all"),
  "head": ("none", "head"),
  "houlsby": ("houlsby", "adapters"),
  "pfeiffer": ("pfeiffer", "adapters"),
  "lora": ("lora", "adapters"),
}
make_setup = harness.make_setup


def validate_config(config) -> None:
  """Checks every field of the `finetune` method; raises ValueError naming the field."""
  harness.validate_harness_config(config)
  _checks.choice(config, "data.protocol", harness.PROTOCOLS)
  _checks.names(config, "variants", tuple(VARIANTS))
  _checks.runs_baseline(config, "variants", "full")  # launch.collect.BASELINES["finetune"]


def train_variant(
  setup: harness.Setup, workdir: str, writer, variant: str, backbone: PyTree, train_set: Examples
) -> tuple[nn.Module, adapters_lib.AdapterConfig, Trained]:
  """Variant `variant` (VARIANTS) trained on `train_set` from `backbone`: (model, adapter,
  trained), with the run's shared initialisation and training keys."""
  config = setup.config
  kind, train_mode = VARIANTS[variant]
  adapter = harness.adapter_config(config, kind)
  model = harness.build_model(setup, adapter)
  sources, _ = harness.protocol_domains(setup)
  trained = harness.train(
    setup,
    workdir,
    writer,
    stage=variant,
    model=model,
    params=harness.init_params(setup, model, setup.key("init"), backbone),
    train_mode=train_mode,
    examples=train_set,
    steps=config.train.steps,
    lr=harness.variant_lr(config, train_mode),
    batch_size=config.train.batch_size,
    key=harness.variant_key(setup),
    epochs=config.train.get("epochs", 0),
    select=harness.dev_selector(setup, model, sources),
  )
  return model, adapter, trained


def run(config, workdir: str, *, setup: harness.Setup | None = None) -> dict:
  """Runs (or resumes) every variant and returns the results dict of DESIGN.md."""
  validate_config(config)
  if setup is None:
    setup = make_setup(config)
  sources, targets = harness.protocol_domains(setup)
  train_set = setup.task.pooled("train", sources)
  logging.info(
    "finetune: %d training examples from %s; eval on %s", len(train_set), sources, targets
  )
  writer = metrics_lib.MetricWriter(workdir)
  backbone = harness.pretrained_backbone(setup, workdir, writer)
  metrics, per_example, counts, step_time, selection, dev = {}, {}, {}, {}, {}, {}
  for variant in config.variants:
    model, adapter, trained = train_variant(setup, workdir, writer, variant, backbone, train_set)
    if trained.selection is not None:
      selection[variant] = harness.selection_entry(trained, len(train_set), config.train.batch_size)
      dev[variant] = trained.selection["dev_accuracy"]
    metrics[variant], per_example[variant] = harness.evaluate_outcomes(
      setup, model, trained.params, targets
    )
    lora = adapter.kind == "lora"
    inference = adapters_lib.merge_lora(trained.params, adapter) if lora else trained.params
    train_mode = VARIANTS[variant][1]
    counts[variant] = adapted.param_counts(
      trained.params, train_mode=train_mode, inference_params=inference
    )
    step_time[variant] = trained.step_time_s
  writer.close()
  results = {
    "method": "finetune",
    "benchmark": config.data.benchmark,
    "seed": config.seed,
    "protocol": config.data.protocol,
    "source_domains": list(sources),
    "target_domains": list(targets),
    "num_examples": {"train": len(train_set)},
    "params": counts,
    "step_time_s": step_time,
    "metrics": metrics,
    results_lib.PER_EXAMPLE: per_example,
  }
  if selection:  # epoch training: the selected epochs and the dev curves they come from
    results["selection"] = selection
    results["dev_accuracy"] = dev
  return results
