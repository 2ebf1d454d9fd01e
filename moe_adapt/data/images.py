"""Vectorised image transforms for building domain benchmarks (NumPy / scipy.ndimage).

Every function takes a batch `images` of shape [N, H, W, C] (float, values in [0, 1],
background 0) and returns a new float32 batch of the same shape; inputs are never modified.
Per-image parameters are either scalars (one value for the batch) or arrays of shape [N].
Functions with randomness take a `numpy.random.Generator` and are deterministic given it.

Geometry uses one convention: pixel (i, j) has centre offset (i - (H-1)/2, j - (W-1)/2);
an output pixel reads the input bilinearly at `centre + A @ offset + t`, and anything that
falls outside the input reads 0 (the background). Positive rotation angles turn the content
counter-clockwise, as `np.rot90` does.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

# Images per chunk in the bilinear sampler: bounds temporary memory (~50 MB at 28×28).
_CHUNK = 4096


def _check_batch(images: np.ndarray, name: str = "images") -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"{name} must have shape [N, H, W, C]; got shape {images.shape}")
  return images.astype(np.float32, copy=False)


def _per_image(value: ArrayLike, n: int, name: str) -> np.ndarray:
  """Broadcasts a scalar or [N] parameter to a float32 [N] array."""
  value = np.asarray(value, dtype=np.float32)
  if value.ndim == 0:
    return np.full((n,), value, dtype=np.float32)
  if value.shape != (n,):
    raise ValueError(f"{name} must be a scalar or have shape [{n}]; got shape {value.shape}")
  return value


def bilinear_sample(images: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """Reads `images` [N, H, W, C] at fractional pixel coordinates `ys`, `xs` [N, h, w].

  Out-of-range neighbours read 0, so content fades into the background at the border.
  Returns [N, h, w, C] float32.
  """
  images = _check_batch(images)
  n, height, width, channels = images.shape
  if ys.shape != xs.shape or ys.shape[0] != n or ys.ndim != 3:
    raise ValueError(f"ys and xs must both have shape [{n}, h, w]; got {ys.shape}, {xs.shape}")
  out = np.empty((*ys.shape, channels), dtype=np.float32)
  flat = images.reshape(n * height * width, channels)
  for start in range(0, n, _CHUNK):
    stop = min(start + _CHUNK, n)
    y = ys[start:stop].astype(np.float32, copy=False)
    x = xs[start:stop].astype(np.float32, copy=False)
    y0 = np.floor(y)
    x0 = np.floor(x)
    wy = y - y0
    wx = x - x0
    y0 = y0.astype(np.int64)
    x0 = x0.astype(np.int64)
    base = (np.arange(start, stop, dtype=np.int64) * (height * width))[:, None, None]
    acc = np.zeros((*y.shape, channels), dtype=np.float32)
    for dy, weight_y in ((0, 1.0 - wy), (1, wy)):
      yy = y0 + dy
      valid_y = (yy >= 0) & (yy < height)
      for dx, weight_x in ((0, 1.0 - wx), (1, wx)):
        xx = x0 + dx
        valid = valid_y & (xx >= 0) & (xx < width)
        index = base + np.clip(yy, 0, height - 1) * width + np.clip(xx, 0, width - 1)
        weight = np.where(valid, weight_y * weight_x, 0.0).astype(np.float32)
        acc += weight[..., None] * flat[index]
    out[start:stop] = acc
  return out


def affine(images: np.ndarray, matrices: ArrayLike, offsets: ArrayLike | None = None) -> np.ndarray:
  """Applies per-image affine maps about the image centre.

  Args:
    images: [N, H, W, C].
    matrices: [N, 2, 2] or [2, 2]; maps an output pixel's centre offset (row, col) to the
      input offset it reads.
    offsets: [N, 2] or [2] added input offset in pixels (row, col); default 0.

  Returns:
    [N, H, W, C] float32.
  """
  images = _check_batch(images)
  n, height, width, _ = images.shape
  matrices = np.broadcast_to(np.asarray(matrices, np.float32), (n, 2, 2))
  offsets = np.zeros((n, 2), np.float32) if offsets is None else np.asarray(offsets, np.float32)
  offsets = np.broadcast_to(offsets, (n, 2))
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  rows = (np.arange(height, dtype=np.float32) - cy)[None, :, None]
  cols = (np.arange(width, dtype=np.float32) - cx)[None, None, :]
  a = matrices[:, :, :, None, None]
  ys = cy + offsets[:, 0, None, None] + a[:, 0, 0] * rows + a[:, 0, 1] * cols
  xs = cx + offsets[:, 1, None, None] + a[:, 1, 0] * rows + a[:, 1, 1] * cols
  return bilinear_sample(images, ys, xs)


def rotate(images: np.ndarray, degrees: ArrayLike) -> np.ndarray:
  """Rotates each image counter-clockwise by `degrees` (scalar or [N]) about its centre."""
  images = _check_batch(images)
  theta = np.deg2rad(_per_image(degrees, images.shape[0], "degrees"))
  c, s = np.cos(theta), np.sin(theta)
  # Inverse map in (row, col) offsets of a counter-clockwise turn (rows point down).
  matrices = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)
  return affine(images, matrices)


def shear(images: np.ndarray, factors: ArrayLike) -> np.ndarray:
  """Shears horizontally: the row at offset r moves right by `factors`·(-r) pixels.

  Positive factors lean the content to the right (its top moves right). Scalar or [N].
  """
  images = _check_batch(images)
  k = _per_image(factors, images.shape[0], "factors")
  ones, zeros = np.ones_like(k), np.zeros_like(k)
  matrices = np.stack([np.stack([ones, zeros], -1), np.stack([k, ones], -1)], -2)
  return affine(images, matrices)


def scale(images: np.ndarray, factors: ArrayLike) -> np.ndarray:
  """Zooms about the centre by `factors` (scalar or [N]); < 1 shrinks the content."""
  images = _check_batch(images)
  f = _per_image(factors, images.shape[0], "factors")
  if np.any(f <= 0):
    raise ValueError(f"factors must be > 0; got min {f.min()}")
  inv = 1.0 / f
  zeros = np.zeros_like(f)
  matrices = np.stack([np.stack([inv, zeros], -1), np.stack([zeros, inv], -1)], -2)
  return affine(images, matrices)


def translate(images: np.ndarray, shifts: ArrayLike) -> np.ndarray:
  """Moves the content by `shifts` pixels, [N, 2] or [2] as (down, right)."""
  images = _check_batch(images)
  eye = np.eye(2, dtype=np.float32)
  return affine(images, eye, -np.asarray(shifts, np.float32))


def elastic(
  images: np.ndarray, rng: np.random.Generator, *, alpha: float, sigma: float
) -> np.ndarray:
  """Elastic distortion (Simard et al. 2003) with a fresh random field per image.

  Each pixel reads its input displaced by a field of i.i.d. U(-1, 1) values smoothed by a
  Gaussian of width `sigma` pixels and scaled by `alpha` pixels.
  """
  images = _check_batch(images)
  if alpha < 0 or sigma <= 0:
    raise ValueError(f"need alpha >= 0 and sigma > 0; got alpha={alpha}, sigma={sigma}")
  n, height, width, _ = images.shape
  fields = rng.uniform(-1.0, 1.0, size=(2, n, height, width)).astype(np.float32)
  fields = ndimage.gaussian_filter(fields, sigma=(0, 0, sigma, sigma), mode="constant")
  fields *= alpha
  rows = np.arange(height, dtype=np.float32)[None, :, None]
  cols = np.arange(width, dtype=np.float32)[None, None, :]
  return bilinear_sample(images, rows + fields[0], cols + fields[1])


def gaussian_noise(images: np.ndarray, rng: np.random.Generator, *, std: ArrayLike) -> np.ndarray:
  """Adds N(0, std²) pixel noise (std scalar or [N]) and clips to [0, 1]."""
  images = _check_batch(images)
  std = _per_image(std, images.shape[0], "std")
  noise = rng.standard_normal(size=images.shape, dtype=np.float32)
  return np.clip(images + std[:, None, None, None] * noise, 0.0, 1.0)


def gaussian_blur(images: np.ndarray, sigma: ArrayLike) -> np.ndarray:
  """Separable Gaussian blur with a per-image width `sigma` (pixels, scalar or [N]).

  The kernel is truncated at 3 sigma of the largest width and renormalised per image;
  outside the image counts as background 0.
  """
  images = _check_batch(images)
  sigma = _per_image(sigma, images.shape[0], "sigma")
  if np.any(sigma <= 0):
    raise ValueError(f"sigma must be > 0; got min {sigma.min()}")
  radius = int(np.ceil(3.0 * sigma.max()))
  taps = np.arange(-radius, radius + 1, dtype=np.float32)
  kernels = np.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
  kernels /= kernels.sum(axis=1, keepdims=True)  # [N, K]
  out = images
  for axis in (1, 2):
    length = out.shape[axis]
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = np.pad(out, pad)
    acc = np.zeros_like(out)
    for k in range(taps.size):
      window = np.take(padded, np.arange(k, k + length), axis=axis)
      acc += kernels[:, k, None, None, None] * window
    out = acc
  return out


def contrast(images: np.ndarray, factors: ArrayLike) -> np.ndarray:
  """Scales each image's deviation from its own mean by `factors` (scalar or [N])."""
  images = _check_batch(images)
  f = _per_image(factors, images.shape[0], "factors")[:, None, None, None]
  mean = images.mean(axis=(1, 2, 3), keepdims=True)
  return np.clip(mean + f * (images - mean), 0.0, 1.0)


