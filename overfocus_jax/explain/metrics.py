r"""How concentrated an attribution map is, and how faithful it is to the model.

Concentration metrics take non-negative maps of any shape ``(B, ...)``, flatten each sample to
:math:`a \in \mathbb{R}_{\ge 0}^N` (negative entries are clipped to 0) and return ``(B,)``:

- Attribution ratio at share :math:`s`: with :math:`a_{(1)} \ge a_{(2)} \ge \dots` sorted in decreasing order,
  :math:`\min\{k : \sum_{i \le k} a_{(i)} \ge s \sum_i a_i\} / N`. One-hot: :math:`1/N` (the smallest);
  uniform: :math:`\lceil sN \rceil / N`. A map with zero total is defined as 1.0 (nothing is concentrated).
- Shannon entropy (natural log) of :math:`p = a / \sum a`, :math:`H = -\sum p_i \log p_i` with
  :math:`0 \log 0 = 0`; normalised entropy :math:`H / \log N \in [0, 1]`. A zero map counts as uniform.
- Gini coefficient (the mean-difference form over ascending order :math:`a_{[1]} \le \dots \le a_{[N]}`):
  :math:`G = \sum_{i=1}^{N} (2i - N - 1)\, a_{[i]} / (N \sum_i a_i)`; 0 for a uniform map, :math:`(N-1)/N` for a
  one-hot one. A zero map gives 0.

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

ProbFn = Callable[[jax.Array], jax.Array]

# Cumulative float sums of equal values can land a rounding error below share·total; this slack keeps the
# uniform map at exactly ⌈share·N⌉/N.
_RELATIVE_SLACK = 1e-6


def _flatten_nonnegative(maps: jax.Array) -> jax.Array:
  return jax.nn.relu(maps.reshape(maps.shape[0], -1))


def attribution_ratio(maps: jax.Array, share: float = 0.5) -> jax.Array:
  """The fraction of positions, largest first, needed to hold ``share`` of the total attribution, ``(B,)``.

  Smallest ``k`` with cumulative sorted sum ≥ ``share · total``, divided by ``N``; 1.0 for a zero map.
  """
  flat = _flatten_nonnegative(maps)
  n = flat.shape[-1]
  descending = -jnp.sort(-flat, axis=-1)
  cumulative = jnp.cumsum(descending, axis=-1)
  total = cumulative[:, -1:]
  short = cumulative < share * total * (1.0 - _RELATIVE_SLACK)
  k = jnp.minimum(jnp.sum(short, axis=-1) + 1, n)  # the first position that reaches the share
  return jnp.where(total[:, 0] > 0, k / n, 1.0).astype(flat.dtype)


def _probabilities(maps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(p, total)``: the normalised map, uniform where the total is zero."""
  flat = _flatten_nonnegative(maps)
  total = jnp.sum(flat, axis=-1, keepdims=True)
  uniform = jnp.full_like(flat, 1.0 / flat.shape[-1])
  p = jnp.where(total > 0, flat / jnp.where(total > 0, total, 1.0), uniform)
  return p, total[:, 0]


def entropy(maps: jax.Array) -> jax.Array:
  """Shannon entropy (nats) of the normalised map, ``(B,)``: 0 for one-hot, ``log N`` for uniform."""
  p, _ = _probabilities(maps)
  return jnp.sum(jax.scipy.special.entr(p), axis=-1)  # entr(0) = 0


def normalised_entropy(maps: jax.Array) -> jax.Array:
  """Entropy divided by ``log N``, in [0, 1], ``(B,)``."""
  n = maps[0].size
  return entropy(maps) / jnp.log(jnp.asarray(n, jnp.float32)) if n > 1 else jnp.zeros(maps.shape[:1])


def gini(maps: jax.Array) -> jax.Array:
  """Gini coefficient ``Σ (2i − N − 1) a_[i] / (N Σ a)`` over ascending order, ``(B,)``; 0 for a zero map."""
  flat = _flatten_nonnegative(maps)
  n = flat.shape[-1]
  ascending = jnp.sort(flat, axis=-1)
  weights = 2.0 * jnp.arange(1, n + 1, dtype=flat.dtype) - n - 1
  total = jnp.sum(flat, axis=-1)
  safe_total = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, jnp.sum(weights * ascending, axis=-1) / (n * safe_total), 0.0)


def covered_units(maps: jax.Array, threshold: float = 0.1, mask: jax.Array | None = None) -> jax.Array:
  """``(N,)`` booleans: units whose max-scaled attribution exceeds ``threshold`` on some (unmasked) input."""
  flat = _flatten_nonnegative(maps)
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
