r"""The train and eval steps of a model that rebuilds its input (``task="reconstruct"``:
:mod:`overfocus_jax.models.reconstruction`), one ``jax.jit``-compiled function each:

    u          = x · σ + μ                      the batch's pixels back in [0, 1] (the pipeline normalized them)
    û, p, h, k = model(u)                       the reconstruction, the K keypoints, the heatmap, the KL per image
    loss       = (1/B) Σ_i [mean (û_i − u_i)² + β · k_i / D]      no labels; k = 0 without a variational decoder

The model sees the pixels in [0, 1] and rebuilds them there (its decoder ends in a sigmoid); D = H·W·C and β is
``kl_weight``. The step's metrics are ``loss``, ``mse`` and, with a variational decoder, ``kl``; the eval step's
sums ``loss_sum`` (the MSE: in inference the latent is its mean), ``mse_sum`` and ``count``, so a run's records
hold ``train_mse`` and ``test_mse``. The state, the data stream, the chunks of steps, the checkpoints and
their resumption are those of every run (:mod:`overfocus_jax.train.step` for the classifiers').
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from overfocus_jax.models import Model
from overfocus_jax.models.reconstruction import reconstruction_mse
from overfocus_jax.train.state import TrainState
from overfocus_jax.train.step import DROPOUT_STREAM


def pixels(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Normalized images ``(x/255 − μ)/σ`` back to ``x/255`` in [0, 1]."""
  return images * jnp.asarray(std, images.dtype) + jnp.asarray(mean, images.dtype)


def make_train_step(model: Model, tx: optax.GradientTransformation, *, mean: Sequence[float], std: Sequence[float],
                    schedule: optax.Schedule | None = None,
                    kl_weight: float = 1.0) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns ``train_step(state, batch) -> (state, metrics)`` for a reconstructing ``model`` (a
  :class:`~overfocus_jax.models.reconstruction.SaliencyReconstructor`: its ``forward`` returns the reconstruction and
  the KL per image); ``batch['image']`` is normalized with ``mean`` and ``std``, its labels are not read."""
  variational = bool(getattr(model.module, "latent", 0))

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    images = pixels(batch["image"], mean, std)
    rng, step_key = jax.random.split(state.rng)
    dropout_key = jax.random.fold_in(step_key, DROPOUT_STREAM)

    def loss_fn(params):
      out = model.module.apply({"params": params}, images, train=True, rngs={"dropout": dropout_key},
                               method="forward")
      mse = jnp.mean(reconstruction_mse(out["reconstruction"], images))
      kl = jnp.mean(out["kl"])
      return mse + kl_weight * kl / images[0].size, (mse, kl)

    (loss, (mse, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "mse": mse, **({"kl": kl} if variational else {}),
               "learning_rate": schedule(state.step) if schedule is not None else jnp.nan}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  return train_step


def make_eval_step(model: Model, *, mean: Sequence[float], std: Sequence[float]) -> Callable[[TrainState, dict], dict]:
  """Returns ``eval_step(state, batch) -> sums`` of the per-image MSE over the real rows (``batch['mask']``)."""

  def eval_step(state: TrainState, batch: dict) -> dict:
    images = pixels(batch["image"], mean, std)
    rebuilt = model.module.apply({"params": state.params}, images, train=False, method="forward")["reconstruction"]
    errors = reconstruction_mse(rebuilt, images) * batch["mask"]
    return {"loss_sum": jnp.sum(errors), "mse_sum": jnp.sum(errors), "count": jnp.sum(batch["mask"])}

  return eval_step
