r"""Training augmentation policies, the same on the host stream (NumPy, per image) and on the device (JAX, per batch).

``config.augment`` turns augmentation on; ``config.augmentation`` chooses it:

* ``crop='pad'`` (the default): a shift by up to ``p`` = an eighth of the side in each direction, zero fill (random
  crop of the zero-padded image, the CIFAR recipe) — for digits and small images.
* ``crop='resized'``: torchvision's ``RandomResizedCrop`` for natural images: a box of area ``s·H·W`` and aspect
  ``r`` (``s ~ U(scale)``, ``log r ~ U(log ratio)``, the first of 10 draws that fits, else the central crop of the
  ratio nearest the image's), resized back to ``H×W`` by bilinear interpolation at pixel centres
  (``y = top + (i + ½)·h/H − ½``, edges clamped; no antialiasing, as torchvision's tensor path with
  ``antialias=False``).
* a horizontal mirror with probability ½, for natural images only (a mirrored digit is another symbol).
* ``color_jitter=j > 0``: brightness, contrast and saturation each scaled by its own factor ``f ~ U(1 − j, 1 + j)``
  (torchvision's ``ColorJitter(j, j, j)``), in that fixed order (torchvision draws the order):
  ``x·f``, then ``(x − μ)·f + μ`` with ``μ`` the image's mean grey, then ``(x − g)·f + g`` with ``g`` each pixel's
  grey (``0.299 R + 0.587 G + 0.114 B``; a one-channel image has no saturation), clipped to [0, 255] after each and
  rounded to uint8 once at the end.

Both paths draw from their own generator (NumPy's per record, JAX's per step), so they give the same distribution,
not the same pixels; for a given box and factors, :func:`resized_crop` and :func:`jitter` compute the same image on
both (tests/test_augmentation.py).
"""

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

CROPS = ('pad', 'resized')
ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before the central crop
GREY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class Policy:
  """One training augmentation: the crop (``pad`` with ``padding`` pixels, or ``resized`` with ``scale`` and
  ``ratio`` ranges), the mirror, and the colour jitter's strength (0: none)."""

  crop: str = 'pad'
  padding: int = 1
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = False
  color_jitter: float = 0.0


def crop_padding(image_shape: Sequence[int]) -> int:
  """Random-crop zero padding: an eighth of the height (4 for 32x32, 3 for 28x28, 1 for 8x8)."""
  return max(1, int(image_shape[0]) // 8)


def make_policy(image_shape: Sequence[int], natural_images: bool, settings=None) -> Policy:
  """The policy for images of ``image_shape``; ``settings``: ``config.augmentation`` (None: the default crop)."""
  if settings is None:
    return Policy(padding=crop_padding(image_shape), flip=natural_images)
  return Policy(crop=settings.crop, padding=crop_padding(image_shape), scale=tuple(float(v) for v in settings.scale),
                ratio=tuple(float(v) for v in settings.ratio), flip=natural_images,
                color_jitter=float(settings.color_jitter))


# ----------------------------------------------------------------------------- the box of a resized crop


def central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """torchvision's fallback: the largest central box whose aspect lies in ``ratio``."""
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def box_size(area_fraction, log_ratio, height: int, width: int, xp=np):
  """``(h, w)`` of a box of ``area_fraction · H·W`` pixels and aspect ``exp(log_ratio)`` (rounded as torchvision)."""
  area, aspect = area_fraction * height * width, xp.exp(log_ratio)
  return xp.round(xp.sqrt(area / aspect)).astype(xp.int32), xp.round(xp.sqrt(area * aspect)).astype(xp.int32)


def host_box(rng: np.random.Generator, height: int, width: int, policy: Policy) -> tuple[int, int, int, int]:
  """``(top, left, h, w)`` of one resized crop, as torchvision's ``RandomResizedCrop.get_params``."""
  log_ratio = (math.log(policy.ratio[0]), math.log(policy.ratio[1]))
  for _ in range(ATTEMPTS):
    h, w = box_size(rng.uniform(*policy.scale), rng.uniform(*log_ratio), height, width)
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), int(h), int(w)
  return central_box(height, width, policy.ratio)


