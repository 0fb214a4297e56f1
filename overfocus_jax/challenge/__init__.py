"""Regularizers that challenge the classifier on its latent map ``z`` (the interface: :mod:`.base`), the masks they
apply (:mod:`.masks`, :mod:`.sgdrop`, :mod:`.rsc`), the attribution they rank by (:mod:`.attribution`) and the
environment objectives (:mod:`.invariance`). Pure functions of arrays and callables: nothing here reads a config.

:data:`NAMES` lists the regularizers the ``overfocus`` CLI builds by name (``config.regularizer.name``).
"""

from overfocus_jax.challenge import rsc, sgdrop  # the modules: rsc.rsc, rsc.rsc_domainbed, sgdrop.sgdrop
from overfocus_jax.challenge.base import NONE, Regularizer, TeacherInputs, chain, stateless

NAMES = ("none", "sgdrop", "rsc", "rsc_domainbed")

__all__ = ["NAMES", "NONE", "Regularizer", "TeacherInputs", "chain", "rsc", "sgdrop", "stateless"]
