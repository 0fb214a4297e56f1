r"""Differentiable glimpses: P×P patches sampled bilinearly around keypoints (as in spatial transformers, Jaderberg
et al. 2015, arXiv 1506.02025, restricted to axis-aligned crops).

    patch[b, k, i, j, :] = Σ_{h,w} tent(v_i − h)·tent(u_j − w)·image[b, h, w, :],   tent(t) = max(0, 1 − |t|)
    u_j = ((x_k + s·o_j) + 1)·W/2 − 1/2,   v_i = ((y_k + s·o_i) + 1)·H/2 − 1/2,   o_i = (2i + 1)/P − 1

Coordinates are normalised to [-1, 1] with -1 and +1 at the outer edges of the image (pixel ``w``'s centre lies at
``x = (2w + 1)/W − 1``), and a keypoint is ``(x, y)``: **x first, the column**; y the row. The patch's side is
``scale`` times the image's side, i.e. it spans ``centre ± scale`` in normalised units, and its P samples are the
centres of P equal cells (``scale = P / W`` is a crop at the image's own resolution). The tent weights are exactly
bilinear interpolation with zeros outside the image, separable in rows and columns, so a patch is two small matrix
products, differentiable in the centres (the weights are piecewise linear in them) and in the image. For a
non-square image ``scale`` applies to each side, so the patch covers the same share of the height and the width.
``scale`` is one number for every patch or one per patch, (B, K): a zooming model sizes each glimpse itself, and
the samples are then differentiable in the scale too (u_j is linear in s).
"""

import jax
import jax.numpy as jnp


def pixel_to_normalized(index: jax.Array, size: int) -> jax.Array:
  """Pixel centre ``index`` (a column or a row) → its normalised coordinate in [-1, 1]."""
  return (2.0 * index + 1.0) / size - 1.0


def normalized_to_pixel(coord: jax.Array, size: int) -> jax.Array:
  """Normalised coordinate → fractional pixel index (the inverse of :func:`pixel_to_normalized`)."""
  return (coord + 1.0) * size / 2.0 - 0.5


def sample_offsets(patch_size: int, scale: float | jax.Array) -> jax.Array:
  """The P sample positions of a patch relative to its centre, in normalised units: cell centres of ±scale.

  (P,) for a number ``scale``; (..., P) for an array of scales (...).
  """
  cells = (2.0 * jnp.arange(patch_size) + 1.0) / patch_size - 1.0
  return jnp.asarray(scale)[..., None] * cells


def tent_weights(positions: jax.Array, size: int) -> jax.Array:
  """Bilinear weights (..., size) of fractional pixel ``positions`` (...) over one axis; 0 beyond the image.

  Written as (1 − f, f) on the two pixels around each position rather than as max(0, 1 − |t|): JAX's |t| has
  derivative 1 at t = 0, which would corrupt the gradient at whole-pixel positions; here it is the one-sided
  difference ``image[⌊u⌋ + 1] − image[⌊u⌋]`` there, and the exact derivative everywhere else.
  """
  base = jnp.floor(positions)
  frac = (positions - base)[..., None]
  grid = jnp.arange(size, dtype=positions.dtype)
  return (1.0 - frac) * (grid == base[..., None]) + frac * (grid == base[..., None] + 1.0)


def extract_patches(images: jax.Array, centers: jax.Array, patch_size: int, scale: float | jax.Array) -> jax.Array:
  """Patches (B, K, P, P, C) of ``images`` (B, H, W, C) around ``centers`` (B, K, 2) = (x, y) in [-1, 1].

  ``scale``: the patches' half side in normalised units, a number or one per patch (B, K).

  Axis 2 of a patch runs down the rows (y) and axis 3 along the columns (x), as in the image.
  """
  _, height, width, _ = images.shape
  offsets = sample_offsets(patch_size, scale).astype(centers.dtype)  # (P,) or (B, K, P)
  cols = normalized_to_pixel(centers[..., 0, None] + offsets, width)   # (B, K, P)
  rows = normalized_to_pixel(centers[..., 1, None] + offsets, height)  # (B, K, P)
  weight_x = tent_weights(cols, width).astype(images.dtype)            # (B, K, P, W)
  weight_y = tent_weights(rows, height).astype(images.dtype)           # (B, K, P, H)
  return jnp.einsum("bkih,bhwc,bkjw->bkijc", weight_y, images, weight_x)
