r"""Latent attributions through the classifier head only.

For a head :math:`\psi` and a latent map :math:`z = \phi(x)`, with :math:`c` the class of each sample:

.. math::

    G(z, c) = \frac{\partial \psi_c(z)}{\partial z}, \qquad
    A(z, c) = \operatorname{ReLU}\!\big(G(z, c) \odot z\big)

(the saliency of Bertoin et al. 2024, arXiv 2409.17370, Fig. 2). All per-sample gradients come from one
``jax.vjp`` of :math:`\sum_b f_{c_b}(x_b)` (:func:`class_score_vjp`): the function runs in inference mode, so
samples do not interact and the gradient of the sum is the stack of per-sample gradients. The input-space methods
of :mod:`overfocus_jax.explain` use the same function with the whole network as ``f``.
"""

from typing import Callable

import jax
import jax.numpy as jnp

ClassifyFn = Callable[[jax.Array], jax.Array]
TARGETS = ("true", "predicted")


def target_classes(logits: jax.Array, labels: jax.Array, target: str) -> jax.Array:
  """The class to attribute: the true label or the predicted one."""
  if target == "true":
    return labels
  if target == "predicted":
    return jnp.argmax(logits, axis=-1)
  raise ValueError(f"unknown attribution target {target=}; use one of {TARGETS}")


def class_score_vjp(fn: Callable, x: jax.Array, choose_classes: Callable[[jax.Array], jax.Array], *,
                    has_aux: bool = False):
  """``(logits, ∂ Σ_b fn(x)_{b, c_b} / ∂x)`` (and ``aux`` when ``has_aux``), with ``c = choose_classes(logits)``.

  One forward and one backward pass: the cotangent is the one-hot of the chosen classes.
  """
  if has_aux:
    logits, vjp, aux = jax.vjp(fn, x, has_aux=True)
  else:
    logits, vjp = jax.vjp(fn, x)
  (grad,) = vjp(jax.nn.one_hot(choose_classes(logits), logits.shape[-1], dtype=logits.dtype))
  return (logits, grad, aux) if has_aux else (logits, grad)


def class_score_gradient(classify_fn: ClassifyFn, z: jax.Array, labels: jax.Array,
                         target: str = "true") -> tuple[jax.Array, jax.Array]:
  """``(logits, ∂ψ_c(z)/∂z)`` from one forward and one backward pass through the head; the gradient in float32
  (or wider) whatever ``z``'s dtype.

  Both are constants for the outer gradient of the train step (``z`` is stopped).
  """
  # At float32 at least, so that a bfloat16 model's attributions and the masks ranked on them keep float32.
  z = jax.lax.stop_gradient(z).astype(jnp.promote_types(z.dtype, jnp.float32))
  logits, grad = class_score_vjp(classify_fn, z, lambda logits: target_classes(logits, labels, target))
  return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(grad)


def gradient_times_activation(classify_fn: ClassifyFn, z: jax.Array, labels: jax.Array,
                              target: str = "true") -> jax.Array:
  """:math:`A(z, c) = \\mathrm{ReLU}(\\partial\\psi_c/\\partial z \\odot z)`, same shape as ``z``."""
  _, grad = class_score_gradient(classify_fn, z, labels, target)
  return jax.nn.relu(grad * jax.lax.stop_gradient(z).astype(grad.dtype))


def latent_attribution(encode_fn: Callable[[jax.Array], jax.Array], classify_fn: ClassifyFn, x: jax.Array,
                       labels: jax.Array, target: str = "true") -> tuple[jax.Array, jax.Array]:
  """``(z, A(z, c))`` with ``z = encode_fn(x)``: the latent map and its attribution through the head, for a batch.

  ``encode_fn`` and ``classify_fn`` are any model's two halves in inference mode: a Linen module's methods
  (:func:`overfocus_jax.models.adapters.linen_fns`), an NNX module's (:func:`~overfocus_jax.models.adapters.nnx_fns`)
  or plain functions.
  """
  z = encode_fn(x)
  return z, gradient_times_activation(classify_fn, z, labels, target)


def check_labels(z: jax.Array, labels: jax.Array, name: str = "z") -> None:
  """Raises ``ValueError`` unless ``labels`` is one integer class per row of ``z``."""
  shape = getattr(labels, "shape", None)
  if shape is None or len(shape) != 1 or shape[0] != z.shape[0]:
    raise ValueError(f"labels must be one class per sample, shape ({z.shape[0]},) for {name} of shape {z.shape}; "
                     f"got labels of shape {shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer classes, got labels of dtype {labels.dtype}")
