"""A backbone (feature extractor θ_e) followed by a linear head (θ_c); with dropout before
the head, MUKA's MC-dropout teacher and student."""

import jax
import jax.numpy as jnp
from flax import linen as nn


class Classifier(nn.Module):
  """Feature extractor θ_e followed by a linear head θ_c.

  Params: {'backbone': ..., 'head': ...}; BatchNorm statistics (if any) live in collection
  'batch_stats' under 'backbone'. The head is separate so that θ_e and θ_c can be adapted
  separately (Meta-DMoE adapts only θ_e): `classify` needs only {'params': {'head': ...}}.

  Attributes:
    backbone: maps images [B, H, W, C] to features [B, D]; called as
      `backbone(x, train=train)`.
    num_classes: number of output logits C.
  """

  backbone: nn.Module
  num_classes: int

  def __post_init__(self):
    if not isinstance(self.backbone, nn.Module):
      raise ValueError(
        f"Classifier: backbone={self.backbone!r} is invalid; accepted: a flax.linen Module"
      )
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(
        f"Classifier: num_classes={self.num_classes!r} is invalid; accepted: an int >= 1"
      )
    super().__post_init__()

  def setup(self):
    # Logits in float32 whatever the backbone's compute dtype: the losses need the precision.
    self.head = nn.Dense(self.num_classes, dtype=jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images [B, H, W, C] -> logits [B, num_classes] (float32)."""
    return self.classify(self.features(x, train=train))

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images [B, H, W, C] -> backbone features [B, D] (the backbone's dtype)."""
    return self.backbone(x, train=train)

  def classify(self, features: jax.Array) -> jax.Array:
    """Features [B, D] -> logits [B, num_classes] (float32); uses only params['head']."""
    if features.ndim != 2:
      raise ValueError(
        f"Classifier.classify: features must be [B, D]; got shape {tuple(features.shape)}"
      )
    return self.head(features)


class DropoutClassifier(nn.Module):
  """Backbone → dropout → linear head; params {'backbone', 'head'}.

  The CNN and MLP backbones have no dropout of their own; this dropout, on the features
  before the head, is where MC dropout samples (a transformer's hidden dropout plays this
  role in the official code). The rng collection is 'dropout'.

  Attributes:
    backbone: inputs (images [B, H, W, C] or vectors [B, D_in]) -> features [B, D].
    num_classes: number of logits C.
    rate: dropout probability.
  """

  backbone: nn.Module
  num_classes: int
  rate: float

  def setup(self):
    self.dropout = nn.Dropout(self.rate)
    self.head = nn.Dense(self.num_classes, dtype=jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False, stochastic: bool = False):
    """Inputs [B, ...] -> logits [B, C]; `stochastic` turns dropout on."""
    return self.classify(self.features(x, train=train), stochastic=stochastic)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Inputs [B, ...] -> features [B, D] (BatchNorm batch statistics when `train`)."""
    return self.backbone(x, train=train)

  def classify(self, features: jax.Array, *, stochastic: bool = False) -> jax.Array:
    """Features [B, D] -> logits [B, C] (float32); uses only params['head']."""
    return self.head(self.dropout(features, deterministic=not stochastic))
