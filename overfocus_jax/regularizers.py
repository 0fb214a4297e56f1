"""The regularizer and the objective a config names: their config groups (:mod:`overfocus_jax.fields`), and the
regularizer built from ``config.regularizer.name`` and the parameters of its group, with schedules given in epochs
turned into the steps the library's regularizers count (:mod:`overfocus_jax.challenge`)."""

import math
from typing import Callable

import ml_collections

from overfocus_jax import fields, plugins
from overfocus_jax.challenge import NAMES, NONE, Regularizer, invariance, rsc, sgdrop
from overfocus_jax.challenge.attribution import TARGETS
from overfocus_jax.errors import UserError

# The official RSC's curriculum moves to its next stage every this many epochs.
RSC_CURRICULUM_EPOCHS = 10


def _sgdrop(group: ml_collections.ConfigDict, steps_per_epoch: int) -> Regularizer:
  return sgdrop.sgdrop(rate=group.rate, granularity=group.granularity, target=group.target, rescale=group.rescale,
                       batch_fraction=group.batch_fraction, ema_decay=group.ema_decay if group.ema_decay > 0 else None,
                       rule=group.rule, mass=group.mass, ramp_steps=group.ramp_epochs * steps_per_epoch)


def _rsc(group: ml_collections.ConfigDict, steps_per_epoch: int) -> Regularizer:
  return rsc.rsc(spatial_fraction=group.spatial_fraction, channel_fraction=group.channel_fraction,
                 spatial_probability=group.spatial_probability,
                 batch_percent=None if group.batch_percent < 0 else group.batch_percent,
                 curriculum_steps=RSC_CURRICULUM_EPOCHS * steps_per_epoch, rule=group.rule)


def _rsc_domainbed(group: ml_collections.ConfigDict, steps_per_epoch: int) -> Regularizer:
  del steps_per_epoch  # no schedule
  return rsc.rsc_domainbed(feature_drop=group.feature_drop, batch_drop=group.batch_drop, rule=group.rule)


# name -> builder from the name's own config group (config.regularizer.<name>); "none" has no group.
BUILDERS: dict[str, Callable[[ml_collections.ConfigDict, int], Regularizer]] = {
    "none": lambda group, steps_per_epoch: NONE,
    "sgdrop": _sgdrop,
    "rsc": _rsc,
    "rsc_domainbed": _rsc_domainbed,
}
# The fields of each regularizer's group that set how much it drops: what to lower when training collapses.
STRENGTH_FIELDS = {
    "sgdrop": ("mass", "rate", "batch_fraction", "ramp_epochs", "rule"),
    "rsc": ("spatial_fraction", "channel_fraction", "batch_percent"),
    "rsc_domainbed": ("feature_drop", "batch_drop"),
}


def plugin_regularizer(spec: str, arguments: dict) -> Regularizer:
  """The regularizer a factory given by import path makes, ``factory(**arguments)``."""
  made = plugins.call_factory(plugins.load_object(spec, "regularizer.name"), spec, "regularizer.name", **arguments)
  if not isinstance(made, Regularizer):
    raise UserError(f"regularizer.name={spec!r} returned {type(made).__name__}, not an overfocus_jax.Regularizer",
                    "return one: ofx.stateless(fn), ofx.sgdrop(...), or Regularizer(init, apply)")
  return made


def build_regularizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Regularizer:
  """The regularizer ``config.regularizer.name`` names, with the parameters of its group; ``steps_per_epoch`` turns
  its schedules' epochs into steps."""
  name = config.regularizer.name
  if plugins.is_import_path(name):
    return plugin_regularizer(name, dict(config.regularizer.args.to_dict()))
  if name not in BUILDERS:
    raise ValueError(f"unknown regularizer {name=}; use one of {NAMES}")
  return BUILDERS[name](config.regularizer.get(name), steps_per_epoch)


# ----------------------------------------------------------------------------------------------- the config groups


