r"""Input-space attribution maps for a classifier used as a pure function.

Every method takes ``logits_fn(x) -> (B, K)``, a pure function of a batch of inputs (callers close over the
variables), and attributes the score :math:`f_c` of one class per sample, the true label or the predicted class
(:func:`overfocus_jax.challenge.attribution.target_classes`). The class is fixed once, at the unperturbed input.

- Input gradient (saliency): :math:`\nabla_x f_c(x)`.
- SmoothGrad (Smilkov et al. 2017, arXiv 1706.03825):
  :math:`\frac{1}{n}\sum_{i=1}^{n} \nabla_x f_c(x + \epsilon_i)`,
  :math:`\epsilon_i \sim \mathcal{N}(0, \sigma^2)`, :math:`\sigma = s\,(\max x - \min x)` per image.
- Integrated gradients (Sundararajan et al. 2017, arXiv 1703.01365), midpoint Riemann rule with :math:`m` steps:
  :math:`(x - x') \odot \frac{1}{m}\sum_{i=1}^{m} \nabla f_c\big(x' + \alpha_i (x - x')\big)`,
  :math:`\alpha_i = (i - \tfrac12)/m`; completeness: :math:`\sum \mathrm{IG} \approx f_c(x) - f_c(x')`.
- Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391) on the latent map :math:`z = \phi(x)` and head :math:`\psi`:
  :math:`\alpha_k = \frac{1}{hw}\sum_{ij} \partial\psi_c/\partial z_{ijk}`,
  :math:`L = \mathrm{ReLU}(\sum_k \alpha_k z_k)`.

All per-sample gradients come from one ``jax.vjp`` of :math:`\sum_b f_{c_b}(x_b)`: models run in inference mode,
so samples do not interact and the gradient of the sum is the stack of per-sample gradients.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from overfocus_jax.challenge.attribution import class_score_gradient, class_score_vjp, target_classes

LogitsFn = Callable[[jax.Array], jax.Array]


def _classes_at(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, target: str) -> jax.Array:
  """The class to attribute per sample, chosen at the unperturbed input."""
  return target_classes(logits_fn(x), labels, target)


def _class_gradient(logits_fn: LogitsFn, x: jax.Array, classes: jax.Array) -> jax.Array:
  """``∂f_c/∂x`` for fixed classes, from one vjp of the summed selected logits."""
  return class_score_vjp(logits_fn, x, lambda logits: classes)[1]


def input_gradient(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, target: str = "true") -> jax.Array:
  """Saliency :math:`\\partial f_c / \\partial x`, shape ``(B, H, W, C)``."""
  return class_score_vjp(logits_fn, x, lambda logits: target_classes(logits, labels, target))[1]


def smoothgrad(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, key: jax.Array, *, samples: int = 16,
               noise_scale: float = 0.15, target: str = "true") -> jax.Array:
  """SmoothGrad: the mean input gradient over ``samples`` Gaussian perturbations, shape ``(B, H, W, C)``.

  The noise standard deviation is ``noise_scale`` times each image's value range, so it is invariant to the
  input scale. Deterministic given ``key``.
  """
  classes = _classes_at(logits_fn, x, labels, target)
  axes = tuple(range(1, x.ndim))
  sigma = noise_scale * (jnp.max(x, axis=axes, keepdims=True) - jnp.min(x, axis=axes, keepdims=True))

  def one_sample(sample_key):
    noise = sigma * jax.random.normal(sample_key, x.shape, x.dtype)
    return _class_gradient(logits_fn, x + noise, classes)

  # lax.map keeps one perturbed batch in memory at a time instead of `samples` of them.
  grads = jax.lax.map(one_sample, jax.random.split(key, samples))
  return jnp.mean(grads, axis=0)


def integrated_gradients(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, *,
                         baseline: Optional[jax.Array] = None, steps: int = 32,
                         target: str = "true") -> jax.Array:
  """Integrated gradients from ``baseline`` (zeros by default) with the midpoint rule, shape ``(B, H, W, C)``.

  The midpoint rule is exact for integrands linear in α and its error falls as ``1/steps²`` for smooth models.
  """
  baseline = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(baseline, x.shape).astype(x.dtype)
  classes = _classes_at(logits_fn, x, labels, target)
  delta = x - baseline
  alphas = (jnp.arange(steps, dtype=x.dtype) + 0.5) / steps

  def gradient_at(alpha):
    return _class_gradient(logits_fn, baseline + alpha * delta, classes)

  # lax.map: one interpolated batch in memory at a time.
  mean_grad = jnp.mean(jax.lax.map(gradient_at, alphas), axis=0)
  return delta * mean_grad


def grad_cam(encode_fn: LogitsFn, classify_fn: LogitsFn, x: jax.Array, labels: jax.Array,
             target: str = "true") -> jax.Array:
  """Grad-CAM on the latent map ``z = encode_fn(x)`` for the head ``classify_fn``, shape ``(B, h, w)``."""
  z = encode_fn(x)
  _, grad = class_score_gradient(classify_fn, z, labels, target)
  weights = jnp.mean(grad, axis=(1, 2), keepdims=True)  # α_k: one weight per channel and sample
  return jax.nn.relu(jnp.sum(weights * jax.lax.stop_gradient(z), axis=-1))


def upsample_to(maps: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of ``(B, h, w)`` maps to ``(B, height, width)``, for display over the input."""
  return jax.image.resize(maps, (maps.shape[0], height, width), method="bilinear")


def to_heatmap(maps: jax.Array) -> jax.Array:
  """``(B, H, W, C)`` → ``(B, H, W)``: sum of absolute values over channels, for display and metrics."""
  return jnp.sum(jnp.abs(maps), axis=-1)
