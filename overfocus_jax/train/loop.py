"""``train_and_evaluate``: the epoch loop — compiled chunks of K sharded train steps, per-epoch evaluation, logs
and asynchronous checkpoints — resuming from ``WORKDIR/checkpoints`` when there is one. The pieces it uses:
:mod:`.experiment` (what a config builds), :mod:`.streams` (where batches come from), :mod:`.dispatch` (K steps per
compiled call), :mod:`.evaluation`, :mod:`.workdir` (files, reading runs back), :mod:`.checkpoint`.

Besides loss and accuracy, each epoch's record holds the overfocus measurements of the attribution probe
(:mod:`.evaluation`) and ``generalization_gap`` = train accuracy − test accuracy, so the SGDrop paper's Fig. 1 can
be drawn for any run (``overfocus explain``). The train accuracy is the epoch's running mean of the train steps'
accuracy — on augmented batches, after the regularizer's masks, while the weights move — so early in a run the gap
can be negative, and a regularizer that masks lowers it by construction; near convergence it is the usual gap.
"""

import contextlib
import json
import math
import pathlib
import sys
import time

import jax
import ml_collections
import numpy as np
import tqdm

from overfocus_jax import config as config_lib
from overfocus_jax import parallel
from overfocus_jax.challenge import Regularizer
from overfocus_jax.errors import UserError
from overfocus_jax.train import checkpoint as checkpoint_lib
from overfocus_jax.train import dispatch, preemption, streams
from overfocus_jax.train.evaluation import attribution_batch, jit_attribution_probe, make_evaluator
from overfocus_jax.train.experiment import build_experiment, jit_train_chunk
from overfocus_jax.regularizers import STRENGTH_FIELDS
from overfocus_jax.train.lock import WorkdirLock
from overfocus_jax.train.workdir import (MetricWriter, keep_trained_rule, prepare_workdir, restore_or_init,
                                        write_file)


def _check_finite(metrics: dict, step: int) -> None:
  for name, value in metrics.items():
    if not math.isfinite(value):
      raise UserError(f"{name} became {value} at step {step}",
                      "lower --config.learning_rate (or raise warmup_epochs); the last good checkpoint is kept")


def collapse_warning(config: ml_collections.ConfigDict, train_accuracy: float, num_classes: int,
                     epoch: int) -> str | None:
  """One warning line when a regularizer's masked train accuracy is at or below chance after an epoch, else None.

  ``train_accuracy`` is the accuracy on the samples the regularizer masked (``train_regularized_accuracy``): at
  chance, the masks remove all of the class evidence and the network cannot learn from those samples (the run goes
  on; the line names the fields that set how much is dropped).
  """
  name = config.regularizer.name
  chance = 1.0 / num_classes
  if name == "none" or train_accuracy > chance:
    return None
  flags = ", ".join(f"--config.regularizer.{name}.{field}" for field in STRENGTH_FIELDS.get(name, ()))
  return (f"overfocus: warning: epoch {epoch}: train accuracy {train_accuracy:.3f} on {name}-masked samples is at or "
          f"below chance ({chance:.3f}): the regularizer removes the class evidence; drop less with {flags}")


IDLE_REMEDY = {"sgdrop": "on a 1×1 latent map the spatial units are one position, which is never dropped: use "
                         "--config.regularizer.sgdrop.granularity=element or channel, or larger images"}


def idle_warning(config: ml_collections.ConfigDict, regularized_share: float | None, epoch: int) -> str | None:
  """One warning line when a regularizer changed no training sample in an epoch (it trains as ERM), else None."""
  name = config.regularizer.name
  if name == "none" or regularized_share is None or regularized_share > 0:
    return None
  remedy = IDLE_REMEDY.get(name, f"check --config.regularizer.{name}.* against the model's latent shape")
  return f"overfocus: warning: epoch {epoch}: {name} changed no training sample (it trained as ERM); {remedy}"


def report_epoch(config: ml_collections.ConfigDict, record: dict, num_classes: int) -> None:
  """The epoch's line on stdout, and the regularizer's warnings on stderr."""
  epoch = record["epoch"]
  measure = "accuracy" if "test_accuracy" in record else "mse"  # a classifier's, or a reconstruction's
  short = {"accuracy": "acc", "mse": "mse"}[measure]
  print(f"epoch {epoch}/{config.num_epochs}: train loss {record['train_loss']:.4f} "
        f"{short} {record[f'train_{measure}']:.4f} | test loss {record['test_loss']:.4f} "
        f"{short} {record[f'test_{measure}']:.4f} | {record['images_per_s']:.0f} img/s", flush=True)
  if measure != "accuracy":
    return
  warning = collapse_warning(config, record.get("train_regularized_accuracy", record["train_accuracy"]),
                             num_classes, epoch)
  idle = idle_warning(config, record.get("train_regularized_share"), epoch)
  for line in (warning, idle):
    if line:
      print(line, file=sys.stderr, flush=True)


