r"""Drop masks: which units of each row of scores a regularizer zeroes. Every mask is a constant for autodiff
(no gradient flows through it) and every fraction may be a traced array (``jax.jit``, ``jax.vmap`` over it).

For scores :math:`s \in \mathbb{R}^{B \times N}` and a drop fraction :math:`\rho \in [0, 1)`, three rules:

**Exact count** (:func:`drop_mask`): :math:`k = \lceil \rho N \rceil` entries dropped in every row,

.. math::

    M_{b,i} = 0 \text{ if } i \in \operatorname{top}_k(s_b) \text{ else } 1,

ties broken deterministically: among equal scores the lower index is dropped first (``lax.top_k``'s order).

**Quantile** (:func:`quantile_mask`): the formula as written, per row,

.. math::

    M_{b,i} = 1\big[s_{b,i} \le \operatorname{quantile}(s_b,\, 1 - \rho)\big]

with ``jnp.quantile``'s linear interpolation: on distinct scores it drops :math:`N - 1 - \lfloor (1-\rho)(N-1)
\rfloor` entries, and every entry tied with the threshold stays (an all-equal row loses nothing).

**Attribution mass** (:func:`mass_drop_mask`): per row of non-negative scores, the fewest highest-scored entries
whose scores sum to a share :math:`m` of the row's total, at most :math:`K = \min(\lceil c N \rceil, N - 1)` of
them — the rule always keeps at least one unit, so a 1×1 map or a single channel is never emptied:

.. math::

    k_b = \min\Big(K,\; \min\{k : \textstyle\sum_{i \le k} s_{b,(i)} \ge m \sum_i s_{b,i}\}\Big),
    \qquad k_b = 0 \text{ when } \textstyle\sum_i s_{b,i} = 0,

with :math:`s_{b,(1)} \ge s_{b,(2)} \ge \dots` the row sorted in decreasing order (ties: lower index first).

**Counts.** :math:`\lceil \rho N \rceil` forgives float noise: a product within :math:`2^{-20}` (relative) above an
integer counts as that integer, so float32's rounding of :math:`\rho` never adds a unit. A Python fraction gives a
Python count (:func:`drop_count`); an array, traced or not, an int32 count computed the same way in float32
(:func:`unit_count`), and the threshold kernel below, which needs no static :math:`k`.

**Two kernels, one exact-count mask.** ``lax.top_k`` needs a static :math:`k`, and XLA's GPU top-k is built for
small :math:`k`. The threshold kernel (:func:`threshold_mask`) builds the same mask from a count that may be traced.
Each score :math:`x` of :math:`w` bits (32 for float32) maps to an unsigned integer in the order ``lax.top_k``'s
comparator uses (the float total order: :math:`-0.0 < +0.0`; a NaN with its sign bit clear above :math:`+\infty`,
one with it set below :math:`-\infty`):

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
:math:`r_b`-th, is bisected the same way in :math:`\lceil \log_2 N \rceil` passes): exactly :math:`k`, with
``lax.top_k``'s tie rule. Keys compare bits, so every float, NaN and ±0.0 included, ranks as ``lax.top_k`` ranks it
on a CPU; scores of other float widths use keys of their width (bfloat16: 16 passes).

:func:`drop_mask` picks the kernel (:func:`mask_kernel`): ``lax.top_k`` for small :math:`k`, the threshold kernel
above the platform's ``TOP_K_MAX_K`` (the crossover is measured by ``python -m benchmarks.mask_kernels``; the
results page holds the numbers). :func:`mass_drop_mask` stays on ``lax.top_k``: its count rests on the running sums
of the top values in sorted order, and a threshold search would add the same values in another order.
"""

import math
import numbers

import jax
import jax.numpy as jnp

KERNELS = ("auto", "top_k", "threshold")
# "auto" runs lax.top_k for k up to this many per row and the threshold kernel above, by jax.default_backend(). The
# CPU's limit is read off `python -m benchmarks.mask_kernels`; every other platform takes DEFAULT_TOP_K_MAX_K until
# that command has been run on it.
TOP_K_MAX_K = {"cpu": 24}
DEFAULT_TOP_K_MAX_K = 16
# A traced fraction's count forgives this much float noise (relative) above an integer: float32's rounding of ρ.
COUNT_TOLERANCE = 2.0 ** -20


def is_static(value) -> bool:
  """Whether ``value`` is a Python (or NumPy) number, known when the program is traced; arrays, traced or not, are
  not: their counts are computed inside the program."""
  return isinstance(value, numbers.Number)


