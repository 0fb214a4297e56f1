r"""Learn to Pay Attention (Jetley, Lord, Lee & Torr, ICLR 2018, arXiv 1804.02391): a VGG-style CNN whose classifier
sees only attention-weighted sums of intermediate feature maps, each weighted by its agreement with a global feature.

    l^s = local map of conv layer s (B, h_s, w_s, C_s), projected by a 1×1 conv to width G when C_s ≠ G
    g   = dense(mean_hw(last map))                                  (the global feature, width G)
    c^s_i = ⟨u_s, l^s_i + g⟩   ("pc", the paper's best)   or   ⟨l^s_i, g⟩   ("dp")
    a^s = softmax_i(c^s),  g^s_a = Σ_i a^s_i l^s_i           ("softmax")
    a^s = sigmoid(c^s),    g^s_a = mean_i a^s_i l^s_i         ("sigmoid")
    logits = dense([g^{s_1}_a, g^{s_2}_a, ...])              (classification "concat")

Under softmax, pc's ⟨u, g⟩ is the same at every position and cancels (so it does in the paper's formula and its
reference code): the attention is then softmax⟨u, l_i⟩, and g with the layers after the last attention layer get no
gradient. With "dp" or "sigmoid", g steers the attention. ``experiments/configs/attention.py`` holds the commands
that compare them (results in ``docs/guide/models.md``).

The backbone is a stack of conv3×3 → BN → ReLU layers, numbered from 1, with a 2×2 max-pool (stride 2, no padding,
as in the paper) after the layers listed in ``pool_after``; an attention map is taken from a layer's output before
its pool (the paper's "attention before max-pooling" variant). A pool that shrinks a side to 0 is an error: see
:func:`feature_sizes`.

The encode/classify split: the attention layers lie at different depths, and every attention map must be a
function of the latent ``z`` (so that a regularizer acting on ``z`` acts on what the attention sees). So

    z      = encode(x)   = layers 1..s_1 and the pools between them: the FIRST attention layer's local map
    logits = classify(z) = the pool after s_1, layers s_1+1..N, g, the attention and the classifier

and ``attention_maps(x)`` returns ``a^s`` (B, h_s, w_s) for every attention layer (softmax maps sum to 1).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from overfocus_jax import fields
from overfocus_jax.models import norms
from overfocus_jax.models.spec import ModelSpec, Platform

COMPATIBILITIES = ("pc", "dp")
NORMALISATIONS = ("softmax", "sigmoid")

ModuleDef = Any  # a flax module class or a functools.partial of one (flax's examples' convention)


def feature_sizes(height: int, width: int, num_layers: int, pool_after: Sequence[int]) -> list[tuple[int, int]]:
  """Spatial sizes through the backbone: entry 0 is the input, entry s the size after layer s and its pool.

  Conv layers keep the size (SAME padding); a 2×2 stride-2 pool without padding floors it: 7 → 3, 1 → 0.
  """
  sizes = [(height, width)]
  for layer in range(1, num_layers + 1):
    h, w = sizes[-1]
    sizes.append((h // 2, w // 2) if layer in pool_after else (h, w))
  return sizes


def first_empty_layer(height: int, width: int, num_layers: int, pool_after: Sequence[int]) -> int | None:
  """The first layer whose pool leaves a side of 0, or None when every map keeps at least one pixel."""
  for layer, (h, w) in enumerate(feature_sizes(height, width, num_layers, pool_after)):
    if layer > 0 and min(h, w) == 0:
      return layer
  return None


def compatibility(local: jax.Array, g: jax.Array, u: jax.Array | None) -> jax.Array:
  """c (B, h, w): ⟨u, l_i + g⟩ when ``u`` is given ("pc"), else ⟨l_i, g⟩ ("dp")."""
  if u is None:
    return jnp.einsum("bhwc,bc->bhw", local, g)
  return jnp.einsum("bhwc,c->bhw", local + g[:, None, None, :], u)


def normalise(scores: jax.Array, kind: str) -> jax.Array:
  """Attention a (B, h, w) from compatibility scores: a softmax over all positions, or a sigmoid per position."""
  if kind == "softmax":
    batch = scores.shape[0]
    return jax.nn.softmax(scores.reshape(batch, -1), axis=-1).reshape(scores.shape)
  return jax.nn.sigmoid(scores)


def attend(attention: jax.Array, local: jax.Array, kind: str) -> jax.Array:
  """The attended vector (B, C): Σ_i a_i l_i for softmax weights (they sum to 1), mean_i a_i l_i for sigmoid ones."""
  weighted = attention[..., None] * local
  return jnp.sum(weighted, axis=(1, 2)) if kind == "softmax" else jnp.mean(weighted, axis=(1, 2))


class ConvBNReLU(nn.Module):
  """conv3×3 (SAME, no bias: BN follows) → BN → ReLU."""

  features: int
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = norms.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, name="conv")(x)
    x = self.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


def _max_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class AttentionEncoder(nn.Module):
  """Layers 1..s_1: x (B, H, W, C_in) → z, the first attention layer's local map (before its pool)."""

  widths: Sequence[int]      # of layers 1..s_1 only
  pool_after: Sequence[int]
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = norms.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    for layer, features in enumerate(self.widths, start=1):
      if layer > 1 and layer - 1 in self.pool_after:
        x = _max_pool(x)
      x = ConvBNReLU(features, dtype=self.dtype, conv=self.conv, norm=self.norm, name=f"layer{layer}")(x, train)
    return x


