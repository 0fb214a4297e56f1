r"""Batch, group and layer normalisation with statistics summed accurately in float32.

Each normalises as flax's modules of the same names do, with the same parameters (``scale``, ``bias``) and running
statistics (``batch_stats``: ``mean``, ``var``), so variables and checkpoints carry over:

.. math::

    \mu = \frac{1}{n}\sum_i x_i, \qquad \sigma^2 = \frac{1}{n}\sum_i (x_i - \mu)^2, \qquad
    y = (x - \mu) \cdot \big(\gamma \cdot (\sigma^2 + \epsilon)^{-1/2}\big) + \beta

over the batch and positions (:class:`BatchNorm`), the positions and a group's channels (:class:`GroupNorm`) or the
channels (:class:`LayerNorm`), two passes and float32 at least whatever the activations' dtype. What differs is how
the sums are taken. A reduction that adds :math:`n` float32 values one after another has an error that grows like
:math:`n \varepsilon`; :func:`blocked_sum` adds them in blocks of at most :data:`BLOCK`, then the block sums in
blocks, and so on, an error that grows like :math:`\lceil \log_{B} n \rceil B \varepsilon` — PyTorch's CPU
reductions are cascaded in the same spirit. It matters on activations of large magnitude (DomainBed's MNIST_CNN on
ColoredMNIST at its stored 0–255 scale): ``python -m benchmarks.float32_accuracy`` measures the float32 gradients'
distance from a float64 run, and PyTorch's, with both summations (figures and cost in ``docs/results/performance.md``).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

BLOCK = 64  # the most values one sequential sum adds


def _block(n: int) -> int:
  """The largest divisor of ``n`` in [2, BLOCK] (a reshape, no copy), or BLOCK when there is none (then padded)."""
  return next((b for b in range(min(n, BLOCK), 1, -1) if n % b == 0), BLOCK)


def blocked_sum(x: jax.Array, axis: int) -> jax.Array:
  """The sum of ``x`` over ``axis``, in blocks of at most :data:`BLOCK` values, then the block sums likewise."""
  axis = axis % x.ndim
  while x.shape[axis] > BLOCK:
    n = x.shape[axis]
    block = _block(n)
    if n % block:
      padding = [(0, 0)] * x.ndim
      padding[axis] = (0, -n % block)
      x = jnp.pad(x, padding)
    x = x.reshape(x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]).sum(axis + 1)
    # Without the barrier XLA merges the levels back into one sequential reduction.
    x = jax.lax.optimization_barrier(x)
  return x.sum(axis)


def _stats_dtype(x: jax.Array):
  return jnp.promote_types(x.dtype, jnp.float32)


def moments(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """``(mean, variance)`` of ``x`` over one ``axis`` (kept as size 1), two passes of :func:`blocked_sum`."""
  x = x.astype(_stats_dtype(x))
  n = x.shape[axis]
  mean = jnp.expand_dims(blocked_sum(x, axis), axis) / n
  variance = jnp.expand_dims(blocked_sum(jnp.square(x - mean), axis), axis) / n
  return mean, variance


def _normalize(module: nn.Module, x, mean, variance, epsilon: float, dtype, param_dtype, features: int,
               use_scale: bool, use_bias: bool, scale_init: Callable, bias_init: Callable):
  """y = (x − μ) · (γ · rsqrt(σ² + ε)) + β, in the order flax computes it, cast to ``dtype`` (None: the promotion of
  the input and the parameters)."""
  y = x - mean
  multiplier = jax.lax.rsqrt(variance + epsilon)
  dtypes = [x.dtype]
  if use_scale:
    scale = module.param("scale", scale_init, (features,), param_dtype)
    multiplier = multiplier * scale
    dtypes.append(scale.dtype)
  y = y * multiplier
  if use_bias:
    bias = module.param("bias", bias_init, (features,), param_dtype)
    y = y + bias
    dtypes.append(bias.dtype)
  return jnp.asarray(y, dtype if dtype is not None else jnp.result_type(*dtypes))


class _Normalization(nn.Module):
  """The fields flax's normalisations share, with their defaults."""

  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable = nn.initializers.zeros
  scale_init: Callable = nn.initializers.ones
  use_fast_variance: bool = False  # accepted for flax's signature; the variance is always two-pass

  def normalize(self, x, mean, variance):
    return _normalize(self, x, mean, variance, self.epsilon, self.dtype, self.param_dtype, x.shape[-1],
                      self.use_scale, self.use_bias, self.scale_init, self.bias_init)


class BatchNorm(_Normalization):
  """``flax.linen.BatchNorm`` over the last axis, its statistics summed accurately (module docstring); the running
  averages as flax keeps them: ``momentum · running + (1 − momentum) · batch`` (the biased variance), not updated
  while the module is initialised."""

  use_running_average: bool | None = None
  axis: int = -1
  momentum: float = 0.99
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    if self.axis not in (-1, x.ndim - 1):
      raise ValueError(f"BatchNorm normalises the last axis; got axis={self.axis} for a {x.ndim}-d input")
    use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    if use_running_average:
      mean, variance = running_mean.value, running_var.value
    else:
      mean, variance = moments(x.reshape(-1, features), 0)
      mean, variance = mean[0], variance[0]
      if not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * variance
    return self.normalize(x, mean, variance)


class GroupNorm(_Normalization):
  """``flax.linen.GroupNorm`` on (B, ..., C) inputs in ``num_groups`` groups of channels, its statistics summed
  accurately (module docstring)."""

  num_groups: int = 32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    if features % self.num_groups:
      raise ValueError(f"GroupNorm needs channels divisible by num_groups={self.num_groups}, got {features}")
    batch, groups = x.shape[0], self.num_groups
    # (B, positions, G, channels of a group): a group's channels summed (a few), then its positions in blocks.
    grouped = x.reshape(batch, -1, groups, features // groups).astype(_stats_dtype(x))
    count = grouped.shape[1] * grouped.shape[3]
    mean = blocked_sum(grouped.sum(-1), 1) / count  # (B, G)
    centred = grouped - mean[:, None, :, None]
    variance = blocked_sum(jnp.square(centred).sum(-1), 1) / count
    shape = (batch,) + (1,) * (x.ndim - 2) + (features,)
    mean = jnp.repeat(mean, features // groups, axis=-1).reshape(shape)
    variance = jnp.repeat(variance, features // groups, axis=-1).reshape(shape)
    return self.normalize(x, mean, variance)


class LayerNorm(_Normalization):
  """``flax.linen.LayerNorm`` over the last axis, its statistics summed accurately (module docstring)."""

  @nn.compact
  def __call__(self, x):
    mean, variance = moments(x, -1)
    return self.normalize(x, mean, variance)