def device_boxes(key: jax.Array, count: int, height: int, width: int, policy: Policy) -> jax.Array:
  """``(count, 4)`` int32 boxes ``(top, left, h, w)``: per image the first of 10 draws that fits, else the
  central box (torchvision's rule, all draws made at once)."""
  area_key, ratio_key, place_key = jax.random.split(key, 3)
  fraction = jax.random.uniform(area_key, (count, ATTEMPTS), minval=policy.scale[0], maxval=policy.scale[1])
  log_ratio = jax.random.uniform(ratio_key, (count, ATTEMPTS), minval=math.log(policy.ratio[0]),
                                 maxval=math.log(policy.ratio[1]))
  h, w = box_size(fraction, log_ratio, height, width, jnp)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits, axis=1)
  h, w = jnp.take_along_axis(h, first[:, None], 1)[:, 0], jnp.take_along_axis(w, first[:, None], 1)[:, 0]
  places = jax.random.uniform(place_key, (count, 2))
  top = jnp.floor(places[:, 0] * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(places[:, 1] * (width - w + 1)).astype(jnp.int32)
  fallback = jnp.asarray(central_box(height, width, policy.ratio), jnp.int32)
  boxes = jnp.stack([top, left, h, w], axis=1)
  return jnp.where(jnp.any(fits, axis=1)[:, None], boxes, fallback[None, :])


# ----------------------------------------------------------------------------- resizing and colour


def sample_grid(start, size, out: int, extent: int, xp):
  """Bilinear sampling along one axis: for the ``out`` output pixels of a box [start, start + size) of an axis of
  ``extent`` pixels, the lower source index, the upper one and the upper one's weight."""
  centres = start + (xp.arange(out) + 0.5) * size / out - 0.5
  centres = xp.clip(centres, start, start + size - 1)  # edges clamped to the box
  low = xp.floor(centres)
  weight = centres - low
  low = low.astype(xp.int32 if xp is jnp else np.int64)
  return xp.clip(low, 0, extent - 1), xp.clip(low + 1, 0, extent - 1), weight


def resized_crop(image, box, xp=np):
  """The box ``(top, left, h, w)`` of an ``(H, W, C)`` image resized to ``H×W`` (bilinear, float32)."""
  height, width = image.shape[:2]
  top, left, h, w = (xp.asarray(v, xp.float32) for v in (box[0], box[1], box[2], box[3]))
  y0, y1, wy = sample_grid(top, h, height, height, xp)
  x0, x1, wx = sample_grid(left, w, width, width, xp)
  image = image.astype(xp.float32)
  rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
  return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def grey(image, xp=np):
  """Per-pixel grey (H, W, 1): the luma of RGB, the channel itself for one channel."""
  if image.shape[-1] == 1:
    return image
  return (image * xp.asarray(GREY_WEIGHTS, xp.float32)).sum(-1, keepdims=True)


def jitter(image, factors, xp=np):
  """Brightness, contrast, saturation of a float (H, W, C) image in [0, 255] scaled by ``factors`` (3,)."""
  image = xp.clip(image * factors[0], 0, 255)
  mean = grey(image, xp).mean()
  image = xp.clip((image - mean) * factors[1] + mean, 0, 255)
  if image.shape[-1] > 1:
    g = grey(image, xp)
    image = xp.clip((image - g) * factors[2] + g, 0, 255)
  return image


def to_uint8(image, xp=np):
  return xp.clip(xp.round(image), 0, 255).astype(xp.uint8)


# ----------------------------------------------------------------------------- the host stream (one image)


def pad_crop(image: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
  """Crops a random window of the zero-padded image: translation jitter of up to `padding` pixels.

  Equivalent to padding by `padding` zeros and cropping at a uniform offset, but copies only the
  overlap (np.pad dominated the per-record cost).
  """
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  rows = _overlap(image.shape[0], int(top) - padding)
  cols = _overlap(image.shape[1], int(left) - padding)
  cropped = np.zeros_like(image)
  cropped[rows[0], cols[0]] = image[rows[1], cols[1]]
  return cropped


def _overlap(size: int, shift: int) -> tuple[slice, slice]:
  """(destination, source) slices for `out[y] = image[y + shift]` along one axis."""
  return slice(max(0, -shift), max(0, size - shift)), slice(max(0, shift), max(0, size + shift))


def host_augment(image: np.ndarray, rng: np.random.Generator, policy: Policy) -> np.ndarray:
  """One uint8 (H, W, C) image augmented by ``policy``."""
  if policy.crop == 'pad':
    image = pad_crop(image, rng, policy.padding)
  else:
    image = to_uint8(resized_crop(image, host_box(rng, *image.shape[:2], policy)))
  if policy.flip and rng.random() < 0.5:
    image = image[:, ::-1]
  if policy.color_jitter > 0:
    factors = rng.uniform(max(0.0, 1 - policy.color_jitter), 1 + policy.color_jitter, size=3)
    image = to_uint8(jitter(image.astype(np.float32), factors.astype(np.float32)))
  return image


# ----------------------------------------------------------------------------- the device stream (one batch)


def device_pad_crop(images: jax.Array, key: jax.Array, padding: int) -> jax.Array:
  """Each image shifted by its own uniform offset in [−padding, padding]² with zero fill (as the host stream)."""
  height, width = images.shape[1:3]
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * padding + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                                     (height, width, images.shape[3]))
  return jax.vmap(crop)(padded, offsets)


def device_flip(images: jax.Array, key: jax.Array) -> jax.Array:
  """Each image mirrored left-right with probability 1/2."""
  coins = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(coins, images[:, :, ::-1], images)


def device_augment(images: jax.Array, key: jax.Array, policy: Policy) -> jax.Array:
  """A uint8 (B, H, W, C) batch augmented by ``policy``, each image with its own draws."""
  # The jitter's key is folded out on its own: the same crops and flips with or without it.
  crop_key, flip_key = jax.random.split(key)
  jitter_key = jax.random.fold_in(key, 2)
  if policy.crop == 'pad':
    images = device_pad_crop(images, crop_key, policy.padding)
  else:
    boxes = device_boxes(crop_key, images.shape[0], images.shape[1], images.shape[2], policy)
    images = to_uint8(jax.vmap(lambda image, box: resized_crop(image, box, jnp))(images, boxes), jnp)
  if policy.flip:
    images = device_flip(images, flip_key)
  if policy.color_jitter > 0:
    factors = jax.random.uniform(jitter_key, (images.shape[0], 3), minval=max(0.0, 1 - policy.color_jitter),
                                 maxval=1 + policy.color_jitter)
    images = to_uint8(jax.vmap(lambda image, f: jitter(image, f, jnp))(images.astype(jnp.float32), factors), jnp)
  return images
