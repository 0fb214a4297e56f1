r"""The encode/classify split that the backbones with a plain head share (VGG, ConvNeXt, torchvision's ResNets,
DomainBed's MNIST_CNN):

    z       = encode(x)             = encoder(x)                 the last feature map (B, H, W, C)
    pooled  = embed(x)              = head.pool(encoder(x))      the vector the classifier reads
    logits  = classify(z)           = head.dense(head.pool(z))
            = classify_embedding(pooled) = head.dense(pooled)

The head has no train-mode behaviour (no batch norm, no dropout), so ``classify`` returns no statistics and ``train``
reaches the encoder alone. A model says how to build ``self.encoder`` and ``self.head`` in its ``setup``.
"""

import flax.linen as nn


class EncoderHead(nn.Module):
  """``__call__``/``encode``/``classify``/``embed``/``classify_embedding`` over ``self.encoder`` ((x, train) → z) and
  ``self.head`` (``pool(z)`` → pooled, ``dense(pooled)`` → float32 logits), which ``setup`` makes."""

  def __call__(self, x, train: bool = False):
    return self.classify(self.encode(x, train), train)

  def encode(self, x, train: bool = False):
    return self.encoder(x, train)

  def classify(self, z, train: bool = False):
    return self.classify_embedding(self.head.pool(z), train)

  def embed(self, x, train: bool = False):
    return self.head.pool(self.encode(x, train))

  def classify_embedding(self, pooled, train: bool = False):
    del train  # the head is the same in training and inference
    return self.head.dense(pooled)
