r"""How concentrated an attribution map is, and how faithful it is to the model.

The concentration measures — ``attribution_ratio``, ``entropy``, ``normalised_entropy``, ``gini`` — are defined in
:mod:`overfocus_jax.challenge.concentration` (training logs them, so they live below the train loop) and are
re-exported here.

Coverage over a set of maps ``(B, ...)`` (the neuron coverage of Pei et al. 2017, DeepXplore, arXiv 1705.06640,
applied to attributions): each map is scaled by its own maximum, and a unit (an entry of the map: a latent
neuron, a position or a pixel) is covered when its scaled attribution exceeds a threshold :math:`\tau` (default
0.1) on at least one of the ``B`` inputs; coverage is the covered fraction, a scalar in [0, 1]. An overfocused
model reuses the same few units on every input and covers little.

Faithfulness: deletion and insertion curves (Petsiuk et al. 2018, RISE, arXiv 1806.07421). Pixels are ranked by
decreasing attribution; deletion replaces the top :math:`\lfloor tP/T \rfloor` pixels by a baseline, insertion
starts from the baseline and reveals them, for :math:`t = 0..T`, recording the true-class probability. A faithful
map gives a low deletion AUC and a high insertion AUC (trapezoid rule over the fraction of pixels in [0, 1]).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from overfocus_jax.challenge.concentration import (attribution_ratio, entropy, flatten_nonnegative, gini,
                                                    normalised_entropy)

__all__ = ["attribution_ratio", "auc", "coverage", "covered_units", "deletion_insertion_curves", "entropy", "gini",
           "normalised_entropy"]

ProbFn = Callable[[jax.Array], jax.Array]


def covered_units(maps: jax.Array, threshold: float = 0.1, mask: jax.Array | None = None) -> jax.Array:
  """``(N,)`` booleans: units whose max-scaled attribution exceeds ``threshold`` on some (unmasked) input."""
  flat = flatten_nonnegative(maps)
  peak = jnp.max(flat, axis=-1, keepdims=True)
  passes = flat / jnp.where(peak > 0, peak, 1.0) > threshold
  if mask is not None:  # padded rows of an evaluation batch cover nothing
    passes = passes & (mask[:, None] > 0)
  return jnp.any(passes, axis=0)


def coverage(maps: jax.Array, threshold: float = 0.1) -> jax.Array:
  """The fraction of units whose max-scaled attribution exceeds ``threshold`` on some input, a scalar."""
  return jnp.mean(covered_units(maps, threshold).astype(jnp.float32))


def deletion_insertion_curves(prob_fn: ProbFn, x: jax.Array, maps: jax.Array, labels: jax.Array, *,
                              steps: int = 16, baseline=0.0) -> tuple[jax.Array, jax.Array]:
  """``(deletion, insertion)`` true-class probability curves, each ``(B, steps + 1)``.

  Args:
    prob_fn: ``x -> (B, K)`` softmax probabilities, a pure function.
    x: inputs ``(B, H, W, C)``.
    maps: attributions ``(B, H, W)`` or ``(B, H, W, C)``; channels are summed, since a pixel is removed whole.
    labels: true classes ``(B,)``.
    steps: the number of equal chunks of pixels; point ``t`` has the top ``⌊t·H·W/steps⌋`` pixels changed.
    baseline: the value of removed pixels, a scalar or anything broadcastable to ``x``.

  Returns:
    Deletion starts at the probability of ``x`` and ends at that of the baseline; insertion the reverse.
  """
  batch, height, width = x.shape[:3]
  pixels = height * width
  scores = maps.sum(axis=-1) if maps.ndim == 4 else maps
  order = jnp.argsort(-scores.reshape(batch, pixels), axis=-1, stable=True)
  # rank[b, p] = position of pixel p in the decreasing order.
  rank = jnp.zeros((batch, pixels), jnp.int32).at[jnp.arange(batch)[:, None], order].set(
      jnp.arange(pixels, dtype=jnp.int32)[None, :])
  rank = rank.reshape(batch, height, width, 1)
  base = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
  counts = jnp.arange(steps + 1) * pixels // steps

  def probabilities_at(count):
    top = rank < count
    deleted = jnp.where(top, base, x)
    inserted = jnp.where(top, x, base)
    # One forward pass for both curves.
    probs = prob_fn(jnp.concatenate([deleted, inserted], axis=0))
    true_probs = jnp.take_along_axis(probs, jnp.concatenate([labels, labels])[:, None], axis=-1)[:, 0]
    return true_probs[:batch], true_probs[batch:]

  deletion, insertion = jax.lax.map(probabilities_at, counts)
  return deletion.T, insertion.T


def auc(curve: jax.Array) -> jax.Array:
  """Area under curves ``(..., T)`` sampled evenly over [0, 1], by the trapezoid rule, ``(...)``."""
  return jnp.trapezoid(curve, dx=1.0 / (curve.shape[-1] - 1), axis=-1)
