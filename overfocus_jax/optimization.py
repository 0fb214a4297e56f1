"""Optimization: the learning-rate schedule and the optimizer a config names (optax), with their config fields
(:mod:`overfocus_jax.fields`).

The training recipe — ``optimizer``, ``learning_rate``, ``weight_decay``, ``warmup_epochs``, ``label_smoothing`` —
is ``"auto"`` by default: each field left at ``auto`` takes the value of the model's recipe (its
:class:`~overfocus_jax.models.spec.ModelSpec`'s ``recipe``: ConvNeXt trains with AdamW, as its paper), else
:data:`DEFAULT_RECIPE`. The learning rate and weight decay go with the optimizer: a run that names another optimizer
than the recipe's takes that optimizer's own (:data:`OPTIMIZER_DEFAULTS`). :func:`resolve_recipe` writes the numbers
into the config, so ``config.json`` holds what ran.
"""

import math
from typing import Mapping

import ml_collections
import optax

from overfocus_jax import fields

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")

AUTO = fields.AUTO
RECIPE_FIELDS = ("optimizer", "learning_rate", "weight_decay", "warmup_epochs", "label_smoothing")
# A model that declares no recipe: SGD with momentum 0.9 and coupled weight decay, a warm-up epoch, no smoothing.
DEFAULT_RECIPE = {"optimizer": "sgd", "learning_rate": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1,
                  "label_smoothing": 0.0}
# An optimizer named without its learning rate or weight decay: torch.optim's defaults for Adam and AdamW.
OPTIMIZER_DEFAULTS = {"sgd": {"learning_rate": 0.1, "weight_decay": 5e-4},
                      "adam": {"learning_rate": 1e-3, "weight_decay": 0.0},
                      "adamw": {"learning_rate": 1e-3, "weight_decay": 1e-2}}


def recipe_values(config: ml_collections.ConfigDict, recipe: Mapping[str, object] | None = None) -> dict:
  """The recipe fields of ``config`` with every ``"auto"`` replaced: from ``recipe`` (a model's, over
  :data:`DEFAULT_RECIPE`), the learning rate and weight decay from the optimizer's defaults when the run names
  another optimizer than the recipe's."""
  recipe = recipe or {}
  unknown = set(recipe) - set(RECIPE_FIELDS)
  if unknown:
    raise ValueError(f"recipe={dict(recipe)!r} sets {sorted(unknown)}; a recipe sets only {RECIPE_FIELDS}")
  full = {**DEFAULT_RECIPE, **recipe}
  optimizer = full["optimizer"] if config.optimizer == AUTO else config.optimizer
  if optimizer != full["optimizer"] and optimizer in OPTIMIZER_DEFAULTS:
    full = {**full, **OPTIMIZER_DEFAULTS[optimizer]}
  return {name: full[name] if config[name] == AUTO else config[name] for name in RECIPE_FIELDS}


def resolve_recipe(config: ml_collections.ConfigDict,
                   recipe: Mapping[str, object] | None = None) -> ml_collections.ConfigDict:
  """``config`` itself when none of its recipe fields is ``"auto"``, else a copy with them resolved
  (:func:`recipe_values`)."""
  if all(config[name] != AUTO for name in RECIPE_FIELDS):
    return config
  resolved = config.copy_and_resolve_references()
  with resolved.ignore_type():
    for name, value in recipe_values(config, recipe).items():
      resolved[name] = value
  return resolved


