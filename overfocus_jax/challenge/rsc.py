r"""RSC: representation self-challenging.

Huang, Wang, Xing, Huang, "Self-Challenging Improves Cross-Domain Generalization", ECCV 2020,
https://arxiv.org/abs/2007.02454.

**Official variant** (:func:`rsc_mask`, :func:`rsc`), on the last feature map
:math:`z \in \mathbb{R}^{B \times H \times W \times C}` (stopped copy, head in inference mode):

.. math::

    g = \frac{\partial \sum_b \psi_{y_b}(z_b)}{\partial z}, \qquad
    \bar g_{b,c} = \operatorname{mean}_{hw}\, g_{b,h,w,c}

    \text{spatial (prob. } p\text{)}: \; s_{b,hw} = \sum_c z_{b,hw,c}\, \bar g_{b,c}, \;
    k = \lceil HW/3 \rceil; \qquad
    \text{channel}: \; s_{b,c} = \bar g_{b,c}, \; k = \lceil C/3.2 \rceil; \qquad
    M_{b,u} = 1\big[s_{b,u} \le s_{b,(k+1)}\big]

    \Delta_b = \max\!\big(0,\; \mathrm{softmax}(\psi(z_b))_{y_b} - \mathrm{softmax}(\psi(z_b \odot M_b))_{y_b}
      - 10^{-4}\big)

with :math:`s_{b,(k+1)}` the :math:`(k+1)`-th largest score of the sample. Only samples whose :math:`\Delta_b`
exceeds :math:`\Delta` sorted in decreasing order at position :math:`\mathrm{round}(B \cdot \text{pecent})` keep
their mask (the most challenged); the others train unmasked. The loss is cross-entropy on :math:`\psi(z \odot M)`.
``pecent = 0.3 + 0.2 ⌊epoch / 10⌋``, or a fixed ``batch_percent``.

How it relates to the reference code, DeLightCMU/RSC ``Domain_Generalization/models/resnet.py``, ``ResNet.forward``
(commit 8295dc7): the gradient of ``sum(output * one_hot)`` in ``eval()`` mode (lines 75–99), the spatial score
(line 102), the coin ``random.randint(0, 9) <= 4`` as a Bernoulli(0.5) draw from the step's key (106–107), the
counts ``math.ceil(HW * 1 / 3.0)`` and ``math.ceil(num_channel * 1 / 3.2)`` (109, 117), the thresholds at index
``k`` of the scores sorted in decreasing order and the masks ``score > threshold`` (110–120), the clamped change
(140–141) and the batch threshold at ``int(round(float(num_rois) * self.pecent))`` with ``gt`` (142–146) are
followed exactly (``rule="reference"``, the default): where a tie crosses the threshold, fewer than :math:`k` units
are dropped, possibly none, as there; the batch position is computed in float64 with Python's rounding.
``rule="topk"`` drops exactly :math:`k` units instead, ties to the lower index. Where the reference has a limit,
this module does instead:

- line 111 expands the threshold to 49 positions (a 7×7 map): any map size works here;
- line 73 sets ``pecent`` to 1.1 from epoch 40, past the end of its sorted list (line 142): the curriculum stops
  at 0.9 (:data:`CURRICULUM_STAGES`), and a position that rounds to the batch size is read at its last entry;
- the curriculum counts the regularizer's own steps: stage :math:`\lfloor t / T \rfloor` with :math:`T` =
  ``curriculum_steps`` (10 epochs' worth in the CLI), the reference's ``epoch // 10``;
- :math:`k \ge N` (a 1×1 map in spatial mode), where line 110 would index past the list, drops every unit.

**DomainBed variant** (:func:`rsc_domainbed_mask`, :func:`rsc_domainbed`), on the pooled feature vector
:math:`f \in \mathbb{R}^{B \times D}`, following facebookresearch/DomainBed ``domainbed/algorithms.py``,
``RSC.update`` (lines 1099–1125 at commit 026d588): the gradient of ``(all_p * all_o).sum()`` (1099),
``mask_f = g < np.percentile(g, (1 − f)·100, axis=1)`` (1102–1105), the change in true-class probability without
clamp or offset (1111–1116), ``mask_b = Δ < np.percentile(Δ, (1 − b)·100)`` (1117–1118) and the mask
``mask_f OR mask_b`` (1119). ``rule="reference"`` (the default) computes the percentiles as NumPy does
(:func:`~overfocus_jax.challenge.masks.below_percentile`): on distinct scores it drops :math:`1 + \lfloor f(D -
1) \rfloor` features (at :math:`f = 0` still the largest) and mutes every sample tied at the batch percentile.
``rule="topk"`` drops exactly :math:`\lceil f D \rceil` features of the :math:`\lceil b B \rceil` most changed
samples, ties to the lower index. DomainBed's defaults are :math:`f = b = 1/3`, drawn from ``uniform(0, 0.5)`` in a
sweep (``hparams_registry.py``, lines 63–64).
"""