def check_regularizer(config) -> None:
  reg = config.regularizer
  fields.require(reg.name in NAMES or plugins.is_import_path(reg.name), f"unknown regularizer.name {reg.name!r}",
                 f"use one of {', '.join(NAMES)}, or your own by import path, e.g. "
                 "--config.regularizer.name=my_pkg.reg:make")
  fields.require(not len(reg.args) or plugins.is_import_path(reg.name),
                 f"config.regularizer.args={reg.args.to_dict()!r} is for a regularizer given by import path, "
                 f"and regularizer.name={reg.name!r} is one of the library's",
                 f"set --config.regularizer.{reg.name}.FIELD instead, or drop --config.regularizer.args")


def check_sgdrop(config) -> None:
  group = config.regularizer.sgdrop
  fields.require_fraction(group.rate, "regularizer.sgdrop.rate")
  fields.require_choice(group.granularity, sgdrop.GRANULARITIES, "regularizer.sgdrop.granularity")
  fields.require_choice(group.rule, sgdrop.RULES, "regularizer.sgdrop.rule")
  fields.require(fields.is_number(group.mass) and 0 < group.mass <= 1,
                 f"config.regularizer.sgdrop.mass={group.mass!r} must be in (0, 1]",
                 "set --config.regularizer.sgdrop.mass to a share of the attribution, e.g. 0.5")
  fields.require(fields.is_number(group.ramp_epochs) and 0 <= group.ramp_epochs < math.inf,
                 f"config.regularizer.sgdrop.ramp_epochs={group.ramp_epochs!r} must be a number >= 0",
                 "set --config.regularizer.sgdrop.ramp_epochs, e.g. 2 (0: no ramp)")
  if group.rule == "mass":
    fields.require(0 < group.rate < 1, f"config.regularizer.sgdrop.rate={group.rate!r} must be in (0, 1) with the "
                   "mass rule (it caps the share of units dropped)", "set --config.regularizer.sgdrop.rate, e.g. 0.5")
  fields.require_choice(group.target, TARGETS, "regularizer.sgdrop.target")
  fields.require(fields.is_number(group.batch_fraction) and 0 < group.batch_fraction <= 1,
                 f"config.regularizer.sgdrop.batch_fraction={group.batch_fraction!r} must be in (0, 1]",
                 "set --config.regularizer.sgdrop.batch_fraction, e.g. 0.5 (the default) or 1")
  fields.require_fraction(group.ema_decay, "regularizer.sgdrop.ema_decay")


def check_rsc(config) -> None:
  group = config.regularizer.rsc
  fields.require_fraction(group.spatial_fraction, "regularizer.rsc.spatial_fraction")
  fields.require_fraction(group.channel_fraction, "regularizer.rsc.channel_fraction")
  fields.require_fraction(group.spatial_probability, "regularizer.rsc.spatial_probability", upper_inclusive=True)
  fields.require(fields.is_number(group.batch_percent) and group.batch_percent < 1,
                 f"config.regularizer.rsc.batch_percent={group.batch_percent!r} must be below 1",
                 "set a value in [0, 1), or -1 for the official curriculum")
  fields.require_choice(group.rule, rsc.RULES, "regularizer.rsc.rule")


def check_rsc_domainbed(config) -> None:
  group = config.regularizer.rsc_domainbed
  fields.require_choice(group.rule, rsc.RULES, "regularizer.rsc_domainbed.rule")
  fields.require_fraction(group.feature_drop, "regularizer.rsc_domainbed.feature_drop")
  fields.require_fraction(group.batch_drop, "regularizer.rsc_domainbed.batch_drop")


