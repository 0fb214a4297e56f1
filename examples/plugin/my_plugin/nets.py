"""Small CNNs of your own: a Flax Linen module and an NNX one, each with ``encode`` and ``classify`` (Linen's
``train`` keywords optional)."""

import flax.linen as nn
from flax import nnx


class TinyNet(nn.Module):
  """conv → ReLU → conv (stride 2) → ReLU is the latent map z; the head reads it whole."""

  num_classes: int
  width: int = 16

  def setup(self):
    self.conv1 = nn.Conv(self.width, (3, 3))
    self.conv2 = nn.Conv(2 * self.width, (3, 3), strides=2)
    self.dense = nn.Dense(self.num_classes)

  def encode(self, x):
    return nn.relu(self.conv2(nn.relu(self.conv1(x))))

  def classify(self, z):
    return self.dense(z.reshape(z.shape[0], -1))

  def __call__(self, x):
    return self.classify(self.encode(x))


class TinyNNX(nnx.Module):
  """The same network as a Flax NNX module, with batch norm: an NNX model plugs in the same way."""

  def __init__(self, num_classes: int, width: int = 16, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
    self.norm = nnx.BatchNorm(2 * width, rngs=rngs)
    self.dense = nnx.Linear(4 * 4 * 2 * width, num_classes, rngs=rngs)  # 8×8 digits: z is 4×4

  def encode(self, x):
    return nnx.relu(self.norm(self.conv2(nnx.relu(self.conv1(x)))))

  def classify(self, z):
    return self.dense(z.reshape(z.shape[0], -1))
