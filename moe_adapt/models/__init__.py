"""Flax Linen modules: image backbones, an MLP for vectors, the classifier wrapper, Meta-DMoE's
aggregator, the BERT-style encoder and ViT (`bert`, `vit`), adapters (`adapters`) and AdaMix
mixtures of adapters (`adamix`, which registers the adapter kinds 'adamix' and 'adamix_lora');
Hugging Face / timm checkpoints (`checkpoints`, `hf_io`) and PEFT LoRA adapters (`peft_lora`)."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from flax import linen as nn

# adamix is imported for its side effect too: it registers its AdapterConfig kinds.
from moe_adapt.models import (
  adamix,
  adapters,
  bert,
  checkpoints,
  hf_io,
  peft_lora,
  text_classifier,
  text_top,
  vit,
)
from moe_adapt.models.adamix import (
  MixtureAdapter,
  MixtureDense,
  MixtureLoRADense,
  merge_mixture_params,
  mixture_param_counts,
)
from moe_adapt.models.adapters import count_params
from moe_adapt.models.aggregator import Aggregator, AggregatorClassifier
from moe_adapt.models.classifier import Classifier, DropoutClassifier
from moe_adapt.models.cnn import ConvNet
from moe_adapt.models.mlp import MLP
from moe_adapt.models.resnet import BasicBlock, Bottleneck, ResNet, ResNet18, ResNet34, ResNet50

__all__ = [
  "MLP",
  "Aggregator",
  "AggregatorClassifier",
  "BasicBlock",
  "Bottleneck",
  "Classifier",
  "ConvNet",
  "DropoutClassifier",
  "MixtureAdapter",
  "MixtureDense",
  "MixtureLoRADense",
  "ResNet",
  "ResNet18",
  "ResNet34",
  "ResNet50",
  "adamix",
  "adapters",
  "bert",
  "checkpoints",
  "count_params",
  "get_backbone",
  "hf_io",
  "merge_mixture_params",
  "mixture_param_counts",
  "peft_lora",
  "text_classifier",
  "text_top",
  "vit",
]

# Backbone constructors by config name; each maps images [B, H, W, C] (`mlp`: vectors
# [B, D_in]; `text_top`: cached hidden states + mask [B, T, D + 1]) to features [B, D].
BACKBONES: dict[str, Callable[..., nn.Module]] = {
  "convnet": ConvNet,
  "mlp": MLP,
  "resnet18": ResNet18,
  "resnet34": ResNet34,
  "resnet50": ResNet50,
  "text_top": text_top.TextTop,
  "vit": vit.ViT,
}


def _options(ctor: Callable[..., nn.Module]) -> list[str]:
  """Keyword options a backbone constructor accepts (its dataclass fields)."""
  cls = ctor.func if isinstance(ctor, functools.partial) else ctor
  return sorted(
    f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")
  )


def get_backbone(name: str, **kwargs: Any) -> nn.Module:
  """The backbone registered as `name`, constructed with `kwargs`.

  Args:
    name: one of BACKBONES ('convnet', 'mlp', 'resnet18', 'resnet34', 'resnet50', 'text_top',
      'vit').
    **kwargs: fields of that module, e.g. width=16 or num_filters=32, small_input=True.

  Raises:
    ValueError: unknown name or option.
  """
  if name not in BACKBONES:
    raise ValueError(f"backbone name={name!r} is unknown; accepted: {', '.join(BACKBONES)}")
  ctor = BACKBONES[name]
  accepted = _options(ctor)
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ValueError(
      f"backbone {name!r}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
    )
  return ctor(**kwargs)