SGDROP = fields.Group("sgdrop", "saliency-guided dropout on z (challenge/sgdrop.py); the default departs from the "
                      "paper's rule, which collapses training on the default model (experiments/README.md)", {
    "rule": fields.Field("mass", "mass: the fewest units holding `mass` of A | topk: exactly ceil(rho N) units | "
                         "quantile: 1[A <= quantile(A, 1 - rho)], the paper's formula"),
    "rate": fields.Field(0.5, "quantile, topk: rho, the share of units dropped, in [0, 1) | mass: the cap, in (0, 1)"),
    "mass": fields.Field(0.5, "m: the share of each sample's positive attribution the mass rule drops, (0, 1]"),
    "ramp_epochs": fields.Field(1.0, "> 0: grow the drop (rho's count or m) linearly from 0 over this many epochs"),
    "granularity": fields.Field("spatial", "spatial (positions) | element | channel"),
    "target": fields.Field("true", "attribute the true class or the predicted one"),
    "rescale": fields.Field(False, "multiply the kept units by 1/(1-rho) (topk) or N/kept (the others, ramps)"),
    "batch_fraction": fields.Field(0.5, "share of each batch that is masked (the rest trains on the whole map)"),
    "ema_decay": fields.Field(0.0, "> 0: attribution from an EMA teacher with this decay (the paper's Fig. 2)"),
}, validate=check_sgdrop)
RSC = fields.Group("rsc", "representation self-challenging, the official code's (challenge/rsc.py)", {
    "spatial_fraction": fields.Field(1 / 3, "share of positions dropped in spatial mode"),
    "channel_fraction": fields.Field(1 / 3.2, "share of channels dropped in channel mode"),
    "spatial_probability": fields.Field(0.5, "chance of spatial mode at each step"),
    "batch_percent": fields.Field(-1.0, "share of the batch masked; < 0 follows the 0.3 + 0.2 floor(epoch/10) "
                                  "curriculum"),
    "rule": fields.Field("reference", "reference: the official code's thresholds and ties | topk: exactly "
                         "ceil(f N) units"),
}, validate=check_rsc)
RSC_DOMAINBED = fields.Group("rsc_domainbed", "representation self-challenging, DomainBed's (challenge/rsc.py)", {
    "feature_drop": fields.Field(1 / 3, "f: share of pooled features dropped per sample"),
    "batch_drop": fields.Field(1 / 3, "b: share of the batch masked"),
    "rule": fields.Field("reference", "reference: DomainBed's np.percentile counts and ties | topk: exactly "
                         "ceil(f N)"),
}, validate=check_rsc_domainbed)

REGULARIZER = fields.Group("regularizer", "what the train step does to the latent map z = encode(x)", {
    "name": fields.Field("none", f"{' | '.join(NAMES)} | your own by import path, PKG.MOD:make, called as "
                         "make(**args) and returning an overfocus_jax.Regularizer"),
    "args": fields.Field({}, "a regularizer given by import path: its keyword arguments "
                         "(--config.regularizer.args.NAME=VALUE)"),
    "sgdrop": SGDROP,
    "rsc": RSC,
    "rsc_domainbed": RSC_DOMAINBED,
}, validate=check_regularizer)


def check_objective(config) -> None:
  objective = config.objective
  fields.require_choice(objective.name, invariance.NAMES, "objective.name")
  for name in ("irm", "vrex"):
    group = objective[name]
    fields.require(fields.is_number(group.penalty_weight) and math.isfinite(group.penalty_weight)
                   and group.penalty_weight >= 0, f"config.objective.{name}.penalty_weight={group.penalty_weight!r} "
                   "must be a number >= 0", f"set --config.objective.{name}.penalty_weight, e.g. 100")
    fields.require(isinstance(group.anneal_steps, int) and group.anneal_steps >= 0,
                   f"config.objective.{name}.anneal_steps={group.anneal_steps!r} must be an integer >= 0",
                   f"set --config.objective.{name}.anneal_steps, e.g. 500 (0: the full penalty from the first step)")
  if objective.name != "erm":
    fields.require(config.environments.balanced, f"objective {objective.name!r} needs environment-balanced batches "
                   "(it compares the training environments' risks)",
                   "set --config.environments.balanced=true, or --config.objective.name=erm")
    fields.require(config.batch_norm == "global", f"objective {objective.name!r} compares risks over the whole "
                   "batch, and batch_norm=local computes each device's part alone", "set --config.batch_norm=global")


def _penalty(weight: float) -> fields.Group:
  return fields.Group("", "", {
      "penalty_weight": fields.Field(weight, "lambda, the penalty's weight from step anneal_steps on (1 before)"),
      "anneal_steps": fields.Field(500, "the step the penalty takes its full weight and the optimizer restarts"),
  })


OBJECTIVE = fields.Group("objective", "the loss over a batch (challenge/invariance.py): penalties over the training "
                         "environments' risks (balanced batches); DomainBed's defaults", {
    "name": fields.Field("erm", f"{' | '.join(invariance.NAMES)}"),
    "irm": _penalty(100.0),
    "vrex": _penalty(10.0),
}, validate=check_objective)
