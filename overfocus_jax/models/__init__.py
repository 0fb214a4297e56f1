"""Models as pure functions over explicit variables: the library's model zoo and its wrapper, :class:`Model`.

    variables = model.init(key, input_shape)                  # {'params': ..., 'batch_stats': ...}
    z, state = model.encode(variables, x, train=...)          # the last feature map (B, H, W, C)
    logits, state = model.classify(variables, z, train=...)   # the head ψ; jax.grad w.r.t. z goes through it alone
    logits, state = model.apply(variables, x, train=...)      # == classify(encode(x))
    encode_fn, classify_fn = model.inference_fns(variables)   # the two halves as plain callables, inference mode

``model.split("pooled")`` gives the same pair one step later, at the pooled feature vector (B, C). The interface is
written out in :mod:`overfocus_jax.models.adapters`, which also adapts NNX modules (:class:`NNXModel`) and gives any
Linen or NNX module's two halves as plain functions for the masks and attributions.

In training, ``rng`` (an optional PRNG key: ``model.apply(variables, x, train=True, rng=key)``, the same for
``encode``, ``classify`` and the pooled split) is the module's ``dropout`` stream, for models with random layers in
training (ConvNeXt's drop path); the train step passes one derived from its own key every step. Inference needs none.

``state`` holds the updated batch-norm statistics of the part that ran and ``{}`` when ``train=False``: nothing is
hidden in the module, so the train step decides what to keep.

Models that look at parts of the image say where, in inference mode, or return None when they have no such method:

    maps = model.attention_maps(variables, x)   # attention: a tuple of (B, h, w) maps
    points = model.keypoints(variables, x)      # focus, corner: (B, K, 2) = (x, y) in [-1, 1], x the column
    scales = model.patch_scales(variables, x)   # focus, corner: (B, K), each patch spans its keypoint ± its scale

Pretrained weights (``config.init_from``): :mod:`overfocus_jax.models.weights` maps a ``.safetensors`` state dict
onto a model through its module's ``from_<layout>`` function (e.g. ``resnet_tv.from_torchvision``).

:func:`build_model` builds the model ``config.model`` names (:data:`REGISTRY`: each model's :class:`ModelSpec`,
declared in its own file) with the convolution module and dtype it is given: ``conv`` is a flax ``ModuleDef``
(``nn.Conv`` or a partial of it, see :mod:`overfocus_jax.platform_tuning`), ``config.dtype`` (:data:`DTYPES`) the
dtype of activations and convolutions; parameters are float32 either way.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from overfocus_jax import fields, plugins
from overfocus_jax.errors import UserError
from overfocus_jax.models import attention, convnext, focus, mnist_cnn, reconstruction, resnet, resnet_tv, vgg, weights
from overfocus_jax.models.adapters import NNXModel, takes_train  # noqa: F401  (NNXModel: part of this package's API)
from overfocus_jax.models.spec import ModelSpec, Platform

Variables = dict[str, Any]
# The halves of the library's own modules: their batch statistics are returned half by half.
HALVES = ("encoder", "head")


@dataclasses.dataclass(frozen=True)
class Model:
  """A Flax Linen module used through pure functions (the interface in :mod:`overfocus_jax.models.adapters`).

  The module must have ``__call__(x)``, ``encode(x)`` and ``classify(z)`` with ``classify(encode(x)) == __call__(x)``;
  the pooled split also needs ``embed(x)`` and ``classify_embedding(pooled)``. A method that takes a ``train``
  keyword is called with ``train=True`` in training and ``train=False`` in inference; one that does not is called
  without it (a module without batch norm or dropout needs none). Batch statistics live in the ``batch_stats``
  collection; the library's modules name their halves ``encoder`` and ``head``, and each call returns the
  statistics of the half that ran; any other module's calls return the whole collection.
  """

  module: nn.Module
  name: str

  def init(self, key: jax.Array, input_shape: tuple[int, ...]) -> Variables:
    x = jnp.zeros((1, *input_shape), jnp.float32)
    return dict(self.module.init(key, x, **self._train_kwargs(type(self.module).__call__, False)))

  def _train_kwargs(self, method, train: bool) -> dict:
    return {"train": train} if takes_train(method) else {}

  def _run(self, method, variables: Variables, inputs: jax.Array, train: bool, parts: tuple[str, ...],
           rng: jax.Array | None = None):
    kwargs = self._train_kwargs(method, train)
    if not train:
      return self.module.apply(variables, inputs, method=method, **kwargs), {}
    rngs = {} if rng is None else {"dropout": rng}
    out, state = self.module.apply(variables, inputs, method=method, mutable=["batch_stats"], rngs=rngs, **kwargs)
    stats = state.get("batch_stats", {})
    if set(stats) <= set(HALVES):
      # The library's modules: keep only the half that ran, or the other half's old statistics would overwrite its
      # fresh ones when the step merges them.
      stats = {k: stats[k] for k in parts if k in stats}
    return out, {"batch_stats": stats}

  def apply(self, variables: Variables, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
    return self._run(self.module.__call__, variables, x, train, HALVES, rng)

  def encode(self, variables: Variables, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
    return self._run(self.module.encode, variables, x, train, ("encoder",), rng)

  def classify(self, variables: Variables, z: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
    return self._run(self.module.classify, variables, z, train, ("head",), rng)

  def inference_fns(self, variables: Variables) -> tuple[Callable, Callable]:
    """``(encode_fn, classify_fn)``: the two halves with ``variables``, in inference mode, as plain callables."""
    return (lambda x: self.encode(variables, x)[0]), (lambda z: self.classify(variables, z)[0])

  def has(self, name: str) -> bool:
    """Whether the module has the method ``name`` (e.g. ``attention_maps`` or ``keypoints``)."""
    return callable(getattr(self.module, name, None))

  def _inspect(self, name: str, variables: Variables, x: jax.Array):
    if not self.has(name):
      return None
    return self.module.apply(variables, x, method=name, **self._train_kwargs(getattr(type(self.module), name), False))

  def attention_maps(self, variables: Variables, x: jax.Array):
    """The attention maps (a tuple of (B, h, w) arrays) in inference mode, or None for a model without attention."""
    return self._inspect("attention_maps", variables, x)

  def keypoints(self, variables: Variables, x: jax.Array):
    """Keypoints (B, K, 2) = (x, y) in [-1, 1], x the column, in inference mode; None for a model without them."""
    return self._inspect("keypoints", variables, x)

  def patch_scales(self, variables: Variables, x: jax.Array):
    """Each keypoint's patch scale (B, K) (the patch spans the keypoint ± it, in [-1, 1] units) in inference mode;
    None for a model without keypoints."""
    return self._inspect("patch_scales", variables, x)

  def supports_split(self, level: str) -> bool:
    """Whether the module has the methods ``split(level)`` needs."""
    needed = {"latent": ("encode", "classify"), "pooled": ("embed", "classify_embedding")}.get(level, ("?",))
    return all(callable(getattr(self.module, name, None)) for name in needed)

  def split(self, level: str):
    """``(encode_fn, classify_fn)`` at a split point: ``latent`` (the feature map) or ``pooled`` (the vector)."""
    if level == "latent":
      return self.encode, self.classify
    if level == "pooled":
      embed = lambda variables, x, *, train=False, rng=None: self._run(self.module.embed, variables, x, train,
                                                                       HALVES, rng)
      classify = lambda variables, p, *, train=False, rng=None: self._run(self.module.classify_embedding, variables,
                                                                          p, train, (), rng)
      return embed, classify
    raise ValueError(f"unknown split level {level=}; use 'latent' or 'pooled'")


def merge_batch_stats(old: Any, *updates: Variables) -> Any:
  """Overlays the batch-norm statistics that ``encode``/``classify`` returned on the previous ones."""
  merged = dict(old)
  for update in updates:
    merged.update(update.get("batch_stats", {}))
  return merged


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# Every shipped model, declared in its own file (models/spec.py): one line per file.
REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in (
    *resnet.SPECS,
    *resnet_tv.SPECS,
    *vgg.SPECS,
    *convnext.SPECS,
    *mnist_cnn.SPECS,
    *attention.SPECS,
    *focus.SPECS,
    *reconstruction.SPECS,
)}
MODELS = tuple(REGISTRY)
# A model given by import path: no limits the library knows, no platform preferences.
PLUGIN_PLATFORM = Platform()


def model_groups() -> tuple:
  """The config groups of the shipped models (:mod:`overfocus_jax.fields`), each once, in registry order."""
  seen = {}
  for spec in REGISTRY.values():
    for group in spec.groups:
      seen.setdefault(group.name, group)
  return tuple(seen.values())


def platform_of(name: str) -> Platform:
  """The platform preferences of model ``name`` (a plugin's: none)."""
  spec = REGISTRY.get(name)
  return spec.platform if spec else PLUGIN_PLATFORM


def task_of(name: str) -> str:
  """What model ``name`` learns (:data:`~overfocus_jax.models.spec.TASKS`); a plugin classifies."""
  spec = REGISTRY.get(name)
  return spec.task if spec else "classify"


def recipe_of(name: str) -> dict:
  """The training recipe of model ``name`` (:attr:`ModelSpec.recipe`; a plugin's and most models': none, so the
  defaults of :mod:`overfocus_jax.optimization`)."""
  spec = REGISTRY.get(name)
  return dict(spec.recipe) if spec else {}


def check_fits_images(config, image_shape: tuple[int, ...]) -> None:
  """Raises :class:`UserError` when ``config.model`` cannot take (H, W, C) images, naming the field to change.
  Call it once the dataset is known, before the model is initialised."""
  spec = REGISTRY.get(config.model)
  if spec is not None and spec.fits is not None:
    spec.fits(config, int(image_shape[0]), int(image_shape[1]))


def check_config(config) -> None:
  """The model fields every run has: a known model or an import path, its arguments, dtype and weights."""
  fields.require(config.model in REGISTRY or plugins.is_import_path(config.model), f"unknown model {config.model!r}",
                 f"use one of {', '.join(MODELS)}, or your own by import path, e.g. "
                 "--config.model=my_pkg.nets:TinyNet")
  fields.require(not len(config.model_args) or plugins.is_import_path(config.model),
                 f"config.model_args={config.model_args.to_dict()!r} is for a model given by import path, and "
                 f"config.model={config.model!r} is one of the library's", "set the model's own group instead "
                 f"(--config.{config.model}.FIELD=...), or drop --config.model_args")
  fields.require_choice(config.dtype, tuple(DTYPES), "dtype")
  # The weights' fields only: the file itself is read (and refused when it is a pickle, missing or does not fit)
  # when a new run starts (models/weights.py).
  fields.require(isinstance(config.init_from, str), f"config.init_from={config.init_from!r} must be a path",
                 "set --config.init_from=PATH to a .safetensors file, or '' for none")
  fields.require_choice(config.init_from_layout, weights.LAYOUTS, "init_from_layout")


FIELDS = fields.Group("", "the model", {
    "model": fields.Field("resnet", "a shipped model (overfocus train --help-config lists them) | your own by import "
                          "path, PKG.MOD:factory, called as factory(num_classes=N, **model_args)"),
    "model_args": fields.Field({}, "a model given by import path: its keyword arguments "
                               "(--config.model_args.NAME=VALUE)"),
    "dtype": fields.Field("float32", "float32 | bfloat16: activations and convolutions (parameters stay float32)"),
    "init_from": fields.Field("", "a .safetensors state dict mapped onto the model when a run starts ('': none; "
                              "pickles are never read; the head is re-initialised when the class count differs)"),
    "init_from_layout": fields.Field("torchvision", "torchvision | timm: whose tensor names the file has"),
}, validate=check_config)


def build_model(config, num_classes: int, *, conv: Any = nn.Conv) -> Model:
  """The model named by ``config.model`` (an ``ml_collections.ConfigDict``), sized from its config group, in
  ``config.dtype``.

  ``conv``: the convolution module every convolution is built from (``nn.Conv``; the train loop passes
  :func:`overfocus_jax.platform_tuning.conv_module`'s choice). It changes how fast gradients are computed, not
  the model: parameters and results are the same (to float rounding).
  """
  if plugins.is_import_path(config.model):
    return plugin_model(config.model, num_classes, dict(config.model_args.to_dict()))
  if config.model not in REGISTRY:  # validate() rejects this earlier; kept for callers that skip it
    raise ValueError(f"unknown model {config.model=}; use one of {MODELS}")
  if config.dtype not in DTYPES:
    raise ValueError(f"unknown dtype {config.dtype=}; use one of {tuple(DTYPES)}")
  module = REGISTRY[config.model].build(config, num_classes=num_classes, dtype=DTYPES[config.dtype], conv=conv)
  return Model(module=module, name=config.model)


def plugin_model(spec: str, num_classes: int, arguments: dict):
  """The model a factory given by import path builds, ``factory(num_classes=N, **arguments)``: a Linen module with
  ``encode`` and ``classify`` methods (:class:`Model`) or an NNX module with them (:class:`NNXModel`)."""
  module = plugins.call_factory(plugins.load_object(spec, "model"), spec, "model", num_classes=num_classes,
                                **arguments)
  methods = all(callable(getattr(module, name, None)) for name in ("encode", "classify"))
  if isinstance(module, nn.Module) and methods:
    return Model(module=module, name=spec)
  from flax import nnx
  if isinstance(module, nnx.Module) and methods:
    return NNXModel(module, spec)
  raise UserError(f"model={spec!r} returned {type(module).__name__}, not a model",
                          "return a flax Linen or NNX module with encode(x) and classify(z) methods")


def parameter_count(params: Any) -> int:
  """The number of scalars in a parameter tree."""
  return int(sum(leaf.size for leaf in jax.tree.leaves(params)))
