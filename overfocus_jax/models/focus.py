r"""Focus models: classify from K small glimpses of the image, at keypoints that are learned (``FocusNet``) or found
by the Harris corner detector (``CornerNet``; Harris & Stephens 1988, "A Combined Corner and Edge Detector").

    p_k    = keypoint k = (x_k, y_k) ∈ [-1, 1]²                  (x the column, y the row; see patches.py)
    z      = encode(x)   = [f(extract_patches(x, p, P, s)_k)]_k   (B, 1, K, D): one feature vector per patch
    logits = classify(z) = dense(relu(dense(flatten(z))))        (the head ψ sees the patches only)

FocusNet's keypoints come from a small CNN, ``p = (1 − s)·tanh(dense(flatten(cnn(x))))``, so that every patch stays
inside the image; its dense layer starts with a zero kernel and a bias on a grid, so training starts from K patches
spread over the image, not all at its centre, and it learns ``keypoint_grad_scale`` times slower than the rest
(:func:`scale_gradient`): bilinear sampling makes the loss differentiable in ``p``, but steeply so.
Its zoom variant (``zoom_range = (s_min, s_max)``) also learns each patch's size,

    s_k = s_min + (s_max − s_min)·σ(dense_s(flatten(cnn(x))))_k,   p_k = (1 − s_k)·tanh(dense_p(...))_k

starting at ``s_k = s`` (a zero kernel and the bias σ⁻¹ of s's place in the range), so it starts as the fixed-size
model and the patch stays inside the image at any size; the P×P samples then cover a larger or smaller region.
CornerNet's keypoints are the K strongest Harris corners, strongest first,

    M = G_σ * [[I_x², I_x I_y], [I_x I_y, I_y²]]   (Sobel gradients of the channel-mean image, Gaussian window)
    R = det M − k · (trace M)²

after non-maximum suppression in a (2r+1)² window and with a border excluded (the image centre stands in for
missing corners); they are not trained
(``stop_gradient``), but the image still gets gradients through the sampled pixels. Both share one patch encoder f
and one head. z is shaped (B, 1, K, D) so that the regularizers' "spatial" masks drop whole patches and their
"channel" masks drop patch-feature channels.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax import fields
from overfocus_jax.models import norms
from overfocus_jax.models.spec import ModelSpec, Platform
from overfocus_jax.models.patches import extract_patches, pixel_to_normalized

# FocusNet's initial keypoint grid is shrunk by this factor, so that its patches start over the image's middle.
GRID_SPREAD = 0.75
MAX_HARRIS_WINDOW = 8  # the largest corner sigma and NMS radius: the smoothing window has radius ⌈3σ⌉ and NMS
                       # compares (2r+1)² − 1 shifted copies of the response, so both stay small when compiled

ModuleDef = Any  # a flax module class or a functools.partial of one (flax's examples' convention)


# ----------------------------------------------------------------------------- Harris corners


def gaussian_kernel(sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian of radius ⌈3σ⌉ (2⌈3σ⌉ + 1 taps)."""
  radius = max(1, math.ceil(3 * sigma))
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (t / sigma) ** 2)
  return (kernel / kernel.sum()).astype(np.float32)


def separable_filter(images: jax.Array, column_kernel: np.ndarray, row_kernel: np.ndarray) -> jax.Array:
  """Correlates (B, H, W) images with ``column_kernel`` down the rows and ``row_kernel`` along the columns.

  The border is replicated (edge padding), so a flat background far from the digit has no gradient at the edges.
  """
  ry, rx = len(column_kernel) // 2, len(row_kernel) // 2
  padded = jnp.pad(images, ((0, 0), (ry, ry), (rx, rx)), mode="edge")
  height, width = images.shape[1:]
  rows = sum(float(w) * padded[:, i:i + height, :] for i, w in enumerate(column_kernel))
  return sum(float(w) * rows[:, :, j:j + width] for j, w in enumerate(row_kernel))


