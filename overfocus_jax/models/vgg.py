r"""VGG-16 (Simonyan & Zisserman, ICLR 2015, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
arXiv 1409.1556): configuration D, thirteen 3×3 convolutions in five blocks, each block closed by a 2×2 max-pool.

    features:        64-64-M  128-128-M  256-256-256-M  512-512-512-M  512-512-512-M     (conv3×3 → [BN] → ReLU)
    head "gap":      logits = dense(mean_hw(z))
    head "classic":  logits = dense(relu(dense(relu(dense(flatten(adaptive_avg_pool_n×n(z)))))))   (4096-4096, n=7)

``batch_norm`` puts a BN after every conv (torchvision's ``vgg16_bn``); the convs keep their bias either way, as in
torchvision, so the classic head on 224×224×3 images and 1,000 classes has torchvision's 138,357,544 parameters
(``vgg16``; 138,365,992 with BN, ``vgg16_bn``). The initialisation is torchvision's too (He normal, fan-out, for the
convs; N(0, 0.01) for the dense layers; zero biases). ``width`` multiplies every conv's width (0.25: 16-…-128). No
dropout: the models run without an RNG (the paper's classic head drops half of each hidden layer in training).

Any image of at least 1×1 goes through: a max-pool (stride 2, no padding, as in the paper) halves only the sides of
at least 2 pixels, so 28×28 maps go 28 → 14 → 7 → 3 → 1 → 1; ``max_pools`` < 5 keeps the pools of the first blocks
only, for a larger last map on small images, and ``max_pools="auto"`` (:func:`auto_pools`) as many as keep the last
map at least 3×3 (:data:`AUTO_MIN_SIDE`): 5 on 224×224 images, 3 on 28×28, 1 on 8×8 — a map a spatial
regularizer has positions to drop from. The classic head's pool is torchvision's ``AdaptiveAvgPool2d`` (bin i
of n spans rows ⌊iH/n⌋ … ⌈(i+1)H/n⌉ − 1), which takes any map size too; it flattens in NHWC order (torchvision's
in NCHW: importing its ``classifier.0`` weights means permuting their inputs).

The split:

    z      = encode(x)   = the five blocks and their pools: the last feature map (B, H', W', 512·width)
    logits = classify(z) = the head (no batch norm there: ``classify`` returns no statistics)

and at the pooled vector: ``embed(x)`` = mean_hw(z) (B, C) for "gap", flatten(adaptive pool of z) (B, n·n·C) for
"classic"; ``classify_embedding`` = the head's dense layer(s).

torchvision's state dicts (``vgg16``, ``vgg16_bn``; :func:`from_torchvision`, :func:`to_torchvision`): its
``features`` is one numbered list, conv [BN] ReLU per layer and a max-pool after each block, so conv ``i_j`` and its
BN are the entries at their places in that list (whatever ``max_pools`` says: the pools hold no weights); the
classic head is ``classifier.0``/``.3``/``.6`` (the ReLUs and dropouts between hold none either), whose first
layer's inputs are permuted from NCHW's flatten order (c, i, j) to ours (i, j, c). The gap head has no torchvision
counterpart: loading keeps it fresh (one line), exporting refuses.
"""

import math
import re
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from overfocus_jax import fields
from overfocus_jax.errors import UserError
from overfocus_jax.models import norms, weights
from overfocus_jax.models.spec import ModelSpec, Platform
from overfocus_jax.models.split import EncoderHead

ModuleDef = Any  # a flax module class or a functools.partial of one (flax's examples' convention)
HEADS = ("gap", "classic")
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision: kaiming_normal_(fan_out, relu)
DENSE_INIT = nn.initializers.normal(0.01)


def scaled_blocks(width: float, blocks: Sequence[Sequence[int]] = VGG16_BLOCKS) -> tuple[tuple[int, ...], ...]:
  """The conv widths times ``width``, rounded, at least 1."""
  return tuple(tuple(max(1, round(features * width)) for features in block) for block in blocks)


