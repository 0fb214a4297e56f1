r"""Any intermediate feature map of a Flax model, by module path, and Grad-CAM there — without changing the model.

A layer is named by the path of the Flax module whose ``__call__`` produces it: ``encoder`` is the latent map
:math:`z`, ``encoder/stage2_block1`` a residual block's output, ``head/bn`` the head's normalised map.
:func:`flax.linen.intercept_methods` lets us read that output :math:`a` and add a perturbation :math:`\delta` to it;
at :math:`\delta = 0` the forward pass is unchanged and

.. math::

    \frac{\partial f_c}{\partial \delta}\Big|_{\delta=0} = \frac{\partial f_c}{\partial a},

so Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391) works at any layer:
:math:`\alpha_k = \frac{1}{hw}\sum_{ij} \partial f_c/\partial a_{ijk}`, :math:`L = \mathrm{ReLU}(\sum_k \alpha_k a_k)`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from overfocus_jax.challenge.attribution import class_score_vjp, target_classes

# A batch size no model multiplies into its own batch axis by accident (focus models run K patches per image):
# layers whose leading axis is not this size are not maps of the input images.
_PROBE_BATCH = 3


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


def feature_layers(model, variables: dict, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
  """``{path: (h, w, c)}`` of every module output that is one ``(B, h, w, c)`` map per input image, in call order.

  Modules called more than once in a forward pass are left out (a perturbation would hit every call).
  """
  seen: dict[str, list] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      seen.setdefault(_path(context.module), []).append(getattr(out, "shape", None))
    return out

  def forward():
    with nn.intercept_methods(record):
      return model.module.apply(variables, jnp.zeros((_PROBE_BATCH, *input_shape), jnp.float32), train=False)

  jax.eval_shape(forward)
  return {path: tuple(shapes[0][1:]) for path, shapes in seen.items()
          if path and len(shapes) == 1 and shapes[0] is not None and len(shapes[0]) == 4
          and shapes[0][0] == _PROBE_BATCH}


def probed_forward(model, variables: dict, layer: str):
  """``forward(x, delta) -> (logits, a)``: inference forward with ``delta`` added to ``layer``'s output ``a``."""

  def forward(x: jax.Array, delta: Any):
    captured = []

    def probe(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and _path(context.module) == layer:
        captured.append(out)
        out = out + delta
      return out

    with nn.intercept_methods(probe):
      logits = model.module.apply(variables, x, train=False)
    if len(captured) != 1:
      raise ValueError(f"layer {layer!r} ran {len(captured)} times in the forward pass; it must run once")
    return logits, captured[0]

  return forward


def layer_activation(model, variables: dict, x: jax.Array, layer: str) -> jax.Array:
  """The output of ``layer`` for inputs ``x`` (inference mode)."""
  return probed_forward(model, variables, layer)(x, 0.0)[1]


def layer_grad_cam(model, variables: dict, x: jax.Array, labels: jax.Array, layer: str,
                   target: str = "true") -> jax.Array:
  """Grad-CAM at ``layer`` (a path from :func:`feature_layers`), shape ``(B, h, w)``."""
  forward = probed_forward(model, variables, layer)
  activation_shape = jax.eval_shape(lambda: forward(x, 0.0)[1]).shape
  zeros = jnp.zeros(activation_shape, jnp.float32)
  _, grad, activation = class_score_vjp(lambda delta: forward(x, delta), zeros,
                                       lambda logits: target_classes(logits, labels, target), has_aux=True)
  weights = jnp.mean(grad, axis=(1, 2), keepdims=True)
  return jax.nn.relu(jnp.sum(weights * activation, axis=-1))
