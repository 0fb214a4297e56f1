r"""SGDrop: saliency-guided dropout on the latent map.

Bertoin, Sanchez, Zouitine, Rachelson, "The Overfocusing Bias of Convolutional Neural Networks: A Saliency-Guided
Regularization Approach", 2024, https://arxiv.org/abs/2409.17370 (Fig. 2).

.. math::

    A(z, c) = \operatorname{ReLU}\!\Big(\frac{\partial \psi_c(z)}{\partial z} \odot z\Big), \qquad
    M = 1[A \le q_\rho(A)], \qquad
    \tilde z = z \odot M \;\big(\cdot \tfrac{1}{1-\rho} \text{ if rescaled}\big), \qquad
    \mathcal L = \mathrm{CE}(\psi(\tilde z), y)

with :math:`q_\rho` the upper :math:`\rho`-quantile per sample: exactly :math:`\lceil \rho N \rceil` of the
:math:`N` units are dropped (``rule="quantile"``, :mod:`overfocus_jax.challenge.masks`). ``rule="mass"`` drops
instead the fewest most-attributed units that hold a share :math:`m` of the sample's positive attribution, at most
:math:`\lceil \rho N \rceil` of them (:func:`overfocus_jax.challenge.masks.mass_drop_mask`): on a trained CNN a few
units carry almost all of the evidence, so a fixed share of *units* can remove all of it, and how many that is
depends on the latent shape and the network.

``ramp_epochs = r > 0`` grows the drop linearly from nothing over the first :math:`r` epochs: at step :math:`t` the
quantile rule drops :math:`\lceil s_t \lceil \rho N \rceil \rceil` units and the mass rule a share :math:`s_t m`,
with :math:`s_t = \min(1, (t + 1) / (r \cdot \text{steps per epoch}))` — an untrained network's evidence is
spread thin, and taking half of it away before it has learned anything stops it from learning. Units are single
elements of ``z``, spatial positions (attribution summed over channels) or channels (summed over positions). No
gradient flows through ``M``.

**The library's default departs from the paper.** The paper's rule at its setting (``rule="quantile"``, ρ = 0.1 of
the elements, every sample) removes all of the class evidence on most of the shipped models: its masked samples
train below chance in epoch 1 (3.4% on the default model, 6.2% on ``attention``, 3.8% on ``focus``, 3.9% on
``corner``; chance is 10%), the default model ends at 60.6% where ERM reaches 97.6%, and ``focus`` and ``corner``
never learn (8.5%). The default is instead ``rule="mass"``, ``mass=0.5``, ``rate=0.5`` (the cap),
``granularity="spatial"``, ``batch_fraction=0.5``, ``ramp_epochs=1``: drop the fewest *positions* holding half of
the sample's attribution (at most half of them, never all), on a random half of each batch, the share growing from
nothing over the first epoch. Each part was measured (experiments/README.md, "SGDrop's defaults", commands beside
every number):

- the mass rule follows how concentrated the evidence is, where a share of units follows the latent's shape;
- positions, not elements: a shortcut sits at a place, and dropping a position removes it from every channel;
- half of each batch stays whole, so the network always sees the full evidence of some samples and cannot collapse
  (RSC masks part of the batch for the same reason);
- the ramp keeps the masked samples above chance in the first epoch, when an untrained network's few right answers
  rest on the units the mask takes.

On the six configs it was chosen on, and on vgg16, convnext and mnist_cnn (its ColoredMNIST and plain digits; shipped
later), its final test accuracy is within a point of ERM's (3 seeds; convnext, whose recipe already regularizes hard,
and mnist_cnn on plain digits are the closest, at 0.8 below). With the shortcut config it gains 11 points over ERM on
decorrelated test images with the planted patch (the paper's rule 7) and 12 with a class glyph in a random corner, a
kind added after the default was chosen (the paper's rule 7); with the default config it is within a point of ERM on
both (+0.7, −0.4; 5 seeds). It does **not** help against a colour cue (a feature of every stroke pixel, hence of every
latent position): in the shortcut config's 6 epochs no SGDrop variant nor RSC beats ERM there; trained 5× longer, the
paper's element rule gains 6 points and with its EMA teacher 12, where the default's positions gain 1
(experiments/README.md, "The paper's EMA teacher on longer runs"); that design, though, starves the glimpse models
(``focus`` 42.7%, ``corner`` 26.1%, one seed).
``sgdrop(rule="quantile", rate=0.1, granularity="element", batch_fraction=1, ramp_epochs=0)`` is the paper's rule,
exactly as before.

In the paper the attribution comes from an EMA copy :math:`(\phi', \psi')` of the network,
:math:`A_{\psi'}(\phi'(x), c)`, and the mask multiplies the online :math:`z`. With ``ema_decay=d`` that teacher is
SGDrop's own state: ``init`` copies the initial variables, and each step first moves it toward the online
variables :math:`\theta_t` the step starts from, :math:`\theta' \leftarrow d\,\theta' + (1 - d)\,\theta_t`
(parameters and batch statistics, ``optax.incremental_update``), then attributes with it. Without a decay the
online head and ``z`` are used and the state is empty.
"""

