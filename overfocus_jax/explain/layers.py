r"""Any intermediate feature map of a Flax model (Linen or NNX), by module path, and Grad-CAM there — without
changing the model.

A layer is named by the path of the module whose ``__call__`` produces it, parts joined by ``/``: ``encoder`` is the
library's latent map :math:`z`, ``encoder/stage2_block1`` a residual block's output, ``layers/0`` the first module
of an ``nnx.List``. A *probed forward* reads that output :math:`a` and adds a perturbation :math:`\delta` to it;
at :math:`\delta = 0` the forward pass is unchanged and

.. math::

    \frac{\partial f_c}{\partial \delta}\Big|_{\delta=0} = \frac{\partial f_c}{\partial a},

so Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391) works at any layer:
:math:`\alpha_k = \frac{1}{hw}\sum_{ij} \partial f_c/\partial a_{ijk}`, :math:`L = \mathrm{ReLU}(\sum_k \alpha_k a_k)`.

:func:`linen_probe` and :func:`nnx_probe` make the probed forward ``forward(x, delta) -> (logits, a)`` of a Linen
module (through :func:`flax.linen.intercept_methods`) or an NNX module (on a copy, its layer's ``__call__`` wrapped);
:func:`linen_feature_layers` and :func:`nnx_feature_layers` list the layers a probe can take. :func:`layer_grad_cam`
and :func:`layer_activation` work on any probed forward. Models run in inference mode.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from overfocus_jax.challenge.attribution import class_score_vjp, target_classes
from overfocus_jax.models.adapters import takes_train

ProbedForward = Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]]
# A batch size no model multiplies into its own batch axis by accident (focus models run K patches per image):
# layers whose leading axis is not this size are not maps of the input images.
_PROBE_BATCH = 3


def _linen_module(model) -> nn.Module:
  """The Linen module of the library's :class:`~overfocus_jax.models.Model` wrapper, or ``model`` itself."""
  return getattr(model, "module", model)


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


def _maps_of_images(seen: dict[str, list]) -> dict[str, tuple[int, ...]]:
  """The recorded output shapes (per path, one per call) that are one (B, h, w, c) map per probe image."""
  return {path: tuple(shapes[0][1:]) for path, shapes in seen.items()
          if path and len(shapes) == 1 and shapes[0] is not None and len(shapes[0]) == 4
          and shapes[0][0] == _PROBE_BATCH}


