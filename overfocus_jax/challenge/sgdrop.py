r"""SGDrop: saliency-guided dropout on the latent map.

Bertoin, Sanchez, Zouitine, Rachelson, "The Overfocusing Bias of Convolutional Neural Networks: A Saliency-Guided
Regularization Approach", 2024, https://arxiv.org/abs/2409.17370 (Fig. 2).

.. math::

    A(z, c) = \operatorname{ReLU}\!\Big(\frac{\partial \psi_c(z)}{\partial z} \odot z\Big), \qquad
    M = 1[A \le q_\rho(A)], \qquad
    \tilde z = z \odot M \;\big(\cdot \tfrac{1}{1-\rho} \text{ if rescaled}\big), \qquad
    \mathcal L = \mathrm{CE}(\psi(\tilde z), y)

with :math:`q_\rho` the upper :math:`\rho`-quantile per sample: exactly :math:`\lceil \rho N \rceil` of the
:math:`N` units are dropped (:mod:`overfocus_jax.challenge.masks`). Units are single elements of ``z``, spatial
positions (attribution summed over channels) or channels (summed over positions). In the paper the attribution
comes from an EMA copy :math:`(\phi', \psi')` of the network, :math:`A_{\psi'}(\phi'(x), c)`, and the mask
multiplies the online :math:`z`; the train step provides that teacher in ``step_info["teacher"]`` when
``ema_decay > 0``. Without it the online head and ``z`` are used. No gradient flows through ``M``.
"""

import jax
import jax.numpy as jnp

from overfocus_jax.challenge.attribution import gradient_times_activation
from overfocus_jax.challenge.masks import drop_count, dropped_fraction, top_k_drop_mask, top_k_select

GRANULARITIES = ("element", "spatial", "channel")
TARGETS = ("true", "predicted")


def saliency_mask(attribution: jax.Array, rate: float, granularity: str) -> jax.Array:
  """0/1 mask, broadcastable to ``attribution`` (B, H, W, C), dropping its top-ρ units per sample."""
  batch = attribution.shape[0]
  if granularity == "element":
    return top_k_drop_mask(attribution.reshape(batch, -1), rate).reshape(attribution.shape)
  if attribution.ndim != 4:
    raise ValueError(f"{granularity=} needs a (B, H, W, C) latent map, got shape {attribution.shape}")
  _, height, width, channels = attribution.shape
  if granularity == "spatial":
    scores = jnp.sum(attribution, axis=-1).reshape(batch, -1)
    return top_k_drop_mask(scores, rate).reshape(batch, height, width, 1)
  if granularity == "channel":
    return top_k_drop_mask(jnp.sum(attribution, axis=(1, 2)), rate).reshape(batch, 1, 1, channels)
  raise ValueError(f"unknown {granularity=}; use one of {GRANULARITIES}")


def choose_samples(key: jax.Array, batch: int, fraction: float) -> jax.Array:
  """Exactly ⌈fraction·B⌉ samples, chosen uniformly at random (all of them when fraction is 1)."""
  if fraction >= 1:
    return jnp.ones((batch,), bool)
  return top_k_select(jax.random.uniform(key, (batch,)), drop_count(fraction, batch))


def sgdrop(*, rate: float = 0.1, granularity: str = "element", target: str = "true", rescale: bool = False,
           batch_fraction: float = 1.0):
  """The SGDrop regularizer (see the module docstring) with the train step's regularizer signature.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> w = jnp.arange(4.0)                                       # a linear head: logit_c = Σ z · w_c
    >>> classify_fn = lambda z: jnp.stack([-(z.reshape(1, -1) @ w), z.reshape(1, -1) @ w], -1)[..., 0]
    >>> z = jnp.ones((1, 1, 1, 4))
    >>> z_masked, _ = sgdrop(rate=0.25)(classify_fn, z, jnp.array([1]), jax.random.PRNGKey(0), {})
    >>> z_masked.ravel().tolist()                                 # the most salient unit (w = 3) is dropped
    [1.0, 1.0, 1.0, 0.0]
  """
  if not 0 <= rate < 1:
    raise ValueError(f"SGDrop rate must be in [0, 1), got {rate=}")
  if granularity not in GRANULARITIES:
    raise ValueError(f"unknown {granularity=}; use one of {GRANULARITIES}")
  if target not in TARGETS:
    raise ValueError(f"unknown {target=}; use one of {TARGETS}")
  if not 0 < batch_fraction <= 1:
    raise ValueError(f"batch_fraction must be in (0, 1], got {batch_fraction=}")
  scale = 1.0 / (1.0 - rate) if rescale else 1.0

  def regularizer(classify_fn, z, labels, key, step_info):
    teacher = step_info.get("teacher") if step_info else None
    attr_classify, attr_z = (teacher["classify_fn"], teacher["z"]) if teacher else (classify_fn, z)
    attribution = gradient_times_activation(attr_classify, attr_z, labels, target)
    mask = saliency_mask(attribution, rate, granularity)
    chosen = choose_samples(key, z.shape[0], batch_fraction).reshape((-1,) + (1,) * (z.ndim - 1))
    multiplier = jnp.where(chosen, mask * scale, 1.0)
    dropped = jnp.where(chosen, mask, 1.0) * jnp.ones_like(z)
    metrics = {"sgdrop_dropped_fraction": dropped_fraction(dropped),
               "sgdrop_batch_fraction": jnp.mean(chosen.astype(jnp.float32))}
    return z * jax.lax.stop_gradient(multiplier), metrics

  return regularizer
