"""The train state: every array a run needs to continue exactly, as one pytree (checkpointed whole)."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from overfocus_jax.challenge import NONE, Regularizer
from overfocus_jax.models import Model

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array           # uint32[2]: split each step for the regularizer's random choices
  regularizer_state: Any   # the regularizer's own state (regularizer.init; e.g. SGDrop's EMA teacher); () if none

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Learning rate per step: linear warm-up, then cosine to 0, step decay, or constant."""
  total = config.num_epochs * steps_per_epoch
  warmup = min(config.warmup_epochs * steps_per_epoch, max(total - 1, 0))
  base = config.learning_rate
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(base, decay_steps=max(total - warmup, 1))
  elif config.schedule == "step":
    boundaries = {int(e * steps_per_epoch) - warmup: config.step_decay_factor for e in config.step_decay_epochs
                  if e * steps_per_epoch > warmup}
    main = optax.piecewise_constant_schedule(base, boundaries)
  else:
    main = optax.constant_schedule(base)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(base / warmup, base, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (as torch.optim.SGD), Adam (L2 in the gradient) or AdamW; with
  ``config.freeze_backbone``, for the head only (:func:`head_only`); with ``config.backbone_lr_scale`` ≠ 1, the
  encoder at that fraction of the learning rate (:func:`backbone_at`)."""
  if config.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum or None))
  elif config.optimizer == "adam":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(schedule))
  elif config.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    raise ValueError(f"unknown optimizer {config.optimizer=}")
  if config.freeze_backbone:
    return head_only(tx)
  return backbone_at(tx, config.backbone_lr_scale) if config.backbone_lr_scale != 1 else tx


def by_part(params) -> dict:
  """The top-level parts of a model's parameters, labelled ``backbone`` (the ``encoder``) or ``head``."""
  return {part: "backbone" if part == "encoder" else "head" for part in params}


def backbone_at(tx: optax.GradientTransformation, scale: float) -> optax.GradientTransformation:
  """Two parameter groups, as fine-tuning uses them: the ``head`` trained by ``tx``, the ``encoder`` by ``tx`` with
  its updates × ``scale`` — PyTorch's param group at ``lr × scale``: SGD's momentum, Adam's moments and AdamW's
  decoupled decay are all linear in the learning rate. Each group keeps its own optimizer state."""
  return optax.multi_transform({"head": tx, "backbone": optax.chain(tx, optax.scale(scale))}, by_part)


def head_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` on the ``head`` parameters; the ``encoder``'s updates are zero (no weight decay either, no optimizer
  state kept for it). Its batch-norm statistics still follow the data in training, as a PyTorch backbone with
  ``requires_grad=False`` in train mode."""
  return optax.multi_transform({"head": tx, "backbone": optax.set_to_zero()}, by_part)


def initial_variables(model: Model, seed: int, input_shape: tuple[int, ...]) -> dict:
  """The model's fresh variables for ``seed``, as :func:`create_train_state` draws them."""
  init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
  return model.init(init_key, input_shape)


def create_train_state(model: Model, tx: optax.GradientTransformation, *, seed: int, input_shape: tuple[int, ...],
                       regularizer: Regularizer = NONE, variables: dict | None = None) -> TrainState:
  """Fresh variables from ``seed`` (or ``variables``: e.g. pretrained ones), the optimizer's and the regularizer's
  initial states, step 0."""
  _, train_key = jax.random.split(jax.random.PRNGKey(seed))
  variables = initial_variables(model, seed, input_shape) if variables is None else variables
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=train_key,
                    regularizer_state=regularizer.init({"params": params, "batch_stats": batch_stats}))