def invert(images: np.ndarray) -> np.ndarray:
  """Photographic negative: 1 - x."""
  return 1.0 - _check_batch(images)


def occlude(
  images: np.ndarray, rng: np.random.Generator, *, size: int, value: float = 0.5
) -> np.ndarray:
  """Pastes a `size`×`size` square of constant `value` at a uniform random position."""
  images = _check_batch(images)
  n, height, width, _ = images.shape
  if not 0 < size <= min(height, width):
    raise ValueError(f"size must be in [1, {min(height, width)}]; got {size}")
  top = rng.integers(0, height - size + 1, size=n)
  left = rng.integers(0, width - size + 1, size=n)
  rows = np.arange(height)[None, :, None]
  cols = np.arange(width)[None, None, :]
  inside = (
    (rows >= top[:, None, None])
    & (rows < top[:, None, None] + size)
    & (cols >= left[:, None, None])
    & (cols < left[:, None, None] + size)
  )
  return np.where(inside[..., None], np.float32(value), images)


def resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of [N, H, W, C] to [N, size[0], size[1], C].

  Half-pixel centres (as `jax.image.resize` and TF2 do) with edge values held at the border.
  Written as two small interpolation matrices, so any batch size is one einsum.
  """
  images = _check_batch(images)
  out_h, out_w = (int(s) for s in size)
  if out_h < 1 or out_w < 1:
    raise ValueError(f"size must be positive; got {size}")
  wy = _interp_matrix(images.shape[1], out_h)
  wx = _interp_matrix(images.shape[2], out_w)
  return np.einsum("ih,nhwc,jw->nijc", wy, images, wx, optimize=True).astype(np.float32)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear-interpolation weights with half-pixel centres and edge clamping."""
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.clip(src, 0.0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  weights = np.zeros((n_out, n_in))
  weights[np.arange(n_out), lo] += 1.0 - frac
  weights[np.arange(n_out), hi] += frac
  return weights.astype(np.float32)
