"""A small convolutional feature extractor for 16–32 px images (digits, Fashion-MNIST)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

# PyTorch's BatchNorm defaults (momentum 0.1 there = 0.9 here), as in the reference recipes.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def check_images(x: jax.Array, *, module: str) -> None:
  """Raises ValueError unless `x` is a non-empty image batch [B, H, W, C]."""
  if x.ndim != 4 or 0 in x.shape:
    raise ValueError(
      f"{module}: x must be a non-empty image batch [B, H, W, C]; got shape {tuple(x.shape)}"
    )


class ConvNet(nn.Module):
  """CNN backbone: `depth` conv blocks, global average pooling, optional FC feature layer.

  Block i is conv 3×3 (padding 1) → BatchNorm → ReLU; block 0 has `width` channels and
  stride 1, every later block 2·`width` channels and stride 2. After global average pooling
  comes Dense(`feature_dim`) → ReLU; a plain 3-conv net with only pooling is a weak feature
  extractor on Fashion-MNIST (~72 %), the FC layer makes it a usable one.

  Attributes:
    width: channels of the first block (later blocks have twice as many).
    depth: number of conv blocks (≥ 1).
    feature_dim: size of the FC feature layer; 0 means no FC layer, so the features are the
      pooled conv features (2·width channels, or width when depth == 1).
    use_batchnorm: BatchNorm after each conv (running stats in collection 'batch_stats');
      without it the convs get biases. In eval mode with float32 compute, each BatchNorm
      (then a fixed per-channel affine map) is folded into its conv's kernel and a bias,
      which is the same function up to float rounding and has the same variables.
    dtype: computation dtype (parameters stay float32).
  """

  width: int = 32
  depth: int = 3
  feature_dim: int = 128
  use_batchnorm: bool = True
  dtype: Any = jnp.float32

  def __post_init__(self):
    for field, value, low in (("width", self.width, 1), ("depth", self.depth, 1)):
      if not isinstance(value, int) or value < low:
        raise ValueError(f"ConvNet: {field}={value!r} is invalid; accepted: an int >= {low}")
    if not isinstance(self.feature_dim, int) or self.feature_dim < 0:
      raise ValueError(
        f"ConvNet: feature_dim={self.feature_dim!r} is invalid; accepted: an int >= 0 "
        "(0 = pooled conv features, no FC layer)"
      )
    super().__post_init__()

  @property
  def output_dim(self) -> int:
    """Size D of the feature vector returned by __call__."""
    if self.feature_dim:
      return self.feature_dim
    return self.width if self.depth == 1 else 2 * self.width

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps images [B, H, W, C] to features [B, output_dim] in `dtype`.

    Args:
      x: images [B, H, W, C].
      train: BatchNorm uses batch statistics and updates its running averages (call with
        `mutable=['batch_stats']`); otherwise it uses the running averages.
    """
    check_images(x, module="ConvNet")
    x = jnp.asarray(x, self.dtype)
    # Folding needs the variables, so not while they are being created; bfloat16 keeps the
    # unfolded path (rounding W·m to bfloat16 would change more than the summation order).
    fold = (
      self.use_batchnorm
      and not train
      and jnp.dtype(self.dtype) == jnp.float32
      and not self.is_initializing()
      and "batch_stats" in self.variables
    )
    for i in range(self.depth):
      channels = self.width if i == 0 else 2 * self.width
      if fold:
        x = nn.relu(self._folded_conv_bn(x, i, stride=1 if i == 0 else 2))
        continue
      x = nn.Conv(
        channels,
        (3, 3),
        strides=1 if i == 0 else 2,
        padding=((1, 1), (1, 1)),
        use_bias=not self.use_batchnorm,
        dtype=self.dtype,
        name=f"conv_{i}",
      )(x)
      if self.use_batchnorm:
        x = nn.BatchNorm(
          use_running_average=not train,
          momentum=BN_MOMENTUM,
          epsilon=BN_EPSILON,
          dtype=self.dtype,
          name=f"bn_{i}",
        )(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.feature_dim:
      x = nn.relu(nn.Dense(self.feature_dim, dtype=self.dtype, name="fc")(x))
    return x

  def _folded_conv_bn(self, x: jax.Array, i: int, *, stride: int) -> jax.Array:
    """Block i's conv → eval-mode BatchNorm as one conv with a bias: [B, H, W, C] -> [B, H', W', O].

    Frozen BatchNorm is z ↦ (z − mean)·m + bias with m = scale/√(var + ε) per channel, and
    conv(x, W)·m = conv(x, W·m), so the block is conv(x, W·m) + (bias − mean·m). It is
    exact up to float rounding, and cheaper to differentiate: the gradients of scale and
    bias come from the small kernel gradient and one channel sum instead of extra passes over
    the activations, and the meta-step's Hessian-vector products have fewer elementwise
    terms (Meta-DMoE meta-step on XLA:CPU: 8-11 % faster, `benchmarks/README.md`).
    """
    params, stats = self.variables["params"], self.variables["batch_stats"]
    bn, running = params[f"bn_{i}"], stats[f"bn_{i}"]
    m = bn["scale"] * jax.lax.rsqrt(running["var"] + BN_EPSILON)
    kernel = params[f"conv_{i}"]["kernel"] * m  # [3, 3, C, O] · [O]
    bias = bn["bias"] - running["mean"] * m
    y = jax.lax.conv_general_dilated(
      x,
      kernel.astype(self.dtype),
      (stride, stride),
      ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias.astype(self.dtype)
