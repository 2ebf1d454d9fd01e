"""Tests for moe_adapt.data.images against scipy.ndimage / NumPy / jax.image references."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from moe_adapt.data import images


@pytest.fixture(name="batch")
def fixture_batch():
  return np.random.default_rng(0).random((4, 11, 13, 2)).astype(np.float32)


@pytest.fixture(name="square")
def fixture_square():
  return np.random.default_rng(1).random((3, 8, 8, 1)).astype(np.float32)


@pytest.mark.parametrize("k, degrees", [(1, 90), (2, 180), (-1, -90), (3, 270)])
def test_rotate_right_angles_match_rot90(square, k, degrees):
  np.testing.assert_allclose(
    images.rotate(square, degrees), np.rot90(square, k, axes=(1, 2)), atol=1e-5
  )


def test_rotate_moves_a_pixel_counter_clockwise():
  x = np.zeros((1, 9, 9, 1), np.float32)
  x[0, 4, 8, 0] = 1.0  # Right of the centre (4, 4).
  out = images.rotate(x, 90)[0, ..., 0]
  assert np.unravel_index(out.argmax(), out.shape) == (0, 4)  # Now above the centre.
  np.testing.assert_allclose(out.sum(), 1.0, atol=1e-6)


def test_rotate_zero_is_identity(batch):
  np.testing.assert_array_equal(images.rotate(batch, 0.0), batch)


def test_rotate_per_image_angles_match_scipy(batch):
  angles = np.array([0.0, 20.0, -35.0, 75.0])
  out = images.rotate(batch, angles)
  for i, angle in enumerate(angles):
    ref = ndimage.rotate(batch[i], angle, axes=(1, 0), reshape=False, order=1, mode="grid-constant")
    np.testing.assert_allclose(out[i], ref, atol=1e-5)


def test_affine_matches_scipy_affine_transform(batch):
  rng = np.random.default_rng(2)
  matrices = rng.normal(size=(4, 2, 2))
  offsets = rng.normal(size=(4, 2)) * 2
  out = images.affine(batch, matrices, offsets)
  centre = np.array([5.0, 6.0])
  for i in range(4):
    a = np.eye(3)
    a[:2, :2] = matrices[i]
    a[:2, 2] = centre + offsets[i] - matrices[i] @ centre
    for c in range(2):
      ref = ndimage.affine_transform(batch[i, ..., c], a, order=1, mode="grid-constant")
      np.testing.assert_allclose(out[i, ..., c], ref, atol=1e-5)


def test_shear_by_one_shifts_rows_by_their_offset():
  x = np.random.default_rng(3).random((2, 7, 12, 1)).astype(np.float32)
  out = images.shear(x, 1.0)
  for row in range(7):
    shift = 3 - row  # Row offset r = row - 3 moves right by -r pixels.
    ref = np.zeros_like(x[:, row])
    if shift >= 0:
      ref[:, shift:] = x[:, row, : 12 - shift]
    else:
      ref[:, :shift] = x[:, row, -shift:]
    np.testing.assert_allclose(out[:, row], ref, atol=1e-6)


def test_scale_and_translate(square):
  np.testing.assert_allclose(images.scale(square, 1.0), square, atol=1e-6)
  shrunk = images.scale(square, 0.5)
  assert shrunk[:, 0].max() == 0 and shrunk[:, :, -1].max() == 0  # Content left the border.
  moved = images.translate(square, [2, -1])
  np.testing.assert_allclose(moved[:, 2:, :-1], square[:, :-2, 1:], atol=1e-6)
  assert moved[:, :2].max() == 0 and moved[:, :, -1].max() == 0
  with pytest.raises(ValueError, match="factors"):
    images.scale(square, 0.0)


def test_resize_matches_jax_image_resize(batch):
  # Upsampling only: jax.image.resize antialiases when it downsamples.
  for size in [(22, 26), (16, 13), (11, 13)]:
    ref = jax.image.resize(batch, (4, *size, 2), "linear")
    np.testing.assert_allclose(images.resize(batch, size), np.asarray(ref), atol=1e-5)


def test_blur_matches_scipy_per_image(batch):
  sigmas = np.array([0.6, 1.0, 1.3, 0.9], np.float32)
  out = images.gaussian_blur(batch, sigmas)
  radius = int(np.ceil(3 * sigmas.max()))
  for i, s in enumerate(sigmas):
    ref = ndimage.gaussian_filter(batch[i], (s, s, 0), mode="constant", radius=(radius, radius, 0))
    np.testing.assert_allclose(out[i], ref, atol=1e-5)


def test_gaussian_noise_statistics_and_determinism():
  x = np.full((64, 28, 28, 1), 0.5, np.float32)
  out = images.gaussian_noise(x, np.random.default_rng(4), std=0.1)
  np.testing.assert_allclose((out - x).mean(), 0.0, atol=2e-3)
  np.testing.assert_allclose((out - x).std(), 0.1, rtol=0.02)
  again = images.gaussian_noise(x, np.random.default_rng(4), std=0.1)
  np.testing.assert_array_equal(out, again)
  clipped = images.gaussian_noise(x, np.random.default_rng(4), std=5.0)
  assert clipped.min() == 0.0 and clipped.max() == 1.0


def test_contrast_scales_deviation_from_the_mean(batch):
  out = images.contrast(batch, 0.3)
  mean = batch.mean(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(out, mean + 0.3 * (batch - mean), atol=1e-6)
  np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), mean.ravel(), atol=1e-6)


def test_invert(batch):
  np.testing.assert_allclose(images.invert(batch), 1.0 - batch)


def test_occlude_pastes_one_square_per_image():
  x = np.zeros((50, 28, 28, 1), np.float32)
  out = images.occlude(x, np.random.default_rng(5), size=10, value=0.5)
  corners = set()
  for img in out[..., 0]:
    rows, cols = np.nonzero(img == 0.5)
    assert len(rows) == 100 and np.ptp(rows) == 9 and np.ptp(cols) == 9
    corners.add((rows.min(), cols.min()))
  assert len(corners) > 25  # Positions are random.
  with pytest.raises(ValueError, match="size"):
    images.occlude(x, np.random.default_rng(0), size=29)


def test_elastic_is_seeded_and_zero_alpha_is_identity(batch):
  a = images.elastic(batch, np.random.default_rng(6), alpha=8.0, sigma=2.0)
  b = images.elastic(batch, np.random.default_rng(6), alpha=8.0, sigma=2.0)
  c = images.elastic(batch, np.random.default_rng(7), alpha=8.0, sigma=2.0)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 0.05 and np.abs(a - batch).max() > 0.05
  same = images.elastic(batch, np.random.default_rng(6), alpha=0.0, sigma=2.0)
  np.testing.assert_allclose(same, batch, atol=1e-6)


def test_bad_inputs(batch):
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    images.rotate(batch[0], 10)
  with pytest.raises(ValueError, match="degrees"):
    images.rotate(batch, np.zeros(3))
  with pytest.raises(ValueError, match="sigma"):
    images.gaussian_blur(batch, -1.0)
  with pytest.raises(ValueError, match="size"):
    images.resize(batch, (0, 4))