import jax
import jax.numpy as jnp

from overfocus_jax.challenge.attribution import check_labels, class_score_gradient
from overfocus_jax.challenge.base import Regularizer, stateless
from overfocus_jax.challenge.masks import (above_kth_mask, below_percentile, check_fraction, drop_mask,
                                           dropped_fraction, is_static, select_top, unit_count)

CHANGE_OFFSET = 1e-4  # the official code's margin before a drop in confidence counts
RULES = ("reference", "topk")  # the reference code's counts and ties | exactly ⌈f·N⌉, ties to the lower index
CURRICULUM_STAGES = 4  # 0.3, 0.5, 0.7, 0.9: the reference code's list would be indexed past its end at the fifth


def check_rule(rule: str) -> None:
  if rule not in RULES:
    raise ValueError(f"unknown rule={rule!r}; use one of {RULES}")


def curriculum_percent(stage: jax.Array) -> jax.Array:
  """The official schedule at curriculum stage ``stage`` (10 epochs each): 0.3, 0.5, 0.7, then 0.9 (kept below 1)."""
  return jnp.minimum(0.3 + 0.2 * stage, 0.9)


def official_percent(stage: int) -> float:
  """``pecent`` at the start of stage ``stage`` as the reference code computes it, in float64:
  ``3.0 / 10 + (epoch / interval) * 2.0 / 10`` with ``epoch = 10 · stage``, ``interval = 10``."""
  return 3.0 / 10 + float(stage) * 2.0 / 10


def selection_position(batch: int, percent):
  """``int(round(float(batch) * percent))`` — where the reference code reads its threshold in the sorted changes —
  kept inside the batch (it would index past its end for a percent that rounds to the batch). A Python ``percent``
  gives a Python int (float64, Python's round-half-to-even); a traced one an int32 (float32, ``jnp.round``)."""
  if is_static(percent):
    return min(int(round(float(batch) * percent)), batch - 1)
  return jnp.minimum(jnp.round(batch * jnp.asarray(percent, jnp.float32)).astype(jnp.int32), batch - 1)


def true_class_probability(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]


def unit_drop_mask(scores: jax.Array, fraction, rule: str) -> jax.Array:
  """(B, N): the reference rule (:func:`~overfocus_jax.challenge.masks.above_kth_mask` with k = ⌈f·N⌉: the entries
  strictly above the (k + 1)-th largest) or exactly ⌈f·N⌉ (``topk``)."""
  if rule == "topk":
    return drop_mask(scores, fraction)
  return above_kth_mask(scores, unit_count(fraction, scores.shape[-1]))


def spatial_mask(z: jax.Array, grad: jax.Array, fraction, rule: str = "reference") -> jax.Array:
  """(B, H, W, 1): drops the positions with the largest Σ_c z · mean_hw(grad)."""
  batch, height, width, _ = z.shape
  scores = jnp.sum(z * jnp.mean(grad, axis=(1, 2), keepdims=True), axis=-1).reshape(batch, -1)
  return unit_drop_mask(scores, fraction, rule).reshape(batch, height, width, 1)


def channel_mask(grad: jax.Array, fraction, rule: str = "reference") -> jax.Array:
  """(B, 1, 1, C): drops the channels with the largest mean_hw(grad)."""
  batch, _, _, channels = grad.shape
  return unit_drop_mask(jnp.mean(grad, axis=(1, 2)), fraction, rule).reshape(batch, 1, 1, channels)


def confidence_change(p_before: jax.Array, p_after: jax.Array) -> jax.Array:
  """Δ = max(0, p_before − p_after − 10⁻⁴), as the reference code clamps it (``torch.where(Δ > 0, Δ, 0)``)."""
  change = p_before - p_after - CHANGE_OFFSET
  return jnp.where(change > 0, change, 0.0)


