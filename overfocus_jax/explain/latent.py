r"""The latent attribution :math:`A(z, c) = \mathrm{ReLU}(\partial\psi_c(z)/\partial z \odot z)` (Bertoin et al. 2024,
arXiv 2409.17370) as a measurement: how concentrated it is per image, and which channels carry it over a dataset.

Concentration (logged every epoch on a fixed evaluation batch, so the paper's Fig. 1 can be drawn for any run):
the mean over images of the attribution ratio, normalised entropy and Gini of :math:`A` at element level, and the
attribution ratio of :math:`\sum_k A_{ijk}` over spatial positions — :func:`concentration`, defined with the
measures in :mod:`overfocus_jax.challenge.concentration` because the train loop logs it.

Feature usage over a dataset :math:`D` of latent maps :math:`z \in \mathbb{R}^{h \times w \times C}`:

.. math::

    \mathrm{act}_k = \frac{1}{|D|\,hw}\sum_{x \in D}\sum_{ij} |z_{ijk}|, \qquad
    \mathrm{attr}_k = \frac{1}{|D|}\sum_{x \in D}\sum_{ij} A_{ijk}, \qquad
    s_k = \mathrm{attr}_k \Big/ \sum_{k'} \mathrm{attr}_{k'},

and the effective number of channels used, :math:`\exp(-\sum_k s_k \log s_k)` (:math:`C` when every channel
carries the same share, 1 when one carries all of it).
"""

import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax.challenge.attribution import latent_attribution
from overfocus_jax.challenge.concentration import latent_concentration as concentration

__all__ = ["channel_sums", "concentration", "latent_attribution", "usage_from_sums"]


def channel_sums(encode_fn, classify_fn, x: jax.Array, labels: jax.Array, mask: jax.Array,
                 target: str = "true") -> dict:
  """Per-channel sums over the real samples of a (padded) batch: ``abs_activation`` (summed over positions too),
  ``attribution`` (summed over positions) and ``count`` — the pieces of :func:`usage_from_sums`."""
  z, attribution = latent_attribution(encode_fn, classify_fn, x, labels, target)
  weight = mask.astype(z.dtype)[:, None, None, None]
  return {"abs_activation": jnp.sum(jnp.abs(z) * weight, axis=(0, 1, 2)),
          "attribution": jnp.sum(attribution * weight, axis=(0, 1, 2)),
          "count": jnp.sum(mask.astype(jnp.float32)), "positions": jnp.asarray(z.shape[1] * z.shape[2], jnp.float32)}


def usage_from_sums(sums: dict) -> dict:
  """The per-channel statistics of the module docstring from accumulated :func:`channel_sums` (NumPy)."""
  count = float(sums["count"])
  activation = np.asarray(sums["abs_activation"], np.float64) / (count * float(sums["positions"]))
  attribution = np.asarray(sums["attribution"], np.float64) / count
  total = attribution.sum()
  share = attribution / total if total > 0 else np.full_like(attribution, 1.0 / attribution.size)
  nonzero = share[share > 0]
  top = max(1, int(np.ceil(0.1 * share.size)))
  return {"activation": activation.tolist(), "attribution": attribution.tolist(), "share": share.tolist(),
          "effective_channels": float(np.exp(-np.sum(nonzero * np.log(nonzero)))), "channels": int(share.size),
          "top10pct_share": float(np.sort(share)[::-1][:top].sum()), "images": int(count)}
