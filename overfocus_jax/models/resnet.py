"""Pre-activation residual CNNs (He et al. 2016, "Identity Mappings in Deep Residual Networks", arXiv 1603.05027).

    block(x) = shortcut(x) + conv(relu(bn(conv(relu(bn(x))))))
    shortcut(x) = x                            when width and stride are unchanged
                = conv1x1_stride(relu(bn(x)))  otherwise (the projection sees the pre-activation, as in the paper)

The network is split where the overfocus regularizers need it:

    z      = encode(x)  = stages(stem(x))                  # the last feature map, (B, H', W', C)
    logits = classify(z) = dense(mean_hw(relu(bn(z))))     # the head ψ

so that ``jax.grad`` of a class score with respect to ``z`` runs through the head alone. A second split,
``embed(x) = mean_hw(relu(bn(z)))`` and ``classify_embedding(p) = dense(p)``, serves methods that work on the
pooled feature vector.
``PreActResNet`` is the seeds' residual CNN (three stages, widths 16→32/64/128); ``ResNet18`` the RSC
papers' backbone (four stages of two blocks, widths 64→512).

Both take the seeds' options: ``activation`` (``relu``, or ``gelu``: exact, as torch's) and ``norm`` — ``batch``
(above), ``group`` (GroupNorm, Wu & He 2018: at most 32 groups of at least 4 channels that divide the width,
:func:`group_count`) or ``none`` (no normalisation; the convolutions then get biases).
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from overfocus_jax import fields
from overfocus_jax.models import norms
from overfocus_jax.models.spec import ModelSpec, Platform

ModuleDef = Any  # a flax module class or a functools.partial of one (flax's examples' convention)
STEM_POOLS = ("none", "max", "avg")
ACTIVATIONS = {"relu": nn.relu, "gelu": functools.partial(nn.gelu, approximate=False)}
NORMS = ("batch", "group", "none")
MAX_GROUPS = 32     # Wu & He's default
MIN_GROUP_SIZE = 4  # channels per group: groups of one channel (instance norm) trained slowest on the tiny CNN


def group_count(channels: int, max_groups: int = MAX_GROUPS, min_size: int = MIN_GROUP_SIZE) -> int:
  """The largest number of groups that divides ``channels``, at most ``max_groups`` and, where the width allows,
  with at least ``min_size`` channels each: 8 → 2, 16 → 4, 64 → 16, 128 and wider → 32; 3 → 1."""
  limit = max(1, min(max_groups, channels // min_size))
  return max(g for g in range(1, limit + 1) if channels % g == 0)


class GroupNorm(nn.Module):
  """GroupNorm over :func:`group_count` groups of the input's channels; ``use_running_average`` is ignored."""

  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    del use_running_average  # no running statistics: the same in training and inference
    return norms.GroupNorm(num_groups=group_count(x.shape[-1]), epsilon=self.epsilon, dtype=self.dtype, name="gn")(x)


class Identity(nn.Module):
  """``norm = none``: the input unchanged."""

  def __call__(self, x, use_running_average: bool | None = None):
    del use_running_average
    return x


def norm_def(kind: str, dtype: Any, train: bool | None = None) -> ModuleDef:
  """The normalisation module of ``kind`` (one of NORMS); ``train`` binds batch norm's mode when given."""
  if kind == "group":
    return functools.partial(GroupNorm, epsilon=1e-5, dtype=dtype)
  if kind == "none":
    return Identity
  mode = {} if train is None else {"use_running_average": not train}
  return functools.partial(norms.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype, **mode)


