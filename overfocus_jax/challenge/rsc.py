r"""RSC: representation self-challenging.

Huang, Wang, Xing, Huang, "Self-Challenging Improves Cross-Domain Generalization", ECCV 2020,
https://arxiv.org/abs/2007.02454; reference code DeLightCMU/RSC ``Domain_Generalization/models/resnet.py``.

Official variant, on the last feature map :math:`z \in \mathbb{R}^{B \times H \times W \times C}` (stopped copy,
head in inference mode):

.. math::

    g = \frac{\partial \sum_b \psi_{y_b}(z_b)}{\partial z}, \qquad
    \bar g_{b,c} = \operatorname{mean}_{hw}\, g_{b,h,w,c}

    \text{spatial (prob. } p\text{)}: \; s_{b,hw} = \sum_c z_{b,hw,c}\, \bar g_{b,c}, \text{ drop the top }
    \lceil HW/3 \rceil \text{ positions}; \qquad
    \text{channel}: \; \text{drop the top } \lceil C/3.2 \rceil \text{ channels of } \bar g_b

    \Delta_b = \max\!\big(0,\; \mathrm{softmax}(\psi(z_b))_{y_b} - \mathrm{softmax}(\psi(z_b \odot M_b))_{y_b}
      - 10^{-4}\big)

Only samples whose :math:`\Delta_b` exceeds the value at position :math:`\mathrm{round}(B \cdot \text{pecent})` of
:math:`\Delta` sorted in descending order keep their mask (the top ``pecent`` share: the most challenged); the
others train unmasked. ``pecent = 0.3 + 0.2 \lfloor \text{epoch}/10 \rfloor`` (capped at 0.9) or a fixed value.
The loss is cross-entropy on :math:`\psi(z \odot M)`.

DomainBed variant (facebookresearch/DomainBed ``algorithms.py``, class ``RSC``), on the pooled feature vector
:math:`f \in \mathbb{R}^{B \times D}`: ``mask_f`` drops the top :math:`\lceil f D \rceil` features of
:math:`\partial \sum_b \psi_{y_b}(f_b) / \partial f` per sample; ``mask_b`` keeps every feature of the samples outside
the top :math:`\lceil b B \rceil` by :math:`\Delta` (here without the clamp and offset); the final mask is
``mask_f OR mask_b``. (DomainBed thresholds with ``np.percentile``; exact top-k counts are used here.)
"""

import jax
import jax.numpy as jnp

from overfocus_jax.challenge.attribution import class_score_gradient
from overfocus_jax.challenge.base import Regularizer, stateless
from overfocus_jax.challenge.masks import drop_count, drop_mask, dropped_fraction, top_k_select

CHANGE_OFFSET = 1e-4  # the official code's margin before a drop in confidence counts