class AttentionHead(nn.Module):
  """From z (layer s_1's map) to logits: the rest of the backbone, g, attention at every listed layer, classifier."""

  num_classes: int
  widths: Sequence[int]      # of all N layers (the head runs s_1+1..N)
  pool_after: Sequence[int]
  attention_layers: Sequence[int]
  global_features: int
  compatibility: str = "pc"
  normalisation: str = "softmax"
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = norms.BatchNorm

  @nn.compact
  def __call__(self, z, train: bool, return_maps: bool = False):
    first = self.attention_layers[0]
    locals_, x = {first: z}, z
    for layer in range(first + 1, len(self.widths) + 1):
      if layer - 1 in self.pool_after:
        x = _max_pool(x)
      x = ConvBNReLU(self.widths[layer - 1], dtype=self.dtype, conv=self.conv, norm=self.norm,
                     name=f"layer{layer}")(x, train)
      if layer in self.attention_layers:
        locals_[layer] = x
    if len(self.widths) in self.pool_after:
      x = _max_pool(x)
    g = nn.Dense(self.global_features, dtype=self.dtype, name="global")(jnp.mean(x, axis=(1, 2)))
    maps, attended = [], []
    for layer in self.attention_layers:
      local = locals_[layer]
      if local.shape[-1] != self.global_features:  # the paper's projector: l and g must share a width
        local = self.conv(self.global_features, (1, 1), use_bias=False, dtype=self.dtype,
                          name=f"project{layer}")(local)
      u = None
      if self.compatibility == "pc":
        u = self.param(f"compat{layer}", nn.initializers.lecun_normal(), (self.global_features, 1))[:, 0]
      a = normalise(compatibility(local, g, u), self.normalisation)
      maps.append(a)
      attended.append(attend(a, local, self.normalisation))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(jnp.concatenate(attended, -1))
    logits = logits.astype(jnp.float32)
    return (logits, tuple(maps)) if return_maps else logits


class AttentionNet(nn.Module):
  """Learn-to-Pay-Attention CNN with an ``encode``/``classify`` split at the first attention layer."""

  num_classes: int
  widths: Sequence[int] = (16, 32, 32, 64, 64, 128)
  pool_after: Sequence[int] = (1, 3, 5)
  attention_layers: Sequence[int] = (3, 5)
  global_features: int = 128
  compatibility: str = "pc"
  normalisation: str = "softmax"
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = norms.BatchNorm

  def setup(self):
    first = self.attention_layers[0]
    self.encoder = AttentionEncoder(tuple(self.widths[:first]), tuple(self.pool_after), dtype=self.dtype,
                                    conv=self.conv, norm=self.norm)
    self.head = AttentionHead(self.num_classes, tuple(self.widths), tuple(self.pool_after),
                              tuple(self.attention_layers), self.global_features, self.compatibility,
                              self.normalisation, dtype=self.dtype, conv=self.conv, norm=self.norm)

  def _check_input(self, x):
    empty = first_empty_layer(x.shape[1], x.shape[2], len(self.widths), self.pool_after)
    if empty is not None:  # a 0-pixel map would silently average to NaN
      raise ValueError(f"{x.shape[1]}x{x.shape[2]} inputs are pooled to nothing after layer {empty}")

  def __call__(self, x, train: bool = False):
    return self.classify(self.encode(x, train), train)

  def encode(self, x, train: bool = False):
    self._check_input(x)
    return self.encoder(x, train)

  def classify(self, z, train: bool = False):
    return self.head(z, train)

  def forward_with_maps(self, x, train: bool = False):
    """``(logits, maps)`` from one forward pass: the logits of ``__call__`` and a^s (B, h_s, w_s) per layer."""
    return self.head(self.encode(x, train), train, return_maps=True)

  def attention_maps(self, x, train: bool = False):
    """a^s (B, h_s, w_s) for each attention layer, in order."""
    return self.forward_with_maps(x, train)[1]


