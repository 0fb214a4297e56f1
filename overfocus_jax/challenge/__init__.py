"""Regularizers that challenge the classifier on its latent map ``z`` (see ``overfocus_jax.train.step``).

:func:`build_challenge` maps ``config.regularizer`` to a pure function with the :data:`Regularizer` signature,
the split point it works at, and the EMA teacher decay it needs (``None`` for none).
"""

from typing import NamedTuple

import ml_collections

from overfocus_jax.challenge import rsc, sgdrop  # the modules: rsc.rsc, rsc.rsc_domainbed, sgdrop.sgdrop
from overfocus_jax.train.step import Regularizer, no_regularizer

NAMES = ("none", "sgdrop", "rsc", "rsc_domainbed")


class Challenge(NamedTuple):
  regularizer: Regularizer
  split: str = "latent"                   # "latent" (feature map) or "pooled" (feature vector)
  teacher_ema_decay: float | None = None  # an EMA teacher for the attribution, when set


def build_challenge(config: ml_collections.ConfigDict) -> Challenge:
  name, reg = config.regularizer.name, config.regularizer
  if name == "none":
    return Challenge(no_regularizer)
  if name == "sgdrop":
    c = reg.sgdrop
    return Challenge(sgdrop.sgdrop(rate=c.rate, granularity=c.granularity, target=c.target, rescale=c.rescale,
                                   batch_fraction=c.batch_fraction),
                     teacher_ema_decay=c.ema_decay if c.ema_decay > 0 else None)
  if name == "rsc":
    c = reg.rsc
    return Challenge(rsc.rsc(spatial_fraction=c.spatial_fraction, channel_fraction=c.channel_fraction,
                             spatial_probability=c.spatial_probability,
                             batch_percent=None if c.batch_percent < 0 else c.batch_percent))
  if name == "rsc_domainbed":
    c = reg.rsc_domainbed
    return Challenge(rsc.rsc_domainbed(feature_drop=c.feature_drop, batch_drop=c.batch_drop), split="pooled")
  raise ValueError(f"unknown regularizer {name=}; use one of {NAMES}")  # config.validate() rejects it first
