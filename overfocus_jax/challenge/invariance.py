r"""Objectives over environments: ERM, IRM and V-REx — how the per-example losses of an environment-balanced batch
become the one loss the train step differentiates.

A batch of ``E`` training environments holds ``b`` examples of each, environment ``e`` in rows ``[e·b, (e+1)·b)``
(:mod:`overfocus_jax.data.balanced`). With :math:`R_e` the mean cross-entropy of environment ``e``'s rows:

.. math::

    \text{ERM:}\quad \mathcal L = \tfrac1E \textstyle\sum_e R_e \quad(\text{the batch mean})

    \text{IRM (IRMv1):}\quad \mathcal L = \tfrac1E \textstyle\sum_e R_e
        + \lambda_t\, \tfrac1E \sum_e \frac{\partial R_e^{\text{even}}(s)}{\partial s}\Big|_{s=1}
                                      \frac{\partial R_e^{\text{odd}}(s)}{\partial s}\Big|_{s=1}

    \text{V-REx:}\quad \mathcal L = \bar R + \lambda_t\, \tfrac1E \textstyle\sum_e (R_e - \bar R)^2,
        \qquad \bar R = \tfrac1E \sum_e R_e

where :math:`R_e^{\text{even}}(s)` is the mean cross-entropy of the logits scaled by ``s`` on the environment's
even rows (``[::2]``), :math:`R_e^{\text{odd}}` on its odd rows — the unbiased estimate of
:math:`\lVert\nabla_s R_e\rVert^2` of Arjovsky et al., "Invariant Risk Minimization" (2019), as DomainBed computes
it — and V-REx is Krueger et al., "Out-of-Distribution Generalization via Risk Extrapolation" (ICML 2021).
:math:`\lambda_t = \lambda` from step ``anneal_steps`` on, 1 before it; at step ``anneal_steps`` the optimizer's
state starts afresh, because Adam's moments do not fit the jump in gradient size (DomainBed resets Adam there).
Both follow facebookresearch/DomainBed ``domainbed/algorithms.py`` (``IRM``, ``VREx``) and its defaults
(``hparams_registry.py``: IRM λ = 100, V-REx λ = 10, both annealed over 500 steps).

An :class:`Objective` is a pure function ``loss(per_example_losses, logits, labels, step) -> (loss, metrics)`` plus
``reset_optimizer_at``; the train step calls it where it took the batch mean, so the regularizers on ``z`` (SGDrop,
RSC) compose with any objective. The derivative in ``s`` is a forward-mode ``jax.jvp`` through the loss of the
logits alone, so the network is differentiated once, in reverse mode, as for ERM.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class Objective(NamedTuple):
  """``loss(per_example_losses (B,), logits (B, K), labels (B,), step) -> (scalar loss, metrics)``.

  ``environments``: how many environments the batch holds, each in its own block of equal rows (0: the objective
  needs none). ``reset_optimizer_at``: the step at which the optimizer's state is re-initialised (None: never).
  """

  loss: LossFn
  environments: int = 0
  reset_optimizer_at: int | None = None
  name: str = "erm"


def _batch_mean(losses, logits, labels, step):
  del logits, labels, step
  return jnp.mean(losses), {}


ERM = Objective(loss=_batch_mean)


def environment_risks(losses: jax.Array, environments: int) -> jax.Array:
  """``(E,)``: each environment's mean loss, environment ``e`` in rows ``[e·b, (e+1)·b)`` of the batch."""
  return jnp.mean(losses.reshape(environments, -1), axis=1)


def irm_penalty(logits: jax.Array, labels: jax.Array, environments: int) -> jax.Array:
  """IRMv1's penalty: the mean over environments of ``∂R_even/∂s · ∂R_odd/∂s`` at ``s = 1`` (plain cross-entropy
  of ``s · logits``), each environment's even and odd rows as DomainBed's ``logits[::2]`` and ``logits[1::2]``."""
  logits = logits.astype(jnp.float32).reshape(environments, -1, logits.shape[-1])
  labels = labels.reshape(environments, -1)

  def half_risks(scale):  # (2, E): the even rows' and the odd rows' risk of every environment
    losses = optax.softmax_cross_entropy_with_integer_labels(logits * scale, labels)
    return jnp.stack([jnp.mean(losses[:, ::2], axis=1), jnp.mean(losses[:, 1::2], axis=1)])

  _, slopes = jax.jvp(half_risks, (jnp.float32(1.0),), (jnp.float32(1.0),))
  return jnp.mean(slopes[0] * slopes[1])