def curriculum_percent(epoch: jax.Array) -> jax.Array:
  """The official schedule: 0.3 for epochs 0–9, 0.5 for 10–19, 0.7, then 0.9 (kept below 1)."""
  return jnp.minimum(0.3 + 0.2 * (epoch // 10), 0.9)


def true_class_probability(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]


def spatial_mask(z: jax.Array, grad: jax.Array, fraction: float) -> jax.Array:
  """(B, H, W, 1): drops the positions with the largest Σ_c z · mean_hw(grad)."""
  batch, height, width, _ = z.shape
  scores = jnp.sum(z * jnp.mean(grad, axis=(1, 2), keepdims=True), axis=-1).reshape(batch, -1)
  return drop_mask(scores, fraction).reshape(batch, height, width, 1)


def channel_mask(grad: jax.Array, fraction: float) -> jax.Array:
  """(B, 1, 1, C): drops the channels with the largest mean_hw(grad)."""
  batch, _, _, channels = grad.shape
  return drop_mask(jnp.mean(grad, axis=(1, 2)), fraction).reshape(batch, 1, 1, channels)


def most_challenged(p_before: jax.Array, p_after: jax.Array, percent: jax.Array) -> jax.Array:
  """bool (B,): the samples whose true-class probability fell most, as the official code selects them."""
  change = jnp.maximum(p_before - p_after - CHANGE_OFFSET, 0.0)
  batch = change.shape[0]
  position = jnp.minimum(jnp.round(batch * percent).astype(jnp.int32), batch - 1)
  threshold = jnp.sort(change)[::-1][position]
  return change > threshold


def rsc(*, spatial_fraction: float = 1 / 3, channel_fraction: float = 1 / 3.2, spatial_probability: float = 0.5,
        batch_percent: float | None = None) -> Regularizer:
  """The official RSC regularizer; ``batch_percent=None`` follows the epoch curriculum."""
  for name, value in (("spatial_fraction", spatial_fraction), ("channel_fraction", channel_fraction)):
    if not 0 <= value < 1:
      raise ValueError(f"RSC {name} must be in [0, 1), got {value=}")
  if not 0 <= spatial_probability <= 1:
    raise ValueError(f"RSC spatial_probability must be in [0, 1], got {spatial_probability=}")
  if batch_percent is not None and not 0 <= batch_percent < 1:
    raise ValueError(f"RSC batch_percent must be in [0, 1), got {batch_percent=}")

  def regularizer(classify_fn, z, labels, key, info):
    if z.ndim != 4:
      raise ValueError(f"RSC needs a (B, H, W, C) latent map, got shape {z.shape}")
    logits, grad = class_score_gradient(classify_fn, z, labels)
    z_stopped = jax.lax.stop_gradient(z)
    use_spatial = jax.random.bernoulli(key, spatial_probability)
    # lax.cond runs only the branch the coin picked: one mask per step (positions or channels), not both.
    mask = jax.lax.cond(use_spatial, lambda: spatial_mask(z_stopped, grad, spatial_fraction) * jnp.ones_like(z),
                        lambda: channel_mask(grad, channel_fraction) * jnp.ones_like(z))
    percent = curriculum_percent(info.epoch) if batch_percent is None else batch_percent
    p_after = true_class_probability(classify_fn(z_stopped * mask), labels)
    keep = most_challenged(true_class_probability(logits, labels), p_after, percent)
    mask = jax.lax.stop_gradient(jnp.where(keep[:, None, None, None], mask, 1.0))
    metrics = {"rsc_spatial": use_spatial.astype(jnp.float32), "rsc_batch_masked_fraction": jnp.mean(keep),
               "rsc_dropped_fraction": dropped_fraction(mask), "rsc_percent": jnp.asarray(percent, jnp.float32)}
    return (z * mask).astype(z.dtype), metrics

  return stateless(regularizer)


def rsc_domainbed(*, feature_drop: float = 1 / 3, batch_drop: float = 1 / 3) -> Regularizer:
  """DomainBed's RSC on the pooled feature vector (the model is split at ``"pooled"``)."""
  for name, value in (("feature_drop", feature_drop), ("batch_drop", batch_drop)):
    if not 0 <= value < 1:
      raise ValueError(f"RSC-DomainBed {name} must be in [0, 1), got {value=}")

  def regularizer(classify_fn, features, labels, key, info):
    del key, info
    if features.ndim != 2:
      raise ValueError(f"rsc_domainbed works on pooled (B, D) features, got shape {features.shape}")
    logits, grad = class_score_gradient(classify_fn, features, labels)
    mask_f = drop_mask(grad, feature_drop)
    stopped = jax.lax.stop_gradient(features)
    change = true_class_probability(logits, labels) - true_class_probability(classify_fn(stopped * mask_f), labels)
    muted = top_k_select(change, drop_count(batch_drop, features.shape[0]))
    mask = jax.lax.stop_gradient(jnp.where(muted[:, None], mask_f, 1.0))
    metrics = {"rsc_batch_masked_fraction": jnp.mean(muted), "rsc_dropped_fraction": dropped_fraction(mask)}
    return (features * mask).astype(features.dtype), metrics

  return stateless(regularizer, split="pooled")
