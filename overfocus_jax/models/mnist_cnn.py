r"""DomainBed's MNIST_CNN (Gulrajani & Lopez-Paz, ICLR 2021, "In Search of Lost Domain Generalization"; code:
facebookresearch/DomainBed, ``domainbed/networks.py``, class ``MNIST_CNN``, the featurizer of ColoredMNIST and
RotatedMNIST) with DomainBed's linear ``Classifier`` (``nonlinear_classifier=False``, its default):

    conv1 3×3, 64,  stride 1, pad 1 → ReLU → GroupNorm(8 groups)    bn0
    conv2 3×3, 128, stride 2, pad 1 → ReLU → GroupNorm(8 groups)    bn1
    conv3 3×3, 128, stride 1, pad 1 → ReLU → GroupNorm(8 groups)    bn2
    conv4 3×3, 128, stride 1, pad 1 → ReLU → GroupNorm(8 groups)    bn3
    mean_hw → 128 features (DomainBed's n_outputs)  → dense(num_classes)

ReLU comes before the normalisation, as in DomainBed's ``forward``; the convs have biases and the GroupNorms
PyTorch's epsilon 1e-5 and affine scale and bias. On ColoredMNIST (2×28×28, 2 classes) that is 371,394 parameters,
PyTorch's count for the same layers. Initialisation is PyTorch's default for ``Conv2d`` and ``Linear``
(``kaiming_uniform_(a=√5)``: weights and biases uniform in ±1/√fan_in, fan_in = k·k·C_in or the input width),
GroupNorm at the identity. The layer names are DomainBed's, so its weights map one to one (conv kernels OIHW →
HWIO, linear weights transposed).

Any image of at least 1×1 goes through: the one stride-2 conv pads by 1 (``ceil(side / 2)`` out, PyTorch's
``floor((side + 2 − 3) / 2) + 1``), so 28×28 maps go 28 → 14 and the 8×8 digits 8 → 4. No batch statistics: the
model is the same in training and inference.

The split:

    z      = encode(x)   = the four conv blocks: the last feature map (B, H', W', 128), after bn3
    logits = classify(z) = dense(mean_hw(z))

and at the pooled vector, DomainBed's featurizer/classifier boundary: ``embed(x)`` = mean_hw(z) (B, 128),
``classify_embedding`` = the dense layer.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from overfocus_jax.models import norms
from overfocus_jax.models.spec import ModelSpec, Platform
from overfocus_jax.models.split import EncoderHead

ModuleDef = Any  # a flax module class or a functools.partial of one (flax's examples' convention)
WIDTHS = (64, 128, 128, 128)  # conv1..conv4
STRIDES = (1, 2, 1, 1)
GROUPS = 8
N_OUTPUTS = 128  # DomainBed's MNIST_CNN.n_outputs: the pooled feature width
# PyTorch's kaiming_uniform_(a=√5): bound = gain·√(3 / fan_in) with gain = √(2 / (1 + 5)), i.e. 1/√fan_in,
# which is a variance scaling of 1/3 (flax's uniform bound is √(3·scale / fan_in)).
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init for Conv2d and Linear: uniform in ±1/√fan_in (flax's bias init is not told
  fan_in, so the layer's is bound here)."""
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class MNISTCNNEncoder(nn.Module):
  """The four conv blocks: x (B, H, W, C_in) → z (B, ⌈H/2⌉, ⌈W/2⌉, 128)."""

  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # GroupNorm behaves the same in training and inference
    for i, (features, stride) in enumerate(zip(WIDTHS, STRIDES)):
      fan_in = 3 * 3 * x.shape[-1]
      # PyTorch's padding=1 on both sides: flax's "SAME" pads a stride-2 conv on even sides by (0, 1) instead.
      x = self.conv(features, (3, 3), strides=stride, padding=((1, 1), (1, 1)), dtype=self.dtype,
                    kernel_init=TORCH_KERNEL_INIT, bias_init=torch_bias_init(fan_in), name=f"conv{i + 1}")(x)
      x = nn.relu(x)
      # Statistics in float32 under bfloat16 too, two-pass and summed in blocks (models/norms.py), as PyTorch's.
      x = norms.GroupNorm(num_groups=GROUPS, epsilon=1e-5, dtype=self.dtype, name=f"bn{i}")(x)
    return x


class MNISTCNNHead(nn.Module):
  """DomainBed's linear Classifier on the pooled features: ``pool`` (mean over positions) then ``dense``."""

  num_classes: int
  dtype: Any = jnp.float32

  def setup(self):
    self.classifier = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=TORCH_KERNEL_INIT,
                               bias_init=torch_bias_init(N_OUTPUTS))

  def pool(self, z):
    return jnp.mean(z, axis=(1, 2))

  def dense(self, pooled):
    return self.classifier(pooled).astype(jnp.float32)

  def __call__(self, z):
    return self.dense(self.pool(z))


class MNISTCNN(EncoderHead):
  """MNIST_CNN with an ``encode``/``classify`` split (see the module docstring)."""

  num_classes: int
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  def setup(self):
    self.encoder = MNISTCNNEncoder(dtype=self.dtype, conv=self.conv)
    self.head = MNISTCNNHead(self.num_classes, dtype=self.dtype)


# ------------------------------------------------------------------------------------- the registry


def build_mnist_cnn(config, **common) -> nn.Module:
  del config  # DomainBed's fixed architecture: no options
  return MNISTCNN(**common)


# oneDNN's convolutions: python -m benchmarks.onednn_models finds its float32 step faster with them.
SPECS = (ModelSpec("mnist_cnn", "DomainBed's MNIST_CNN (ColoredMNIST, RotatedMNIST); no options", build_mnist_cnn,
                   platform=Platform(onednn=True)),)
