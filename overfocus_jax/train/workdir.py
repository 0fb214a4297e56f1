"""A run's workdir: what ``overfocus train`` writes there and how a run is read back.

    WORKDIR/checkpoints/     orbax (train state + data-iterator position), the last config.keep_checkpoints
    WORKDIR/config.json      the validated config
    WORKDIR/metrics.jsonl    one JSON object per epoch (:class:`MetricWriter`, :func:`read_metrics`)
    WORKDIR/events.*         the same scalars as TensorBoard events
    WORKDIR/summary.json     the run's summary, at the end
"""

import dataclasses
import json
import os
import pathlib
import sys

import ml_collections

from overfocus_jax import config as config_lib
from overfocus_jax import parallel
from overfocus_jax.errors import UserError, WriteError
from overfocus_jax.files import make_writable_directory
from overfocus_jax.train import checkpoint as checkpoint_lib
from overfocus_jax.train.experiment import Experiment, build_experiment
from overfocus_jax.train.state import TrainState

METRICS_FILE = "metrics.jsonl"


def prepare_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  """Creates ``workdir`` and proves it writable before any work starts."""
  path = pathlib.Path(workdir).expanduser().resolve()
  try:
    make_writable_directory(path)
  except OSError as e:
    raise UserError(f"workdir {str(path)!r} is not writable ({e.strerror or type(e).__name__})",
                    "pass a --workdir in a directory you can write to") from None
  return path


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


def keep_trained_rule(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """``config`` for a run resumed in ``workdir``: when its config.json was written with a rule whose meaning has
  since changed (:func:`config_lib.trained_rule`) and ``config`` still names that rule, the run keeps the rule it
  was trained with, "topk" (one line on stderr)."""
  path = workdir / "config.json"
  if not path.is_file():
    return config
  try:
    saved = json.loads(path.read_text())
  except (ValueError, OSError):
    return config
  name = config_lib.trained_rule(saved)
  if name is None or config.regularizer.name != name or \
     config.regularizer[name].rule != (config_lib.EARLIER_RULES[name] or "reference"):
    return config
  print(config_lib.trained_rule_note(name), file=sys.stderr)
  config = config.copy_and_resolve_references()
  config.regularizer[name].rule = "topk"
  return config


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The per-epoch records of ``WORKDIR/metrics.jsonl`` in order (``[]`` when there is none yet)."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_failed(error: OSError, path: pathlib.Path, what: str) -> WriteError:
  """The one-line error of a failed write of ``what`` to ``path``."""
  return WriteError(f"writing {what} to {path} failed ({error.strerror or type(error).__name__})",
                    "free space there, or pass a --workdir that is writable, then rerun the same command: it resumes "
                    "from the last complete checkpoint")


def write_file(path: pathlib.Path, text: str, what: str) -> None:
  """Writes ``text`` to ``path`` whole or not at all (a temporary file renamed over it); a failure is a
  :class:`WriteError`, and the old file stays as it was."""
  partial = path.with_name(f".{path.name}.partial")
  try:
    partial.write_text(text)
    os.replace(partial, path)
  except OSError as e:
    partial.unlink(missing_ok=True) if partial.exists() else None
    raise write_failed(e, path, what) from None


class MetricWriter:
  """One JSON object per epoch in ``metrics.jsonl`` and the same scalars as TensorBoard events."""

  def __init__(self, workdir: pathlib.Path, resumed_at: int = 0):
    """``resumed_at``: the step a run resumes from; records and TensorBoard events of later steps (written before a
    crash, by epochs whose checkpoint was never completed) are dropped, so that each step keeps one record."""
    from tensorboardX import SummaryWriter  # imported here: only training writes events
    self.jsonl = workdir / METRICS_FILE
    self.keep_until(resumed_at)
    # purge_step: TensorBoard discards the events of earlier files at steps >= it.
    self.tensorboard = SummaryWriter(str(workdir), purge_step=resumed_at + 1 if resumed_at else None)

  def keep_until(self, step: int) -> None:
    """Drops the records of steps after ``step``."""
    records = read_metrics(self.jsonl.parent)
    if any(r.get("step", 0) > step for r in records):
      self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))

  def write(self, step: int, record: dict) -> None:
    """Appends the epoch's line whole or not at all: a write that fails (a full disk) is cut back to the file's
    previous end and raised as a :class:`WriteError`, so no half-written line stays."""
    line = (json.dumps(record) + "\n").encode()
    end = self.jsonl.stat().st_size if self.jsonl.exists() else 0
    try:
      with self.jsonl.open("ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
      try:
        os.truncate(self.jsonl, end)
      except OSError:
        pass
      raise write_failed(e, self.jsonl, "the epoch's metrics") from None
    for name, value in record.items():
      if isinstance(value, (int, float)) and name not in ("epoch", "step"):
        self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    self.tensorboard.close()


def restore_or_init(exp: Experiment, checkpointer: checkpoint_lib.Checkpointer, *,
                    move_damaged: bool = True) -> tuple[TrainState, dict | None]:
  """``(state, data_state)`` of the newest checkpoint that restores (the data state is the train stream's position,
  :mod:`.streams`), else the experiment's fresh state and None when there is none.

  A damaged checkpoint (:class:`~.checkpoint.DamagedCheckpoint`) is moved aside into ``checkpoints.damaged/`` (or,
  with ``move_damaged=False``, for readers, left where it is) and the next newest is tried; one line on stderr says
  which were skipped, or, when none restores, the error names them all.
  """
  if checkpointer.latest_step() is None:
    return exp.state, None
  abstract = checkpoint_lib.abstract_like(exp.state, parallel.replicated(exp.mesh))
  damaged = []
  for step in checkpointer.complete_steps():
    try:
      restored = checkpointer.restore(abstract, step)
    except checkpoint_lib.DamagedCheckpoint as e:
      damaged.append((step, checkpointer.move_aside(step) if move_damaged and parallel.is_primary() else e.path))
      continue
    if damaged:
      where = "; ".join(f"{s}{f' (moved to {path})' if move_damaged else ''}" for s, path in damaged)
      print(f"overfocus: note: checkpoint {where} cannot be read (its files are damaged); resuming from checkpoint "
            f"{step}", file=sys.stderr)
    return restored
  raise UserError(f"no checkpoint of {checkpointer.directory} can be read (damaged: "
                  f"{', '.join(str(path) for _, path in damaged)})",
                  "restore them from a backup, or start afresh in a new --workdir")


@dataclasses.dataclass
class TrainedRun:
  """A finished (or interrupted) run read back from its workdir: its config, experiment and latest state."""

  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  exp: Experiment
  state: TrainState
  step: int


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
    state, _ = restore_or_init(exp, checkpointer, move_damaged=False)
  finally:
    checkpointer.close()
  return TrainedRun(workdir, config, exp, state, int(step))