def max_pool(x):
  """2×2 stride-2 max-pool without padding along each side of at least 2 pixels; a 1-pixel side stays as it is."""
  window = tuple(2 if side >= 2 else 1 for side in x.shape[1:3])
  if window == (1, 1):
    return x
  return nn.max_pool(x, window, strides=window, padding="VALID")


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) averaging weights of torchvision's adaptive pool: row i averages inputs ⌊i·in/out⌋ up to
  ⌈(i+1)·in/out⌉ − 1."""
  weights = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_avg_pool(x, size: int):
  """(B, H, W, C) → (B, size, size, C): ``AdaptiveAvgPool2d((size, size))`` for NHWC maps."""
  rows = jnp.asarray(adaptive_pool_matrix(x.shape[1], size), x.dtype)
  cols = jnp.asarray(adaptive_pool_matrix(x.shape[2], size), x.dtype)
  return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols)


AUTO_MIN_SIDE = 3  # max_pools="auto": the last map's smaller side stays at least this


def auto_pools(height: int, width: int, blocks: int = 5) -> int:
  """The most leading pools (at most ``blocks``) that leave the map's smaller side at least :data:`AUTO_MIN_SIDE`."""
  side, pools = min(height, width), 0
  while pools < blocks and side // 2 >= AUTO_MIN_SIDE:
    side, pools = side // 2, pools + 1
  return pools


class VGGEncoder(nn.Module):
  """The conv blocks: x (B, H, W, C_in) → z (B, H', W', blocks[-1][-1]); conv ``i_j`` is the j-th of block i."""

  blocks: Sequence[Sequence[int]]
  batch_norm: bool
  max_pools: int | str = 5  # or "auto" (auto_pools of the input's size)
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool):
    pools = auto_pools(x.shape[1], x.shape[2], len(self.blocks)) if self.max_pools == "auto" else self.max_pools
    for i, block in enumerate(self.blocks, start=1):
      for j, features in enumerate(block, start=1):
        x = self.conv(features, (3, 3), padding="SAME", dtype=self.dtype, kernel_init=CONV_INIT,
                      name=f"conv{i}_{j}")(x)
        if self.batch_norm:
          x = norms.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                              name=f"bn{i}_{j}")(x)
        x = nn.relu(x)
      if i <= pools:
        x = max_pool(x)
    return x


class VGGHead(nn.Module):
  """The classifier ψ: ``pool`` (global average, or flattened adaptive n×n) then ``dense`` (one layer, or three)."""

  num_classes: int
  kind: str = "gap"  # one of HEADS
  hidden: int = 4096
  pool_size: int = 7
  dtype: Any = jnp.float32

  def setup(self):
    dense = lambda features: nn.Dense(features, dtype=self.dtype, kernel_init=DENSE_INIT)
    if self.kind == "classic":
      self.fc1, self.fc2 = dense(self.hidden), dense(self.hidden)
    self.classifier = dense(self.num_classes)

  def pool(self, z):
    if self.kind == "classic":
      pooled = adaptive_avg_pool(z, self.pool_size)
      return pooled.reshape(pooled.shape[0], -1)
    return jnp.mean(z, axis=(1, 2))

  def dense(self, pooled):
    if self.kind == "classic":
      pooled = nn.relu(self.fc2(nn.relu(self.fc1(pooled))))
    return self.classifier(pooled).astype(jnp.float32)

  def __call__(self, z):
    return self.dense(self.pool(z))


class VGG(EncoderHead):
  """VGG with an ``encode``/``classify`` split (see the module docstring); ``blocks`` default to VGG-16's."""

  num_classes: int
  blocks: Sequence[Sequence[int]] = VGG16_BLOCKS
  batch_norm: bool = False
  width: float = 1.0
  max_pools: int | str = 5
  head_kind: str = "gap"
  hidden: int = 4096
  head_pool: int = 7
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  def setup(self):
    self.encoder = VGGEncoder(scaled_blocks(self.width, self.blocks), self.batch_norm, max_pools=self.max_pools,
                              dtype=self.dtype, conv=self.conv)
    self.head = VGGHead(self.num_classes, kind=self.head_kind, hidden=self.hidden, pool_size=self.head_pool,
                        dtype=self.dtype)


