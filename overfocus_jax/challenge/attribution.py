r"""Latent attributions through the classifier head only.

For a head :math:`\psi` and a latent map :math:`z = \phi(x)`, with :math:`c` the class of each sample:

.. math::

    G(z, c) = \frac{\partial \psi_c(z)}{\partial z}, \qquad
    A(z, c) = \operatorname{ReLU}\!\big(G(z, c) \odot z\big)

(the saliency of Bertoin et al. 2024, arXiv 2409.17370, Fig. 2). All per-sample gradients come from one
``jax.vjp`` of :math:`\sum_b \psi_{c_b}(z_b)`: the head runs in inference mode, so samples do not interact and
the gradient of the sum is the stack of per-sample gradients.
"""

from typing import Callable

import jax
import jax.numpy as jnp

ClassifyFn = Callable[[jax.Array], jax.Array]


def target_classes(logits: jax.Array, labels: jax.Array, target: str) -> jax.Array:
  """The class to attribute: the true label or the predicted one."""
  if target == "true":
    return labels
  if target == "predicted":
    return jnp.argmax(logits, axis=-1)
  raise ValueError(f"unknown attribution target {target=}; use 'true' or 'predicted'")


def class_score_gradient(classify_fn: ClassifyFn, z: jax.Array, labels: jax.Array,
                         target: str = "true") -> tuple[jax.Array, jax.Array]:
  """``(logits, ∂ψ_c(z)/∂z)`` from one forward and one backward pass through the head.

  Both are constants for the outer gradient of the train step (``z`` is stopped).
  """
  z = jax.lax.stop_gradient(z)
  logits, vjp = jax.vjp(classify_fn, z)
  classes = target_classes(logits, labels, target)
  (grad,) = vjp(jax.nn.one_hot(classes, logits.shape[-1], dtype=logits.dtype))
  return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(grad)


def gradient_times_activation(classify_fn: ClassifyFn, z: jax.Array, labels: jax.Array,
                              target: str = "true") -> jax.Array:
  """:math:`A(z, c) = \\mathrm{ReLU}(\\partial\\psi_c/\\partial z \\odot z)`, same shape as ``z``."""
  _, grad = class_score_gradient(classify_fn, z, labels, target)
  return jax.nn.relu(grad * jax.lax.stop_gradient(z))
