"""The train step: forward, regularizer, loss, gradients, optax update, batch-norm statistics, metrics — one
``jax.jit``-compiled function.

    z                 = encode(x)                                      (online encoder, train mode, a dropout key)
    z̃, s', aux        = regularizer.apply(s, classify_fn, z, y, key)   (SGDrop/RSC masks; identity for NONE)
    logits            = classify(z̃)                                   (online head, train mode)
    loss              = objective(CE(logits_i, smooth(y_i)) for each i)     (the batch mean for ERM; IRM, V-REx)

A regularizer is a :class:`overfocus_jax.challenge.Regularizer`, an ``init``/``apply`` pair of pure functions;
its state ``s`` (its step counter, an EMA teacher) lives in ``TrainState.regularizer_state`` and is checkpointed with
the rest. ``classify_fn(z) -> logits`` closes over the step's starting variables with the head in inference mode
and stopped gradients, so a regularizer may call ``jax.grad``/``jax.vjp`` through the head alone to decide what to
drop. A regularizer that ``needs_teacher`` also gets a :class:`overfocus_jax.challenge.TeacherInputs`: the online
variables, the batch's images and the model's inference-mode ``encode``/``classify`` at the regularizer's split
point (``regularizer.split``: the feature map or the pooled vector, ``Model.split``). Its ``aux`` scalars become
the step's metrics (``aux["mask"]`` is not logged). An objective (:mod:`overfocus_jax.challenge.invariance`) turns
the per-example losses into the loss: their mean (ERM), or the risks of the batch's environments with IRM's or
V-REx's penalty.

Batch-norm statistics are threaded through the two halves: ``classify`` runs on the variables ``encode`` updated, so
a model whose halves return the whole updated collection (an NNX adapter) and one that returns only its own half
(the library's Linen models) both end with every fresh statistic.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from overfocus_jax.challenge import NONE, Regularizer, TeacherInputs
from overfocus_jax.challenge.base import apply_regularizer
from overfocus_jax.challenge.invariance import ERM, Objective, reset_optimizer_state
from overfocus_jax.models import Model, merge_batch_stats
from overfocus_jax.train.state import TrainState

DROPOUT_STREAM = 0xD809  # fold_in data for the models' dropout key


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy with optional label smoothing; the caller reduces."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def regularized_sample_metrics(z: jax.Array, regularized: jax.Array, logits: jax.Array,
                               labels: jax.Array) -> dict[str, jax.Array]:
  """The share of the batch the regularizer changed and the share it changed *and* the network still got right.

  Their ratio over an epoch (``regularized_accuracy`` in metrics.jsonl) is the train accuracy on the regularized
  samples alone: the batch accuracy mixes in the samples a regularizer leaves alone (RSC's and a partial-batch
  SGDrop's), which can hide a mask that removes all of the class evidence.
  """
  changed = jnp.any((regularized != z).reshape(z.shape[0], -1), axis=-1)
  correct = jnp.argmax(logits, -1) == labels
  return {"regularized_share": jnp.mean(changed), "regularized_hits": jnp.mean(changed & correct)}


def make_train_step(model: Model, tx: optax.GradientTransformation, *, schedule: optax.Schedule | None = None,
                    regularizer: Regularizer = NONE, label_smoothing: float = 0.0, axis_name: str | None = None,
                    objective: Objective = ERM) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns ``train_step(state, batch) -> (state, metrics)``, a pure function ready for ``jax.jit``.

  ``model``: the library's :class:`~overfocus_jax.models.Model` or an adapter with its interface
  (:mod:`overfocus_jax.models.adapters`). ``batch`` holds ``image`` (B, H, W, C) float and ``label`` (B,) int32.
  ``metrics`` are batch means. ``state.regularizer_state`` must come from ``regularizer.init`` (see
  ``state.create_train_state``).

  ``axis_name``: the step runs per device under ``shard_map`` over that mesh axis (:func:`local_batch_norm_step`):
  forward, batch-norm statistics and regularizer on the device's own rows, then one all-reduce averages the
  gradients, the new running statistics and the metrics over the devices.

  ``objective``: the loss over the batch's per-example losses (ERM: their mean); an environment objective reads the
  batch as ``objective.environments`` equal blocks of rows, and may restart the optimizer's state at one step.
  """
  if objective.environments and axis_name is not None:
    raise ValueError(f"objective {objective.name!r} needs the whole batch; it cannot run per device")
  encode, classify = model.split(regularizer.split)
  infer_encode = lambda variables, x: encode(variables, x, train=False)[0]
  infer_classify = lambda variables, latent: classify(variables, latent, train=False)[0]

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    images, labels = batch["image"], batch["label"]
    rng, step_key = jax.random.split(state.rng)
    # The model's own randomness in training (ConvNeXt's drop path) gets a stream folded out of the step's key: the
    # regularizer's key is the same with or without it, and so is every run of a model without random layers.
    dropout_key = jax.random.fold_in(step_key, DROPOUT_STREAM)
    if axis_name is not None:  # each device's rows draw their own masks
      dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
    frozen = jax.lax.stop_gradient(state.variables)
    teacher = TeacherInputs(variables=frozen, images=images, encode=infer_encode, classify=infer_classify) \
        if regularizer.needs_teacher else None

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      z, encoder_state = encode(variables, images, train=True, rng=dropout_key)
      classify_fn = lambda latent: infer_classify(frozen, latent)
      regularized, reg_state, reg_aux = apply_regularizer(regularizer, state.regularizer_state, classify_fn, z,
                                                          labels, step_key, teacher)
      encoded_stats = merge_batch_stats(state.batch_stats, encoder_state)
      logits, head_state = classify({"params": params, "batch_stats": encoded_stats}, regularized, train=True)
      loss, objective_metrics = objective.loss(cross_entropy(logits, labels, label_smoothing), logits, labels,
                                               state.step)
      reg_metrics = {name: value for name, value in reg_aux.items() if name != "mask"}
      if regularizer is not NONE:
        reg_metrics = {**reg_metrics, **regularized_sample_metrics(z, regularized, logits, labels)}
      reg_metrics = {**reg_metrics, **objective_metrics}
      return loss, (logits, merge_batch_stats(encoded_stats, head_state), reg_state, reg_metrics)

    # Under shard_map, gradients taken at the replicated parameters would come out already summed over the
    # devices; taken at a per-device view of them they are each device's own, and the mean below is the one
    # all-reduce of the step.
    params = state.params if axis_name is None else jax.lax.pcast(state.params, axis_name, to="varying")
    (loss, (logits, batch_stats, reg_state, reg_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels), **reg_metrics}
    if axis_name is not None:  # equal rows per device: the mean of the devices' means is the batch mean
      grads, batch_stats, reg_state, metrics = mean_over_devices((grads, batch_stats, reg_state, metrics), axis_name)
    opt_state = state.opt_state
    if objective.reset_optimizer_at is not None:  # DomainBed restarts Adam where the penalty's weight jumps
      opt_state = reset_optimizer_state(state.step, objective.reset_optimizer_at, tx.init(state.params), opt_state)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["learning_rate"] = schedule(state.step) if schedule is not None else jnp.nan
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              rng=rng, regularizer_state=jax.lax.stop_gradient(reg_state))
    return new_state, metrics

  return train_step


def mean_over_devices(tree, axis_name: str):
  """``lax.pmean`` of every float leaf of ``tree`` over ``axis_name`` (integer leaves, such as counters, are the same
  on every device), in one all-reduce."""
  leaves, treedef = jax.tree.flatten(tree)
  floating = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  means = jax.lax.pmean([leaves[i] for i in floating], axis_name)
  for i, mean in zip(floating, means):
    leaves[i] = mean
  return jax.tree.unflatten(treedef, leaves)


def local_batch_norm_step(train_step: Callable, mesh: jax.sharding.Mesh, axis_name: str) -> Callable:
  """``train_step`` (made with ``axis_name``) run on each device's rows of the batch, the state replicated:
  batch-norm statistics per device, as large-scale data-parallel ResNet training computes them."""
  replicated, rows = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(axis_name)
  return jax.shard_map(train_step, mesh=mesh, in_specs=(replicated, rows), out_specs=(replicated, replicated))


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