def check_fraction(name: str, value, *, low: float = 0.0, high: float = 1.0, low_open: bool = False,
                   high_open: bool = True) -> None:
  """Raises ``ValueError`` naming ``name`` when a static ``value`` lies outside its interval (a traced one cannot be
  checked: it is the caller's)."""
  if not is_static(value):
    return
  above_low = value > low if low_open else value >= low
  below_high = value < high if high_open else value <= high
  if not (above_low and below_high and math.isfinite(value)):
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be in {interval}, got {name}={value!r}")


def drop_count(fraction: float, size: int) -> int:
  """⌈fraction · size⌉ for a Python fraction in [0, 1), forgiving ``COUNT_TOLERANCE`` of float noise above an integer
  (0.28 · 25 is 7.000000000000001; float32's 1/3 times 72 is 24.0000007)."""
  if not 0 <= fraction < 1:
    raise ValueError(f"drop fraction must be in [0, 1), got {fraction=}")
  product = fraction * size
  return min(size, math.ceil(product - abs(product) * COUNT_TOLERANCE))


def unit_count(fraction, size: int):
  """⌈fraction · size⌉: :func:`drop_count` (a Python int) for a Python fraction; an int32 array in [0, size] for an
  array (traced or not), computed the same way in float32."""
  if is_static(fraction):
    return drop_count(fraction, size)
  product = jnp.asarray(fraction, jnp.float32) * size
  return jnp.clip(jnp.ceil(product - jnp.abs(product) * COUNT_TOLERANCE), 0, size).astype(jnp.int32)


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


def count_holding_share(descending: jax.Array, total: jax.Array, share) -> jax.Array:
  """(B,) the fewest leading entries of each row of ``descending`` (sorted largest first, ≥ 0) whose sum reaches
  ``share`` of ``total`` (B, 1); the row's length when even all of them fall short."""
  short = jnp.cumsum(descending, axis=-1) < share * total * (1.0 - RELATIVE_SLACK)
  return jnp.minimum(jnp.sum(short, axis=-1) + 1, descending.shape[-1])


def mass_cap(max_fraction, size: int):
  """K = min(⌈max_fraction · size⌉, size − 1): the most units the mass rule drops in a row; one always stays."""
  if is_static(max_fraction):
    return min(drop_count(max_fraction, size), size - 1)
  return jnp.minimum(unit_count(max_fraction, size), size - 1)


def mass_drop_mask(scores: jax.Array, share, max_fraction) -> jax.Array:
  """``scores`` (B, N) ≥ 0 → float mask (B, N): 0 at the fewest top scores holding ``share`` of each row's total,
  at most min(⌈max_fraction·N⌉, N − 1) of them (see :mod:`overfocus_jax.challenge.masks`); 1 elsewhere. Negative
  scores count as 0. ``share`` and ``max_fraction`` may be traced (a traced cap ranks the whole row)."""
  check_fraction("share", share, low_open=True, high_open=False)
  check_fraction("max_fraction", max_fraction, low_open=True)
  batch, size = scores.shape
  cap = mass_cap(max_fraction, size)
  # A static cap ranks only its own worth of units; a traced one every unit but one, then counts to the cap.
  ranked = cap if is_static(cap) else size - 1
  if ranked == 0:  # a single unit: dropping it would leave the classifier nothing
    return jnp.ones_like(scores)
  scores = jax.nn.relu(jax.lax.stop_gradient(scores))
  values, indices = jax.lax.top_k(scores, ranked)  # largest first
  total = jnp.sum(scores, axis=-1, keepdims=True)
  count = jnp.where((total[:, 0] > 0) & (share > 0), count_holding_share(values, total, share), 0)
  if not is_static(cap):
    count = jnp.minimum(count, cap)
  drop = jnp.arange(ranked)[None, :] < count[:, None]
  mask = jnp.ones_like(scores).at[jnp.arange(batch)[:, None], indices].min(jnp.where(drop, 0.0, 1.0))
  return jax.lax.stop_gradient(mask)


def quantile_mask(scores: jax.Array, fraction) -> jax.Array:
  """``scores`` (B, N) → float mask (B, N): 1[s ≤ jnp.quantile(s, 1 − fraction)] per row, ties and all (see
  :mod:`overfocus_jax.challenge.masks`); ``fraction`` in [0, 1] may be traced."""
  check_fraction("fraction", fraction, high_open=False)
  scores = jax.lax.stop_gradient(scores)
  level = 1.0 - jnp.asarray(fraction, jnp.promote_types(scores.dtype, jnp.float32))
  threshold = jnp.quantile(scores.astype(level.dtype), level, axis=-1, keepdims=True)
  return jax.lax.stop_gradient((scores.astype(level.dtype) <= threshold).astype(scores.dtype))