def _mean_metrics(sums: dict, count: int) -> dict:
  return {k: float(v) / count for k, v in sums.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       regularizer: Regularizer | None = None, progress: bool | None = None,
                       handle_signals: bool = True) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint) and returns the summary.

  ``regularizer`` replaces the one the config names (your own, or a ``challenge.chain`` of several). With
  ``handle_signals`` (and in the main thread), SIGTERM, SIGUSR1 and SIGINT stop the run cleanly after a checkpoint
  (:mod:`.preemption`): :class:`~.preemption.Stopped` is raised once it is on disk.

  The run holds ``workdir``'s lock (:mod:`.lock`, process 0 of several) from before it writes anything until it
  ends: a second run on the same workdir stops with a :class:`UserError` naming the first.
  """
  config_lib.validate(config)
  workdir = prepare_workdir(workdir)
  with contextlib.ExitStack() as held:
    if parallel.is_primary():
      held.enter_context(WorkdirLock(workdir, "overfocus train"))
    return _train(config, workdir, regularizer, progress, handle_signals)


def _train(config, workdir: pathlib.Path, regularizer, progress, handle_signals) -> dict:
  config = keep_trained_rule(config, workdir)
  # Pretrained weights start a new run only: a resumed one restores its checkpoint (and never reads the file).
  pretrained = bool(config.init_from) and not checkpoint_lib.has_checkpoint(workdir)
  exp = build_experiment(config, regularizer=regularizer, pretrained=pretrained)
  config = exp.config  # the run's config as trained (a balanced batch may be adjusted to the environments)
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  with contextlib.ExitStack() as closing:
    # On the way out, in this order: the data stream's workers stop, then any asynchronous save in flight is
    # finished (every checkpoint is complete on return).
    closing.callback(checkpointer.close)
    state, data_state = restore_or_init(exp, checkpointer)
    data_state, progress_record = preemption.split_progress(data_state)
    resume = check_resume_point(int(jax.device_get(state.step)), exp.steps_per_epoch, progress_record)
    stream = streams.make_stream(exp, data_state)
    closing.callback(stream.close)
    if parallel.is_primary():  # process 0 writes the run's files; every process writes its part of a checkpoint
      write_file(workdir / "config.json", config_lib.config_to_json(config), "the run's config")
    schedule = preemption.CheckpointSchedule(config.checkpoint_every_steps, config.checkpoint_every_minutes)
    with preemption.watching_signals(handle_signals) as watch:
      saver = preemption.Saver(checkpointer, schedule, watch, exp.steps_per_epoch)
      return _run_epochs(exp, state, stream, saver, workdir, progress, resume)


def environment_evaluators(exp, *, resident: bool):
  """``evaluate(state) -> {"env0_in_acc": ..., "env0_out_acc": ..., ...}``: the accuracy on every environment's in-
  and out-split (held-out ones included), DomainBed's record of each evaluation; ``{}`` for a dataset without
  environments, and for a model that does not classify."""
  if exp.task != "classify":
    return lambda state: {}
  evaluators = [(name, make_evaluator(exp, source, resident=resident))
                for name, source in exp.dataset.environment_splits]
  return lambda state: {f"{name}_acc": evaluate(state)["accuracy"] for name, evaluate in evaluators}


def check_resume_point(step: int, steps_per_epoch: int, progress_record: dict | None) -> preemption.EpochProgress:
  """Where the first epoch resumes: at an epoch end, or inside an epoch that the checkpoint's progress record
  describes (saved between epoch ends, :mod:`.preemption`). Another step means the epoch length changed."""
  inside = step % steps_per_epoch
  if progress_record is None and not inside:
    return preemption.EpochProgress()
  if progress_record is not None and progress_record.get("steps_per_epoch") == steps_per_epoch \
      and progress_record.get("steps") == inside:
    return preemption.EpochProgress.from_json(progress_record)
  raise UserError(f"the checkpoint is at step {step}, not at an epoch end of this config ({steps_per_epoch} steps "
                  "an epoch)", "resume with the batch_size and dataset the run was started with, or use a new "
                  "--workdir")


def steps_per_dispatch(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """K, the train steps one compiled call runs: ``config.steps_per_dispatch``, or the platform's default for 0
  (:func:`dispatch.default_steps_per_dispatch`), at most an epoch."""
  chosen = config.steps_per_dispatch or dispatch.default_steps_per_dispatch(jax.default_backend())
  return min(chosen, steps_per_epoch)


class CompiledChunks(dict):
  """Chunk length → its compiled program (:func:`compile_chunks`); a length not compiled ahead (a run resumed
  between epoch ends with another K) is compiled when first asked for."""

  def __init__(self, jitted, state, stream):
    super().__init__()
    self._lower = lambda n: jitted.lower(state, stream.abstract_data(n), n)

  def compile(self, num_steps: int) -> None:
    self[num_steps] = self._lower(num_steps).compile()

  def __missing__(self, num_steps: int):
    self.compile(num_steps)
    return self[num_steps]


def compile_chunks(exp, state, stream, chunk_size: int, resume_steps: int = 0) -> CompiledChunks:
  """The compiled chunk for each length an epoch needs (K, and the epoch's remainder when K does not divide it, also
  from ``resume_steps`` into the first epoch), ahead of time so that no epoch's clock includes compilation."""
  chunks = CompiledChunks(jit_train_chunk(exp, stream.feed, stream.sharding), state, stream)
  steps = exp.steps_per_epoch
  for n in sorted({chunk_size, steps % chunk_size, (steps - resume_steps) % chunk_size} - {0}):
    chunks.compile(n)
  return chunks


