"""Per-example transforms of `data.streaming`: image decoding and augmentation, text tokens.

A transform is `(example, rng) -> {name: array}`, drawing any randomness from `rng` (the
stream seeds it by seed and position, so the batches do not depend on the worker count).
The augmentations and normalisations are described in `data.streaming`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from moe_adapt.data import images
from moe_adapt.data import text as text_lib

AUGMENTATIONS = ("random_resized_crop", "flip", "center_crop", "resize")
NORMALIZATIONS = ("imagenet", "unit")
_SIZING = ("random_resized_crop", "center_crop", "resize")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CENTER_CROP_FRACTION = 0.875  # 224 / 256
_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3 / 4, 4 / 3)

Example = Mapping[str, Any]
Transform = Callable[[Example, np.random.Generator], dict[str, np.ndarray]]


def check_augment(augment: Sequence[str], *, field: str = "augment") -> tuple[str, ...]:
  """Validates an augmentation list (one clear message naming `field`, e.g. a config
  field such as 'data.augment')."""
  if isinstance(augment, str) or not isinstance(augment, Sequence):
    raise ValueError(
      f"{field}={augment!r} is invalid; accepted: a list of {', '.join(AUGMENTATIONS)}"
    )
  unknown = [a for a in augment if a not in AUGMENTATIONS]
  if unknown:
    raise ValueError(f"{field} has unknown name(s) {unknown}; accepted: {', '.join(AUGMENTATIONS)}")
  sizing = [a for a in augment if a in _SIZING]
  if len(sizing) > 1:
    raise ValueError(
      f"{field}={list(augment)} sizes the image twice ({', '.join(sizing)}); accepted: at "
      f"most one of {', '.join(_SIZING)}"
    )
  return tuple(augment)


def random_resized_crop_box(
  height: int, width: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
  """(top, left, h, w) of an Inception-style crop (torchvision's RandomResizedCrop)."""
  area = height * width
  log_ratio = np.log(_RRC_RATIO)
  for _ in range(10):
    target = area * rng.uniform(*_RRC_SCALE)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest central crop with the aspect ratio clamped to the range.
  ratio = width / height
  if ratio < _RRC_RATIO[0]:
    w, h = width, round(width / _RRC_RATIO[0])
  elif ratio > _RRC_RATIO[1]:
    h, w = height, round(height * _RRC_RATIO[1])
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
  """(top, left, h, w): a centred square of 87.5 % of the shorter side."""
  side = max(1, round(min(height, width) * CENTER_CROP_FRACTION))
  return (height - side) // 2, (width - side) // 2, side, side


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """`image[top:top+h, left:left+w]` resized to [size, size, C] (bilinear).

  uint8 images go through PIL (antialiased bilinear, as torchvision's PIL transforms),
  float images through `images.resize`.
  """
  top, left, h, w = box
  if image.dtype == np.uint8:
    channels = image.shape[2]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = pil.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return np.asarray(out).reshape(size, size, channels)
  crop = image[top : top + h, left : left + w]
  return images.resize(crop[None].astype(np.float32), (size, size))[0]


def image_transform(
  *,
  image_size: int,
  augment: Sequence[str] = ("random_resized_crop", "flip"),
  normalize: str = "imagenet",
  image_key: str = "image",
  label_key: str = "label",
  domain_key: str | None = None,
) -> Transform:
  """`(example, rng) -> {'image': [S, S, 3 or C] float32, 'label': int32[, 'domain']}`.

  Args:
    image_size: side S of the output images.
    augment: operations in order (module docstring); use ('center_crop',) to evaluate.
    normalize: 'imagenet' or 'unit'.
    image_key, label_key, domain_key: feature names (domain copied when given).

  Raises:
    ValueError: naming `augment`, `normalize` or `image_size`.
  """
  augment = check_augment(augment)
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize={normalize!r} is unknown; accepted: {', '.join(NORMALIZATIONS)}")
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size={image_size!r} is invalid; accepted: an int >= 1")

  def transform(example: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = np.asarray(example[image_key])
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or (image.dtype != np.uint8 and image.dtype.kind != "f"):
      raise ValueError(
        f"image_key={image_key!r} must hold uint8 or float [H, W(, C)] images; got "
        f"{image.dtype} {image.shape}"
      )
    image = _augmented(image, augment, image_size, rng)
    if image.shape[:2] != (image_size, image_size):
      raise ValueError(
        f"an image of {image.shape[:2]} is not {image_size}x{image_size}; add one of "
        f"{', '.join(_SIZING)} to augment"
      )
    x = image.astype(np.float32)
    if image.dtype == np.uint8:
      x /= np.float32(255.0)
    if normalize == "imagenet":
      if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
      x = (x - IMAGENET_MEAN) / IMAGENET_STD
    out = {"image": np.ascontiguousarray(x), "label": np.int32(example[label_key])}
    if domain_key is not None:
      out["domain"] = np.int32(_as_int(example[domain_key]))
    return out

  return transform


def _augmented(
  image: np.ndarray, augment: Sequence[str], size: int, rng: np.random.Generator
) -> np.ndarray:
  """`image` [H, W, C] through the operations of `augment`, in order (the crops resize to
  [size, size, C]; the boxes are those of the original H x W)."""
  height, width = image.shape[:2]
  for op in augment:
    if op == "random_resized_crop":
      image = crop_and_resize(image, random_resized_crop_box(height, width, rng), size)
    elif op == "center_crop":
      image = crop_and_resize(image, center_crop_box(height, width), size)
    elif op == "resize":
      image = crop_and_resize(image, (0, 0, height, width), size)
    elif op == "flip" and rng.uniform() < 0.5:
      image = image[:, ::-1]
  return image


def _as_int(value: Any) -> int:
  value = np.asarray(value)
  return int(value) if value.dtype.kind in "iub" else -1


def text_transform(
  *,
  tokenize: Callable[[str], Mapping[str, np.ndarray]],
  text_key: str = "sentence",
  label_key: str = "label",
) -> Transform:
  """`(example, rng) -> {**tokenize(text), 'label': int32}`; `tokenize` must return arrays
  of a fixed shape (e.g. `tokenizer_hook` of a padded tokenizer)."""
  if not callable(tokenize):
    raise ValueError(f"tokenize={tokenize!r} is invalid; accepted: a callable text -> dict")

  def transform(example: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
    del rng
    value = example[text_key]
    text = value.decode() if isinstance(value, bytes) else str(value)
    out = {k: np.asarray(v) for k, v in tokenize(text).items()}
    out["label"] = np.int32(example[label_key])
    return out

  return transform


def tokenizer_hook(tokenizer: Any) -> Callable[[str], dict[str, np.ndarray]]:
  """`text -> {'input_ids': int32 [T], 'attention_mask': int32 [T]}` of a fixed-length
  `tokenizers.Tokenizer` (`data.text.load_tokenizer`)."""

  def tokenize(text: str) -> dict[str, np.ndarray]:
    ids, mask = text_lib.tokenize([text], tokenizer)
    return {"input_ids": ids[0], "attention_mask": mask[0]}

  return tokenize