# ----------------------------------------------------------------------------- torchvision's state dict

TORCHVISION_CLASSIFIER = {"fc1": "classifier.0", "fc2": "classifier.3", "classifier": "classifier.6"}


def torchvision_feature_indices(encoder: dict) -> dict[str, int]:
  """Our encoder's module names (``conv2_1``, ``bn2_1``, …) → their places in torchvision's ``features`` list: conv,
  [BN,] ReLU per layer, a max-pool after each block."""
  layers = sorted((tuple(map(int, re.fullmatch(r"conv(\d+)_(\d+)", name).groups())) for name in encoder
                   if name.startswith("conv")))
  batch_norm = any(name.startswith("bn") for name in encoder)
  indices, index = {}, 0
  for n, (block, layer) in enumerate(layers):
    indices[f"conv{block}_{layer}"] = index
    if batch_norm:
      indices[f"bn{block}_{layer}"] = index + 1
    index += 3 if batch_norm else 2
    if n + 1 == len(layers) or layers[n + 1][0] != block:
      index += 1  # the block's max-pool
  return indices


def _module_namer(variables: dict):
  """Our module path → torchvision's module name, for ``variables``' encoder."""
  indices = torchvision_feature_indices(variables["params"]["encoder"])

  def name(path: tuple[str, ...]) -> str:
    part, module = path
    return f"features.{indices[module]}" if part == "encoder" else TORCHVISION_CLASSIFIER[module]

  return name


def _classic_head(variables: dict) -> bool:
  return "fc1" in variables["params"]["head"]