# ------------------------------------------------------------------------------------- the config and the registry


def check_config(config) -> None:
  arch = config.attention
  fields.require_positive_ints(arch.widths, "attention.widths")
  layers = len(arch.widths)
  valid = f"valid layer indices are 1..{layers}, one per entry of config.attention.widths"
  pools, attended = tuple(arch.pool_after), tuple(arch.attention_layers)
  fields.require(all(isinstance(i, int) and 1 <= i <= layers for i in pools),
                 f"config.attention.pool_after={pools!r} names a layer the {layers}-layer backbone does not have",
                 valid)
  fields.require(len(attended) > 0, "config.attention.attention_layers is empty", "give 2 or 3 layers, e.g. (2,3,4)")
  fields.require(all(isinstance(i, int) and 1 <= i <= layers for i in attended),
                 f"config.attention.attention_layers={attended!r} names a layer the {layers}-layer backbone does not "
                 "have", valid)
  fields.require(all(a < b for a, b in zip(attended, attended[1:])),
                 f"config.attention.attention_layers={attended!r} is not strictly increasing",
                 "list each layer once, shallowest first, e.g. (2,3,4)")
  fields.require_positive_int(arch.global_features, "attention.global_features", 128)
  fields.require_choice(arch.compatibility, COMPATIBILITIES, "attention.compatibility")
  fields.require_choice(arch.normalisation, NORMALISATIONS, "attention.normalisation")


def check_images(config, height: int, width: int) -> None:
  """The backbone's unpadded 2x2 pools must leave every layer a map."""
  arch = config.attention
  empty = first_empty_layer(height, width, len(arch.widths), tuple(arch.pool_after))
  fields.require(empty is None, f"{height}x{width} images are too small for the attention backbone: its 2x2 pools "
                 f"(config.attention.pool_after={tuple(arch.pool_after)}) shrink them to nothing by layer {empty}",
                 "remove pools from --config.attention.pool_after or use larger images")


GROUP = fields.Group("attention", "Learn to Pay Attention (model=attention): conv3x3-BN-ReLU layers numbered from 1, "
                     "attention on some layers' maps against a global feature; z = the first attention layer's map", {
    "widths": fields.Field((16, 32, 32, 64, 64, 128), "each conv layer's width"),
    "pool_after": fields.Field((1, 3, 5), "a 2x2 max-pool after these layers (28x28 -> 14 -> 7 -> 3)"),
    "attention_layers": fields.Field((3, 5), "the layers whose maps are attended (MNIST's 14x14 and 7x7)"),
    "global_features": fields.Field(128, "the global feature's width"),
    "compatibility": fields.Field("pc", "pc: <u, l + g> | dp: <l, g>"),
    "normalisation": fields.Field("softmax", "softmax over positions | sigmoid per position"),
}, validate=check_config)


def build_attention(config, **common) -> nn.Module:
  arch = config.attention
  return AttentionNet(widths=tuple(arch.widths), pool_after=tuple(arch.pool_after),
                      attention_layers=tuple(arch.attention_layers), global_features=arch.global_features,
                      compatibility=arch.compatibility, normalisation=arch.normalisation, **common)


# oneDNN's convolutions: python -m benchmarks.onednn_models finds its float32 step faster with them.
SPECS = (ModelSpec("attention", "Learn to Pay Attention (Jetley et al.), sized by config.attention", build_attention,
                   (GROUP,), fits=check_images, platform=Platform(onednn=True)),)