import jax
import jax.numpy as jnp
import optax

from overfocus_jax.challenge.attribution import TARGETS, gradient_times_activation
from overfocus_jax.challenge.base import Regularizer, StepInfo
from overfocus_jax.challenge.masks import (drop_count, drop_mask, dropped_fraction, mass_drop_mask, ramped_drop_mask,
                                           top_k_select)

GRANULARITIES = ("element", "spatial", "channel")
RULES = ("quantile", "mass")


def unit_scores(attribution: jax.Array, granularity: str) -> tuple[jax.Array, tuple[int, ...]]:
  """``(scores (B, N), mask_shape)``: one score per unit — an element, a position (summed over channels) or a
  channel (summed over positions) — and the shape that broadcasts a (B, N) mask back onto ``attribution``."""
  batch = attribution.shape[0]
  if granularity == "element":
    return attribution.reshape(batch, -1), attribution.shape
  if attribution.ndim != 4:
    raise ValueError(f"{granularity=} needs a (B, H, W, C) latent map, got shape {attribution.shape}")
  _, height, width, channels = attribution.shape
  if granularity == "spatial":
    return jnp.sum(attribution, axis=-1).reshape(batch, -1), (batch, height, width, 1)
  if granularity == "channel":
    return jnp.sum(attribution, axis=(1, 2)), (batch, 1, 1, channels)
  raise ValueError(f"unknown {granularity=}; use one of {GRANULARITIES}")


def saliency_mask(attribution: jax.Array, rate: float, granularity: str, *, rule: str = "quantile",
                  mass: float = 0.5, scale: jax.Array | None = None) -> jax.Array:
  """0/1 mask, broadcastable to ``attribution`` (B, H, W, C): per sample, the top ⌈ρN⌉ units (``quantile``) or the
  fewest top units holding a share ``mass`` of the attribution, at most ⌈ρN⌉ (``mass``); ``scale`` (a ramp's
  value in [0, 1], None: 1) shrinks the count or the share."""
  scores, shape = unit_scores(attribution, granularity)
  if rule == "quantile":
    mask = drop_mask(scores, rate) if scale is None else ramped_drop_mask(scores, rate, scale)
    return mask.reshape(shape)
  if rule == "mass":
    return mass_drop_mask(scores, mass if scale is None else scale * mass, rate).reshape(shape)
  raise ValueError(f"unknown SGDrop {rule=}; use one of {RULES}")


def ramp_scale(info: StepInfo, ramp_epochs: float) -> jax.Array | None:
  """s_t = min(1, (t + 1) / (ramp_epochs · steps_per_epoch)); None without a ramp (exactly the unramped masks)."""
  if not ramp_epochs:
    return None
  ramp_steps = ramp_epochs * info.steps_per_epoch
  return jnp.minimum(1.0, (jnp.asarray(info.step, jnp.float32) + 1.0) / ramp_steps)


def kept_scale(mask: jax.Array, rescale: bool) -> jax.Array:
  """Per sample, N / (units kept) when rescaling (the mass rule drops a different count in each sample), else 1."""
  if not rescale:
    return jnp.ones((mask.shape[0],) + (1,) * (mask.ndim - 1), mask.dtype)
  kept = jnp.sum(mask, axis=tuple(range(1, mask.ndim)), keepdims=True)
  units = mask[0].size
  return units / jnp.maximum(kept, 1.0)


def choose_samples(key: jax.Array, batch: int, fraction: float) -> jax.Array:
  """Exactly ⌈fraction·B⌉ samples, chosen uniformly at random (all of them when fraction is 1)."""
  if fraction >= 1:
    return jnp.ones((batch,), bool)
  return top_k_select(jax.random.uniform(key, (batch,)), drop_count(fraction, batch))


def init_teacher(variables):
  """The EMA teacher's starting point: a copy of the model's variables."""
  return {"ema": jax.tree.map(jnp.copy, variables)}


def update_teacher(teacher_variables, online_variables, decay: float):
  """θ' ← decay·θ' + (1 − decay)·θ, leaf by leaf (parameters and batch statistics)."""
  return optax.incremental_update(online_variables, teacher_variables, step_size=1.0 - decay)


