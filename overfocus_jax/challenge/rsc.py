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
others train unmasked. The loss is cross-entropy on :math:`\psi(z \odot M)`. The official schedule is
``pecent = 0.3 + 0.2 ⌊epoch / 10⌋``; here :math:`0.3 + 0.2 \lfloor t / T \rfloor` at the regularizer's step
:math:`t` (its own ``count``) with :math:`T` = ``curriculum_steps`` (10 epochs' worth of steps), capped at 0.9 (the
reference code would index past its sorted list from epoch 40), or a fixed ``batch_percent``.

DomainBed variant (facebookresearch/DomainBed ``algorithms.py``, class ``RSC``), on the pooled feature vector
:math:`f \in \mathbb{R}^{B \times D}`: ``mask_f`` drops the top :math:`\lceil f D \rceil` features of
:math:`\partial \sum_b \psi_{y_b}(f_b) / \partial f` per sample; ``mask_b`` keeps every feature of the samples outside
the top :math:`\lceil b B \rceil` by :math:`\Delta` (here without the clamp and offset); the final mask is
``mask_f OR mask_b``. (DomainBed thresholds with ``np.percentile``; exact top-k counts are used here.)
"""

import jax
import jax.numpy as jnp

from overfocus_jax.challenge.attribution import check_labels, class_score_gradient
from overfocus_jax.challenge.base import Regularizer, stateless
from overfocus_jax.challenge.masks import check_fraction, drop_mask, dropped_fraction, is_static, select_top

CHANGE_OFFSET = 1e-4  # the official code's margin before a drop in confidence counts


def curriculum_percent(stage: jax.Array) -> jax.Array:
  """The official schedule at curriculum stage ``stage`` (10 epochs each): 0.3, 0.5, 0.7, then 0.9 (kept below 1)."""
  return jnp.minimum(0.3 + 0.2 * stage, 0.9)


def true_class_probability(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]


def spatial_mask(z: jax.Array, grad: jax.Array, fraction) -> jax.Array:
  """(B, H, W, 1): drops the positions with the largest Σ_c z · mean_hw(grad)."""
  batch, height, width, _ = z.shape
  scores = jnp.sum(z * jnp.mean(grad, axis=(1, 2), keepdims=True), axis=-1).reshape(batch, -1)
  return drop_mask(scores, fraction).reshape(batch, height, width, 1)


def channel_mask(grad: jax.Array, fraction) -> jax.Array:
  """(B, 1, 1, C): drops the channels with the largest mean_hw(grad)."""
  batch, _, _, channels = grad.shape
  return drop_mask(jnp.mean(grad, axis=(1, 2)), fraction).reshape(batch, 1, 1, channels)


def most_challenged(p_before: jax.Array, p_after: jax.Array, percent) -> jax.Array:
  """bool (B,): the samples whose true-class probability fell most, as the official code selects them."""
  change = jnp.maximum(p_before - p_after - CHANGE_OFFSET, 0.0)
  batch = change.shape[0]
  position = jnp.minimum(jnp.round(batch * percent).astype(jnp.int32), batch - 1)
  threshold = jnp.sort(change)[::-1][position]
  return change > threshold


def check_rsc_arguments(spatial_fraction, channel_fraction, spatial_probability, batch_percent) -> None:
  check_fraction("spatial_fraction", spatial_fraction)
  check_fraction("channel_fraction", channel_fraction)
  check_fraction("spatial_probability", spatial_probability, high_open=False)
  if batch_percent is not None:
    check_fraction("batch_percent", batch_percent)


def rsc_mask(classify_fn, z: jax.Array, labels: jax.Array, key: jax.Array, *, spatial_fraction=1 / 3,
             channel_fraction=1 / 3.2, spatial_probability=0.5, batch_percent=0.3) -> tuple[jax.Array, dict]:
  """The 0/1 mask the official RSC multiplies ``z`` (B, H, W, C) by, and what it was made from.

  ``key`` flips the step's coin: spatial with probability ``spatial_probability``, else channels. Only the
  ``batch_percent`` most challenged samples keep their mask (see the module docstring). Every number may be traced.

  Returns:
    ``(mask, aux)``: ``mask`` (B, H, W, C), 0/1; ``aux`` holds ``spatial`` (bool scalar: the coin), ``chosen`` (B,)
    bool (the samples masked), ``change`` (B,) (:math:`\\Delta`, before the selection), ``percent``, ``logits`` and
    ``gradient`` (:math:`g`).
  """
  if z.ndim != 4:
    raise ValueError(f"rsc needs z of shape (B, H, W, C), got z of shape {z.shape}")
  check_labels(z, labels)
  check_rsc_arguments(spatial_fraction, channel_fraction, spatial_probability, batch_percent)
  logits, grad = class_score_gradient(classify_fn, z, labels)
  z_stopped = jax.lax.stop_gradient(z)
  use_spatial = jax.random.bernoulli(key, spatial_probability)
  # lax.cond runs only the branch the coin picked: one mask per step (positions or channels), not both.
  mask = jax.lax.cond(use_spatial, lambda: spatial_mask(z_stopped, grad, spatial_fraction) * jnp.ones_like(z),
                      lambda: channel_mask(grad, channel_fraction) * jnp.ones_like(z))
  p_before = true_class_probability(logits, labels)
  p_after = true_class_probability(classify_fn(z_stopped * mask), labels)
  chosen = most_challenged(p_before, p_after, batch_percent)
  mask = jax.lax.stop_gradient(jnp.where(chosen[:, None, None, None], mask, 1.0))
  aux = {"spatial": use_spatial, "chosen": chosen, "change": p_before - p_after, "percent": batch_percent,
         "logits": logits, "gradient": grad}
  return mask, aux


def rsc(*, spatial_fraction=1 / 3, channel_fraction=1 / 3.2, spatial_probability=0.5, batch_percent=None,
        curriculum_steps: int | None = None) -> Regularizer:
  """The official RSC regularizer: :func:`rsc_mask` times ``z``.

  Args:
    spatial_fraction, channel_fraction, spatial_probability: as in :func:`rsc_mask` (may be traced).
    batch_percent: a fixed share of the batch masked; None follows the official curriculum.
    curriculum_steps: the curriculum's stage length in steps (the official: 10 epochs), needed when
      ``batch_percent`` is None.

  The state is ``{"count": int32}``. ``aux`` holds ``mask`` and the scalar metrics ``rsc_spatial``,
  ``rsc_batch_masked_fraction``, ``rsc_dropped_fraction`` and ``rsc_percent``.
  """
  check_rsc_arguments(spatial_fraction, channel_fraction, spatial_probability, batch_percent)
  if batch_percent is None:
    if curriculum_steps is None:
      raise ValueError("curriculum_steps is required with the official curriculum (batch_percent=None): the steps "
                       "of one stage, 10 epochs in the reference code (curriculum_steps=10 * steps_per_epoch); or "
                       "pass a fixed batch_percent, e.g. 0.3")
    if not (is_static(curriculum_steps) and curriculum_steps >= 1):
      raise ValueError(f"curriculum_steps must be a whole number of steps >= 1, got {curriculum_steps=!r}")

  def init(variables):
    del variables
    return {"count": jnp.zeros((), jnp.int32)}

  def apply(state, classify_fn, z, labels, key):
    count = state["count"]
    percent = curriculum_percent(count // int(curriculum_steps)) if batch_percent is None else batch_percent
    mask, aux = rsc_mask(classify_fn, z, labels, key, spatial_fraction=spatial_fraction,
                         channel_fraction=channel_fraction, spatial_probability=spatial_probability,
                         batch_percent=percent)
    metrics = {"mask": mask, "rsc_spatial": aux["spatial"].astype(jnp.float32),
               "rsc_batch_masked_fraction": jnp.mean(aux["chosen"]), "rsc_dropped_fraction": dropped_fraction(mask),
               "rsc_percent": jnp.asarray(percent, jnp.float32)}
    return (z * mask).astype(z.dtype), {"count": count + 1}, metrics

  return Regularizer(init=init, apply=apply)


def rsc_domainbed_mask(classify_fn, features: jax.Array, labels: jax.Array, *, feature_drop=1 / 3,
                       batch_drop=1 / 3) -> tuple[jax.Array, dict]:
  """The 0/1 mask DomainBed's RSC multiplies the pooled features (B, D) by, and what it was made from.

  Returns:
    ``(mask, aux)``: ``mask`` (B, D); ``aux`` holds ``mask_f`` (B, D) (the per-sample feature mask), ``chosen`` (B,)
    bool (the samples muted), ``change`` (B,), ``logits`` and ``gradient``.
  """
  if features.ndim != 2:
    raise ValueError(f"rsc_domainbed needs pooled features of shape (B, D), got features of shape {features.shape}")
  check_labels(features, labels, "features")
  check_fraction("feature_drop", feature_drop)
  check_fraction("batch_drop", batch_drop)
  logits, grad = class_score_gradient(classify_fn, features, labels)
  mask_f = drop_mask(grad, feature_drop)
  stopped = jax.lax.stop_gradient(features)
  change = true_class_probability(logits, labels) - true_class_probability(classify_fn(stopped * mask_f), labels)
  muted = select_top(change, batch_drop)
  mask = jax.lax.stop_gradient(jnp.where(muted[:, None], mask_f, 1.0))
  return mask, {"mask_f": mask_f, "chosen": muted, "change": change, "logits": logits, "gradient": grad}


def rsc_domainbed(*, feature_drop=1 / 3, batch_drop=1 / 3) -> Regularizer:
  """DomainBed's RSC on the pooled feature vector (the model is split at ``"pooled"``): :func:`rsc_domainbed_mask`
  times the features. Keeps no state; ``aux`` holds ``mask``, ``rsc_batch_masked_fraction`` and
  ``rsc_dropped_fraction``."""
  check_fraction("feature_drop", feature_drop)
  check_fraction("batch_drop", batch_drop)

  def regularizer(classify_fn, features, labels, key):
    del key
    mask, aux = rsc_domainbed_mask(classify_fn, features, labels, feature_drop=feature_drop, batch_drop=batch_drop)
    metrics = {"mask": mask, "rsc_batch_masked_fraction": jnp.mean(aux["chosen"]),
               "rsc_dropped_fraction": dropped_fraction(mask)}
    return (features * mask).astype(features.dtype), metrics

  return stateless(regularizer, split="pooled")