def most_challenged(change: jax.Array, position) -> jax.Array:
  """bool (B,): the samples whose change exceeds the one at ``position`` of the changes sorted in decreasing order
  (:func:`selection_position`), as the reference code selects them."""
  threshold = jnp.sort(change)[::-1][position]
  return change > threshold


def check_rsc_arguments(spatial_fraction, channel_fraction, spatial_probability, batch_percent) -> None:
  check_fraction("spatial_fraction", spatial_fraction)
  check_fraction("channel_fraction", channel_fraction)
  check_fraction("spatial_probability", spatial_probability, high_open=False)
  if batch_percent is not None:
    check_fraction("batch_percent", batch_percent)


def rsc_mask(classify_fn, z: jax.Array, labels: jax.Array, key: jax.Array, *, spatial_fraction=1 / 3,
             channel_fraction=1 / 3.2, spatial_probability=0.5, batch_percent=0.3, rule: str = "reference",
             position=None) -> tuple[jax.Array, dict]:
  r"""The 0/1 mask the official RSC multiplies ``z`` (B, H, W, C) by, and what it was made from.

  ``key`` flips the step's coin: spatial with probability ``spatial_probability``, else channels. Only the
  ``batch_percent`` most challenged samples keep their mask (see :mod:`overfocus_jax.challenge.rsc`); ``position``
  (a Python or traced int) overrides where the threshold is read in the sorted changes (the curriculum passes the
  reference code's own). ``rule``: ``"reference"`` (the reference code's ties) or ``"topk"`` (exactly ⌈f·N⌉). Every
  number may be traced.

  Returns:
    ``(mask, aux)``: ``mask`` (B, H, W, C), 0/1; ``aux`` holds ``spatial`` (bool scalar: the coin), ``chosen`` (B,)
    bool (the samples masked), ``change`` (B,) (:math:`\Delta`, clamped, before the selection), ``logits`` and
    ``gradient`` (:math:`g`).
  """
  if z.ndim != 4:
    raise ValueError(f"rsc needs z of shape (B, H, W, C), got z of shape {z.shape}")
  check_labels(z, labels)
  check_rsc_arguments(spatial_fraction, channel_fraction, spatial_probability, batch_percent)
  check_rule(rule)
  logits, grad = class_score_gradient(classify_fn, z, labels)
  z_stopped = jax.lax.stop_gradient(z)
  use_spatial = jax.random.bernoulli(key, spatial_probability)
  # lax.cond runs only the branch the coin picked: one mask per step (positions or channels), not both.
  mask = jax.lax.cond(use_spatial, lambda: spatial_mask(z_stopped, grad, spatial_fraction, rule) * jnp.ones_like(z),
                      lambda: channel_mask(grad, channel_fraction, rule) * jnp.ones_like(z))
  p_before = true_class_probability(logits, labels)
  change = confidence_change(p_before, true_class_probability(classify_fn(z_stopped * mask), labels))
  position = selection_position(z.shape[0], batch_percent) if position is None else position
  chosen = most_challenged(change, position)
  mask = jax.lax.stop_gradient(jnp.where(chosen[:, None, None, None], mask, 1.0))
  aux = {"spatial": use_spatial, "chosen": chosen, "change": change, "logits": logits, "gradient": grad}
  return mask, aux


