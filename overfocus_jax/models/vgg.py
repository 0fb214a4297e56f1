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
only, for a larger last map on small images. The classic head's pool is torchvision's ``AdaptiveAvgPool2d`` (bin i
of n spans rows ⌊iH/n⌋ … ⌈(i+1)H/n⌉ − 1), which takes any map size too; it flattens in NHWC order (torchvision's
in NCHW: importing its ``classifier.0`` weights means permuting their rows).

The split:

    z      = encode(x)   = the five blocks and their pools: the last feature map (B, H', W', 512·width)
    logits = classify(z) = the head (no batch norm there: ``classify`` returns no statistics)

and at the pooled vector: ``embed(x)`` = mean_hw(z) (B, C) for "gap", flatten(adaptive pool of z) (B, n·n·C) for
"classic"; ``classify_embedding`` = the head's dense layer(s).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

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


class VGGEncoder(nn.Module):
  """The conv blocks: x (B, H, W, C_in) → z (B, H', W', blocks[-1][-1]); conv ``i_j`` is the j-th of block i."""

  blocks: Sequence[Sequence[int]]
  batch_norm: bool
  max_pools: int = 5
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool):
    for i, block in enumerate(self.blocks, start=1):
      for j, features in enumerate(block, start=1):
        x = self.conv(features, (3, 3), padding="SAME", dtype=self.dtype, kernel_init=CONV_INIT,
                      name=f"conv{i}_{j}")(x)
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                           name=f"bn{i}_{j}")(x)
        x = nn.relu(x)
      if i <= self.max_pools:
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


class VGG(nn.Module):
  """VGG with an ``encode``/``classify`` split (see the module docstring); ``blocks`` default to VGG-16's."""

  num_classes: int
  blocks: Sequence[Sequence[int]] = VGG16_BLOCKS
  batch_norm: bool = False
  width: float = 1.0
  max_pools: int = 5
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

  def __call__(self, x, train: bool = False):
    return self.head(self.encoder(x, train))

  def encode(self, x, train: bool = False):
    return self.encoder(x, train)

  def classify(self, z, train: bool = False):
    del train  # the head has no batch norm
    return self.head(z)

  def embed(self, x, train: bool = False):
    return self.head.pool(self.encoder(x, train))

  def classify_embedding(self, pooled, train: bool = False):
    del train
    return self.head.dense(pooled)