def _require_resolved(config: ml_collections.ConfigDict) -> None:
  auto = [name for name in RECIPE_FIELDS if config[name] == AUTO]
  if auto:
    raise ValueError(f"config.{auto[0]} is 'auto': resolve the training recipe first with "
                     "overfocus_jax.config.resolved(config) (build_config and build_experiment do)")


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Learning rate per step: linear warm-up, then cosine to 0, step decay, or constant."""
  _require_resolved(config)
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
  _require_resolved(config)
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


def check_config(config) -> None:
  config = resolve_recipe(config)  # "auto" where left so checks as the default recipe; the rest as set
  fields.require_choice(config.optimizer, OPTIMIZERS, "optimizer")
  fields.require_choice(config.schedule, SCHEDULES, "schedule")
  fields.require(fields.is_number(config.learning_rate) and math.isfinite(config.learning_rate)
                 and config.learning_rate > 0, f"config.learning_rate={config.learning_rate!r} must be a positive "
                 "number", "set --config.learning_rate, e.g. 0.1 for SGD or 1e-3 for Adam")
  fields.require(fields.is_number(config.weight_decay) and math.isfinite(config.weight_decay)
                 and config.weight_decay >= 0, f"config.weight_decay={config.weight_decay!r} must be >= 0",
                 "set --config.weight_decay, e.g. 5e-4")
  fields.require(fields.is_number(config.momentum) and 0 <= config.momentum < 1,
                 f"config.momentum={config.momentum!r} must be in [0, 1)", "set --config.momentum, e.g. 0.9")
  fields.require(fields.is_number(config.label_smoothing) and 0 <= config.label_smoothing < 1,
                 f"config.label_smoothing={config.label_smoothing!r} must be in [0, 1)",
                 "set --config.label_smoothing, e.g. 0.1")
  fields.require(fields.is_number(config.step_decay_factor) and 0 < config.step_decay_factor <= 1,
                 f"config.step_decay_factor={config.step_decay_factor!r} must be in (0, 1]",
                 "set --config.step_decay_factor, e.g. 0.1")
  if config.schedule == "step":
    fields.require_positive_ints(config.step_decay_epochs, "step_decay_epochs")
  fields.require(fields.is_number(config.warmup_epochs) and config.warmup_epochs >= 0,
                 f"config.warmup_epochs={config.warmup_epochs!r} must be >= 0", "set --config.warmup_epochs, e.g. 0")
  fields.require_bool(config.freeze_backbone, "freeze_backbone")
  scale = config.backbone_lr_scale
  fields.require(fields.is_number(scale) and math.isfinite(scale) and scale >= 0,
                 f"config.backbone_lr_scale={scale!r} must be a number >= 0",
                 "set --config.backbone_lr_scale, e.g. 0.1 (the encoder at a tenth of the learning rate) or 1")
  fields.require(not (config.freeze_backbone and scale != 1), f"config.freeze_backbone=true and "
                 f"config.backbone_lr_scale={scale!r} both set the encoder's learning rate",
                 "set one of them: freeze_backbone=true is scale 0")


FIELDS = fields.Group("", "optimization", {
    "optimizer": fields.Field(AUTO, "sgd (with momentum and coupled weight decay, as torch.optim.SGD) | adam (L2 in "
                              "the gradient) | adamw | auto: the model's recipe, else sgd"),
    "learning_rate": fields.Field(AUTO, "the peak learning rate | auto: the model's recipe, else the optimizer's "
                                  "(sgd 0.1, adam and adamw 1e-3)"),
    "momentum": fields.Field(0.9, "sgd's momentum"),
    "weight_decay": fields.Field(AUTO, "weight decay (adamw: decoupled) | auto: the model's recipe, else the "
                                 "optimizer's (sgd 5e-4, adam 0, adamw 1e-2)"),
    "schedule": fields.Field("cosine", "after the warm-up: cosine (to 0) | step | constant"),
    "warmup_epochs": fields.Field(AUTO, "linear warm-up from learning_rate / steps | auto: the model's recipe, else 1"),
    "step_decay_epochs": fields.Field((30, 60), "schedule=step: the epochs the rate is multiplied at"),
    "step_decay_factor": fields.Field(0.1, "schedule=step: the factor"),
    "label_smoothing": fields.Field(AUTO, "the cross-entropy's label smoothing | auto: the model's recipe, else 0"),
    "freeze_backbone": fields.Field(False, "train the head only: the encoder's updates are zero (its BN statistics "
                                    "still move)"),
    "backbone_lr_scale": fields.Field(1.0, "the encoder's learning rate = learning_rate x this (fine-tuning: e.g. "
                                      "0.1)"),
}, validate=check_config)