def linen_feature_layers(model, variables: dict, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
  """``{path: (h, w, c)}`` of every module output of a Linen module (or the library's ``Model``) that is one
  ``(B, h, w, c)`` map per input image, in call order. Modules called more than once in a forward pass are left
  out (a perturbation would hit every call)."""
  module = _linen_module(model)
  seen: dict[str, list] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      seen.setdefault(_path(context.module), []).append(getattr(out, "shape", None))
    return out

  def forward():
    with nn.intercept_methods(record):
      return module.apply(variables, jnp.zeros((_PROBE_BATCH, *input_shape), jnp.float32), **_inference(module))

  jax.eval_shape(forward)
  return _maps_of_images(seen)


def _inference(module: nn.Module) -> dict:
  return {"train": False} if takes_train(type(module).__call__) else {}


def linen_probe(model, variables: dict, layer: str) -> ProbedForward:
  """``forward(x, delta) -> (logits, a)``: a Linen module's (or the library ``Model``'s) inference forward with
  ``delta`` added to ``layer``'s output ``a``."""
  module = _linen_module(model)

  def forward(x: jax.Array, delta: Any):
    captured = []

    def probe(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and _path(context.module) == layer:
        captured.append(out)
        out = out + delta
      return out

    with nn.intercept_methods(probe):
      logits = module.apply(variables, x, **_inference(module))
    return logits, _one_capture(captured, layer)

  return forward


def _one_capture(captured: list, layer: str) -> jax.Array:
  if len(captured) != 1:
    raise ValueError(f"layer={layer!r} ran {len(captured)} times in the forward pass; probe a layer that runs once "
                     "(the feature-layer listing names them)")
  return captured[0]


def _nnx_child(parent, part: str):
  return parent[int(part)] if part.isdigit() else getattr(parent, part)


def _wrap_call(module, after: Callable) -> None:
  """Makes ``module``'s ``__call__`` return ``after(out)`` (this instance only: a subclass just for it)."""
  base = type(module)

  class Probed(base):
    def __call__(self, *args, **kwargs):
      return after(super().__call__(*args, **kwargs))

  Probed.__name__ = base.__name__
  object.__setattr__(module, "__class__", Probed)


def _nnx_forward_fn(model, encode: str, classify: str) -> Callable:
  if encode and classify:
    return lambda m, x: getattr(m, classify)(getattr(m, encode)(x))
  return lambda m, x: m(x)


def nnx_feature_layers(model, input_shape: tuple[int, ...], *, encode: str = "encode",
                       classify: str = "classify") -> dict[str, tuple[int, ...]]:
  """``{path: (h, w, c)}`` of every submodule output of an NNX module that is one ``(B, h, w, c)`` map per input
  image (see :func:`linen_feature_layers`); the forward pass is ``classify(encode(x))``, or ``model(x)`` when
  ``encode`` or ``classify`` is empty."""
  from flax import nnx
  graphdef, state = nnx.split(model)
  run = _nnx_forward_fn(model, encode, classify)
  seen: dict[str, list] = {}

  def forward(x):
    copy = nnx.merge(graphdef, state)
    copy.eval()
    for path, module in nnx.iter_modules(copy):
      if path:
        name = "/".join(str(p) for p in path)
        _wrap_call(module, lambda out, name=name: seen.setdefault(name, []).append(getattr(out, "shape", None))
                   or out)
    return run(copy, x)

  jax.eval_shape(forward, jnp.zeros((_PROBE_BATCH, *input_shape), jnp.float32))
  return _maps_of_images(seen)


def nnx_probe(model, layer: str, *, encode: str = "encode", classify: str = "classify") -> ProbedForward:
  """``forward(x, delta) -> (logits, a)``: an NNX module's inference forward (``classify(encode(x))``, or
  ``model(x)`` when ``encode`` or ``classify`` is empty) with ``delta`` added to ``layer``'s output ``a``. It runs a
  copy of the module in evaluation mode; ``model`` itself is not changed."""
  from flax import nnx
  graphdef, state = nnx.split(model)
  run = _nnx_forward_fn(model, encode, classify)
  parts = layer.split("/")

  def forward(x: jax.Array, delta: Any):
    copy = nnx.merge(graphdef, state)
    copy.eval()
    target = copy
    for part in parts:
      try:
        target = _nnx_child(target, part)
      except (AttributeError, IndexError, KeyError, TypeError):
        raise ValueError(f"layer={layer!r} is not a submodule of the NNX model (no {part!r}); list them with "
                         "nnx_feature_layers") from None
    captured = []
    _wrap_call(target, lambda out: captured.append(out) or out + delta)
    logits = run(copy, x)
    return logits, _one_capture(captured, layer)

  return forward


def layer_activation(forward: ProbedForward, x: jax.Array) -> jax.Array:
  """The probed layer's output for inputs ``x``."""
  return forward(x, 0.0)[1]


def layer_grad_cam(forward: ProbedForward, x: jax.Array, labels: jax.Array, target: str = "true") -> jax.Array:
  """Grad-CAM at the probed layer (a ``(B, h, w, c)`` map), shape ``(B, h, w)``."""
  activation_shape = jax.eval_shape(lambda: forward(x, 0.0)[1]).shape
  zeros = jnp.zeros(activation_shape, jnp.float32)
  _, grad, activation = class_score_vjp(lambda delta: forward(x, delta), zeros,
                                       lambda logits: target_classes(logits, labels, target), has_aux=True)
  weights = jnp.mean(grad, axis=(1, 2), keepdims=True)
  return jax.nn.relu(jnp.sum(weights * activation, axis=-1))