def _run_epochs(exp, state, stream, saver, workdir, progress, resume) -> dict:
  config, steps = exp.config, exp.steps_per_epoch
  chunk_size = steps_per_dispatch(config, steps)
  train_chunks = compile_chunks(exp, state, stream, chunk_size, resume.steps)
  evaluate_test = make_evaluator(exp, exp.dataset.test, resident=stream.resident)
  evaluate_environments = environment_evaluators(exp, resident=stream.resident)
  start_step = int(jax.device_get(state.step))
  start_epoch = start_step // steps
  saver.schedule.saved(start_step)
  # Lines (and TensorBoard events) of steps after the checkpoint — a crash before their save was complete — are
  # dropped: those steps train again, and each step keeps one record.
  writer = MetricWriter(workdir, resumed_at=start_step) if parallel.is_primary() else None
  probe_batch = attribution_batch(exp)
  probe = jit_attribution_probe(exp) if probe_batch is not None else None
  if probe_batch is not None:
    probe_batch = parallel.replicate(probe_batch, exp.mesh)
  run_start, trained_images, trained_time = time.perf_counter(), 0, 0.0
  record = {}
  try:
    for epoch in range(start_epoch, config.num_epochs):
      epoch_resume = resume if epoch == start_epoch else preemption.EpochProgress()
      state, train_metrics, epoch_time = train_epoch(exp, state, stream, train_chunks, chunk_size, epoch,
                                                       progress, resume=epoch_resume, saver=saver)
      trained = (steps - epoch_resume.steps) * config.batch_size
      trained_images, trained_time = trained_images + trained, trained_time + epoch_time - epoch_resume.seconds
      test = evaluate_test(state)
      step = int(jax.device_get(state.step))
      record = {"epoch": epoch + 1, "step": step,
                **{f"train_{k}": v for k, v in train_metrics.items()},
                **{f"test_{k}": v for k, v in test.items() if k != "n"},
                "images_per_s": steps * config.batch_size / max(epoch_time, 1e-9), "epoch_time_s": epoch_time}
      record["learning_rate"] = record.pop("train_learning_rate")
      if "accuracy" in test:
        record["generalization_gap"] = record["train_accuracy"] - test["accuracy"]
      if record.get("train_regularized_share"):  # accuracy on the samples the regularizer changed, this epoch
        record["train_regularized_accuracy"] = record["train_regularized_hits"] / record["train_regularized_share"]
      record.update(evaluate_environments(state))
      if probe is not None:
        record.update({k: float(v) for k, v in jax.device_get(probe(state, probe_batch)).items()})
      # Weights that became non-finite on the epoch's last step leave its train metrics finite; the test loss shows it.
      _check_finite({"test loss": test["loss"]}, step)
      saver.save(step, state, stream.state())  # asynchronous: written while the next epoch trains
      if writer is not None:
        writer.write(step, record)
        report_epoch(config, record, exp.dataset.num_classes)
      if epoch + 1 < config.num_epochs and saver.poll(step)[1]:
        saver.stop(step)
  finally:
    if writer is not None:
      writer.close()
  if not record:  # nothing left to train: report the checkpoint as it is
    test = evaluate_test(state)
    record = {"epoch": start_epoch, "step": int(jax.device_get(state.step)),
              **{f"test_{k}": v for k, v in test.items() if k != "n"}, **evaluate_environments(state)}
  summary = {
      "dataset": config.dataset, "model": config.model, "regularizer": config.regularizer.name,
      "epochs": record["epoch"], "steps": record["step"], "devices": exp.mesh.devices.size,
      "processes": jax.process_count(), "process_index": jax.process_index(),
      "data_on_device": stream.resident, "steps_per_dispatch": chunk_size,
      **{k: v for k, v in record.items() if k.startswith("test_")},
      **({"train_accuracy": record.get("train_accuracy")} if exp.task == "classify" else
         {"train_mse": record.get("train_mse")}),
      "train_loss": record.get("train_loss"),
      "images_per_s": trained_images / trained_time if trained_time else None,
      "wall_time_s": time.perf_counter() - run_start,
  }
  if exp.dataset.environment_splits:  # DomainBed's per-environment accuracies, at the end of the run
    summary["test_envs"] = list(config.environments.test_envs)
    summary.update({k: v for k, v in record.items() if k.startswith("env") and k.endswith("_acc")})
  if parallel.is_primary():
    write_file(workdir / "summary.json", json.dumps(summary, indent=2), "the run's summary")
  return summary


