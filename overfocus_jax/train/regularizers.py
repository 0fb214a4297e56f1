"""The regularizer a config names: ``config.regularizer.name`` and the parameters of its group, with schedules given
in epochs turned into the steps the library's regularizers count (:mod:`overfocus_jax.challenge`)."""

from typing import Callable

import ml_collections

from overfocus_jax import plugins
from overfocus_jax.challenge import NAMES, NONE, Regularizer, rsc, sgdrop
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
