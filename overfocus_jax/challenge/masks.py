r"""Exact top-k drop masks.

For scores :math:`s \in \mathbb{R}^{B \times N}` and a drop fraction :math:`\rho \in [0, 1)`,

.. math::

    k = \lceil \rho N \rceil, \qquad
    M_{b,i} = 0 \text{ if } i \in \operatorname{top}_k(s_b) \text{ else } 1,

so exactly :math:`k` entries are dropped in every row, which is the paper's :math:`M = 1[A \le q_\rho]` with the
upper :math:`\rho`-quantile :math:`q_\rho` taken per sample. Ties are broken deterministically: among equal scores,
the lower index is dropped first (``lax.top_k`` returns lower indices first). ``lax.top_k`` selects without a full
sort. Masks are constants for autodiff: no gradient flows through them.
"""

import math

import jax
import jax.numpy as jnp


def drop_count(fraction: float, size: int) -> int:
  """⌈fraction · size⌉, robust to float noise (0.28 · 25 is 7.000000000000001 in binary)."""
  if not 0 <= fraction < 1:
    raise ValueError(f"drop fraction must be in [0, 1), got {fraction=}")
  return min(size, math.ceil(round(fraction * size, 9)))


def top_k_drop_mask(scores: jax.Array, fraction: float) -> jax.Array:
  """``scores`` (B, N) → float mask (B, N) with 0 at the ⌈fraction·N⌉ highest scores of each row, 1 elsewhere."""
  batch, size = scores.shape
  k = drop_count(fraction, size)
  if k == 0:
    return jnp.ones_like(scores)
  _, dropped = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
  mask = jnp.ones_like(scores).at[jnp.arange(batch)[:, None], dropped].set(0.0)
  return jax.lax.stop_gradient(mask)


def top_k_select(scores: jax.Array, count: int) -> jax.Array:
  """``scores`` (B,) → bool (B,), True for the ``count`` highest (lower index first among ties)."""
  if count <= 0:
    return jnp.zeros(scores.shape, bool)
  _, chosen = jax.lax.top_k(jax.lax.stop_gradient(scores), count)
  return jnp.zeros(scores.shape, bool).at[chosen].set(True)


def dropped_fraction(mask: jax.Array) -> jax.Array:
  """The share of entries a 0/1 mask drops, as a float scalar (for the step's metrics)."""
  return 1.0 - jnp.mean(mask)
