"""Evaluation of a train state: loss and accuracy over a whole split, and the per-epoch attribution probe.

The probe measures the overfocus statistics of :func:`overfocus_jax.challenge.concentration.latent_concentration`
(``attribution_ratio``, ``attribution_ratio_spatial``, ``attribution_entropy``, ``attribution_gini``) on a fixed
batch of the first :data:`ATTRIBUTION_IMAGES` test images, so the SGDrop paper's Fig. 1 can be drawn for any run.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from overfocus_jax import parallel
from overfocus_jax.challenge.concentration import latent_concentration
from overfocus_jax.data import on_device, pipeline
from overfocus_jax.data.sources import load_dataset
from overfocus_jax.errors import UserError
from overfocus_jax.train.experiment import Experiment, eval_step, jit, jit_eval_step
from overfocus_jax.train.state import TrainState

ATTRIBUTION_IMAGES = 64


def evaluate(exp: Experiment, state: TrainState, source, eval_step=None) -> dict:
  """Loss and accuracy of ``state`` on every example of ``source`` (padded batches, masked)."""
  eval_step = eval_step or jit_eval_step(exp)
  totals = None
  for batch in pipeline.eval_batches(source, batch_size=exp.config.eval_batch_size, mean=exp.dataset.mean,
                                     std=exp.dataset.std):
    sums = eval_step(state, parallel.shard_batch(batch, exp.mesh))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return _totals_to_metrics(totals)


def _totals_to_metrics(totals: dict) -> dict:
  """The eval step's sums over a split as means: ``loss``, ``accuracy`` (from ``correct``) for a classifier, ``mse``
  (from ``mse_sum``) for a reconstruction, and ``n``."""
  totals = jax.device_get(totals)
  n = float(totals["count"])
  means = {"loss": float(totals["loss_sum"]) / n}
  if "correct" in totals:
    means["accuracy"] = float(totals["correct"]) / n
  means.update({name[:-len("_sum")]: float(value) / n for name, value in totals.items()
                if name.endswith("_sum") and name != "loss_sum"})
  return {**means, "n": int(n)}


def jit_resident_evaluation(exp: Experiment):
  """``(state, batches, mask) -> sums`` over a split already on the device, cut into padded batches
  (:func:`on_device.padded_eval_batches`): one compiled pass, a ``lax.scan`` over the batches, normalized there."""
  step = eval_step(exp)
  rep, data = parallel.replicated(exp.mesh), parallel.data_sharded(exp.mesh)
  mean, std = exp.dataset.mean, exp.dataset.std

  def evaluate_split(state, batches, mask):
    def batch_sums(xs):
      images, labels, valid = xs
      batch = {"image": on_device.normalize(images, mean, std), "label": labels, "mask": valid}
      return step(state, jax.lax.with_sharding_constraint(batch, data))

    def add_batch(totals, xs):
      return jax.tree.map(jnp.add, totals, batch_sums(xs)), None

    first = jax.tree.map(lambda a: a[0], (batches.images, batches.labels, mask))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(batch_sums, first))
    return jax.lax.scan(add_batch, zeros, (batches.images, batches.labels, mask))[0]

  return jit(exp, evaluate_split, in_shardings=(rep, rep, rep), out_shardings=rep)


def make_evaluator(exp: Experiment, source, *, resident: bool) -> Callable[[TrainState], dict]:
  """``evaluate(state) -> {loss, accuracy, n}`` on ``source``: with ``resident``, the split is copied to the devices
  once and each evaluation is one compiled pass; otherwise host batches through the eval step (:func:`evaluate`)."""
  if not resident:
    eval_step = jit_eval_step(exp)
    return lambda state: evaluate(exp, state, source, eval_step)
  batches, mask = on_device.padded_eval_batches(on_device.put_split(source, parallel.replicated(exp.mesh)), exp.config.eval_batch_size)
  evaluate_split = jit_resident_evaluation(exp)
  return lambda state: _totals_to_metrics(evaluate_split(state, batches, mask))


def evaluation_split(exp: Experiment, dataset: str | None):
  """``(source, name)``: the experiment's own test split, or that of ``dataset`` when it fits the model."""
  if not dataset:
    return exp.dataset.test, exp.config.dataset
  trained = exp.dataset
  # Another folder without a :SIZE is read at the size the model was trained on.
  image_size = 0
  if dataset.strip().startswith("imagefolder:"):
    from overfocus_jax.data import imagefolder  # PIL only when needed
    image_size = 0 if imagefolder.parse_spec(dataset, dataset.split(":", 1)[1])[1] else exp.dataset.image_shape[0]
  other = load_dataset(dataset, data_dir=exp.config.data_dir or None, skip_bad_images=exp.config.skip_bad_images,
                       trial_seed=exp.config.environments.trial_seed, image_size=image_size)
  if other.image_shape != trained.image_shape or other.num_classes > trained.num_classes:
    raise UserError(f"dataset {dataset!r} has {other.image_shape} images and {other.num_classes} classes; "
                    f"the model was trained on {trained.image_shape} and {trained.num_classes}",
                    "use a dataset of the same image shape and label set")
  return other.test, dataset


def attribution_batch(exp: Experiment) -> dict | None:
  """The fixed batch the per-epoch attribution metrics use: the first test images (None without a latent split)."""
  if not exp.model.supports_split("latent"):
    return None
  count = min(ATTRIBUTION_IMAGES, len(exp.dataset.test))
  batch = next(pipeline.eval_batches(exp.dataset.test, batch_size=count, mean=exp.dataset.mean, std=exp.dataset.std))
  return {"image": batch["image"], "label": batch["label"]}


def jit_attribution_probe(exp: Experiment):
  """``(state, batch) -> {attribution_ratio, ...}`` (:func:`latent_concentration`), everything replicated."""
  rep = parallel.replicated(exp.mesh)
  fn = lambda state, batch: latent_concentration(*exp.model.inference_fns(state.variables), batch["image"], batch["label"])
  return jit(exp, fn, in_shardings=(rep, rep), out_shardings=rep)