def vrex_penalty(risks: jax.Array) -> jax.Array:
  """V-REx's penalty: the variance (1/E) of the environments' risks."""
  return jnp.mean(jnp.square(risks - jnp.mean(risks)))


def annealed_weight(step: jax.Array, penalty_weight: float, anneal_steps: int) -> jax.Array:
  """``λ`` from step ``anneal_steps`` on, 1 before (DomainBed's ``penalty_weight``)."""
  return jnp.where(step >= anneal_steps, jnp.float32(penalty_weight), jnp.float32(1.0))


def _check(environments: int, penalty_weight: float, anneal_steps: int, name: str, ids) -> None:
  if ids is not None and len(ids) != environments:
    raise ValueError(f"{name}: {len(ids)} ids for {environments} environments")
  if environments < 1:
    raise ValueError(f"{name} needs the batch's environments (got {environments})")
  if penalty_weight < 0 or anneal_steps < 0:
    raise ValueError(f"{name}: penalty_weight={penalty_weight} and anneal_steps={anneal_steps} must be >= 0")


def irm(environments: int, *, penalty_weight: float = 100.0, anneal_steps: int = 500,
        ids: tuple[int, ...] | None = None) -> Objective:
  """IRMv1 over ``environments`` equal blocks of the batch (see the module docstring)."""
  _check(environments, penalty_weight, anneal_steps, "irm", ids)

  def loss(losses, logits, labels, step):
    risks = environment_risks(losses, environments)
    penalty = irm_penalty(logits, labels, environments)
    weight = annealed_weight(step, penalty_weight, anneal_steps)
    return jnp.mean(risks) + weight * penalty, {"nll": jnp.mean(risks), "penalty": penalty,
                                                 **risk_metrics(risks, ids)}

  return Objective(loss=loss, environments=environments, reset_optimizer_at=anneal_steps, name="irm")


def vrex(environments: int, *, penalty_weight: float = 10.0, anneal_steps: int = 500,
         ids: tuple[int, ...] | None = None) -> Objective:
  """V-REx over ``environments`` equal blocks of the batch (see the module docstring)."""
  _check(environments, penalty_weight, anneal_steps, "vrex", ids)

  def loss(losses, logits, labels, step):
    del logits, labels
    risks = environment_risks(losses, environments)
    penalty = vrex_penalty(risks)
    weight = annealed_weight(step, penalty_weight, anneal_steps)
    return jnp.mean(risks) + weight * penalty, {"nll": jnp.mean(risks), "penalty": penalty,
                                                 **risk_metrics(risks, ids)}

  return Objective(loss=loss, environments=environments, reset_optimizer_at=anneal_steps, name="vrex")


def risk_metrics(risks: jax.Array, ids: tuple[int, ...] | None = None) -> dict[str, jax.Array]:
  """``{"risk_env{i}": R_i}`` for each training environment, named by ``ids`` (the dataset's environment of each
  block of the batch; default: the block's position)."""
  ids = tuple(range(risks.shape[0])) if ids is None else ids
  return {f"risk_env{i}": risks[block] for block, i in enumerate(ids)}


def reset_optimizer_state(step: jax.Array, at: int, fresh, current):
  """``fresh`` (``tx.init(params)``) at step ``at``, else ``current``: DomainBed's Adam reset, as a ``where``."""
  return jax.tree.map(lambda new, old: jnp.where(step == at, new, old), fresh, current)


NAMES = ("erm", "irm", "vrex")


def build_objective(name: str, group, environments: int = 0, ids: tuple[int, ...] | None = None) -> Objective:
  """The objective ``name`` with its config group's ``penalty_weight`` and ``anneal_steps`` (``config.objective``),
  over ``environments`` blocks of each batch."""
  if name == "erm":
    return ERM
  if name not in NAMES:
    raise ValueError(f"unknown objective {name=}; use one of {NAMES}")
  build = {"irm": irm, "vrex": vrex}[name]
  return build(environments, penalty_weight=float(group.penalty_weight), anneal_steps=int(group.anneal_steps), ids=ids)