def rsc(*, spatial_fraction=1 / 3, channel_fraction=1 / 3.2, spatial_probability=0.5, batch_percent=None,
        curriculum_steps: int | None = None, rule: str = "reference") -> Regularizer:
  """The official RSC regularizer: :func:`rsc_mask` times ``z``.

  Args:
    spatial_fraction, channel_fraction, spatial_probability: as in :func:`rsc_mask` (may be traced).
    batch_percent: a fixed share of the batch masked; None follows the official curriculum.
    curriculum_steps: the curriculum's stage length in steps (the official: 10 epochs), needed when
      ``batch_percent`` is None.
    rule: ``"reference"`` (the reference code's thresholds and ties) or ``"topk"`` (exactly ⌈f·N⌉ units).

  The state is ``{"count": int32}``. ``aux`` holds ``mask`` and the scalar metrics ``rsc_spatial``,
  ``rsc_batch_masked_fraction``, ``rsc_dropped_fraction`` and ``rsc_percent``.
  """
  check_rsc_arguments(spatial_fraction, channel_fraction, spatial_probability, batch_percent)
  check_rule(rule)
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
    if batch_percent is None:  # the reference code's percent and position at each stage, looked up by the count
      stage = jnp.minimum(count // int(curriculum_steps), CURRICULUM_STAGES - 1)
      percents = [official_percent(s) for s in range(CURRICULUM_STAGES)]
      percent = jnp.asarray(percents, jnp.float32)[stage]
      position = jnp.asarray([selection_position(z.shape[0], p) for p in percents], jnp.int32)[stage]
    else:
      percent, position = batch_percent, None
    mask, aux = rsc_mask(classify_fn, z, labels, key, spatial_fraction=spatial_fraction,
                         channel_fraction=channel_fraction, spatial_probability=spatial_probability,
                         batch_percent=percent, rule=rule, position=position)
    metrics = {"mask": mask, "rsc_spatial": aux["spatial"].astype(jnp.float32),
               "rsc_batch_masked_fraction": jnp.mean(aux["chosen"]), "rsc_dropped_fraction": dropped_fraction(mask),
               "rsc_percent": jnp.asarray(percent, jnp.float32)}
    return (z * mask).astype(z.dtype), {"count": count + 1}, metrics

  return Regularizer(init=init, apply=apply)


def rsc_domainbed_mask(classify_fn, features: jax.Array, labels: jax.Array, *, feature_drop=1 / 3,
                       batch_drop=1 / 3, rule: str = "reference") -> tuple[jax.Array, dict]:
  """The 0/1 mask DomainBed's RSC multiplies the pooled features (B, D) by, and what it was made from.

  ``rule="reference"``: DomainBed's percentiles (``mask_f = g < percentile(g, (1 − f)·100)`` per sample, ``mask_b =
  Δ < percentile(Δ, (1 − b)·100)``, the mask ``mask_f OR mask_b``); ``"topk"``: exactly ⌈f·D⌉ features of the
  ⌈b·B⌉ most changed samples, ties to the lower index.

  Returns:
    ``(mask, aux)``: ``mask`` (B, D); ``aux`` holds ``mask_f`` (B, D) (the per-sample feature mask), ``chosen`` (B,)
    bool (the samples muted), ``change`` (B,), ``logits`` and ``gradient``.
  """
  if features.ndim != 2:
    raise ValueError(f"rsc_domainbed needs pooled features of shape (B, D), got features of shape {features.shape}")
  check_labels(features, labels, "features")
  check_fraction("feature_drop", feature_drop)
  check_fraction("batch_drop", batch_drop)
  check_rule(rule)
  logits, grad = class_score_gradient(classify_fn, features, labels)
  if rule == "topk":
    mask_f = drop_mask(grad, feature_drop)
  else:
    mask_f = below_percentile(grad, (1 - feature_drop) * 100).astype(grad.dtype)
  stopped = jax.lax.stop_gradient(features)
  change = true_class_probability(logits, labels) - true_class_probability(classify_fn(stopped * mask_f), labels)
  if rule == "topk":
    muted = select_top(change, batch_drop)
  else:
    muted = ~below_percentile(change[None, :], (1 - batch_drop) * 100)[0]
  mask = jax.lax.stop_gradient(jnp.where(muted[:, None], mask_f, 1.0))
  return mask, {"mask_f": mask_f, "chosen": muted, "change": change, "logits": logits, "gradient": grad}


def rsc_domainbed(*, feature_drop=1 / 3, batch_drop=1 / 3, rule: str = "reference") -> Regularizer:
  """DomainBed's RSC on the pooled feature vector (the model is split at ``"pooled"``): :func:`rsc_domainbed_mask`
  times the features. Keeps no state; ``aux`` holds ``mask``, ``rsc_batch_masked_fraction`` and
  ``rsc_dropped_fraction``."""
  check_fraction("feature_drop", feature_drop)
  check_fraction("batch_drop", batch_drop)
  check_rule(rule)

  def regularizer(classify_fn, features, labels, key):
    del key
    mask, aux = rsc_domainbed_mask(classify_fn, features, labels, feature_drop=feature_drop, batch_drop=batch_drop,
                                   rule=rule)
    metrics = {"mask": mask, "rsc_batch_masked_fraction": jnp.mean(aux["chosen"]),
               "rsc_dropped_fraction": dropped_fraction(mask)}
    return (features * mask).astype(features.dtype), metrics

  return stateless(regularizer, split="pooled")
