"""Models as pure functions over explicit variables.

    variables = model.init(key, input_shape)                  # {'params': ..., 'batch_stats': ...}
    z, state = model.encode(variables, x, train=...)          # the last feature map (B, H, W, C)
    logits, state = model.classify(variables, z, train=...)   # the head ψ; jax.grad w.r.t. z goes through it alone
    logits, state = model.apply(variables, x, train=...)      # == classify(encode(x))

``model.split("pooled")`` gives the same pair one step later, at the pooled feature vector (B, C).

``state`` holds the updated batch-norm statistics of the part that ran — the ``encoder`` sub-tree for ``encode``,
the ``head`` sub-tree for ``classify``, both for ``apply`` — and ``{}`` when ``train=False``: nothing is hidden in
the module, so the train step decides what to keep. A model module therefore names its two halves ``encoder``
and ``head`` and has ``encode``/``classify`` methods.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from overfocus_jax.models import resnet

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Model:
  """A Flax module with ``encode``/``classify`` methods, used through pure functions."""

  module: nn.Module
  name: str

  def init(self, key: jax.Array, input_shape: tuple[int, ...]) -> Variables:
    x = jnp.zeros((1, *input_shape), jnp.float32)
    return dict(self.module.init(key, x, train=False))

  def _run(self, method, variables: Variables, inputs: jax.Array, train: bool, parts: tuple[str, ...]):
    if not train:
      return self.module.apply(variables, inputs, train=False, method=method), {}
    out, state = self.module.apply(variables, inputs, train=True, method=method, mutable=["batch_stats"])
    # Flax returns the whole collection; keep only the half that ran, or the other half's old statistics
    # would overwrite its fresh ones when the step merges them.
    stats = state.get("batch_stats", {})
    return out, {"batch_stats": {k: stats[k] for k in parts if k in stats}}

  def apply(self, variables: Variables, x: jax.Array, *, train: bool = False):
    return self._run(self.module.__call__, variables, x, train, ("encoder", "head"))

  def encode(self, variables: Variables, x: jax.Array, *, train: bool = False):
    return self._run(self.module.encode, variables, x, train, ("encoder",))

  def classify(self, variables: Variables, z: jax.Array, *, train: bool = False):
    return self._run(self.module.classify, variables, z, train, ("head",))

  def supports_split(self, level: str) -> bool:
    """Whether the module has the methods ``split(level)`` needs."""
    needed = {"latent": ("encode", "classify"), "pooled": ("embed", "classify_embedding")}.get(level, ("?",))
    return all(callable(getattr(self.module, name, None)) for name in needed)

  def split(self, level: str):
    """``(encode_fn, classify_fn)`` at a split point: ``latent`` (the feature map) or ``pooled`` (the vector)."""
    if level == "latent":
      return self.encode, self.classify
    if level == "pooled":
      embed = lambda variables, x, *, train=False: self._run(self.module.embed, variables, x, train,
                                                             ("encoder", "head"))
      classify = lambda variables, p, *, train=False: self._run(self.module.classify_embedding, variables, p,
                                                                train, ())
      return embed, classify
    raise ValueError(f"unknown split level {level=}; use 'latent' or 'pooled'")


def merge_batch_stats(old: Any, *updates: Variables) -> Any:
  """Overlays the batch-norm statistics that ``encode``/``classify`` returned on the previous ones.

  ``encode`` returns only the encoder's sub-tree and ``classify`` only the head's, so the union is the new tree.
  """
  merged = dict(old)
  for update in updates:
    merged.update(update.get("batch_stats", {}))
  return merged


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Model:
  """The model named by ``config.model``, sized from its config group."""
  if config.model == "resnet":
    arch = config.resnet
    module = resnet.PreActResNet(
        num_classes=num_classes, stem_features=arch.stem_features, stage_widths=tuple(arch.stage_widths),
        stage_sizes=tuple(arch.stage_sizes), stage_strides=tuple(arch.stage_strides), stem_kernel=arch.stem_kernel,
        stem_strides=arch.stem_strides, stem_pool=arch.stem_pool)
  elif config.model == "resnet18":
    # The CIFAR-style stem (3×3, stride 1, no pool) unless the resnet group asks for an ImageNet one.
    arch = config.resnet
    module = resnet.ResNet18(num_classes=num_classes, stem_kernel=arch.stem_kernel, stem_strides=arch.stem_strides,
                             stem_pool=arch.stem_pool)
  else:  # validate() rejects this earlier; kept for callers that skip it
    raise ValueError(f"unknown model {config.model=}")
  return Model(module=module, name=config.model)
