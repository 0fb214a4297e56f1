"""The train step: forward, regularizer, loss, gradients, optax update, batch-norm statistics, metrics — one
``jax.jit``-compiled function.

    z            = encode(x)                                     (online encoder, train mode)
    z̃, aux       = regularizer(classify_fn, z, y, key, step_info)  (e.g. SGDrop or RSC masks; identity for "none")
    logits       = classify(z̃)                                   (online head, train mode)
    loss         = mean_i CE(logits_i, smooth(y_i))

A regularizer is any pure function with the signature of :data:`Regularizer`; ``classify_fn(z) -> logits`` closes
over the current variables with the head in inference mode and stopped gradients, so a regularizer may call
``jax.grad``/``jax.vjp`` through the head alone to decide what to drop. Composition is function composition
(:func:`compose`). ``step_info`` holds ``step`` and ``epoch`` (traced integers) and, when the step keeps an EMA
teacher (``teacher_ema_decay``), ``teacher = {"z": φ'(x), "classify_fn": ψ'}`` computed with the EMA variables,
which are updated after each optimizer step: ``θ' ← d·θ' + (1 − d)·θ`` (batch statistics likewise).
``split="pooled"`` moves the split point to the pooled feature vector (``Model.split``).
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from overfocus_jax.models import Model, merge_batch_stats
from overfocus_jax.train.state import TrainState

# regularizer(classify_fn, z, labels, key, step_info) -> (z_for_the_head, metrics)
Regularizer = Callable[[Callable[[jax.Array], jax.Array], jax.Array, jax.Array, jax.Array, Mapping[str, Any]],
                       tuple[jax.Array, dict[str, jax.Array]]]


def no_regularizer(classify_fn, z, labels, key, step_info):
  """The identity regularizer (ERM)."""
  del classify_fn, labels, key, step_info
  return z, {}


def compose(*regularizers: Regularizer) -> Regularizer:
  """Applies regularizers left to right, each to the previous one's output; metrics are merged."""

  def composed(classify_fn, z, labels, key, step_info):
    metrics = {}
    for regularizer, sub_key in zip(regularizers, jax.random.split(key, len(regularizers))):
      z, more = regularizer(classify_fn, z, labels, sub_key, step_info)
      metrics.update(more)
    return z, metrics

  return composed


def init_ema(state: TrainState) -> TrainState:
  """Starts the EMA teacher as a copy of the current variables (kept in ``state.extra`` and checkpointed)."""
  return state.replace(extra={**state.extra, "ema": jax.tree.map(jnp.copy, state.variables)})


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy with optional label smoothing; the caller reduces."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def ema_update(ema: Any, online: Any, decay: float) -> Any:
  """θ' ← decay·θ' + (1 − decay)·θ, leaf by leaf."""
  return jax.tree.map(lambda e, o: decay * e + (1.0 - decay) * o, ema, online)


def make_train_step(model: Model, tx: optax.GradientTransformation, *, schedule: optax.Schedule | None = None,
                    regularizer: Regularizer = no_regularizer, label_smoothing: float = 0.0,
                    steps_per_epoch: int = 1, split: str = "latent",
                    teacher_ema_decay: float | None = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns ``train_step(state, batch) -> (state, metrics)``, a pure function ready for ``jax.jit``.

  ``batch`` holds ``image`` (B, H, W, C) float32 and ``label`` (B,) int32. ``metrics`` are batch means. With
  ``teacher_ema_decay``, ``state.extra["ema"]`` must hold ``{"params", "batch_stats"}`` (see ``init_ema``).
  """
  encode, classify = model.split(split)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    images, labels = batch["image"], batch["label"]
    rng, step_key = jax.random.split(state.rng)
    step_info = {"step": state.step, "epoch": state.step // steps_per_epoch}
    if teacher_ema_decay is not None:
      ema = state.extra["ema"]
      step_info["teacher"] = {"z": encode(ema, images, train=False)[0],
                              "classify_fn": lambda latent: classify(ema, latent, train=False)[0]}

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      z, encoder_state = encode(variables, images, train=True)
      frozen = jax.lax.stop_gradient(variables)
      classify_fn = lambda latent: classify(frozen, latent, train=False)[0]
      z, reg_metrics = regularizer(classify_fn, z, labels, step_key, step_info)
      logits, head_state = classify(variables, z, train=True)
      loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
      return loss, (logits, merge_batch_stats(state.batch_stats, encoder_state, head_state), reg_metrics)

    (loss, (logits, batch_stats, reg_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "learning_rate": schedule(state.step) if schedule is not None else jnp.nan,
        **reg_metrics,
    }
    extra = state.extra
    if teacher_ema_decay is not None:
      extra = {**extra, "ema": ema_update(extra["ema"], {"params": params, "batch_stats": batch_stats},
                                          teacher_ema_decay)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              rng=rng, extra=extra)
    return new_state, metrics

  return train_step


def make_eval_step(model: Model) -> Callable[[TrainState, dict], dict]:
  """Returns ``eval_step(state, batch) -> sums`` of loss, correct predictions and real examples.

  ``batch['mask']`` marks padded rows with 0, so every batch has one shape (one compilation) and the last, short
  batch still counts exactly.
  """

  def eval_step(state: TrainState, batch: dict) -> dict:
    logits, _ = model.apply(state.variables, batch["image"], train=False)
    mask = batch["mask"]
    losses = cross_entropy(logits, batch["label"])
    return {
        "loss_sum": jnp.sum(losses * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }

  return eval_step
