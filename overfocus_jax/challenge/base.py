r"""The regularizer interface: an optax-style pair of pure functions that challenge the head on its latent map.

.. math::

    s_0 = \mathrm{init}(\theta_0), \qquad
    (\tilde z_t,\; s_{t+1},\; \mathrm{aux}_t) = \mathrm{apply}(s_t,\; \psi_{\theta_t},\; z_t,\; y_t,\; k_t),
    \qquad \mathcal L_t = \mathrm{CE}(\psi(\tilde z_t), y_t)

``init(variables) -> state`` makes the regularizer's own state from the model's initial variables: a step
``count`` that its schedules read (like optax's), an EMA teacher's variables; ``()`` when it keeps none.
``apply(state, classify_fn, z, labels, key) -> (z̃, new_state, aux)`` runs inside the user's jitted step:

- ``classify_fn(z) -> logits`` is the head in inference mode; ``jax.vjp`` through it is the one extra backward pass
  SGDrop and RSC need. Gradients reach the encoder through ``z̃ = z ⊙ M``; none flow through the mask ``M``.
- ``key`` is this step's PRNG key for the regularizer's random choices.
- ``aux["mask"]`` is the 0/1 mask it multiplied ``z`` by (broadcastable to ``z``); every other entry of ``aux`` is a
  scalar metric.
- A regularizer with ``needs_teacher`` (SGDrop with an EMA teacher) also takes ``teacher=TeacherInputs(...)``: the
  online variables the teacher follows, the batch's images, and how to run the network on other variables. Calling
  it without them is a ``ValueError`` when the step is traced.

``split`` says where the model is cut: ``"latent"`` (the last feature map ``(B, H, W, C)``) or ``"pooled"`` (the
pooled feature vector ``(B, D)``). :func:`chain` composes regularizers left to right, like ``optax.chain``;
:func:`stateless` lifts a plain ``fn(classify_fn, z, labels, key) -> (z̃, aux)`` into a :class:`Regularizer`.
"""

from typing import Any, Callable, NamedTuple

import jax

ClassifyFn = Callable[[jax.Array], jax.Array]
Variables = Any
SPLITS = ("latent", "pooled")


class TeacherInputs(NamedTuple):
  """What an EMA teacher needs from the step: the online ``variables`` it follows (gradients stopped), the
  ``images`` the latent map came from, and how to run the network with other variables, in inference mode:
  ``encode(variables, images) -> z`` and ``classify(variables, z) -> logits``."""

  variables: Variables
  images: jax.Array
  encode: Callable[[Variables, jax.Array], jax.Array]
  classify: Callable[[Variables, jax.Array], jax.Array]


InitFn = Callable[[Variables], Any]
ApplyFn = Callable[..., tuple[jax.Array, Any, dict[str, jax.Array]]]


class Regularizer(NamedTuple):
  """``init(variables) -> state`` and ``apply(state, classify_fn, z, labels, key[, teacher=]) -> (z̃, state, aux)``
  (see :mod:`overfocus_jax.challenge.base`)."""

  init: InitFn
  apply: ApplyFn
  split: str = "latent"
  needs_teacher: bool = False


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown {split=}; use one of {SPLITS}")


def stateless(fn: Callable[..., tuple[jax.Array, dict]], *, split: str = "latent") -> Regularizer:
  """A :class:`Regularizer` from ``fn(classify_fn, z, labels, key) -> (z̃, aux)`` that keeps no state."""
  check_split(split)

  def apply(state, classify_fn, z, labels, key):
    z, aux = fn(classify_fn, z, labels, key)
    return z, state, aux

  return Regularizer(init=lambda variables: (), apply=apply, split=split)


def _identity(classify_fn, z, labels, key):
  del classify_fn, labels, key
  return z, {}


NONE = stateless(_identity)  # ERM: the latent map goes to the head unchanged


def identity() -> Regularizer:
  """The regularizer that leaves the latent map as it is (ERM), like ``optax.identity``."""
  return NONE


def apply_regularizer(regularizer: Regularizer, state, classify_fn, z, labels, key, teacher: TeacherInputs | None):
  """``regularizer.apply``, given ``teacher`` only when it needs one (a regularizer that does not may not take it)."""
  if regularizer.needs_teacher:
    return regularizer.apply(state, classify_fn, z, labels, key, teacher=teacher)
  return regularizer.apply(state, classify_fn, z, labels, key)


def chain(*regularizers: Regularizer) -> Regularizer:
  """Applies ``regularizers`` left to right, each to the previous one's output; states are a tuple, metrics merged.

  Each gets its own PRNG key (split from the step's). All must work at the same split point. ``aux["mask"]`` is the
  product of the members' masks when every member reports one.
  """
  if not regularizers:
    return NONE
  splits = {r.split for r in regularizers}
  if len(splits) > 1:
    raise ValueError(f"chained regularizers work at different split points {sorted(splits)}; chain ones that "
                     "share one")
  needs_teacher = any(r.needs_teacher for r in regularizers)

  def init(variables):
    return tuple(r.init(variables) for r in regularizers)

  def apply(states, classify_fn, z, labels, key, teacher: TeacherInputs | None = None):
    new_states, aux, masks = [], {}, []
    for regularizer, state, sub_key in zip(regularizers, states, jax.random.split(key, len(regularizers))):
      z, state, more = apply_regularizer(regularizer, state, classify_fn, z, labels, sub_key, teacher)
      new_states.append(state)
      more = dict(more)
      masks.append(more.pop("mask", None))
      aux.update(more)
    if all(m is not None for m in masks):
      product = masks[0]
      for m in masks[1:]:
        product = product * m
      aux["mask"] = product
    return z, tuple(new_states), aux

  if needs_teacher:
    return Regularizer(init=init, apply=apply, split=regularizers[0].split, needs_teacher=True)
  return Regularizer(init=init, apply=lambda states, classify_fn, z, labels, key: apply(states, classify_fn, z,
                                                                                         labels, key),
                     split=regularizers[0].split)

