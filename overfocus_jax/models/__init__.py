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

Models that look at parts of the image say where, in inference mode, or return None when they have no such method:

    maps = model.attention_maps(variables, x)   # attention: a tuple of (B, h, w) maps
    points = model.keypoints(variables, x)      # focus, corner: (B, K, 2) = (x, y) in [-1, 1], x the column

:func:`check_model_fits` rejects, with one line, a config whose model cannot take the dataset's images.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from overfocus_jax.errors import UserError
from overfocus_jax.models import attention, focus, resnet

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

  def has(self, name: str) -> bool:
    """Whether the module has the method ``name`` (e.g. ``attention_maps`` or ``keypoints``)."""
    return callable(getattr(self.module, name, None))

  def _inspect(self, name: str, variables: Variables, x: jax.Array):
    return self.module.apply(variables, x, train=False, method=name) if self.has(name) else None

  def attention_maps(self, variables: Variables, x: jax.Array):
    """The attention maps (a tuple of (B, h, w) arrays) in inference mode, or None for a model without attention."""
    return self._inspect("attention_maps", variables, x)

  def keypoints(self, variables: Variables, x: jax.Array):
    """Keypoints (B, K, 2) = (x, y) in [-1, 1], x the column, in inference mode; None for a model without them."""
    return self._inspect("keypoints", variables, x)

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


def build_model(config: ml_collections.ConfigDict, num_classes: int, *, conv_general_dilated=None) -> Model:
  """The model named by ``config.model``, sized from its config group.

  ``conv_general_dilated``: the convolution the residual CNNs use (None: ``lax.conv_general_dilated``); the
  train loop passes :func:`overfocus_jax.models.conv.conv_general_dilated` on one CPU device. It changes how
  fast the weight gradients are computed, not the model: parameters and results are the same (to float
  rounding). Its custom VJP rules out forward-mode autodiff (``jax.jvp``, ``jacfwd``) through the model; build
  the model without it for that.
  """
  if config.model == "resnet":
    arch = config.resnet
    module = resnet.PreActResNet(
        num_classes=num_classes, stem_features=arch.stem_features, stage_widths=tuple(arch.stage_widths),
        stage_sizes=tuple(arch.stage_sizes), stage_strides=tuple(arch.stage_strides), stem_kernel=arch.stem_kernel,
        stem_strides=arch.stem_strides, stem_pool=arch.stem_pool, conv_general_dilated=conv_general_dilated)
  elif config.model == "resnet18":
    # The CIFAR-style stem (3×3, stride 1, no pool) unless the resnet group asks for an ImageNet one.
    arch = config.resnet
    module = resnet.ResNet18(num_classes=num_classes, stem_kernel=arch.stem_kernel, stem_strides=arch.stem_strides,
                             stem_pool=arch.stem_pool, conv_general_dilated=conv_general_dilated)
  elif config.model == "attention":
    arch = config.attention
    module = attention.AttentionNet(
        num_classes=num_classes, widths=tuple(arch.widths), pool_after=tuple(arch.pool_after),
        attention_layers=tuple(arch.attention_layers), global_features=arch.global_features,
        compatibility=arch.compatibility, normalisation=arch.normalisation)
  elif config.model in ("focus", "corner"):
    patch = dict(num_classes=num_classes, num_keypoints=config.focus.num_keypoints,
                 patch_size=config.focus.patch_size, patch_scale=config.focus.patch_scale,
                 patch_widths=tuple(config.focus.patch_widths), feature_width=config.focus.feature_width,
                 hidden=config.focus.hidden)
    if config.model == "focus":
      module = focus.FocusNet(keypoint_widths=tuple(config.focus.keypoint_widths),
                              keypoint_grad_scale=config.focus.keypoint_grad_scale, **patch)
    else:
      harris = config.corner
      module = focus.CornerNet(harris_k=harris.harris_k, sigma=harris.sigma, nms_radius=harris.nms_radius,
                               border=harris.border, **patch)
  else:  # validate() rejects this earlier; kept for callers that skip it
    raise ValueError(f"unknown model {config.model=}")
  return Model(module=module, name=config.model)


def check_model_fits(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> None:
  """Raises :class:`UserError` when ``config.model`` cannot take (H, W, C) images, with the field to change.

  Only these models have such limits: the attention backbone's unpadded pools, the focus models' patch size and
  the corner detector's border. Call it once the dataset is known, before the model is initialised.
  """
  height, width = int(image_shape[0]), int(image_shape[1])
  if config.model == "attention":
    arch = config.attention
    empty = attention.first_empty_layer(height, width, len(arch.widths), tuple(arch.pool_after))
    if empty is not None:
      raise UserError(f"{height}x{width} images are too small for the attention backbone: its 2x2 pools "
                      f"(config.attention.pool_after={tuple(arch.pool_after)}) shrink them to nothing by layer {empty}",
                      "remove pools from --config.attention.pool_after or use larger images")
  if config.model in ("focus", "corner"):
    size = config.focus.patch_size
    if size > min(height, width):
      raise UserError(f"config.focus.patch_size={size} is larger than the {height}x{width} images",
                      f"set --config.focus.patch_size to at most {min(height, width)}")
  if config.model == "corner":
    k = config.focus.num_keypoints
    if k > height * width:  # top-K over the pixels
      raise UserError(f"config.focus.num_keypoints={k} asks for more corners than the {height}x{width} images have "
                      "pixels", f"set --config.focus.num_keypoints to at most {height * width}")
    border = config.corner.border
    if 2 * border >= min(height, width):
      raise UserError(f"config.corner.border={border} leaves no pixel of the {height}x{width} images to find corners "
                      "in", f"set --config.corner.border below {(min(height, width) + 1) // 2}")