def harris_response(gray: jax.Array, k: float = 0.05, sigma: float = 1.0) -> jax.Array:
  """R = det(M) − k·trace(M)² (B, H, W) of gray images (B, H, W): > 0 at corners, < 0 on edges, ≈ 0 where flat."""
  smooth, derive = np.array([1, 2, 1], np.float32) / 4, np.array([-1, 0, 1], np.float32) / 2
  grad_x = separable_filter(gray, smooth, derive)  # Sobel: differentiate along x, smooth along y
  grad_y = separable_filter(gray, derive, smooth)
  window = gaussian_kernel(sigma)
  mxx = separable_filter(grad_x * grad_x, window, window)
  myy = separable_filter(grad_y * grad_y, window, window)
  mxy = separable_filter(grad_x * grad_y, window, window)
  return mxx * myy - mxy * mxy - k * (mxx + myy) ** 2


def non_max_suppression(response: jax.Array, radius: int) -> jax.Array:
  """Keeps (B, H, W) responses that are > 0 and the strict maximum of their (2r+1)² window; zeros elsewhere.

  This is the max-pool rule (keep what equals its window's maximum) with ties broken in raster order (the earlier
  pixel wins), so no two kept pixels lie within ``radius`` of each other (Chebyshev distance): a plateau of equal
  responses keeps only its first pixel.
  """
  height, width = response.shape[1:]
  padded = jnp.pad(response, ((0, 0), (radius, radius), (radius, radius)), constant_values=-jnp.inf)
  keep = response > 0
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      if dy == 0 and dx == 0:
        continue
      neighbour = padded[:, radius + dy:radius + dy + height, radius + dx:radius + dx + width]
      later = dy > 0 or (dy == 0 and dx > 0)  # the neighbour comes after this pixel in raster order
      keep &= (response > neighbour) | ((response == neighbour) & later)
  return jnp.where(keep, response, 0.0)


