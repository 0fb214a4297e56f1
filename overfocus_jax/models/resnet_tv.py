r"""torchvision's ResNet-18 and ResNet-50 (He et al., CVPR 2016, "Deep Residual Learning for Image Recognition",
arXiv 1512.03385; code: pytorch/vision, ``torchvision/models/resnet.py``, ``resnet18`` and ``resnet50``):
post-activation residual blocks, ResNet v1.5 (a bottleneck's stride is on its 3×3 conv, not its first 1×1).

    stem "imagenet":  conv1 7×7/2 (pad 3) → bn1 → ReLU → max-pool 3×3/2 (pad 1)      torchvision's
    stem "cifar":     conv1 3×3/1 (pad 1) → bn1 → ReLU                              small images (no pool)
    BasicBlock:  y = relu(bn2(conv2 3×3(relu(bn1(conv1 3×3/s(x))))) + shortcut(x))                    (resnet18)
    Bottleneck:  y = relu(bn3(conv3 1×1(relu(bn2(conv2 3×3/s(relu(bn1(conv1 1×1(x)))))))) + shortcut(x))  (resnet50)
    shortcut(x) = x, or downsample(x) = bn(conv 1×1/s(x)) where the stride or the width changes
    layer1..layer4: widths 64, 128, 256, 512 (a bottleneck's output 4× that), strides 1, 2, 2, 2;
                    blocks (2, 2, 2, 2) for resnet18, (3, 4, 6, 3) for resnet50
    logits = fc(mean_hw(layer4))

As torchvision: convs without bias, PyTorch's symmetric padding (flax's "SAME" pads a stride-2 conv on even sides
(0, 1) instead of (1, 1)), BatchNorm eps 1e-5 and momentum 0.1 (flax's 0.9) with PyTorch's two-pass batch variance,
He normal fan-out init for the convs, BN at the identity (``zero_init_residual`` sets each block's last BN scale to 0,
off by default as in torchvision), PyTorch's ``Linear`` init for ``fc`` (weight and bias uniform in ±1/√fan_in).
At 224×224×3 and 1,000 classes: 11,689,512 parameters (resnet18) and 25,557,032 (resnet50), torchvision's counts.
One difference in training only: flax keeps the biased batch variance as the running variance, PyTorch the unbiased
(n/(n−1) larger); inference with the same running statistics is the same function.

The layer names are torchvision's (``encoder/layer1_0/downsample_0`` is ``layer1.0.downsample.0``), so its state dict
maps one to one: :func:`from_torchvision` (and :func:`from_timm`: timm's plain ``resnet18``/``resnet50`` use the same
names) and the inverse :func:`to_torchvision`, through :mod:`overfocus_jax.models.weights`.

The split:

    z      = encode(x)   = the stem and layer1..layer4: layer4's map (B, H', W', 512 or 2048), after its ReLU
    logits = classify(z) = fc(mean_hw(z))   (no batch norm in the head: ``classify`` returns no statistics)

and at the pooled vector: ``embed(x)`` = mean_hw(z) (B, C), ``classify_embedding`` = fc.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from overfocus_jax import fields
from overfocus_jax.models import norms, weights
from overfocus_jax.models.mnist_cnn import TORCH_KERNEL_INIT, torch_bias_init
from overfocus_jax.models.spec import ModelSpec
from overfocus_jax.models.split import EncoderHead

ModuleDef = Any  # a flax module class or a functools.partial of one (flax's examples' convention)
STEMS = ("imagenet", "cifar")
WIDTHS = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)
EXPANSION = {"basic": 1, "bottleneck": 4}
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming_normal_(fan_out, relu)


def torch_padded(conv: ModuleDef, kernel: int) -> ModuleDef:
  """A bias-free k×k conv with torchvision's ``padding = k // 2`` on every side and its initialisation."""
  pad = kernel // 2
  return functools.partial(conv, kernel_size=(kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=False,
                           kernel_init=CONV_INIT)


class Block(nn.Module):
  """A BasicBlock (``kind = basic``: two 3×3 convs) or a v1.5 Bottleneck (``bottleneck``: 1×1, 3×3/s, 1×1 ×4)."""

  kind: str
  planes: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    out_features = self.planes * EXPANSION[self.kind]
    if self.kind == "basic":
      layers = ((self.planes, 3, self.strides), (self.planes, 3, 1))
    else:
      layers = ((self.planes, 1, 1), (self.planes, 3, self.strides), (out_features, 1, 1))
    y = x
    for i, (features, kernel, strides) in enumerate(layers, start=1):
      y = torch_padded(self.conv, kernel)(features, strides=strides, name=f"conv{i}")(y)
      last = i == len(layers)
      scale_init = nn.initializers.zeros if last and self.zero_init_residual else nn.initializers.ones
      y = self.norm(scale_init=scale_init, name=f"bn{i}")(y)
      if not last:
        y = nn.relu(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = torch_padded(self.conv, 1)(out_features, strides=self.strides, name="downsample_0")(x)
      shortcut = self.norm(name="downsample_1")(shortcut)
    return nn.relu(y + shortcut)


class ResNetTVEncoder(nn.Module):
  """The stem and layer1..layer4: x (B, H, W, C_in) → z (B, H', W', 512 · expansion)."""

  kind: str
  stage_sizes: Sequence[int]
  stem: str = "cifar"  # one of STEMS
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(self.conv, dtype=self.dtype)
    # Flax's momentum weighs the old statistics: PyTorch's 0.1 is 0.9 here.
    norm = functools.partial(norms.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)
    if self.stem == "imagenet":
      x = torch_padded(conv, 7)(64, strides=2, name="conv1")(x)
    else:
      x = torch_padded(conv, 3)(64, strides=1, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf, as PyTorch
    for stage, (planes, size, strides) in enumerate(zip(WIDTHS, self.stage_sizes, STRIDES), start=1):
      for block in range(size):
        x = Block(self.kind, planes, strides if block == 0 else 1, conv=conv, norm=norm,
                  zero_init_residual=self.zero_init_residual, name=f"layer{stage}_{block}")(x)
    return x


class ResNetTVHead(nn.Module):
  """The classifier ψ: ``pool`` (global average) then ``dense`` (``fc``, from ``in_features`` to the classes)."""

  num_classes: int
  in_features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.fc = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=TORCH_KERNEL_INIT,
                       bias_init=torch_bias_init(self.in_features))

  def pool(self, z):
    return jnp.mean(z, axis=(1, 2))

  def dense(self, pooled):
    return self.fc(pooled).astype(jnp.float32)

  def __call__(self, z):
    return self.dense(self.pool(z))


class ResNetTV(EncoderHead):
  """torchvision's ResNet with an ``encode``/``classify`` split (see the module docstring)."""

  num_classes: int
  kind: str = "basic"  # a key of EXPANSION
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  stem: str = "cifar"
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  def setup(self):
    self.encoder = ResNetTVEncoder(self.kind, self.stage_sizes, stem=self.stem,
                                   zero_init_residual=self.zero_init_residual, dtype=self.dtype, conv=self.conv)
    self.head = ResNetTVHead(self.num_classes, WIDTHS[-1] * EXPANSION[self.kind], dtype=self.dtype)


ResNet18TV = functools.partial(ResNetTV, kind="basic", stage_sizes=(2, 2, 2, 2))
ResNet50TV = functools.partial(ResNetTV, kind="bottleneck", stage_sizes=(3, 4, 6, 3))

# config.resnet_tv.zero_init_residual's values, any case (a bool True/False reads as "true"/"false").
ZERO_INIT_RESIDUAL = ("auto", "true", "false")


def zero_init_residual(setting, kind: str) -> bool:
  """``config.resnet_tv.zero_init_residual`` for a network of ``kind`` blocks: ``auto`` is on for bottleneck blocks
  (resnet50_tv: from scratch at the default run's settings its loss diverges without it) and off for basic ones
  (resnet18_tv trains with torchvision's own initialisation); ``docs/guide/models.md`` has the runs and their
  commands."""
  setting = str(setting).lower()
  return kind == "bottleneck" if setting == "auto" else setting == "true"


# ----------------------------------------------------------------------------- torchvision's state dict


def torchvision_module_name(path: tuple[str, ...]) -> str:
  """Our module path → torchvision's module name: ``("encoder", "layer1_0", "downsample_0")`` →
  ``layer1.0.downsample.0``, ``("head", "fc")`` → ``fc`` (the encoder/head level is ours alone)."""
  return ".".join(part.replace("_", ".") for part in path[1:])


def from_torchvision(state: dict[str, np.ndarray], variables: dict) -> dict:
  """torchvision's ``resnet18``/``resnet50`` state dict on ``variables`` (the model's fresh ones: ``fc`` stays fresh
  when the class count differs); raises :class:`weights.Mismatch` at the first name or shape that does not fit."""
  return weights.load_torch_state(state, variables, torchvision_module_name, head="fc")


def to_torchvision(variables: dict) -> dict[str, np.ndarray]:
  """The inverse: ``variables`` as torchvision's state dict (without ``num_batches_tracked``)."""
  return weights.torch_state(variables, torchvision_module_name)


from_timm = from_torchvision  # timm's resnet18/resnet50 (not the -d/-c variants) name every tensor as torchvision
to_timm = to_torchvision


# ------------------------------------------------------------------------------------- the config and the registry


def check_config(config) -> None:
  arch = config.resnet_tv
  fields.require_choice(arch.stem, STEMS, "resnet_tv.stem")
  fields.require(str(arch.zero_init_residual).lower() in ZERO_INIT_RESIDUAL,
                 f"config.resnet_tv.zero_init_residual={arch.zero_init_residual!r} must be auto, true or false",
                 "set --config.resnet_tv.zero_init_residual=auto, true or false")


GROUP = fields.Group("resnet_tv", "torchvision's resnet18/resnet50 (model=resnet18_tv, resnet50_tv), z = layer4's "
                     "map, with torchvision's layer names so its weights load (init_from)", {
    "stem": fields.Field("cifar", "cifar: conv3x3/1, no pool (28x28 -> z 4x4) | imagenet: conv7x7/2 + max-pool "
                         "3x3/2, torchvision's, for 224x224 images and its weights (28x28 -> z 1x1)"),
    "zero_init_residual": fields.Field("auto", "true: each block's last BN scale starts at 0 (torchvision's option) "
                                       "| false: torchvision's default | auto: on for resnet50_tv, off for "
                                       "resnet18_tv (from scratch only: loaded weights replace the scales)"),
}, validate=check_config)


def build(factory, config, **common) -> nn.Module:
  arch = config.resnet_tv
  zero_init = zero_init_residual(arch.zero_init_residual, factory.keywords["kind"])
  return factory(stem=arch.stem, zero_init_residual=zero_init, **common)


SPECS = (
    ModelSpec("resnet18_tv", "torchvision's ResNet-18 (post-activation), its weights loadable",
              functools.partial(build, ResNet18TV), (GROUP,)),
    ModelSpec("resnet50_tv", "torchvision's ResNet-50 (v1.5 bottlenecks), its weights loadable",
              functools.partial(build, ResNet50TV), (GROUP,)),
)
