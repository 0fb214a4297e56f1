r"""Saliency learned by reconstruction: where must a model look to rebuild the whole image from K small patches?

The focus-and-attention seed's ``Saliency_Reconstruction_Training`` experiment, trained end to end:

    h      = saliency(x)                       (B, h, w): conv 32 → max-pool → conv 64 → max-pool → 1×1 conv
    p_1..K = select(h)                         (B, K, 2) = (x, y) ∈ [-1, 1]², from the centres c_n of h's cells
    x̂      = decoder([extract_patches(x, p, P, s)_k]_k)   an MLP: dropout, dense 1024, ReLU, dropout, dense H·W·C, σ
    loss   = mean (x̂ − x)²                     no labels

``select`` is one of

- ``"soft"``: K soft-argmaxes in turn, each over the cells' standardised scores ``ĥ = (h − mean h)/std h`` at
  temperature τ, with the cells near the points already chosen suppressed,

      π_k = softmax((ĥ − β·Σ_{j<k} exp(−‖c − p_j‖² / 2r²)) / τ),   p_k = Σ_n π_k[n]·c_n,

  so every keypoint is a convex combination of cell centres (it stays inside the image) and the loss reaches the
  saliency network through the bilinear patch sampler (:mod:`overfocus_jax.models.patches`);
- ``"hard"``: the K highest cells, as the seed's code reads them (``.item()`` and integer slices): no gradient
  reaches the saliency network, so its heatmap never learns and only the decoder trains.

Keypoints may also be given (``keypoints=``): K random cells or K Harris corners, the baselines at the same K, patch
size and decoder. With ``decoder_positions`` the decoder also receives each patch's (x, y); the seed's does not.

The variational decoder (``latent`` = d > 0; the "VAE" of the seed's notes) puts a Gaussian latent between the
patches and the MLP, with its KL term to N(0, I) per image over the image's D = H·W·C values:

    μ, log σ² = dense(dropout(patches))       (B, d) each
    u         = μ + σ ⊙ ε,  ε ~ N(0, I)       in training; u = μ in inference
    x̂         = MLP(u)
    loss      = mean (x̂ − x)² + β · KL(N(μ, σ²) ‖ N(0, I)) / D,   KL = ½ Σ_j (μ_j² + σ_j² − log σ_j² − 1)
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from overfocus_jax import fields
from overfocus_jax.models.patches import extract_patches
from overfocus_jax.models.spec import ModelSpec

SELECT_RULES = ("soft", "hard")
SUPPRESSION = 6.0  # β: a chosen cell's standardised score drops by this many standard deviations


def cell_centres(height: int, width: int) -> jax.Array:
  """(h·w, 2) = (x, y) in [-1, 1] of the centres of an h×w grid of cells over the image, row by row."""
  xs = (2.0 * jnp.arange(width) + 1.0) / width - 1.0
  ys = (2.0 * jnp.arange(height) + 1.0) / height - 1.0
  grid_y, grid_x = jnp.meshgrid(ys, xs, indexing="ij")
  return jnp.stack([grid_x.reshape(-1), grid_y.reshape(-1)], axis=-1)


def standardise(scores: jax.Array) -> jax.Array:
  """(B, N) scores with zero mean and unit standard deviation per row, so a temperature means the same on any scale."""
  centred = scores - jnp.mean(scores, axis=-1, keepdims=True)
  return centred / (jnp.std(scores, axis=-1, keepdims=True) + 1e-6)


def soft_top_k_points(heatmap: jax.Array, k: int, temperature, radius) -> jax.Array:
  """K soft-argmaxes (B, K, 2) of (B, h, w) heatmaps in turn, each suppressing the cells near the points before it
  (the module docstring's ``"soft"``). ``temperature`` and ``radius`` (normalised units) may be traced."""
  batch, height, width = heatmap.shape
  centres = cell_centres(height, width).astype(heatmap.dtype)                   # (N, 2)
  scores = standardise(heatmap.reshape(batch, -1))                            # (B, N)
  points = []
  for _ in range(k):
    weights = jax.nn.softmax(scores / temperature, axis=-1)
    point = weights @ centres                                                  # (B, 2)
    points.append(point)
    distance2 = jnp.sum((centres[None] - point[:, None]) ** 2, axis=-1)        # (B, N)
    scores = scores - SUPPRESSION * jnp.exp(-distance2 / (2.0 * radius ** 2))
  return jnp.stack(points, axis=1)


def hard_top_k_points(heatmap: jax.Array, k: int) -> jax.Array:
  """The centres (B, K, 2) of the K highest cells of (B, h, w) heatmaps, highest first; no gradient flows back."""
  batch, height, width = heatmap.shape
  _, index = jax.lax.top_k(jax.lax.stop_gradient(heatmap).reshape(batch, -1), k)
  return cell_centres(height, width).astype(heatmap.dtype)[index]


def random_cell_points(key: jax.Array, batch: int, k: int, height: int, width: int) -> jax.Array:
  """K distinct cells per image drawn uniformly (B, K, 2): the positions a saliency chooses from, chosen blindly."""
  keys = jax.random.split(key, batch)
  index = jax.vmap(lambda key: jax.random.choice(key, height * width, (k,), replace=False))(keys)
  return cell_centres(height, width)[index]


def check_reconstruction(num_keypoints: int, patch_size: int, patch_scale: float, select: str, image_height: int,
                         image_width: int, heatmap_cells: int) -> None:
  """ValueErrors naming the argument: K above the heatmap's cells, a patch larger than the image, an unknown rule."""
  if select not in SELECT_RULES:
    raise ValueError(f"unknown select={select!r}; use one of {SELECT_RULES}")
  if not 1 <= num_keypoints <= heatmap_cells:
    raise ValueError(f"num_keypoints={num_keypoints} must be between 1 and the heatmap's {heatmap_cells} cells "
                     f"for {image_height}x{image_width} images")
  if patch_size < 1 or patch_size > min(image_height, image_width):
    raise ValueError(f"patch_size={patch_size} must be between 1 and the image's side "
                     f"{min(image_height, image_width)}")
  if not 0 < patch_scale <= 1:
    raise ValueError(f"patch_scale={patch_scale} must be in (0, 1] (a patch's side over the image's)")


def heatmap_side(side: int) -> int:
  """The saliency network's output side for an input side: two SAME max-pools of 2."""
  return math.ceil(math.ceil(side / 2) / 2)


class SaliencyNet(nn.Module):
  """x (B, H, W, C) → heatmap (B, ⌈H/4⌉, ⌈W/4⌉): the seed's conv 32 → max-pool → conv 64 → max-pool → 1×1 conv."""

  widths: tuple[int, ...] = (32, 64)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, features in enumerate(self.widths):
      x = nn.relu(nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype, name=f"conv{i + 1}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return nn.Conv(1, (1, 1), dtype=self.dtype, name="score")(x)[..., 0].astype(jnp.float32)


def gaussian_kl(mean: jax.Array, log_variance: jax.Array) -> jax.Array:
  """KL(N(mean, exp(log_variance)) ‖ N(0, I)) per row (B,) of (B, d) parameters."""
  return 0.5 * jnp.sum(mean ** 2 + jnp.exp(log_variance) - log_variance - 1.0, axis=-1)


class PatchDecoder(nn.Module):
  """K patches (B, K, P, P, C) [and their positions (B, K, 2)] → ``(image (B, H, W, C) in [0, 1], KL (B,))``: the
  seed's MLP, through a Gaussian latent of ``latent`` units when it is above 0 (its KL to N(0, I); else 0). The
  latent's noise is drawn from the ``"dropout"`` rng in training."""

  hidden: int = 1024
  dropout: float = 0.5
  latent: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, patches, positions, image_shape: tuple[int, int, int], train: bool):
    x = patches.reshape(patches.shape[0], -1)
    if positions is not None:
      x = jnp.concatenate([x, positions.reshape(positions.shape[0], -1).astype(x.dtype)], axis=-1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    kl = jnp.zeros((x.shape[0],), jnp.float32)
    if self.latent:  # after the input's dropout: the latent's own noise is its only one
      mean = nn.Dense(self.latent, dtype=self.dtype, name="latent_mean")(x).astype(jnp.float32)
      log_variance = nn.Dense(self.latent, dtype=self.dtype, name="latent_log_variance")(x).astype(jnp.float32)
      kl = gaussian_kl(mean, log_variance)
      x = mean
      if train:
        x = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(self.make_rng("dropout"), mean.shape)
      x = x.astype(patches.dtype)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(math.prod(image_shape), dtype=self.dtype, name="out")(x)
    return jax.nn.sigmoid(x.astype(jnp.float32)).reshape(x.shape[0], *image_shape), kl


class SaliencyReconstructor(nn.Module):
  """Saliency → K keypoints → K patches → decoder → image (the module docstring). ``__call__`` returns
  ``(reconstruction, keypoints, heatmap)``; dropout needs a ``"dropout"`` rng in training.

  ``image_shape``: the images it rebuilds (None: those it is first called on). ``patch_scale`` (a patch's side over
  the image's; None: ``patch_size`` pixels) and ``suppression_radius`` (normalised units; None: one heatmap cell)
  follow the image size when left None.
  """

  image_shape: tuple[int, int, int] | None = None
  num_keypoints: int = 5
  patch_size: int = 9
  patch_scale: float | None = None
  select: str = "soft"
  temperature: float = 0.2
  suppression_radius: float | None = None
  decoder_positions: bool = False
  saliency_widths: tuple[int, ...] = (32, 64)
  hidden: int = 1024
  dropout: float = 0.5
  latent: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    if self.image_shape is not None:
      self._check(tuple(self.image_shape))
    self.saliency = SaliencyNet(tuple(self.saliency_widths), dtype=self.dtype)
    self.decoder = PatchDecoder(self.hidden, self.dropout, self.latent, dtype=self.dtype)

  def _check(self, image_shape) -> None:
    height, width = image_shape[:2]
    check_reconstruction(self.num_keypoints, self.patch_size, self._scale(image_shape), self.select, height, width,
                         heatmap_side(height) * heatmap_side(width))

  def _scale(self, image_shape) -> float:
    return self.patch_scale if self.patch_scale is not None else self.patch_size / min(image_shape[:2])

  def heatmap(self, x):
    return self.saliency(x)

  def select_points(self, heatmap):
    """(B, K, 2) = (x, y) in [-1, 1] from (B, h, w) heatmaps by this model's ``select`` rule."""
    if self.select == "hard":
      return hard_top_k_points(heatmap, self.num_keypoints)
    radius = self.suppression_radius if self.suppression_radius is not None else 2.0 / min(heatmap.shape[1:3])
    return soft_top_k_points(heatmap, self.num_keypoints, self.temperature, radius)

  def keypoints(self, x):
    """The saliency network's K keypoints of images x."""
    return self.select_points(self.saliency(x))

  def patch_scales(self, x):
    """(B, K): every patch spans its keypoint ± this, in [-1, 1] units (as the focus models' ``patch_scales``)."""
    return jnp.full((x.shape[0], self.num_keypoints), self._scale(x.shape[1:]), jnp.float32)

  def reconstruct(self, x, keypoints, train: bool = False):
    """``(reconstruction, KL per image)`` from the patches of x at ``keypoints``."""
    image_shape = tuple(self.image_shape) if self.image_shape is not None else tuple(x.shape[1:])
    patches = extract_patches(x, keypoints.astype(x.dtype), self.patch_size, self._scale(image_shape))
    return self.decoder(patches, keypoints if self.decoder_positions else None, image_shape, train)

  def forward(self, x, train: bool = False, keypoints=None) -> dict:
    """Everything one pass computes: ``reconstruction``, ``keypoints``, ``heatmap`` and the variational decoder's
    ``kl`` per image (0 without one). ``keypoints`` (B, K, 2): given positions (random cells, Harris corners)
    instead of the saliency's."""
    if self.image_shape is None:
      self._check(tuple(x.shape[1:]))
    heatmap = self.saliency(x)
    if keypoints is None:
      keypoints = self.select_points(heatmap)
    reconstruction, kl = self.reconstruct(x, keypoints, train)
    return {"reconstruction": reconstruction, "keypoints": keypoints, "heatmap": heatmap, "kl": kl}

  def __call__(self, x, train: bool = False, keypoints=None):
    """``(reconstruction, keypoints, heatmap)`` (:meth:`forward`)."""
    out = self.forward(x, train, keypoints)
    return out["reconstruction"], out["keypoints"], out["heatmap"]


def reconstruction_mse(reconstruction: jax.Array, images: jax.Array) -> jax.Array:
  """Mean squared error per image (B,) between a reconstruction and images, both in [0, 1]."""
  return jnp.mean((reconstruction - images) ** 2, axis=tuple(range(1, images.ndim)))


# ------------------------------------------------------------------------------------- the config and the registry


def check_config(config) -> None:
  group = config.reconstruction
  fields.require_positive_int(group.num_keypoints, "reconstruction.num_keypoints", 5)
  fields.require_positive_int(group.patch_size, "reconstruction.patch_size", 9)
  fields.require_choice(group.select, SELECT_RULES, "reconstruction.select")
  fields.require_positive_number(group.temperature, "reconstruction.temperature", 0.2)
  fields.require_bool(group.decoder_positions, "reconstruction.decoder_positions")
  fields.require_positive_ints(group.saliency_widths, "reconstruction.saliency_widths")
  fields.require_positive_int(group.hidden, "reconstruction.hidden", 1024)
  fields.require_fraction(group.dropout, "reconstruction.dropout")
  fields.require(isinstance(group.latent, int) and not isinstance(group.latent, bool) and group.latent >= 0,
                 f"config.reconstruction.latent={group.latent!r} must be an integer of at least 0",
                 "set --config.reconstruction.latent to 0 (the seed's decoder) or d >= 1 (a variational one)")
  fields.require(fields.is_number(group.kl_weight) and group.kl_weight >= 0,
                 f"config.reconstruction.kl_weight={group.kl_weight!r} must be a number >= 0",
                 "set --config.reconstruction.kl_weight, e.g. 1")


def check_images(config, height: int, width: int) -> None:
  """K fits the heatmap's cells and a patch fits the image."""
  group, cells = config.reconstruction, heatmap_side(height) * heatmap_side(width)
  fields.require(group.num_keypoints <= cells, f"config.reconstruction.num_keypoints={group.num_keypoints} is more "
                 f"than the {cells} heatmap cells of {height}x{width} images",
                 f"set --config.reconstruction.num_keypoints to at most {cells}")
  fields.require(group.patch_size <= min(height, width), f"config.reconstruction.patch_size={group.patch_size} is "
                 f"larger than the {height}x{width} images",
                 f"set --config.reconstruction.patch_size to at most {min(height, width)}")


GROUP = fields.Group("reconstruction", "saliency by reconstruction (model=reconstruction): no labels, test MSE", {
    "num_keypoints": fields.Field(5, "K, the patches the decoder rebuilds the image from"),
    "patch_size": fields.Field(9, "P, each patch's side in pixels"),
    "select": fields.Field("soft", "soft: K soft-argmaxes, trained end to end | hard: the K highest cells, as the "
                           "seed's code (no gradient reaches the saliency)"),
    "temperature": fields.Field(0.2, "the soft-argmax's temperature over the standardised heatmap"),
    "decoder_positions": fields.Field(False, "the decoder also sees each patch's (x, y)"),
    "saliency_widths": fields.Field((32, 64), "the saliency CNN's convolutions, each then a 2x2 max-pool"),
    "hidden": fields.Field(1024, "the decoder MLP's hidden units"),
    "dropout": fields.Field(0.5, "the decoder's dropout, before and after its hidden layer"),
    "latent": fields.Field(0, "0: the seed's decoder | d: a variational one, through a Gaussian latent of d units"),
    "kl_weight": fields.Field(1.0, "latent > 0: β, the KL term's weight per image value"),
}, validate=check_config)


def build_reconstruction(config, *, num_classes, dtype, conv) -> nn.Module:
  """The reconstructor of ``config.reconstruction`` (labels and the convolution module unused: its own nn.Conv)."""
  del num_classes, conv
  group = config.reconstruction
  return SaliencyReconstructor(num_keypoints=group.num_keypoints, patch_size=group.patch_size, select=group.select,
                               temperature=group.temperature, decoder_positions=group.decoder_positions,
                               saliency_widths=tuple(group.saliency_widths), hidden=group.hidden,
                               dropout=group.dropout, latent=group.latent, dtype=dtype)


# The seed's optimizer: Adam at 1e-3, no decay, no warm-up.
RECIPE = {"optimizer": "adam", "learning_rate": 1e-3, "weight_decay": 0.0, "warmup_epochs": 0, "label_smoothing": 0.0}
SPECS = (ModelSpec("reconstruction", "saliency learned by rebuilding the image from K patches (no labels; reports "
                   "the test MSE)", build_reconstruction, (GROUP,), fits=check_images, recipe=RECIPE,
                   task="reconstruct"),)
