"""Regularizers that challenge the classifier on its latent map ``z`` (the interface: :mod:`.base`).

:func:`build_regularizer` maps ``config.regularizer`` to a :class:`Regularizer`; :data:`NAMES` lists the names it
knows, in one place (config validation reads it).
"""

from typing import Callable

import ml_collections

from overfocus_jax.challenge import rsc, sgdrop  # the modules: rsc.rsc, rsc.rsc_domainbed, sgdrop.sgdrop
from overfocus_jax.challenge.base import NONE, Regularizer, StepInfo, chain, stateless

__all__ = ["NAMES", "NONE", "STRENGTH_FIELDS", "Regularizer", "StepInfo", "build_regularizer", "chain", "rsc", "sgdrop", "stateless"]


def _sgdrop(group: ml_collections.ConfigDict) -> Regularizer:
  return sgdrop.sgdrop(rate=group.rate, granularity=group.granularity, target=group.target, rescale=group.rescale,
                       batch_fraction=group.batch_fraction, ema_decay=group.ema_decay if group.ema_decay > 0 else None,
                       rule=group.rule, mass=group.mass, ramp_epochs=group.ramp_epochs)


def _rsc(group: ml_collections.ConfigDict) -> Regularizer:
  return rsc.rsc(spatial_fraction=group.spatial_fraction, channel_fraction=group.channel_fraction,
                 spatial_probability=group.spatial_probability,
                 batch_percent=None if group.batch_percent < 0 else group.batch_percent)


def _rsc_domainbed(group: ml_collections.ConfigDict) -> Regularizer:
  return rsc.rsc_domainbed(feature_drop=group.feature_drop, batch_drop=group.batch_drop)


# name -> builder from the name's own config group (config.regularizer.<name>); "none" has no group.
BUILDERS: dict[str, Callable[[ml_collections.ConfigDict], Regularizer]] = {
    "none": lambda group: NONE,
    "sgdrop": _sgdrop,
    "rsc": _rsc,
    "rsc_domainbed": _rsc_domainbed,
}
NAMES = tuple(BUILDERS)
# The fields of each regularizer's group that set how much it drops: what to lower when training collapses.
STRENGTH_FIELDS = {
    "sgdrop": ("mass", "rate", "batch_fraction", "ramp_epochs", "rule"),
    "rsc": ("spatial_fraction", "channel_fraction", "batch_percent"),
    "rsc_domainbed": ("feature_drop", "batch_drop"),
}


def build_regularizer(config: ml_collections.ConfigDict) -> Regularizer:
  """The regularizer ``config.regularizer.name`` names, with the parameters of its group."""
  name = config.regularizer.name
  if name not in BUILDERS:
    raise ValueError(f"unknown regularizer {name=}; use one of {NAMES}")
  return BUILDERS[name](config.regularizer.get(name))