class PreActBlock(nn.Module):
  """One pre-activation basic block: BN → ReLU → conv3×3 → BN → ReLU → conv3×3, plus the shortcut."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x):
    pre = self.act(self.norm(name="bn1")(x))
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = self.conv(self.features, (1, 1), strides=self.strides, name="proj")(pre)
    else:
      shortcut = x
    y = self.conv(self.features, (3, 3), strides=self.strides, name="conv1")(pre)
    y = self.act(self.norm(name="bn2")(y))
    y = self.conv(self.features, (3, 3), name="conv2")(y)
    return shortcut + y


class Encoder(nn.Module):
  """Stem and residual stages: x (B, H, W, C_in) → z (B, H', W', widths[-1])."""

  stem_features: int
  stage_widths: Sequence[int]
  stage_sizes: Sequence[int]
  stage_strides: Sequence[int]
  stem_kernel: int = 3
  stem_strides: int = 1
  stem_pool: str = "none"  # one of STEM_POOLS: a 3×3 stride-2 pool after the stem (ImageNet style) or none
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: str = "batch"  # one of NORMS
  activation: str = "relu"  # a key of ACTIVATIONS

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(self.conv, use_bias=self.norm == "none", padding="SAME", dtype=self.dtype)
    norm = norm_def(self.norm, self.dtype, train)
    x = conv(self.stem_features, (self.stem_kernel,) * 2, strides=self.stem_strides, name="stem")(x)
    if self.stem_pool == "max":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    elif self.stem_pool == "avg":
      x = nn.avg_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, (width, size, stride) in enumerate(zip(self.stage_widths, self.stage_sizes, self.stage_strides)):
      for block in range(size):
        x = PreActBlock(width, stride if block == 0 else 1, conv=conv, norm=norm, act=ACTIVATIONS[self.activation],
                        name=f"stage{stage + 1}_block{block + 1}")(x)
    return x


class Head(nn.Module):
  """The classifier ψ: BN → ReLU (or the chosen norm and activation) → global average pool (``pool``) → dense
  (``linear``)."""

  num_classes: int
  dtype: Any = jnp.float32
  norm: str = "batch"
  activation: str = "relu"

  def setup(self):
    self.bn = norm_def(self.norm, self.dtype)()
    self.dense = nn.Dense(self.num_classes, dtype=self.dtype)

  def pool(self, z, train: bool):
    act = ACTIVATIONS[self.activation]
    return jnp.mean(act(self.bn(z, use_running_average=not train)), axis=(1, 2))

  def linear(self, pooled):
    return self.dense(pooled).astype(jnp.float32)

  def __call__(self, z, train: bool):
    return self.linear(self.pool(z, train))


class PreActResNet(nn.Module):
  """Pre-activation residual CNN with an ``encode``/``classify`` split (see the module docstring)."""

  num_classes: int
  stem_features: int = 16
  stage_widths: Sequence[int] = (32, 64, 128)
  stage_sizes: Sequence[int] = (1, 1, 1)
  stage_strides: Sequence[int] = (1, 2, 2)
  stem_kernel: int = 3
  stem_strides: int = 1
  stem_pool: str = "none"
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: str = "batch"  # one of NORMS
  activation: str = "relu"  # a key of ACTIVATIONS

  def setup(self):
    self.encoder = Encoder(self.stem_features, self.stage_widths, self.stage_sizes, self.stage_strides,
                           stem_kernel=self.stem_kernel, stem_strides=self.stem_strides,
                           stem_pool=self.stem_pool, dtype=self.dtype, conv=self.conv, norm=self.norm,
                           activation=self.activation)
    self.head = Head(self.num_classes, dtype=self.dtype, norm=self.norm, activation=self.activation)

  def __call__(self, x, train: bool = False):
    return self.head(self.encoder(x, train), train)

  def encode(self, x, train: bool = False):
    return self.encoder(x, train)

  def classify(self, z, train: bool = False):
    return self.head(z, train)

  # The second split point, on the pooled feature vector (DomainBed's RSC works there).
  def embed(self, x, train: bool = False):
    return self.head.pool(self.encoder(x, train), train)

  def classify_embedding(self, pooled, train: bool = False):
    del train  # the linear layer has no train-mode behaviour
    return self.head.linear(pooled)


ResNet18 = functools.partial(PreActResNet, stem_features=64, stage_widths=(64, 128, 256, 512),
                             stage_sizes=(2, 2, 2, 2), stage_strides=(1, 2, 2, 2))


# ------------------------------------------------------------------------------------- the config and the registry


def check_config(config) -> None:
  arch = config.resnet
  for field in ("stage_widths", "stage_sizes", "stage_strides"):
    fields.require_positive_ints(arch[field], f"resnet.{field}")
  fields.require(len(arch.stage_widths) == len(arch.stage_sizes) == len(arch.stage_strides),
                 "config.resnet.stage_widths, stage_sizes and stage_strides have different lengths",
                 "give one entry per stage in each")
  for field in ("stem_features", "stem_kernel", "stem_strides"):
    fields.require(isinstance(arch[field], int) and arch[field] > 0, f"config.resnet.{field}={arch[field]!r} must be "
                   "a positive integer", f"set --config.resnet.{field}")
  fields.require_choice(arch.stem_pool, STEM_POOLS, "resnet.stem_pool")
  fields.require_choice(arch.activation, tuple(ACTIVATIONS), "resnet.activation")
  fields.require_choice(arch.norm, NORMS, "resnet.norm")


GROUP = fields.Group("resnet", "the pre-activation residual CNN (model=resnet; resnet18 reads the stem, norm and "
                     "activation)", {
    "stem_features": fields.Field(16, "the stem convolution's output channels"),
    "stage_widths": fields.Field((32, 64, 128), "each stage's width"),
    "stage_sizes": fields.Field((1, 1, 1), "each stage's number of residual blocks"),
    "stage_strides": fields.Field((1, 2, 2), "each stage's first stride"),
    "stem_kernel": fields.Field(3, "the stem convolution's kernel side"),
    "stem_strides": fields.Field(1, "the stem convolution's stride"),
    "stem_pool": fields.Field("none", "after the stem: none | max | avg (3x3, stride 2)"),
    "activation": fields.Field("relu", "relu | gelu (exact)"),
    "norm": fields.Field("batch", "batch | group (GroupNorm: at most 32 groups of at least 4 channels) | none"),
}, validate=check_config)


def build_resnet(config, **common) -> nn.Module:
  arch = config.resnet
  return PreActResNet(stem_features=arch.stem_features, stage_widths=tuple(arch.stage_widths),
                      stage_sizes=tuple(arch.stage_sizes), stage_strides=tuple(arch.stage_strides),
                      stem_kernel=arch.stem_kernel, stem_strides=arch.stem_strides, stem_pool=arch.stem_pool,
                      norm=arch.norm, activation=arch.activation, **common)


def build_resnet18(config, **common) -> nn.Module:
  # The CIFAR-style stem (3×3, stride 1, no pool) unless the resnet group asks for an ImageNet one; the group's
  # normalisation and activation too.
  arch = config.resnet
  return ResNet18(stem_kernel=arch.stem_kernel, stem_strides=arch.stem_strides, stem_pool=arch.stem_pool,
                  norm=arch.norm, activation=arch.activation, **common)


# Both take the sliced weight gradients (their mid-sized layers meet the rule of platform_tuning.py) and oneDNN's
# convolutions (python -m benchmarks.onednn_models); the small one keeps its data on a CPU device.
SPECS = (
    ModelSpec("resnet", "a small pre-activation residual CNN (the default), sized by config.resnet", build_resnet, (GROUP,),
              platform=Platform(cpu_convolution="sliced", onednn=True, data_on_device=True)),
    ModelSpec("resnet18", "pre-activation ResNet-18 (64-128-256-512), CIFAR stem unless config.resnet says",
              build_resnet18, (GROUP,), platform=Platform(cpu_convolution="sliced", onednn=True)),
)
