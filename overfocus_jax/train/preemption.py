"""Preemption-safe training: checkpoints between epoch ends, and a clean stop on a scheduler's signal.

Clusters stop jobs: SLURM sends SIGTERM (or, with ``--signal=USR1@90``, SIGUSR1 a little before the time limit),
Kubernetes sends SIGTERM, a user presses Ctrl-C (SIGINT). A run that only saved at epoch ends would lose the epoch in
progress. So, besides the epoch ends, the loop saves

- every ``config.checkpoint_every_steps`` steps and every ``config.checkpoint_every_minutes`` minutes (0: off), at
  the first chunk boundary (:mod:`.dispatch`) at or after the interval;
- when a signal arrives: the chunk in flight finishes, its checkpoint is saved and completed, and the run ends with
  :class:`Stopped` (the CLI exits with :data:`EXIT_CODES`: 0 for SIGTERM and SIGUSR1, so a scheduler requeues the
  job cleanly; 130 for SIGINT). A second signal exits at once (code 128 + the signal's number) without waiting:
  orbax writes each checkpoint to a temporary directory and renames it when complete, so the last complete
  checkpoint is never touched and a half-written one is ignored on the next start.

A checkpoint between epoch ends stores, with the data stream's position, the epoch's progress
(:class:`EpochProgress`: its steps done, the sums of their metrics, its seconds), so the resumed epoch's record in
``metrics.jsonl`` is the one an uninterrupted run writes.
"""

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time

import numpy as np

PROGRESS_KEY = "epoch_progress"  # the key of EpochProgress in a checkpoint's data state
EXIT_CODES = {"SIGTERM": 0, "SIGUSR1": 0, "SIGINT": 130}


class Stopped(Exception):
  """A signal stopped the run after a checkpoint of ``step`` was saved and completed."""

  def __init__(self, signal_name: str, step: int):
    self.signal_name, self.step, self.exit_code = signal_name, step, EXIT_CODES[signal_name]
    super().__init__(f"stopped by {signal_name} at step {step}; the checkpoint of step {step} is saved: run the same "
                     "command again to resume")


@dataclasses.dataclass
class EpochProgress:
  """How far an epoch got: ``steps`` done, the sums of their metrics, and the seconds they took."""

  steps: int = 0
  sums: dict | None = None
  seconds: float = 0.0

  def to_json(self, steps_per_epoch: int) -> dict:
    # Each sum keeps its dtype, so that adding the rest of the epoch gives the bits of an uninterrupted run.
    sums = {k: [np.asarray(v).item(), str(np.asarray(v).dtype)] for k, v in (self.sums or {}).items()}
    return {"steps": self.steps, "steps_per_epoch": steps_per_epoch, "seconds": self.seconds, "sums": sums}

  @classmethod
  def from_json(cls, record: dict) -> "EpochProgress":
    sums = {k: np.asarray(value, dtype) for k, (value, dtype) in record["sums"].items()}
    return cls(steps=int(record["steps"]), sums=sums or None, seconds=float(record["seconds"]))


def split_progress(data_state: dict | None) -> tuple[dict | None, dict | None]:
  """A checkpoint's data state → (the stream's own state, the epoch progress record or None)."""
  if data_state is None or PROGRESS_KEY not in data_state:
    return data_state, None
  stream_state = {k: v for k, v in data_state.items() if k != PROGRESS_KEY}
  return stream_state, data_state[PROGRESS_KEY]


def with_progress(stream_state: dict, progress: EpochProgress, steps_per_epoch: int) -> dict:
  return {**stream_state, PROGRESS_KEY: progress.to_json(steps_per_epoch)}


class SignalWatch:
  """Within ``with SignalWatch():``, SIGTERM, SIGUSR1 and SIGINT set :attr:`received` (the first signal's name)
  instead of killing the process; a second one exits at once. Only the main thread can install handlers; elsewhere
  (a notebook's worker thread, say) the watch stays inert and signals behave as before."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.received is not None:
      print(f"overfocus: {name} again: exiting now; the last complete checkpoint is kept", file=sys.stderr,
            flush=True)
      os._exit(128 + signum)  # no unwinding: nothing half-done is finished, and orbax's atomic rename protects saves
    self.received = name
    print(f"overfocus: {name}: saving a checkpoint after the current step, then stopping (send it again to exit "
          "at once)", file=sys.stderr, flush=True)

  def __enter__(self) -> "SignalWatch":
    if threading.current_thread() is threading.main_thread():
      for name in EXIT_CODES:
        signum = getattr(signal, name, None)
        if signum is not None:  # SIGUSR1 does not exist on Windows
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


@dataclasses.dataclass
class CheckpointSchedule:
  """When to save between epoch ends: every ``every_steps`` steps and every ``every_minutes`` minutes (0: never),
  counted from the last save."""

  every_steps: int = 0
  every_minutes: float = 0.0
  last_step: int = 0
  last_time: float = dataclasses.field(default_factory=lambda: time.monotonic())

  def due_by_steps(self, step: int) -> bool:
    return self.every_steps > 0 and step - self.last_step >= self.every_steps

  def due_by_time(self) -> bool:
    return self.every_minutes > 0 and time.monotonic() - self.last_time >= 60 * self.every_minutes

  def saved(self, step: int) -> None:
    self.last_step, self.last_time = step, time.monotonic()


class Saver:
  """The loop's checkpoints: epoch ends, the schedule's steps between them, and a stop on a signal."""

  def __init__(self, checkpointer, schedule: CheckpointSchedule, watch: SignalWatch | None, steps_per_epoch: int):
    self.checkpointer, self.schedule, self.watch = checkpointer, schedule, watch
    self.steps_per_epoch = steps_per_epoch

  @property
  def signal_received(self) -> str | None:
    """The signal this process received, if any."""
    return self.watch.received if self.watch is not None else None

  def poll(self, step: int) -> tuple[bool, bool]:
    """``(save now, stop after the save)`` at a chunk boundary. Every process of a multi-process run gets the same
    answer (their clocks and signals are combined with one small all-gather), so they save the same step together
    and stop together."""
    signalled, timed = self.signal_received is not None, self.schedule.due_by_time()
    if jax_process_count() > 1:
      from jax.experimental import multihost_utils
      signalled, timed = (bool(v) for v in np.max(multihost_utils.process_allgather(
          np.array([signalled, timed], np.int32)), axis=0))
    return self.schedule.due_by_steps(step) or timed or signalled, signalled

  def save(self, step: int, state, stream_state: dict, progress: EpochProgress | None = None) -> None:
    """Saves ``step`` (asynchronously); inside an epoch with its ``progress``."""
    data_state = stream_state if progress is None else with_progress(stream_state, progress, self.steps_per_epoch)
    self.checkpointer.save(step, state, data_state)
    self.schedule.saved(step)

  def stop(self, step: int) -> None:
    """Waits until the checkpoint of ``step`` is on disk and raises :class:`Stopped`."""
    self.checkpointer.wait()
    raise Stopped(self.signal_received or "SIGTERM", step)  # a peer process's signal stops this one alike


def jax_process_count() -> int:
  import jax  # here: the CLI imports this module before JAX
  return jax.process_count()


@contextlib.contextmanager
def watching_signals(enabled: bool):
  """A :class:`SignalWatch` while training when ``enabled``, else None."""
  if not enabled:
    yield None
    return
  with SignalWatch() as watch:
    yield watch
