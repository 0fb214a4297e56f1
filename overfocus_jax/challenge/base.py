r"""The regularizer interface: an optax-style pair of pure functions that challenge the head on its latent map.

.. math::

    s_0 = \mathrm{init}(\theta_0), \qquad
    (\tilde z_t,\; s_{t+1},\; m_t) = \mathrm{apply}(s_t,\; \psi_{\theta_t},\; z_t,\; y_t,\; k_t,\; \mathrm{info}_t),
    \qquad \mathcal L_t = \mathrm{CE}(\psi(\tilde z_t), y_t)

``init(variables) -> state`` makes the regularizer's own state (an EMA teacher, counters; ``()`` when it keeps
none) from the model's initial variables. ``apply(state, classify_fn, z, labels, key, info) -> (z̃, new_state,
metrics)`` runs inside the jitted train step: ``classify_fn(z) -> logits`` is the head in inference mode with
stopped gradients, so ``jax.vjp`` through it is the one extra backward pass SGDrop and RSC need; ``key`` is this
step's PRNG key; ``info`` is a :class:`StepInfo`. ``split`` says where the model is cut: ``"latent"`` (the last
feature map ``(B, H, W, C)``) or ``"pooled"`` (the pooled feature vector ``(B, D)``).

The train step stores ``state`` in the train state, so it is checkpointed and restored with everything else.
:func:`chain` composes regularizers left to right, like ``optax.chain``; :func:`stateless` lifts a plain
``fn(classify_fn, z, labels, key, info) -> (z̃, metrics)`` into a :class:`Regularizer`.
"""

from typing import Any, Callable, NamedTuple

import jax

ClassifyFn = Callable[[jax.Array], jax.Array]
Variables = Any
SPLITS = ("latent", "pooled")


class StepInfo(NamedTuple):
  """What a regularizer may know about the step besides ``z`` and the labels (a typed structure, not a dict).

  ``images``, ``variables``, ``encode`` and ``classify`` let a regularizer run the model itself with other
  variables (SGDrop's EMA teacher: ``encode(teacher_variables, images)``); they are ``None`` outside a train step.
  """

  step: jax.Array | int = 0        # optimizer steps taken before this one
  epoch: jax.Array | int = 0       # step // steps_per_epoch
  steps_per_epoch: int = 1         # a Python int (static): turns schedules in epochs into steps
  images: jax.Array | None = None  # the (augmented) batch z was computed from
  variables: Variables = None      # the online variables at the start of the step, gradients stopped
  encode: Callable[[Variables, jax.Array], jax.Array] | None = None    # (variables, x) -> z, inference mode
  classify: Callable[[Variables, jax.Array], jax.Array] | None = None  # (variables, z) -> logits, inference mode


InitFn = Callable[[Variables], Any]
ApplyFn = Callable[[Any, ClassifyFn, jax.Array, jax.Array, jax.Array, StepInfo],
                   tuple[jax.Array, Any, dict[str, jax.Array]]]


class Regularizer(NamedTuple):
  """``init(variables) -> state`` and ``apply(state, classify_fn, z, labels, key, info) -> (z̃, state, metrics)``."""

  init: InitFn
  apply: ApplyFn
  split: str = "latent"


def stateless(fn: Callable[..., tuple[jax.Array, dict]], *, split: str = "latent") -> Regularizer:
  """A :class:`Regularizer` from ``fn(classify_fn, z, labels, key, info) -> (z̃, metrics)`` that keeps no state."""
  if split not in SPLITS:
    raise ValueError(f"unknown {split=}; use one of {SPLITS}")

  def apply(state, classify_fn, z, labels, key, info):
    z, metrics = fn(classify_fn, z, labels, key, info)
    return z, state, metrics

  return Regularizer(init=lambda variables: (), apply=apply, split=split)


def _identity(classify_fn, z, labels, key, info):
  del classify_fn, labels, key, info
  return z, {}


NONE = stateless(_identity)  # ERM: the latent map goes to the head unchanged


def chain(*regularizers: Regularizer) -> Regularizer:
  """Applies ``regularizers`` left to right, each to the previous one's output; states are a tuple, metrics merged.

  Each gets its own PRNG key (split from the step's). All must work at the same split point.
  """
  if not regularizers:
    return NONE
  splits = {r.split for r in regularizers}
  if len(splits) > 1:
    raise ValueError(f"chained regularizers work at different split points {sorted(splits)}; chain ones that "
                     "share one")

  def init(variables):
    return tuple(r.init(variables) for r in regularizers)

  def apply(states, classify_fn, z, labels, key, info):
    new_states, metrics = [], {}
    for regularizer, state, sub_key in zip(regularizers, states, jax.random.split(key, len(regularizers))):
      z, state, more = regularizer.apply(state, classify_fn, z, labels, sub_key, info)
      new_states.append(state)
      metrics.update(more)
    return z, tuple(new_states), metrics

  return Regularizer(init=init, apply=apply, split=regularizers[0].split)