def top_k_corners(response: jax.Array, k: int, border: int) -> jax.Array:
  """The K strongest positive responses (B, H, W) outside a ``border`` as keypoints (B, K, 2) = (x, y) in [-1, 1].

  Strongest first. An image with fewer than K positive responses gets the image centre (0, 0) for the rest.
  """
  batch, height, width = response.shape
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = (rows >= border) & (rows < height - border) & (cols >= border) & (cols < width - border)
  scores, index = jax.lax.top_k(jnp.where(inside, response, 0.0).reshape(batch, -1), k)
  x = pixel_to_normalized(index % width, width)
  y = pixel_to_normalized(index // width, height)
  found = scores > 0
  return jnp.stack([jnp.where(found, x, 0.0), jnp.where(found, y, 0.0)], axis=-1)


def harris_keypoints(images: jax.Array, k: int, *, harris_k: float, sigma: float, nms_radius: int,
                     border: int) -> jax.Array:
  """Keypoints (B, K, 2) of (B, H, W, C) images: Harris on the channel mean, NMS, top K; no gradient flows back."""
  gray = jnp.mean(jax.lax.stop_gradient(images), axis=-1)
  response = non_max_suppression(harris_response(gray, harris_k, sigma), nms_radius)
  return jax.lax.stop_gradient(top_k_corners(response, k, border))


# ----------------------------------------------------------------------------- learned keypoints


def grid_points(k: int, spread: float = GRID_SPREAD) -> np.ndarray:
  """K points (K, 2) = (x, y) spread over [-spread, spread]²: cell centres of a ⌊√K⌋-row grid, row by row."""
  rows = max(1, math.isqrt(k))
  cols = math.ceil(k / rows)
  points = [((2 * (i % cols) + 1) / cols - 1, (2 * (i // cols) + 1) / rows - 1) for i in range(k)]
  return spread * np.asarray(points, np.float32)


def _grid_bias(k: int, bound: float):
  """Initialiser for the keypoint layer's bias: bound·tanh(bias) is the grid, flattened as (x0, y0, x1, y1, ...)."""

  def init(key, shape, dtype=jnp.float32):
    del key
    assert shape == (2 * k,), shape
    # A grid wider than the bound is squeezed in; a bound of 0 (whole-image patches) leaves every point centred.
    points = np.clip(grid_points(k).reshape(-1) / max(bound, 1e-6), -0.99, 0.99)
    return jnp.arctanh(jnp.asarray(points, dtype))

  return init


def _output_dtype(dtype) -> Any:
  """Keypoints and logits leave in float32 at least (bfloat16 compute), float64 when the model runs in it."""
  return jnp.promote_types(dtype, jnp.float32)


def scale_gradient(x: jax.Array, factor: float) -> jax.Array:
  """x in the forward pass; ``factor`` times its gradient in the backward pass (exactly x: x − sg(x) is 0)."""
  frozen = jax.lax.stop_gradient(x)
  return frozen + factor * (x - frozen)


def zoom_logit(patch_scale: float, zoom_range: Sequence[float]) -> float:
  """σ⁻¹ of ``patch_scale``'s place in ``zoom_range``: the scale layer's initial bias, so zooming starts at s."""
  low, high = zoom_range
  if not 0 < low < patch_scale < high:
    raise ValueError(f"zoom_range={tuple(zoom_range)} must hold patch_scale={patch_scale} strictly inside it")
  share = (patch_scale - low) / (high - low)
  return math.log(share / (1.0 - share))


class KeypointNet(nn.Module):
  """x (B, H, W, C) → K keypoints (B, K, 2) and their patch scales (B, K): stride-2 conv → BN → ReLU layers,
  flatten, dense, (1 − s)·tanh, so that every patch stays inside the image.

  The scales are ``patch_scale`` everywhere, or learned within ``zoom_range`` (the zoom variant, see the module
  docstring). ``grad_scale`` scales the gradient reaching the network in training, i.e. its learning rate under
  SGD; in inference (``train=False``) gradients are exact.
  """

  num_keypoints: int
  widths: Sequence[int] = (8, 16)
  patch_scale: float = 0.0
  zoom_range: Sequence[float] = ()  # () fixed-size patches; (s_min, s_max) learned sizes
  grad_scale: float = 1.0
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = norms.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    for i, features in enumerate(self.widths):
      x = self.conv(features, (3, 3), strides=2, padding="SAME", use_bias=False, dtype=self.dtype,
                    name=f"conv{i + 1}")(x)
      x = nn.relu(self.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                            name=f"bn{i + 1}")(x))
    # Flatten, not pool: where a feature lies is what the keypoints must follow.
    x = x.reshape(x.shape[0], -1)
    batch, k = x.shape[0], self.num_keypoints
    # A patch of the whole image stays centred (bound 0).
    initial_bound = max(1.0 - self.patch_scale, 0.0)
    out = nn.Dense(2 * k, kernel_init=nn.initializers.zeros, bias_init=_grid_bias(k, initial_bound),
                   dtype=self.dtype, name="points")(x)
    # The loss is steep in the keypoints (a one-pixel move changes a whole patch), and the flattened features have
    # a large fan-in: at the full learning rate the keypoints leave the digit in a few steps and never come back.
    # Only in training: in inference the gradient is the model's own (attribution methods differentiate it).
    grad_scale = self.grad_scale if train else 1.0
    out = scale_gradient(out.astype(_output_dtype(self.dtype)), grad_scale)
    if not self.zoom_range:
      scales = jnp.full((batch, k), self.patch_scale, out.dtype)
      return initial_bound * jnp.tanh(out).reshape(batch, k, 2), scales
    low, high = self.zoom_range
    size = nn.Dense(k, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.constant(zoom_logit(self.patch_scale, self.zoom_range)), dtype=self.dtype,
                    name="scales")(x)
    scales = low + (high - low) * jax.nn.sigmoid(scale_gradient(size.astype(out.dtype), grad_scale))
    bound = jnp.maximum(1.0 - scales, 0.0)[..., None]
    return bound * jnp.tanh(out).reshape(batch, k, 2), scales


# ----------------------------------------------------------------------------- the shared patch classifier


def auto_patch_size(patch_scale: float, height: int, width: int) -> int:
  """``patch_size="auto"``: as many samples per side as the patch spans pixels, ``round(patch_scale · min(H, W))``
  and at least 1 (28×28 at 0.43: 12; 8×8: 3), so a patch samples the image at its own resolution."""
  return max(1, round(patch_scale * min(height, width)))


class PatchEncoder(nn.Module):
  """(images, keypoints) → z (B, 1, K, D): sample P×P patches, then a shared CNN and dense layer per patch."""

  patch_size: int | str  # or "auto" (auto_patch_size of the input's size)
  patch_scale: float
  widths: Sequence[int] = (16, 32)
  feature_width: int = 64
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = norms.BatchNorm

  @nn.compact
  def __call__(self, images, keypoints, train: bool, scales=None):
    """``scales`` (B, K): each patch's own scale; None: ``patch_scale`` for all."""
    batch, k = keypoints.shape[:2]
    scales = self.patch_scale if scales is None else scales.astype(images.dtype)
    size = self.patch_size
    if size == "auto":
      size = auto_patch_size(self.patch_scale, images.shape[1], images.shape[2])
    patches = extract_patches(images, keypoints.astype(images.dtype), size, scales)
    x = patches.reshape(batch * k, *patches.shape[2:])
    for i, features in enumerate(self.widths):
      x = self.conv(features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, name=f"conv{i + 1}")(x)
      x = nn.relu(self.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                            name=f"bn{i + 1}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")  # SAME: any patch size keeps ≥ 1 pixel
    x = nn.relu(nn.Dense(self.feature_width, dtype=self.dtype, name="feature")(jnp.mean(x, axis=(1, 2))))
    return x.reshape(batch, 1, k, self.feature_width)


class PatchHead(nn.Module):
  """z (B, 1, K, D) → logits: flatten (patch k keeps its slot), an optional hidden ReLU layer, dense."""

  num_classes: int
  hidden: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool):
    del train  # no train-mode behaviour
    x = z.reshape(z.shape[0], -1)
    if self.hidden:
      x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="dense")(x).astype(_output_dtype(self.dtype))


# ----------------------------------------------------------------------------- the two models


class FocusEncoder(nn.Module):
  """Learned keypoints (and, zooming, their patch sizes), then the patch encoder."""

  num_keypoints: int
  patch_size: int | str
  patch_scale: float
  keypoint_widths: Sequence[int]
  patch_widths: Sequence[int]
  feature_width: int
  keypoint_grad_scale: float = 0.01
  zoom_range: Sequence[float] = ()
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = norms.BatchNorm

  def setup(self):
    self.locate = KeypointNet(self.num_keypoints, tuple(self.keypoint_widths), patch_scale=self.patch_scale,
                              zoom_range=tuple(self.zoom_range), grad_scale=self.keypoint_grad_scale,
                              dtype=self.dtype, conv=self.conv, norm=self.norm)
    self.patches = PatchEncoder(self.patch_size, self.patch_scale, tuple(self.patch_widths), self.feature_width,
                                dtype=self.dtype, conv=self.conv, norm=self.norm)

  def keypoints(self, x, train: bool):
    return self.locate(x, train)[0]

  def patch_scales(self, x, train: bool):
    return self.locate(x, train)[1]

  def __call__(self, x, train: bool):
    points, scales = self.locate(x, train)
    return self.patches(x, points, train, scales if self.zoom_range else None)


class CornerEncoder(nn.Module):
  """Harris keypoints (fixed, no parameters), then the patch encoder."""

  num_keypoints: int
  patch_size: int | str
  patch_scale: float
  patch_widths: Sequence[int]
  feature_width: int
  harris_k: float = 0.05
  sigma: float = 1.0
  nms_radius: int = 2
  border: int = 2
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = norms.BatchNorm

  def setup(self):
    self.patches = PatchEncoder(self.patch_size, self.patch_scale, tuple(self.patch_widths), self.feature_width,
                                dtype=self.dtype, conv=self.conv, norm=self.norm)

  def keypoints(self, x, train: bool):
    del train
    return harris_keypoints(x, self.num_keypoints, harris_k=self.harris_k, sigma=self.sigma,
                            nms_radius=self.nms_radius, border=self.border)

  def patch_scales(self, x, train: bool):
    del train
    return jnp.full((x.shape[0], self.num_keypoints), self.patch_scale, _output_dtype(self.dtype))

  def __call__(self, x, train: bool):
    return self.patches(x, self.keypoints(x, train), train)


class _PatchModel(nn.Module):
  """What both patch models share: the patch settings, the head and the encode/classify/keypoints methods.

  Subclasses add their keypoint settings and say how to build the ``encoder`` (:meth:`make_encoder`).
  """

  num_classes: int
  num_keypoints: int = 4
  patch_size: int | str = 12
  patch_scale: float = 0.43
  patch_widths: Sequence[int] = (16, 32)
  feature_width: int = 64
  hidden: int = 128
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = norms.BatchNorm

  def make_encoder(self) -> nn.Module:
    raise NotImplementedError

  def setup(self):
    self.encoder = self.make_encoder()
    self.head = PatchHead(self.num_classes, self.hidden, dtype=self.dtype)

  def __call__(self, x, train: bool = False):
    return self.classify(self.encode(x, train), train)

  def encode(self, x, train: bool = False):
    return self.encoder(x, train)

  def classify(self, z, train: bool = False):
    return self.head(z, train)

  def keypoints(self, x, train: bool = False):
    """(B, K, 2) = (x, y) in [-1, 1], x the column."""
    return self.encoder.keypoints(x, train)

  def patch_scales(self, x, train: bool = False):
    """(B, K): each patch spans its keypoint ± its scale in [-1, 1] units, on each axis."""
    return self.encoder.patch_scales(x, train)


class FocusNet(_PatchModel):
  """Classifies from K patches at learned keypoints; with a ``zoom_range``, of learned sizes too."""

  keypoint_widths: Sequence[int] = (8, 16)
  keypoint_grad_scale: float = 0.01
  zoom_range: Sequence[float] = ()

  def make_encoder(self):
    return FocusEncoder(self.num_keypoints, self.patch_size, self.patch_scale, tuple(self.keypoint_widths),
                        tuple(self.patch_widths), self.feature_width, self.keypoint_grad_scale,
                        tuple(self.zoom_range), dtype=self.dtype, conv=self.conv, norm=self.norm)


class CornerNet(_PatchModel):
  """Classifies from K patches at the strongest Harris corners."""

  harris_k: float = 0.05
  sigma: float = 1.0
  nms_radius: int = 2
  border: int = 2

  def make_encoder(self):
    return CornerEncoder(self.num_keypoints, self.patch_size, self.patch_scale, tuple(self.patch_widths),
                         self.feature_width, self.harris_k, self.sigma, self.nms_radius, self.border,
                         dtype=self.dtype, conv=self.conv, norm=self.norm)


# ------------------------------------------------------------------------------------- the config and the registry


def _check_zoom(config) -> None:
  patch = config.focus
  fields.require_bool(patch.zoom, "focus.zoom")
  if not patch.zoom:
    return
  zoom_range = patch.zoom_range
  fields.require(isinstance(zoom_range, (tuple, list)) and len(zoom_range) == 2
                 and all(fields.is_number(v) for v in zoom_range)
                 and 0 < zoom_range[0] < patch.patch_scale < zoom_range[1] <= 1,
                 f"config.focus.zoom_range={zoom_range!r} must be (s_min, s_max) with 0 < s_min < "
                 f"patch_scale={patch.patch_scale!r} < s_max <= 1 (the scale starts at patch_scale)",
                 "set --config.focus.zoom_range, e.g. (0.2,0.8)")
  fields.require(config.model == "focus", f"config.focus.zoom=True needs learned keypoints, but "
                 f"config.model={config.model!r}", "set --config.model=focus, or --config.focus.zoom=False")


def check_focus_config(config) -> None:
  patch = config.focus
  fields.require(isinstance(patch.num_keypoints, int) and patch.num_keypoints >= 1,
                 f"config.focus.num_keypoints={patch.num_keypoints!r} must be at least 1 (one patch per keypoint)",
                 "set --config.focus.num_keypoints, e.g. 4")
  fields.require(patch.patch_size == "auto" or (isinstance(patch.patch_size, int) and patch.patch_size >= 1),
                 f"config.focus.patch_size={patch.patch_size!r} must be auto or at least 1 pixel",
                 "set --config.focus.patch_size, e.g. auto, or 12 for 28x28 images")
  fields.require(fields.is_number(patch.patch_scale) and 0 < patch.patch_scale <= 1,
                 f"config.focus.patch_scale={patch.patch_scale!r} must be in (0, 1] (the patch's side over the "
                 "image's)", "set --config.focus.patch_scale, e.g. 0.43 for 12-pixel patches of 28x28 images")
  fields.require_positive_ints(patch.keypoint_widths, "focus.keypoint_widths")
  fields.require(fields.is_number(patch.keypoint_grad_scale) and 0 <= patch.keypoint_grad_scale < math.inf,
                 f"config.focus.keypoint_grad_scale={patch.keypoint_grad_scale!r} must be a number >= 0",
                 "set --config.focus.keypoint_grad_scale, e.g. 0.01 (0: the keypoints stay on their initial grid)")
  fields.require_positive_ints(patch.patch_widths, "focus.patch_widths")
  fields.require_positive_int(patch.feature_width, "focus.feature_width", 64)
  fields.require(isinstance(patch.hidden, int) and patch.hidden >= 0, f"config.focus.hidden={patch.hidden!r} must "
                 "be an integer >= 0", "set --config.focus.hidden, e.g. 128 (0: no hidden layer)")
  _check_zoom(config)


def check_corner_config(config) -> None:
  harris = config.corner
  fields.require(fields.is_number(harris.harris_k) and 0 < harris.harris_k < 0.25,
                 f"config.corner.harris_k={harris.harris_k!r} must be in (0, 0.25)",
                 "set --config.corner.harris_k, e.g. 0.05")
  # Upper bounds keep the compiled filters small: the smoothing window has radius ⌈3σ⌉ and NMS compares
  # (2r+1)² − 1 shifted copies of the response.
  fields.require(fields.is_number(harris.sigma) and 0 < harris.sigma <= MAX_HARRIS_WINDOW,
                 f"config.corner.sigma={harris.sigma!r} must be in (0, {MAX_HARRIS_WINDOW}]",
                 "set --config.corner.sigma, e.g. 1.0")
  for field in ("nms_radius", "border"):
    value = harris[field]
    fields.require(isinstance(value, int) and value >= 0, f"config.corner.{field}={value!r} must be an integer >= 0",
                   f"set --config.corner.{field}, e.g. 2")
  fields.require(harris.nms_radius <= MAX_HARRIS_WINDOW, f"config.corner.nms_radius={harris.nms_radius!r} must be "
                 f"at most {MAX_HARRIS_WINDOW}", "set --config.corner.nms_radius, e.g. 2")


def check_patch_images(config, height: int, width: int) -> None:
  """A patch fits in the image."""
  size = config.focus.patch_size
  if size == "auto":
    return
  fields.require(size <= min(height, width), f"config.focus.patch_size={size} is larger than the {height}x{width} "
                 "images", f"set --config.focus.patch_size to at most {min(height, width)}")


def check_corner_images(config, height: int, width: int) -> None:
  """A patch fits, there are K pixels to take the top-K corners of, and the border leaves some."""
  check_patch_images(config, height, width)
  k = config.focus.num_keypoints
  fields.require(k <= height * width, f"config.focus.num_keypoints={k} asks for more corners than the "
                 f"{height}x{width} images have pixels", f"set --config.focus.num_keypoints to at most {height * width}")
  border = config.corner.border
  fields.require(2 * border < min(height, width), f"config.corner.border={border} leaves no pixel of the "
                 f"{height}x{width} images to find corners in", f"set --config.corner.border below "
                 f"{(min(height, width) + 1) // 2}")


FOCUS_GROUP = fields.Group("focus", "the focus models (model=focus, corner): K patches of PxP samples, each spanning "
                           "patch_scale of the image's side, at learned keypoints (focus) or Harris corners (corner)", {
    "num_keypoints": fields.Field(4, "K, the patches (and keypoints)"),
    "patch_size": fields.Field("auto", "P, each patch's samples per side | auto: the pixels the patch spans, "
                               "round(patch_scale x side) (28x28: 12, 8x8: 3)"),
    "patch_scale": fields.Field(0.43, "each patch's side over the image's (12/28: MNIST at its own resolution)"),
    "keypoint_widths": fields.Field((8, 16), "focus: the keypoint CNN's stride-2 conv layers"),
    "keypoint_grad_scale": fields.Field(0.01, "focus: the keypoint CNN learns this much slower"),
    "zoom": fields.Field(False, "focus: also learn each patch's scale, within zoom_range, from patch_scale"),
    "zoom_range": fields.Field((0.2, 0.8), "focus: the range a learned scale stays in"),
    "patch_widths": fields.Field((16, 32), "the shared patch encoder's conv layers"),
    "feature_width": fields.Field(64, "D, one feature vector per patch"),
    "hidden": fields.Field(128, "the head's hidden layer (0: none)"),
}, validate=check_focus_config)
CORNER_GROUP = fields.Group("corner", "the Harris corner detector of model=corner", {
    "harris_k": fields.Field(0.05, "k in R = det(M) - k trace(M)^2"),
    "sigma": fields.Field(1.0, "the Gaussian window of the structure tensor M"),
    "nms_radius": fields.Field(2, "keep only maxima of their (2r+1)^2 window"),
    "border": fields.Field(2, "ignore corners this close to the edge"),
}, validate=check_corner_config)


def _patch_settings(config) -> dict:
  group = config.focus
  return dict(num_keypoints=group.num_keypoints, patch_size=group.patch_size, patch_scale=group.patch_scale,
              patch_widths=tuple(group.patch_widths), feature_width=group.feature_width, hidden=group.hidden)


def build_focus(config, **common) -> nn.Module:
  group = config.focus
  return FocusNet(keypoint_widths=tuple(group.keypoint_widths), keypoint_grad_scale=group.keypoint_grad_scale,
                  zoom_range=tuple(group.zoom_range) if group.zoom else (), **_patch_settings(config), **common)


def build_corner(config, **common) -> nn.Module:
  harris = config.corner
  return CornerNet(harris_k=harris.harris_k, sigma=harris.sigma, nms_radius=harris.nms_radius, border=harris.border,
                   **_patch_settings(config), **common)


# oneDNN's convolutions for corner, not for focus: python -m benchmarks.onednn_models finds corner's float32 step
# faster with them and focus's not.
SPECS = (
    ModelSpec("focus", "glimpses at learned keypoints, sized by config.focus", build_focus, (FOCUS_GROUP,),
              fits=check_patch_images),
    ModelSpec("corner", "glimpses at Harris corners, sized by config.focus and config.corner", build_corner,
              (FOCUS_GROUP, CORNER_GROUP), fits=check_corner_images, platform=Platform(onednn=True)),
)