def train_epoch(exp, state, stream, train_chunks, chunk_size, epoch, progress, *,
                resume: preemption.EpochProgress | None = None, saver: preemption.Saver | None = None):
  """One epoch in chunks of at most ``chunk_size`` steps (``train_chunks``: :func:`compile_chunks`), one host sync
  per chunk; returns ``(state, the epoch's mean metrics, seconds)``. ``resume``: the epoch's progress in a
  checkpoint saved inside it; ``saver``: saves at the chunk boundaries its schedule or a signal asks for (and stops
  the run after a signal's save).

  The next chunk is dispatched before the previous one's metrics are read: the host prepares chunk i+1 (the host
  stream stacks its K batches) while the device runs chunk i. A save inside the epoch reads the chunk first (its
  metrics go into the checkpoint) and then hands the state to orbax before the next chunk donates it.
  """
  steps, config = exp.steps_per_epoch, exp.config
  resume = resume or preemption.EpochProgress()
  first_step, last_step = epoch * steps, (epoch + 1) * steps
  sums, done, pending = resume.sums, resume.steps, None
  bar = tqdm.tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{config.num_epochs}", unit="step",
                  leave=False, dynamic_ncols=True,
                  disable=True if not parallel.is_primary() else (not progress) if progress is not None else None)
  start = time.perf_counter() - resume.seconds

  def collect(chunk):
    nonlocal sums, done
    chunk_sums, first_bad, count = jax.device_get(chunk)
    if first_bad >= 0:
      bad = {f"train {k}": float(v) for k, v in chunk_sums.items()
             if k not in dispatch.NOT_CHECKED and not math.isfinite(float(v))}
      _check_finite(bad or {"train loss": math.nan}, int(first_bad))
    sums = chunk_sums if sums is None else jax.tree.map(np.add, sums, chunk_sums)
    done += count
    means = _mean_metrics(sums, done)
    elapsed = time.perf_counter() - start
    measure = {"acc": means["accuracy"]} if "accuracy" in means else {"mse": means.get("mse", math.nan)}
    bar.set_postfix(loss=f"{means['loss']:.3f}", **{k: f"{v:.3f}" for k, v in measure.items()},
                    img_s=f"{done * config.batch_size / elapsed:.0f}" if elapsed > 0 else "-")
    bar.update(count)

  with bar:
    for chunk_start in range(first_step + resume.steps, last_step, chunk_size):
      count = min(chunk_size, last_step - chunk_start)
      state, chunk_sums, first_bad = train_chunks[count](state, stream.chunk_data(chunk_start, count))
      if pending is not None:
        collect(pending)
      pending = (chunk_sums, first_bad, count)
      end = chunk_start + count
      save, stop = saver.poll(end) if saver is not None and end < last_step else (False, False)
      if save:
        collect(pending)
        pending = None
        saver.save(end, state, stream.state(), preemption.EpochProgress(done, sums, time.perf_counter() - start))
      if stop:
        saver.stop(end)
    if pending is not None:
      collect(pending)
  jax.block_until_ready(state)
  return state, _mean_metrics(sums, steps), time.perf_counter() - start
