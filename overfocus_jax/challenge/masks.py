r"""Exact top-k drop masks.

For scores :math:`s \in \mathbb{R}^{B \times N}` and a drop fraction :math:`\rho \in [0, 1)`,

.. math::

    k = \lceil \rho N \rceil, \qquad
    M_{b,i} = 0 \text{ if } i \in \operatorname{top}_k(s_b) \text{ else } 1,

so exactly :math:`k` entries are dropped in every row, which is the paper's :math:`M = 1[A \le q_\rho]` with the
upper :math:`\rho`-quantile :math:`q_\rho` taken per sample. Ties are broken deterministically: among equal scores,
the lower index is dropped first (``lax.top_k`` returns lower indices first). ``lax.top_k`` selects without a full
sort. Masks are constants for autodiff: no gradient flows through them.

Attribution-mass masks (:func:`mass_drop_mask`) drop, per row of non-negative scores, the fewest highest-scored
entries whose scores sum to a share :math:`m` of the row's total, at most :math:`K = \min(\lceil c N \rceil, N - 1)`
of them — the rule always keeps at least one unit, so a 1×1 map or a single channel is never emptied:

.. math::

    k_b = \min\Big(K,\; \min\{k : \textstyle\sum_{i \le k} s_{b,(i)} \ge m \sum_i s_{b,i}\}\Big),
    \qquad k_b = 0 \text{ when } \textstyle\sum_i s_{b,i} = 0,

with :math:`s_{b,(1)} \ge s_{b,(2)} \ge \dots` the row sorted in decreasing order (ties: lower index first). The count
follows how concentrated the evidence is, where a fixed :math:`\rho` follows the number of units.
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


# Cumulative float sums can land a rounding error below share·total; this slack keeps exact shares exact (so at
# share 1, units holding less than 1e-6 of the total may be kept).
RELATIVE_SLACK = 1e-6


def count_holding_share(descending: jax.Array, total: jax.Array, share: float) -> jax.Array:
  """(B,) the fewest leading entries of each row of ``descending`` (sorted largest first, ≥ 0) whose sum reaches
  ``share`` of ``total`` (B, 1); the row's length when even all of them fall short."""
  short = jnp.cumsum(descending, axis=-1) < share * total * (1.0 - RELATIVE_SLACK)
  return jnp.minimum(jnp.sum(short, axis=-1) + 1, descending.shape[-1])


def mass_cap(max_fraction: float, size: int) -> int:
  """K = min(⌈max_fraction · size⌉, size − 1): the most units the mass rule drops in a row; one always stays."""
  return min(drop_count(max_fraction, size), size - 1)


def mass_drop_mask(scores: jax.Array, share: float, max_fraction: float) -> jax.Array:
  """``scores`` (B, N) ≥ 0 → float mask (B, N): 0 at the fewest top scores holding ``share`` of each row's total,
  at most min(⌈max_fraction·N⌉, N − 1) of them (see the module docstring); 1 elsewhere. Negative scores count
  as 0."""
  if isinstance(share, (int, float)) and not 0 < share <= 1:  # a traced share (a ramp) is checked by its maker
    raise ValueError(f"attribution mass share must be in (0, 1], got {share=}")
  if not 0 < max_fraction < 1:
    raise ValueError(f"max drop fraction must be in (0, 1), got {max_fraction=}")
  batch, size = scores.shape
  cap = mass_cap(max_fraction, size)
  if cap == 0:  # a single unit: dropping it would leave the classifier nothing
    return jnp.ones_like(scores)
  scores = jax.nn.relu(jax.lax.stop_gradient(scores))
  values, indices = jax.lax.top_k(scores, cap)  # the cap's worth, largest first
  total = jnp.sum(scores, axis=-1, keepdims=True)
  count = jnp.where((total[:, 0] > 0) & (share > 0), count_holding_share(values, total, share), 0)  # k_b ≤ cap
  drop = jnp.arange(cap)[None, :] < count[:, None]
  mask = jnp.ones_like(scores).at[jnp.arange(batch)[:, None], indices].min(jnp.where(drop, 0.0, 1.0))
  return jax.lax.stop_gradient(mask)


def ramped_top_k_drop_mask(scores: jax.Array, fraction: float, scale: jax.Array) -> jax.Array:
  """:func:`top_k_drop_mask` with the count scaled at run time: 0 at the ⌈scale·⌈fraction·N⌉⌉ highest scores per row
  (``scale`` in [0, 1], may be traced — a ramp); ``scale = 1`` is exactly :func:`top_k_drop_mask`."""
  batch, size = scores.shape
  k = drop_count(fraction, size)
  if k == 0:
    return jnp.ones_like(scores)
  _, dropped = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
  count = jnp.ceil(jnp.round(scale * k, 6)).astype(jnp.int32)
  keep = jnp.where(jnp.arange(k) < count, 0.0, 1.0)
  mask = jnp.ones_like(scores).at[jnp.arange(batch)[:, None], dropped].min(jnp.broadcast_to(keep, dropped.shape))
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