def ramped_count(scale: jax.Array, k) -> jax.Array:
  """⌈scale·k⌉ as an int32 (rounded to 6 decimals first, against float noise); ``scale`` and ``k`` may be traced."""
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
  ties), 1 elsewhere — :func:`top_k_drop_mask`'s mask without ``lax.top_k``; ``count`` in [0, N] may be traced, a
  scalar or one per row (B, 1). Jitted, so that an eager call compiles once per shape rather than its loops at
  every call."""
  keys = order_keys(jax.lax.stop_gradient(scores))
  threshold = kth_largest_key(keys, count)
  above, level = keys > threshold, keys == threshold
  room = count - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
  tied = level & (jnp.arange(keys.shape[-1]) <= last_tied_index(level, room)) & (room > 0)
  return jax.lax.stop_gradient(jnp.where(above | tied, 0, 1).astype(scores.dtype))


def threshold_drop_mask(scores: jax.Array, fraction) -> jax.Array:
  """:func:`top_k_drop_mask` by the threshold kernel: the same mask, exactly (``fraction`` may be traced)."""
  return threshold_mask(scores, unit_count(fraction, scores.shape[-1]))


def ramped_threshold_drop_mask(scores: jax.Array, fraction, scale: jax.Array) -> jax.Array:
  """:func:`ramped_top_k_drop_mask` by the threshold kernel: the same mask, exactly (the count clipped to [0, k]);
  ``fraction`` may be traced."""
  k = unit_count(fraction, scores.shape[-1])
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


def _kernel_for(fraction, size: int, kernel: str) -> str:
  """A traced fraction's count is known only at run time: the threshold kernel, whatever ``kernel`` says."""
  if not is_static(fraction):
    mask_kernel(0, kernel)  # still reject an unknown kernel name
    return "threshold"
  return mask_kernel(drop_count(fraction, size), kernel)


def drop_mask(scores: jax.Array, fraction, kernel: str = "auto") -> jax.Array:
  """0 at the ⌈fraction·N⌉ highest scores of each row of ``scores`` (B, N), 1 elsewhere, by the kernel
  :func:`mask_kernel` picks: :func:`top_k_drop_mask` or :func:`threshold_drop_mask` (the same mask). ``fraction``
  in [0, 1) may be traced."""
  check_fraction("fraction", fraction)
  if _kernel_for(fraction, scores.shape[-1], kernel) == "top_k":
    return top_k_drop_mask(scores, fraction)
  return threshold_drop_mask(scores, fraction)


def ramped_drop_mask(scores: jax.Array, fraction, scale: jax.Array, kernel: str = "auto") -> jax.Array:
  """:func:`drop_mask` with the count scaled at run time (:func:`ramped_top_k_drop_mask`), by the kernel
  :func:`mask_kernel` picks for the unscaled count."""
  check_fraction("fraction", fraction)
  if _kernel_for(fraction, scores.shape[-1], kernel) == "top_k":
    return ramped_top_k_drop_mask(scores, fraction, scale)
  return ramped_threshold_drop_mask(scores, fraction, scale)


def top_k_select(scores: jax.Array, count: int) -> jax.Array:
  """``scores`` (B,) → bool (B,), True for the ``count`` highest (lower index first among ties)."""
  if count <= 0:
    return jnp.zeros(scores.shape, bool)
  _, chosen = jax.lax.top_k(jax.lax.stop_gradient(scores), count)
  return jnp.zeros(scores.shape, bool).at[chosen].set(True)


def select_top(scores: jax.Array, fraction) -> jax.Array:
  """``scores`` (B,) → bool (B,), True for the ⌈fraction·B⌉ highest (lower index first among ties); every entry at
  ``fraction`` ≥ 1. ``fraction`` may be traced: the same choice, counted at run time."""
  if is_static(fraction):
    if fraction >= 1:
      return jnp.ones(scores.shape, bool)
    return top_k_select(scores, drop_count(fraction, scores.shape[0]))
  count = jnp.where(jnp.asarray(fraction) >= 1, scores.shape[0], unit_count(jnp.minimum(fraction, 1.0),
                                                                            scores.shape[0]))
  return threshold_mask(scores[None, :], count)[0] == 0


