"""``train_and_evaluate``: the whole run — data, model, sharded jitted step, per-epoch evaluation, logs and
checkpoints — resuming from ``WORKDIR/checkpoints`` when there is one.

Workdir layout: ``checkpoints/`` (orbax), ``config.json``, ``metrics.jsonl`` (one object per epoch), TensorBoard
event files, ``summary.json`` at the end.

Besides loss and accuracy, each epoch's record holds the overfocus measurements of
:mod:`overfocus_jax.explain.latent` (``attribution_ratio``, ``attribution_ratio_spatial``, ``attribution_entropy``,
``attribution_gini``) on a fixed batch of the first :data:`ATTRIBUTION_IMAGES` test images, and
``generalization_gap`` = train accuracy − test accuracy, so the SGDrop paper's Fig. 1 can be drawn for any run
(``overfocus explain``). The train accuracy is the epoch's running mean of the train steps' accuracy — on augmented
batches, after the regularizer's masks, while the weights move — so early in a run the gap can be negative, and a
regularizer that masks lowers it by construction; near convergence it is the usual gap.
"""

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from overfocus_jax import config as config_lib
from overfocus_jax import parallel
from overfocus_jax.data import pipeline
from overfocus_jax.data.sources import ImageDataset, load_dataset
from overfocus_jax.errors import UserError
from overfocus_jax.models import Model, build_model, check_model_fits
from overfocus_jax.train import checkpoint as checkpoint_lib
from overfocus_jax.train import state as state_lib
from overfocus_jax.challenge import Challenge, build_challenge
from overfocus_jax.explain import latent as latent_lib
from overfocus_jax.train.step import init_ema, make_eval_step, make_train_step


def prepare_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  """Creates ``workdir`` and proves it writable before any work starts."""
  path = pathlib.Path(workdir).expanduser().resolve()
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_test"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise UserError(f"workdir {str(path)!r} is not writable ({e.strerror or type(e).__name__})",
                    "pass a --workdir in a directory you can write to") from None
  return path


@dataclasses.dataclass
class Experiment:
  """Everything built from a config, before any step runs: shared by train, eval and bench."""

  config: ml_collections.ConfigDict
  dataset: ImageDataset
  model: Model
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  schedule: Callable
  tx: Any
  state: state_lib.TrainState  # freshly initialised, replicated over the mesh
  challenge: Challenge


def build_experiment(config: ml_collections.ConfigDict, *, dataset: ImageDataset | None = None,
                     mesh: jax.sharding.Mesh | None = None) -> Experiment:
  dataset = dataset or load_dataset(config.dataset, data_dir=config.data_dir or None)
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  check_model_fits(config, dataset.image_shape)  # the focus/attention models' own limits, named by field
  model = build_model(config, dataset.num_classes, conv_general_dilated=parallel.conv_for_mesh(mesh))
  state_lib.check_input_shape(model, dataset.image_shape)
  steps = pipeline.steps_per_epoch(dataset, config.batch_size)
  schedule = state_lib.make_schedule(config, steps)
  tx = state_lib.make_optimizer(config, schedule)
  state = state_lib.create_train_state(model, tx, seed=config.seed, input_shape=dataset.image_shape)
  challenge = build_challenge(config)
  check_challenge_fits(model, challenge, config.regularizer.name)
  if challenge.teacher_ema_decay is not None:
    state = init_ema(state)
  return Experiment(config, dataset, model, mesh, steps, schedule, tx, parallel.replicate(state, mesh), challenge)


def check_challenge_fits(model: Model, challenge: Challenge, name: str) -> None:
  """A regularizer needs the model's encode/classify split at its level."""
  if not model.supports_split(challenge.split):
    raise UserError(f"regularizer {name!r} needs a model with an encode/classify split at the {challenge.split} "
                    f"level, and {model.name!r} has none", "use --config.model=resnet or resnet18, or "
                    "--config.regularizer.name=none")


def jit_train_step(exp: Experiment, challenge: Challenge | None = None):
  """The train step compiled once for the mesh: state replicated, batch sharded, state buffers donated.

  ``challenge`` defaults to the one the config names; pass your own to train with a custom regularizer.
  """
  challenge = challenge or exp.challenge
  step = make_train_step(exp.model, exp.tx, schedule=exp.schedule, regularizer=challenge.regularizer,
                         label_smoothing=exp.config.label_smoothing, steps_per_epoch=exp.steps_per_epoch,
                         split=challenge.split, teacher_ema_decay=challenge.teacher_ema_decay)
  rep, data = parallel.replicated(exp.mesh), parallel.data_sharded(exp.mesh)
  return parallel.jit_for_mesh(step, exp.mesh, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)


