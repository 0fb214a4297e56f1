"""Evaluation of a train state: loss and accuracy over a whole split, and the per-epoch attribution probe.

The probe measures the overfocus statistics of :func:`overfocus_jax.challenge.concentration.latent_concentration`
(``attribution_ratio``, ``attribution_ratio_spatial``, ``attribution_entropy``, ``attribution_gini``) on a fixed
batch of the first :data:`ATTRIBUTION_IMAGES` test images, so the SGDrop paper's Fig. 1 can be drawn for any run.
"""

import jax

from overfocus_jax import parallel
from overfocus_jax.challenge.concentration import latent_concentration
from overfocus_jax.data import pipeline
from overfocus_jax.data.sources import load_dataset
from overfocus_jax.errors import UserError
from overfocus_jax.train.experiment import Experiment, jit, jit_eval_step
from overfocus_jax.train.state import TrainState

ATTRIBUTION_IMAGES = 64


def evaluate(exp: Experiment, state: TrainState, source, eval_step=None) -> dict:
  """Loss and accuracy of ``state`` on every example of ``source`` (padded batches, masked)."""
  eval_step = eval_step or jit_eval_step(exp)
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in pipeline.eval_batches(source, batch_size=exp.config.eval_batch_size, mean=exp.dataset.mean,
                                     std=exp.dataset.std):
    sums = eval_step(state, parallel.shard_batch(batch, exp.mesh))
    totals = jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  n = float(totals["count"])
  return {"loss": float(totals["loss_sum"]) / n, "accuracy": float(totals["correct"]) / n, "n": int(n)}


def evaluation_split(exp: Experiment, dataset: str | None):
  """``(source, name)``: the experiment's own test split, or that of ``dataset`` when it fits the model."""
  if not dataset:
    return exp.dataset.test, exp.config.dataset
  trained = exp.dataset
  other = load_dataset(dataset, data_dir=exp.config.data_dir or None)
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
  fn = lambda state, batch: latent_concentration(exp.model, state.variables, batch["image"], batch["label"])
  return jit(exp, fn, in_shardings=(rep, rep), out_shardings=rep)
