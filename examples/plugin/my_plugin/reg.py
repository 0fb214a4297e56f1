"""A regularizer of your own: zero each sample's most active channel of z (a toy self-challenge)."""

import jax
import jax.numpy as jnp

import overfocus_jax as ofx


def drop_strongest(share: float = 1.0) -> ofx.Regularizer:
  """Drops the most active channel of a random ``share`` of the samples; reports the mask and one metric."""

  def fn(classify_fn, z, labels, key):
    del classify_fn, labels
    strongest = jnp.argmax(jnp.mean(z, axis=(1, 2)), axis=-1)
    chosen = jax.random.uniform(key, (z.shape[0],)) < share
    mask = 1.0 - jax.nn.one_hot(strongest, z.shape[-1])[:, None, None, :] * chosen[:, None, None, None]
    return z * mask, {"mask": mask, "strongest_dropped_fraction": jnp.mean(chosen.astype(jnp.float32))}

  return ofx.stateless(fn)