def jit_eval_step(exp: Experiment):
  """The eval step compiled once for the mesh: state replicated, batch sharded, sums replicated."""
  rep, data = parallel.replicated(exp.mesh), parallel.data_sharded(exp.mesh)
  return parallel.jit_for_mesh(make_eval_step(exp.model), exp.mesh, in_shardings=(rep, data), out_shardings=rep)


ATTRIBUTION_IMAGES = 64


def attribution_batch(exp: Experiment) -> dict | None:
  """The fixed batch the per-epoch attribution metrics use: the first test images (None without a latent split)."""
  if not exp.model.supports_split("latent"):
    return None
  count = min(ATTRIBUTION_IMAGES, len(exp.dataset.test))
  batch = next(pipeline.eval_batches(exp.dataset.test, batch_size=count, mean=exp.dataset.mean, std=exp.dataset.std))
  return {"image": batch["image"], "label": batch["label"]}


def jit_concentration(exp: Experiment):
  """``(state, batch) -> {attribution_ratio, ...}`` (:func:`latent.concentration`), everything replicated."""
  rep = parallel.replicated(exp.mesh)
  fn = lambda state, batch: latent_lib.concentration(exp.model, state.variables, batch["image"], batch["label"])
  return parallel.jit_for_mesh(fn, exp.mesh, in_shardings=(rep, rep), out_shardings=rep)


def evaluate(exp: Experiment, state: state_lib.TrainState, source, eval_step=None) -> dict:
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


def restore_or_init(exp: Experiment, checkpointer: checkpoint_lib.Checkpointer, train_iter=None):
  """The latest checkpoint's state (and iterator position) if there is one, else the fresh state."""
  if checkpointer.latest_step() is None:
    return exp.state
  abstract = checkpoint_lib.abstract_like(exp.state, parallel.replicated(exp.mesh))
  state, data_state = checkpointer.restore(abstract)
  if train_iter is not None:
    train_iter.set_state(data_state)
  return state


@dataclasses.dataclass
class TrainedRun:
  """A finished (or interrupted) run read back from its workdir: its config, experiment and latest state."""

  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  exp: Experiment
  state: state_lib.TrainState
  step: int


def saved_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The validated ``config.json`` of a run made by ``overfocus train``."""
  path = workdir / "config.json"
  if not path.is_file():
    raise UserError(f"no config.json in {str(workdir)!r}", "pass the --workdir of a run made by 'overfocus train'")
  try:
    config = config_lib.config_from_json(path.read_text())
  except (ValueError, OSError) as e:
    raise UserError(f"{path} is unreadable ({e})", "restore it or retrain in a new --workdir") from None
  config_lib.validate(config)
  return config


def load_trained(workdir: str | pathlib.Path) -> TrainedRun:
  """The latest checkpoint of ``workdir`` (read only); a clear error when there is none."""
  workdir = pathlib.Path(workdir).expanduser().resolve()
  config = saved_config(workdir)
  exp = build_experiment(config)
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise UserError(f"no checkpoint in {workdir / 'checkpoints'}", "train first: overfocus train --workdir DIR")
    state = restore_or_init(exp, checkpointer)
  finally:
    checkpointer.close()
  return TrainedRun(workdir, config, exp, state, int(step))


def evaluation_split(run: TrainedRun, dataset: str | None):
  """``(source, name)``: the run's own test split, or that of ``dataset`` when it fits the model."""
  if not dataset:
    return run.exp.dataset.test, run.config.dataset
  trained = run.exp.dataset
  other = load_dataset(dataset, data_dir=run.config.data_dir or None)
  if other.image_shape != trained.image_shape or other.num_classes > trained.num_classes:
    raise UserError(f"dataset {dataset!r} has {other.image_shape} images and {other.num_classes} classes; "
                    f"the model was trained on {trained.image_shape} and {trained.num_classes}",
                    "use a dataset of the same image shape and label set")
  return other.test, dataset


def _check_finite(metrics: dict, step: int) -> None:
  for name, value in metrics.items():
    if not math.isfinite(value):
      raise UserError(f"train {name} became {value} by step {step}",
                      "lower --config.learning_rate (or raise warmup_epochs); the last good checkpoint is kept")


def _mean_metrics(sums: dict, count: int) -> dict:
  return {k: float(v) / count for k, v in jax.device_get(sums).items()}


