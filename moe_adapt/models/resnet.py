"""ResNet feature extractors (He et al. 2016; stride in the 3×3 conv of bottlenecks, "v1.5").

The layout matches the common ImageNet ResNets, so without the classifier ResNet-18 has
11,176,512 and ResNet-50 23,508,032 parameters (BatchNorm scale/bias included, running
statistics not). The output is the global-average-pooled feature, the teacher signal of
Meta-DMoE's experts.
"""

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from moe_adapt.models.cnn import BN_EPSILON, BN_MOMENTUM, check_images


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    name=name,
  )


def _conv(filters: int, kernel: int, strides: int, dtype: Any, name: str) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
    filters,
    (kernel, kernel),
    strides=strides,
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    dtype=dtype,
    name=name,
  )


class BasicBlock(nn.Module):
  """Two 3×3 convs with a residual connection; output channels = filters."""

  filters: int
  strides: int = 1
  dtype: Any = jnp.float32

  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> [B, H/strides, W/strides, filters]."""
    y = _conv(self.filters, 3, self.strides, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
    y = _conv(self.filters, 3, 1, self.dtype, "conv2")(y)
    y = _batch_norm(train, self.dtype, "bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.filters:
      x = _conv(self.filters, 1, self.strides, self.dtype, "proj_conv")(x)
      x = _batch_norm(train, self.dtype, "proj_bn")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1×1 → 3×3 (strided) → 1×1 convs with a residual; output channels = 4·filters."""

  filters: int
  strides: int = 1
  dtype: Any = jnp.float32

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> [B, H/strides, W/strides, 4·filters]."""
    out_channels = self.filters * self.expansion
    y = _conv(self.filters, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
    y = _conv(self.filters, 3, self.strides, self.dtype, "conv2")(y)
    y = nn.relu(_batch_norm(train, self.dtype, "bn2")(y))
    y = _conv(out_channels, 1, 1, self.dtype, "conv3")(y)
    y = _batch_norm(train, self.dtype, "bn3")(y)
    if self.strides != 1 or x.shape[-1] != out_channels:
      x = _conv(out_channels, 1, self.strides, self.dtype, "proj_conv")(x)
      x = _batch_norm(train, self.dtype, "proj_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet backbone: stem, residual stages, global average pooling.

  Attributes:
    stage_sizes: number of blocks per stage; stage i has num_filters·2^i filters and
      downsamples by 2 in its first block (except stage 0).
    block_cls: BasicBlock or Bottleneck.
    num_filters: filters of the stem and of stage 0.
    dtype: computation dtype (parameters stay float32).
    small_input: 3×3 stride-1 stem without max-pool, for 28–32 px inputs; otherwise the
      ImageNet stem (7×7 stride-2 conv, 3×3 stride-2 max-pool).
  """

  stage_sizes: Sequence[int]
  block_cls: type[nn.Module]
  num_filters: int = 64
  dtype: Any = jnp.float32
  small_input: bool = False

  def __post_init__(self):
    sizes = tuple(self.stage_sizes) if isinstance(self.stage_sizes, Sequence) else ()
    if not sizes or not all(isinstance(s, int) and s >= 1 for s in sizes):
      raise ValueError(
        f"ResNet: stage_sizes={self.stage_sizes!r} is invalid; accepted: a non-empty "
        "sequence of ints >= 1, e.g. (2, 2, 2, 2)"
      )
    is_block = isinstance(self.block_cls, type) and issubclass(self.block_cls, nn.Module)
    if not (is_block and isinstance(getattr(self.block_cls, "expansion", None), int)):
      raise ValueError(
        f"ResNet: block_cls={self.block_cls!r} is invalid; accepted: BasicBlock, Bottleneck "
        "(or a Module class with fields filters, strides, dtype and an int `expansion`)"
      )
    if not isinstance(self.num_filters, int) or self.num_filters < 1:
      raise ValueError(
        f"ResNet: num_filters={self.num_filters!r} is invalid; accepted: an int >= 1"
      )
    super().__post_init__()

  @property
  def output_dim(self) -> int:
    """Size D of the feature vector returned by __call__."""
    return self.num_filters * 2 ** (len(self.stage_sizes) - 1) * self.block_cls.expansion

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps images [B, H, W, C] to pooled features [B, output_dim] in `dtype`.

    Args:
      x: images [B, H, W, C].
      train: BatchNorm uses batch statistics and updates its running averages (call with
        `mutable=['batch_stats']`); otherwise it uses the running averages.
    """
    check_images(x, module="ResNet")
    x = jnp.asarray(x, self.dtype)
    if self.small_input:
      x = _conv(self.num_filters, 3, 1, self.dtype, "stem_conv")(x)
      x = nn.relu(_batch_norm(train, self.dtype, "stem_bn")(x))
    else:
      x = _conv(self.num_filters, 7, 2, self.dtype, "stem_conv")(x)
      x = nn.relu(_batch_norm(train, self.dtype, "stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(
          filters=self.num_filters * 2**i,
          strides=2 if i > 0 and j == 0 else 1,
          dtype=self.dtype,
          name=f"stage{i + 1}_block{j + 1}",
        )(x, train)
    return jnp.mean(x, axis=(1, 2))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
