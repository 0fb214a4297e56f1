r"""How concentrated a non-negative attribution map is: the overfocus measures.

Each takes maps of any shape ``(B, ...)``, flattens each sample to :math:`a \in \mathbb{R}_{\ge 0}^N` (negative
entries are clipped to 0) and returns ``(B,)``:

- Attribution ratio at share :math:`s`: with :math:`a_{(1)} \ge a_{(2)} \ge \dots` sorted in decreasing order,
  :math:`\min\{k : \sum_{i \le k} a_{(i)} \ge s \sum_i a_i\} / N`. One-hot: :math:`1/N` (the smallest);
  uniform: :math:`\lceil sN \rceil / N`. A map with zero total is defined as 1.0 (nothing is concentrated).
- Shannon entropy (natural log) of :math:`p = a / \sum a`, :math:`H = -\sum p_i \log p_i` with
  :math:`0 \log 0 = 0`; normalised entropy :math:`H / \log N \in [0, 1]`. A zero map counts as uniform.
- Gini coefficient (the mean-difference form over ascending order :math:`a_{[1]} \le \dots \le a_{[N]}`):
  :math:`G = \sum_{i=1}^{N} (2i - N - 1)\, a_{[i]} / (N \sum_i a_i)`; 0 for a uniform map, :math:`(N-1)/N` for a
  one-hot one. A zero map gives 0.

:func:`latent_concentration` applies them to the latent attribution :math:`A(z, y)` of
:mod:`overfocus_jax.challenge.attribution`; training logs it every epoch (the SGDrop paper's Fig. 1), and
:mod:`overfocus_jax.explain` reports the same measures for every attribution method. They live here, below the
train loop, because training reads them.
"""

import jax
import jax.numpy as jnp

from overfocus_jax.challenge.attribution import latent_attribution
from overfocus_jax.challenge.masks import count_holding_share


def flatten_nonnegative(maps: jax.Array) -> jax.Array:
  return jax.nn.relu(maps.reshape(maps.shape[0], -1))


def attribution_ratio(maps: jax.Array, share: float = 0.5) -> jax.Array:
  """The fraction of positions, largest first, needed to hold ``share`` of the total attribution, ``(B,)``.

  Smallest ``k`` with cumulative sorted sum ≥ ``share · total``, divided by ``N``; 1.0 for a zero map.
  """
  flat = flatten_nonnegative(maps)
  n = flat.shape[-1]
  descending = -jnp.sort(-flat, axis=-1)
  total = jnp.cumsum(descending, axis=-1)[:, -1:]  # as the cumulative sum ends (XLA computes the cumsum once)
  k = count_holding_share(descending, total, share)  # the first position that reaches the share
  return jnp.where(total[:, 0] > 0, k / n, 1.0).astype(flat.dtype)


def _probabilities(maps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(p, total)``: the normalised map, uniform where the total is zero."""
  flat = flatten_nonnegative(maps)
  total = jnp.sum(flat, axis=-1, keepdims=True)
  uniform = jnp.full_like(flat, 1.0 / flat.shape[-1])
  p = jnp.where(total > 0, flat / jnp.where(total > 0, total, 1.0), uniform)
  return p, total[:, 0]


def entropy(maps: jax.Array) -> jax.Array:
  """Shannon entropy (nats) of the normalised map, ``(B,)``: 0 for one-hot, ``log N`` for uniform."""
  p, _ = _probabilities(maps)
  return jnp.sum(jax.scipy.special.entr(p), axis=-1)  # entr(0) = 0


def normalised_entropy(maps: jax.Array) -> jax.Array:
  """Entropy divided by ``log N``, in [0, 1], ``(B,)``."""
  n = maps[0].size
  return entropy(maps) / jnp.log(jnp.asarray(n, jnp.float32)) if n > 1 else jnp.zeros(maps.shape[:1])


def gini(maps: jax.Array) -> jax.Array:
  """Gini coefficient ``Σ (2i − N − 1) a_[i] / (N Σ a)`` over ascending order, ``(B,)``; 0 for a zero map."""
  flat = flatten_nonnegative(maps)
  n = flat.shape[-1]
  ascending = jnp.sort(flat, axis=-1)
  weights = 2.0 * jnp.arange(1, n + 1, dtype=flat.dtype) - n - 1
  total = jnp.sum(flat, axis=-1)
  safe_total = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, jnp.sum(weights * ascending, axis=-1) / (n * safe_total), 0.0)


def latent_concentration(encode_fn, classify_fn, x: jax.Array, labels: jax.Array, share: float = 0.5) -> dict:
  """Mean attribution ratio, normalised entropy and Gini of ``A(z, y)`` over the batch (scalars), for a model's two
  halves in inference mode (:func:`~overfocus_jax.challenge.attribution.latent_attribution`)."""
  _, attribution = latent_attribution(encode_fn, classify_fn, x, labels)
  return {"attribution_ratio": jnp.mean(attribution_ratio(attribution, share)),
          # The same at spatial positions (summed over channels): the share of the image the decision rests on.
          "attribution_ratio_spatial": jnp.mean(attribution_ratio(attribution.sum(-1), share)),
          "attribution_entropy": jnp.mean(normalised_entropy(attribution)),
          "attribution_gini": jnp.mean(gini(attribution))}