class MetricWriter:
  """One JSON object per epoch in ``metrics.jsonl`` and the same scalars as TensorBoard events."""

  def __init__(self, workdir: pathlib.Path):
    from tensorboardX import SummaryWriter  # imported here: only training writes events
    self.jsonl = workdir / "metrics.jsonl"
    self.tensorboard = SummaryWriter(str(workdir))

  def write(self, step: int, record: dict) -> None:
    with self.jsonl.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if isinstance(value, (int, float)) and name not in ("epoch", "step"):
        self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    self.tensorboard.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       challenge: Challenge | None = None, progress: bool | None = None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint) and returns the summary.

  ``challenge`` overrides the regularizer the config names (e.g. ``Challenge(my_regularizer)``).
  """
  config_lib.validate(config)
  workdir = prepare_workdir(workdir)
  exp = build_experiment(config)
  train_iter = pipeline.make_train_iterator(exp.dataset, batch_size=config.batch_size, seed=config.seed,
                                            augment=config.augment)
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  try:
    state = restore_or_init(exp, checkpointer, train_iter)
    (workdir / "config.json").write_text(config_lib.config_to_json(config))
    return _run_epochs(exp, state, train_iter, checkpointer, workdir, challenge, progress)
  finally:
    checkpointer.close()


def _run_epochs(exp, state, train_iter, checkpointer, workdir, challenge, progress) -> dict:
  config, steps = exp.config, exp.steps_per_epoch
  train_step = jit_train_step(exp, challenge)
  eval_step = jit_eval_step(exp)
  writer = MetricWriter(workdir)
  probe_batch = attribution_batch(exp)
  probe = jit_concentration(exp) if probe_batch is not None else None
  start_epoch = int(jax.device_get(state.step)) // steps
  run_start, trained_images, trained_time = time.perf_counter(), 0, 0.0
  record = {}
  try:
    for epoch in range(start_epoch, config.num_epochs):
      state, train_metrics, epoch_time, timed_images = _train_epoch(exp, state, train_iter, train_step, epoch,
                                                                   progress)
      trained_images, trained_time = trained_images + timed_images, trained_time + epoch_time
      test = evaluate(exp, state, exp.dataset.test, eval_step)
      step = int(jax.device_get(state.step))
      record = {"epoch": epoch + 1, "step": step,
                **{f"train_{k}": v for k, v in train_metrics.items()},
                "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                "images_per_s": timed_images / max(epoch_time, 1e-9), "epoch_time_s": epoch_time}
      record["learning_rate"] = record.pop("train_learning_rate")
      record["generalization_gap"] = record["train_accuracy"] - test["accuracy"]
      if probe is not None:
        record.update({k: float(v) for k, v in jax.device_get(probe(state, probe_batch)).items()})
      checkpointer.save(step, state, train_iter.get_state())
      writer.write(step, record)
      print(f"epoch {epoch + 1}/{config.num_epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f} | test loss {test['loss']:.4f} acc {test['accuracy']:.4f} | "
            f"{record['images_per_s']:.0f} img/s", flush=True)
  finally:
    writer.close()
  if not record:  # nothing left to train: report the checkpoint as it is
    test = evaluate(exp, state, exp.dataset.test, eval_step)
    record = {"epoch": start_epoch, "step": int(jax.device_get(state.step)), "test_loss": test["loss"],
              "test_accuracy": test["accuracy"]}
  summary = {
      "dataset": config.dataset, "model": config.model, "regularizer": config.regularizer.name,
      "epochs": record["epoch"], "steps": record["step"], "devices": exp.mesh.devices.size,
      "test_accuracy": record["test_accuracy"], "test_loss": record["test_loss"],
      "train_accuracy": record.get("train_accuracy"), "train_loss": record.get("train_loss"),
      "images_per_s": trained_images / trained_time if trained_time else None,
      "wall_time_s": time.perf_counter() - run_start,
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _train_epoch(exp, state, train_iter, train_step, epoch, progress):
  """One epoch of steps. Throughput excludes the first step of the run (compilation)."""
  steps, config = exp.steps_per_epoch, exp.config
  sums, timed_images, start = None, 0, None
  bar = tqdm.tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.num_epochs}", unit="step", leave=False,
                  disable=(not progress) if progress is not None else None, dynamic_ncols=True)
  with bar:
    for i in range(steps):
      batch = parallel.shard_batch(next(train_iter), exp.mesh)
      state, metrics = train_step(state, batch)
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      if start is None:  # the first step compiles: start the clock once it is done
        jax.block_until_ready(state)
        start = time.perf_counter()
      else:
        timed_images += config.batch_size
      if (i + 1) % 10 == 0 or i + 1 == steps:
        means = _mean_metrics(sums, i + 1)
        _check_finite(means, int(jax.device_get(state.step)))
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy']:.3f}",
                        img_s=f"{timed_images / elapsed:.0f}" if elapsed > 0 else "-")
      bar.update(1)
  jax.block_until_ready(state)
  return state, _mean_metrics(sums, steps), time.perf_counter() - start, timed_images
