"""Regularizers that challenge the classifier on its latent map ``z`` (see ``overfocus_jax.train.step``).

:func:`build_regularizer` maps ``config.regularizer`` to a pure function with the :data:`Regularizer` signature.
"""

import ml_collections

from overfocus_jax.train.step import Regularizer, no_regularizer


def build_regularizer(config: ml_collections.ConfigDict) -> Regularizer:
  name = config.regularizer.name
  if name == "none":
    return no_regularizer
  raise ValueError(f"unknown regularizer {name=}")  # config.validate() rejects it first