def above_kth_mask(scores: jax.Array, count) -> jax.Array:
  """The official RSC's threshold rule: 0 at the entries of each row of ``scores`` (B, N) strictly above its
  (count + 1)-th largest value, 1 elsewhere. On distinct scores that is the ``count`` largest; where a tie crosses
  the boundary, fewer (possibly none); at ``count ≥ N``, where the reference code would index past its sorted list,
  every entry. Values compare as IEEE floats (−0.0 equals +0.0). ``count`` may be traced."""
  scores = jax.lax.stop_gradient(scores)
  size = scores.shape[-1]
  ascending = jnp.sort(scores, axis=-1)
  index = jnp.asarray(size - 1 - count)  # the (count + 1)-th largest, in ascending order
  threshold = jnp.take(ascending, jnp.clip(index, 0, size - 1), axis=-1)[..., None]
  above = (scores > threshold) | (index < 0)
  return jax.lax.stop_gradient(jnp.where(above, 0, 1).astype(scores.dtype))


def below_percentile(scores: jax.Array, percent) -> jax.Array:
  r"""bool, like ``scores`` (B, N): ``scores < np.percentile(scores, percent, axis=-1, keepdims=True)``, as NumPy
  decides it for float32 scores (its default "linear" method, the interpolation in float32):

  .. math::

      v = (N - 1) \cdot \tfrac{p}{100}, \quad a = s_{(\lfloor v \rfloor)}, \quad b = s_{(\lfloor v \rfloor + 1)},
      \quad \gamma = v - \lfloor v \rfloor, \qquad
      q = \begin{cases} a \oplus (b \ominus a) \otimes \gamma & \gamma < \tfrac12 \\
                         b \ominus (b \ominus a) \otimes (1 - \gamma) & \text{else} \end{cases}

  (:math:`s_{(i)}` the row in increasing order; :math:`\oplus, \ominus, \otimes` float32 operations, each rounded;
  at :math:`v \ge N - 1`, :math:`q` is the largest value). No value lies strictly between :math:`a` and :math:`b`
  and :math:`a \le q \le b`, so :math:`s < q` exactly when :math:`s < a`, or :math:`s = a < q`; whether
  :math:`q > a` is decided from the rounding of those two operations, in exact comparisons — a compiler that fused
  the multiply and the add (one rounding) would otherwise move :math:`q` by an ulp. :math:`v` and :math:`\gamma`
  are float64 for a Python ``percent``, as in NumPy, and float32 for a traced one."""
  scores = jax.lax.stop_gradient(scores)
  size = scores.shape[-1]
  ascending = jnp.sort(scores, axis=-1)
  if is_static(percent):
    virtual = (size - 1) * (percent / 100)
    top = virtual >= size - 1
    low = min(max(math.floor(virtual), 0), size - 1)
    gamma = virtual - low
  else:
    virtual = (size - 1) * (jnp.asarray(percent, jnp.float32) / 100)
    top = virtual >= size - 1
    low = jnp.clip(jnp.floor(virtual), 0, size - 1).astype(jnp.int32)
    gamma = virtual - low
  a = jnp.take(ascending, low, axis=-1)[..., None]
  b = jnp.take(ascending, jnp.minimum(low + 1, size - 1), axis=-1)[..., None]
  up = jnp.nextafter(a, jnp.asarray(jnp.inf, a.dtype))  # the float after a
  up_is_even = (jax.lax.bitcast_convert_type(up, jnp.uint32 if up.dtype == jnp.float32 else jnp.uint16) & 1) == 0
  # γ < ½: q = a ⊕ p with p = (b ⊖ a) ⊗ γ ≥ 0 rounds above a when p passes half the gap to the next float (a tie
  # goes to the even one).
  p = (b - a) * jnp.asarray(gamma, scores.dtype)
  half_gap = (up - a) * 0.5
  low_branch = (p > half_gap) | ((p == half_gap) & up_is_even)
  # γ ≥ ½: q = b ⊖ (b ⊖ a) ⊗ w, w = 1 − γ ≤ ½, lies in [(a + b) / 2, b]: above a unless b is a's neighbour, and then
  # (b − a a power of two, the product exact) unless w = ½ lands on the midpoint and the tie goes to a.
  w = jnp.asarray(1 - gamma, scores.dtype)
  high_branch = (b > a) & ((b > up) | (w < 0.5) | ((w == 0.5) & up_is_even))
  q_above_a = jnp.where(jnp.asarray(gamma) < 0.5, low_branch, high_branch)
  below = (scores < a) | ((scores == a) & q_above_a)
  largest = ascending[..., -1:]
  return jnp.where(top, scores < largest, below)


def dropped_fraction(mask: jax.Array) -> jax.Array:
  """The share of entries a 0/1 mask drops, as a float scalar (for the step's metrics)."""
  return 1.0 - jnp.mean(mask)
