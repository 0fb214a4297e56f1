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

**Two kernels, one mask.** XLA's GPU top-k is built for small :math:`k`, and SGDrop's element mask asks for hundreds
per row. The threshold kernel (:func:`threshold_mask`) builds the same mask without it. Each score :math:`x` of
:math:`w` bits (32 for float32) maps to an unsigned integer in the order ``lax.top_k``'s comparator uses (the float
total order: :math:`-0.0 < +0.0`; a NaN with its sign bit clear above :math:`+\infty`, one with it set below
:math:`-\infty`):

.. math::

    u(x) = \begin{cases} \lnot\,\mathrm{bits}(x) & \text{sign bit set} \\
                          \mathrm{bits}(x) \lor 2^{w-1} & \text{else,} \end{cases} \qquad
    v_b = \max\{t : \#\{i : u_{b,i} \ge t\} \ge k\}

(:math:`v_b` is the :math:`k`-th largest key of row :math:`b`, built from the top bit down: :math:`w` passes of
"count the entries :math:`\ge` the candidate", all rows at once, in a ``lax.fori_loop``), then

.. math::

    r_b = k - \#\{j : u_{b,j} > v_b\}, \qquad
    p_b = \max\{p : \#\{j < p : u_{b,j} = v_b\} < r_b\}, \qquad
    M_{b,i} = 0 \iff u_{b,i} > v_b \;\lor\; (u_{b,i} = v_b \land i \le p_b \land r_b > 0),

the entries above the threshold and the :math:`r_b` lowest-indexed of those on it (:math:`p_b`, the index of the
:math:`r_b`-th, is bisected the same way in :math:`\lceil \log_2 N \rceil` passes, which timed about twice as
fast as a cumsum here): exactly :math:`k`, with ``lax.top_k``'s tie rule. Keys compare bits, so every float, NaN and
±0.0 included, ranks as ``lax.top_k`` ranks it on a CPU (tested); attributions are finite and mostly ≥ 0 after the
ReLU, where this is the plain order. Scores of other float widths use keys of their width (bfloat16: 16 passes).

:func:`drop_mask` and :func:`ramped_drop_mask` pick the kernel (:func:`mask_kernel`): ``lax.top_k`` for small
:math:`k`, the threshold kernel above the platform's ``TOP_K_MAX_K``. On the CPU here the threshold kernel is the
faster from :math:`k = 26` on (0.30× ``lax.top_k``'s time at :math:`128 \times 16384`; the paper's SGDrop step,
:math:`N = 6272`, in 0.96× the time) and ``lax.top_k`` at :math:`k \le 17` (BENCHMARKS.md, "Drop-mask kernels").
The accelerators' limit, 16, is **not measured** (no GPU was lent): ``python -m benchmarks.mask_kernels`` on one
measures it.

:func:`mass_drop_mask` stays on ``lax.top_k``: its count rests on the running sums of the top values in sorted
order; a threshold search would add the same values in another order, so where the share falls within rounding of
a sum its count could differ. Its ``lax.top_k`` is over the cap (25 of 49 positions by default).
:func:`top_k_select` (a batch's samples: 64 of 128 by default) stays on it too.
"""

import math

import jax
import jax.numpy as jnp

KERNELS = ("auto", "top_k", "threshold")
# "auto" runs lax.top_k for k up to this many per row and the threshold kernel above, by jax.default_backend().
# "cpu" is measured on the 2-core CPU here (BENCHMARKS.md, "Drop-mask kernels"): lax.top_k is the faster at k ≤ 17,
# the threshold kernel from k = 26 on. Every other platform takes DEFAULT_TOP_K_MAX_K, NOT measured (no GPU was
# lent): `python -m benchmarks.mask_kernels` on one measures it.
TOP_K_MAX_K = {"cpu": 24}
DEFAULT_TOP_K_MAX_K = 16


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


def ramped_count(scale: jax.Array, k: int) -> jax.Array:
  """⌈scale·k⌉ as an int32 (rounded to 6 decimals first, against float noise); ``scale`` may be traced."""
  return jnp.ceil(jnp.round(scale * k, 6)).astype(jnp.int32)


def ramped_top_k_drop_mask(scores: jax.Array, fraction: float, scale: jax.Array) -> jax.Array:
  """:func:`top_k_drop_mask` with the count scaled at run time: 0 at the ⌈scale·⌈fraction·N⌉⌉ highest scores per row
  (``scale`` in [0, 1], may be traced — a ramp); ``scale = 1`` is exactly :func:`top_k_drop_mask`."""
  batch, size = scores.shape
  k = drop_count(fraction, size)
  if k == 0:
    return jnp.ones_like(scores)
  _, dropped = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
  keep = jnp.where(jnp.arange(k) < ramped_count(scale, k), 0.0, 1.0)
  mask = jnp.ones_like(scores).at[jnp.arange(batch)[:, None], dropped].min(jnp.broadcast_to(keep, dropped.shape))
  return jax.lax.stop_gradient(mask)


def order_keys(scores: jax.Array) -> jax.Array:
  """Unsigned integers of the scores' width in the float total order (the module docstring's u(x)): NOT of the bits
  when the sign bit is set, the bits with the sign bit set otherwise."""
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise TypeError(f"the threshold kernel ranks floating-point scores, got {scores.dtype}")
  width = jnp.finfo(scores.dtype).bits
  unsigned = jnp.dtype(f"uint{width}")
  bits = jax.lax.bitcast_convert_type(scores, unsigned)
  sign = jnp.array(1 << (width - 1), unsigned)
  return jnp.where((bits & sign) != 0, ~bits, bits | sign)


def top_bit_first(found: jax.Array, bits: int, passes) -> jax.Array:
  """Sets the ``bits`` bits of ``found`` from the top down: bit b stays set where ``passes(candidate)`` holds for
  ``found | 2^b``. A ``lax.fori_loop`` of static length: XLA knows its trip count (a GPU runs it without a host
  round trip per pass) and compiles one pass, not ``bits``."""
  one = jnp.ones((), found.dtype)

  def body(step, found):
    candidate = found | (one << (bits - 1 - step).astype(found.dtype))
    return jnp.where(passes(candidate), candidate, found)

  return jax.lax.fori_loop(0, bits, body, found)


def kth_largest_key(keys: jax.Array, k: jax.Array | int) -> jax.Array:
  """(B, 1): v_b = max{t : #{i : keys_bi ≥ t} ≥ k}, the k-th largest key of each row (all ones when k = 0), one
  count per bit of the keys."""
  enough = lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True, dtype=jnp.int32) >= k  # noqa: E731
  return top_bit_first(jnp.zeros(keys.shape[:-1] + (1,), keys.dtype), keys.dtype.itemsize * 8, enough)


def last_tied_index(level: jax.Array, room: jax.Array) -> jax.Array:
  """(B, 1): p_b = max{p : #{j < p : level_bj} < room_b}, the index of each row's room-th True in ``level`` (B, N)
  when 1 ≤ room_b ≤ #level_b; ⌈log₂ N⌉ counts, like :func:`kth_largest_key`."""
  index = jnp.arange(level.shape[-1], dtype=jnp.int32)
  short = lambda p: jnp.sum(level & (index < p), axis=-1, keepdims=True, dtype=jnp.int32) < room  # noqa: E731
  bits = max(1, (level.shape[-1] - 1).bit_length())
  return top_bit_first(jnp.zeros(level.shape[:-1] + (1,), jnp.int32), bits, short)


@jax.jit
def threshold_mask(scores: jax.Array, count: jax.Array | int) -> jax.Array:
  """``scores`` (B, N) → float mask (B, N), 0 at the ``count`` highest scores of each row (lower index first among
  ties), 1 elsewhere — :func:`top_k_drop_mask`'s mask without ``lax.top_k``; ``count`` in [0, N] may be traced.
  Jitted, so that an eager call compiles once per shape rather than its loops at every call."""
  keys = order_keys(jax.lax.stop_gradient(scores))
  threshold = kth_largest_key(keys, count)
  above, level = keys > threshold, keys == threshold
  room = count - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
  tied = level & (jnp.arange(keys.shape[-1]) <= last_tied_index(level, room)) & (room > 0)
  return jax.lax.stop_gradient(jnp.where(above | tied, 0, 1).astype(scores.dtype))


def threshold_drop_mask(scores: jax.Array, fraction: float) -> jax.Array:
  """:func:`top_k_drop_mask` by the threshold kernel: the same mask, exactly."""
  return threshold_mask(scores, drop_count(fraction, scores.shape[-1]))


def ramped_threshold_drop_mask(scores: jax.Array, fraction: float, scale: jax.Array) -> jax.Array:
  """:func:`ramped_top_k_drop_mask` by the threshold kernel: the same mask, exactly (the count clipped to [0, k])."""
  k = drop_count(fraction, scores.shape[-1])
  return threshold_mask(scores, jnp.clip(ramped_count(scale, k), 0, k))


def mask_kernel(k: int, kernel: str = "auto", platform: str | None = None) -> str:
  """The kernel a mask of ``k`` per row runs: ``kernel`` itself unless "auto"; then "top_k" for k up to the
  platform's ``TOP_K_MAX_K`` (else ``DEFAULT_TOP_K_MAX_K``), "threshold" above. ``platform`` defaults to
  ``jax.default_backend()`` at trace time (both kernels give the same mask: only speed depends on the choice)."""
  if kernel not in KERNELS:
    raise ValueError(f"unknown mask {kernel=}; use one of {KERNELS}")
  if kernel != "auto":
    return kernel
  platform = jax.default_backend() if platform is None else platform
  return "top_k" if k <= TOP_K_MAX_K.get(platform, DEFAULT_TOP_K_MAX_K) else "threshold"


def drop_mask(scores: jax.Array, fraction: float, kernel: str = "auto") -> jax.Array:
  """0 at the ⌈fraction·N⌉ highest scores of each row of ``scores`` (B, N), 1 elsewhere, by the kernel
  :func:`mask_kernel` picks: :func:`top_k_drop_mask` or :func:`threshold_drop_mask` (the same mask)."""
  if mask_kernel(drop_count(fraction, scores.shape[-1]), kernel) == "top_k":
    return top_k_drop_mask(scores, fraction)
  return threshold_drop_mask(scores, fraction)


def ramped_drop_mask(scores: jax.Array, fraction: float, scale: jax.Array, kernel: str = "auto") -> jax.Array:
  """:func:`drop_mask` with the count scaled at run time (:func:`ramped_top_k_drop_mask`), by the kernel
  :func:`mask_kernel` picks for the unscaled count."""
  if mask_kernel(drop_count(fraction, scores.shape[-1]), kernel) == "top_k":
    return ramped_top_k_drop_mask(scores, fraction, scale)
  return ramped_threshold_drop_mask(scores, fraction, scale)


def top_k_select(scores: jax.Array, count: int) -> jax.Array:
  """``scores`` (B,) → bool (B,), True for the ``count`` highest (lower index first among ties)."""
  if count <= 0:
    return jnp.zeros(scores.shape, bool)
  _, chosen = jax.lax.top_k(jax.lax.stop_gradient(scores), count)
  return jnp.zeros(scores.shape, bool).at[chosen].set(True)


def dropped_fraction(mask: jax.Array) -> jax.Array:
  """The share of entries a 0/1 mask drops, as a float scalar (for the step's metrics)."""
  return 1.0 - jnp.mean(mask)