def sgdrop(*, rule: str = "mass", mass: float = 0.5, rate: float = 0.5, granularity: str = "spatial",
           batch_fraction: float = 0.5, target: str = "true", rescale: bool = False, ema_decay: float | None = None,
           ramp_epochs: float = 1.0) -> Regularizer:
  """The SGDrop regularizer (see the module docstring); ``ema_decay`` in (0, 1) attributes with an EMA teacher.

  The defaults are the library's (the config's): the mass rule, half of the attribution, at most half of the
  positions, on half of each batch, ramped in over the first epoch. ``sgdrop(rule="quantile", rate=0.1,
  granularity="element", batch_fraction=1, ramp_epochs=0)`` is the paper's setting.

  ``rule="quantile"`` (the paper's) drops ⌈ρN⌉ units per sample; ``rule="mass"`` the fewest units holding a share
  ``mass`` of the positive attribution, at most min(⌈ρN⌉, N − 1) (``rate`` is then the cap, in (0, 1)).
  ``ramp_epochs > 0`` grows the drop from nothing over that many epochs. ``rescale`` multiplies the kept units by
  1/(1 − ρ) under the unramped quantile rule (the paper's), and otherwise by N / kept, per sample.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> w = jnp.arange(4.0)                                       # a linear head: logit_c = Σ z · w_c
    >>> classify_fn = lambda z: jnp.stack([-(z.reshape(1, -1) @ w), z.reshape(1, -1) @ w], -1)[..., 0]
    >>> z = jnp.ones((1, 1, 1, 4))
    >>> reg = sgdrop(rule="quantile", rate=0.25, granularity="element", batch_fraction=1.0)  # the paper's rule
    >>> z_masked, state, metrics = reg.apply(reg.init({}), classify_fn, z, jnp.array([1]), jax.random.PRNGKey(0),
    ...                                      StepInfo())
    >>> z_masked.ravel().tolist()                                 # the most salient unit (w = 3) is dropped
    [1.0, 1.0, 1.0, 0.0]
  """
  if not 0 <= rate < 1:
    raise ValueError(f"SGDrop rate must be in [0, 1), got {rate=}")
  if granularity not in GRANULARITIES:
    raise ValueError(f"unknown {granularity=}; use one of {GRANULARITIES}")
  if target not in TARGETS:
    raise ValueError(f"unknown {target=}; use one of {TARGETS}")
  if not 0 < batch_fraction <= 1:
    raise ValueError(f"batch_fraction must be in (0, 1], got {batch_fraction=}")
  if rule not in RULES:
    raise ValueError(f"unknown SGDrop {rule=}; use one of {RULES}")
  if rule == "mass" and not (0 < mass <= 1 and 0 < rate < 1):
    raise ValueError(f"the mass rule needs mass in (0, 1] and rate (its cap) in (0, 1), got {mass=}, {rate=}")
  if not ramp_epochs >= 0:
    raise ValueError(f"SGDrop ramp_epochs must be >= 0, got {ramp_epochs=}")
  if ema_decay is not None and not 0 < ema_decay < 1:
    raise ValueError(f"SGDrop ema_decay must be in (0, 1) or None, got {ema_decay=}")
  rescale_factor = 1.0 / (1.0 - rate) if rescale else 1.0

  def init(variables):
    return init_teacher(variables) if ema_decay is not None else ()

  def apply(state, classify_fn, z, labels, key, info: StepInfo):
    if ema_decay is None:
      attribution = gradient_times_activation(classify_fn, z, labels, target)
    else:
      if info.encode is None or info.classify is None or info.variables is None or info.images is None:
        raise ValueError("SGDrop's EMA teacher needs the step's images, variables, encode and classify in info")
      teacher = update_teacher(state["ema"], info.variables, ema_decay)
      state = {"ema": teacher}
      attribution = gradient_times_activation(lambda latent: info.classify(teacher, latent),
                                              info.encode(teacher, info.images), labels, target)
    mask = saliency_mask(attribution, rate, granularity, rule=rule, mass=mass, scale=ramp_scale(info, ramp_epochs))
    chosen = choose_samples(key, z.shape[0], batch_fraction).reshape((-1,) + (1,) * (z.ndim - 1))
    fixed_count = rule == "quantile" and not ramp_epochs  # then every sample drops ⌈ρN⌉: today's 1/(1-ρ) rescale
    multiplier = jnp.where(chosen, mask * (rescale_factor if fixed_count else kept_scale(mask, rescale)), 1.0)
    dropped = jnp.where(chosen, mask, 1.0) * jnp.ones_like(z)
    metrics = {"sgdrop_dropped_fraction": dropped_fraction(dropped),
               "sgdrop_batch_fraction": jnp.mean(chosen.astype(jnp.float32))}
    return (z * jax.lax.stop_gradient(multiplier)).astype(z.dtype), state, metrics

  return Regularizer(init=init, apply=apply)