def _flatten_permutation(variables: dict) -> tuple[int, int]:
  """``(channels, pool size)`` of the classic head's flattened input, from the shapes of ``variables``."""
  encoder = variables["params"]["encoder"]
  indices = torchvision_feature_indices(encoder)
  last_conv = max((name for name in indices if name.startswith("conv")), key=indices.get)
  inputs = np.shape(variables["params"]["head"]["fc1"]["kernel"])[0]
  channels = np.shape(encoder[last_conv]["kernel"])[-1]
  return channels, int(round((inputs // channels) ** 0.5))


def _permute_first_layer(weight: np.ndarray, channels: int, size: int, *, to_ours: bool) -> np.ndarray:
  """``classifier.0.weight`` (out, in) with its inputs reordered between torchvision's (c, i, j) and our (i, j, c)."""
  if weight.ndim != 2 or weight.shape[1] != channels * size * size:
    return weight  # the loader names the shape that does not fit
  if to_ours:
    return weight.reshape(-1, channels, size, size).transpose(0, 2, 3, 1).reshape(weight.shape)
  return weight.reshape(-1, size, size, channels).transpose(0, 3, 1, 2).reshape(weight.shape)


def from_torchvision(state: dict[str, np.ndarray], variables: dict) -> dict:
  """torchvision's ``vgg16``/``vgg16_bn`` state dict on ``variables`` (the model's fresh ones): the classic head's
  last layer stays fresh for another class count, the gap head always (one line on stderr); raises
  :class:`weights.Mismatch` at the first name or shape that does not fit (e.g. BN in one and not the other)."""
  if _classic_head(variables):
    state = dict(state)
    if "classifier.0.weight" in state:
      state["classifier.0.weight"] = _permute_first_layer(np.asarray(state["classifier.0.weight"]),
                                                          *_flatten_permutation(variables), to_ours=True)
    return weights.load_torch_state(state, variables, _module_namer(variables), head="classifier.6")
  encoder_only = {collection: {k: v for k, v in tree.items() if k != "head"} for collection, tree in variables.items()}
  loaded = weights.load_torch_state({k: v for k, v in state.items() if not k.startswith("classifier.")}, encoder_only,
                                    _module_namer(variables))
  print("overfocus: init_from: torchvision's classifier does not fit the gap head (--config.vgg.head=classic is "
        "torchvision's): head is re-initialised", file=sys.stderr, flush=True)
  return {collection: {**tree, **loaded.get(collection, {})} for collection, tree in variables.items()}


def to_torchvision(variables: dict) -> dict[str, np.ndarray]:
  """The inverse for the classic head: ``variables`` as torchvision's state dict (no ``num_batches_tracked``)."""
  if not _classic_head(variables):
    raise UserError("the vgg16 gap head has no torchvision counterpart", "export a run with --config.vgg.head=classic")
  state = weights.torch_state(variables, _module_namer(variables))
  state["classifier.0.weight"] = np.ascontiguousarray(
      _permute_first_layer(state["classifier.0.weight"], *_flatten_permutation(variables), to_ours=False))
  return state


# ------------------------------------------------------------------------------------- the config and the registry


def check_config(config) -> None:
  arch = config.vgg
  fields.require_bool(arch.batch_norm, "vgg.batch_norm")
  fields.require(fields.is_number(arch.width) and math.isfinite(arch.width) and arch.width > 0,
                 f"config.vgg.width={arch.width!r} must be a positive number (it multiplies every conv's width)",
                 "set --config.vgg.width, e.g. 0.25 or 1")
  fields.require(arch.max_pools == "auto" or (isinstance(arch.max_pools, int) and 0 <= arch.max_pools <= 5),
                 f"config.vgg.max_pools={arch.max_pools!r} must be auto or an integer in 0..5 (VGG-16 has five "
                 "blocks)", "set --config.vgg.max_pools, e.g. auto (z at least 3x3), 5 (the paper) or 3 for 28x28 "
                 "images")
  fields.require_choice(arch.head, HEADS, "vgg.head")
  fields.require_positive_int(arch.hidden, "vgg.hidden", 4096)
  fields.require_positive_int(arch.head_pool, "vgg.head_pool", 7)


GROUP = fields.Group("vgg", "VGG-16 (model=vgg16): conv3x3 64-64-M-128-128-M-256x3-M-512x3-M-512x3-M, z = the last "
                     "block's map", {
    "batch_norm": fields.Field(True, "BN after every conv (torchvision's vgg16_bn) | false: the paper's (lower "
                               "learning_rate)"),
    "width": fields.Field(1.0, "multiplies every conv's width: 0.25 gives 16-...-128, for small images and CPUs"),
    "max_pools": fields.Field("auto", f"the first N blocks end in a 2x2 max-pool (5: the paper) | auto: as many as "
                              f"keep z at least {AUTO_MIN_SIDE}x{AUTO_MIN_SIDE} (224x224: 5, 28x28: 3, 8x8: 1)"),
    "head": fields.Field("gap", "gap: global average pool -> dense | classic: adaptive pool -> 4096-4096 MLP -> "
                         "dense (the paper's)"),
    "hidden": fields.Field(4096, "the classic head's two hidden layers"),
    "head_pool": fields.Field(7, "the classic head's adaptive average pool: head_pool x head_pool bins "
                              "(torchvision: 7)"),
}, validate=check_config)


def build_vgg16(config, **common) -> nn.Module:
  arch = config.vgg
  return VGG(blocks=VGG16_BLOCKS, batch_norm=arch.batch_norm, width=arch.width, max_pools=arch.max_pools,
             head_kind=arch.head, hidden=arch.hidden, head_pool=arch.head_pool, **common)


# oneDNN's convolutions and the data on a CPU device: python -m benchmarks.onednn_models and
# experiments/data_paths.py find its step faster with each (data/on_device.py).
SPECS = (ModelSpec("vgg16", "VGG-16 (Simonyan & Zisserman), torchvision's layer names, sized by config.vgg",
                   build_vgg16, (GROUP,), platform=Platform(onednn=True, data_on_device=True)),)
