"""A sweep's jobs: each an ``overfocus train`` run in its own folder ``OUT/<name>``, and the markers that say how it
went.

    OUT/<name>/done       the run finished and its results are written
    OUT/<name>/failed     the run failed: one line, why (a rerun skips it unless asked to retry failed jobs)
    OUT/<name>/.overfocus.lock held: the run is training now (train/lock.py)
    OUT/<name>/out.txt, err.txt   the run's stdout and stderr, appended on every attempt

A job is data (its name, config file and overrides) plus an optional ``finish(workdir)`` that turns a finished run
into results (DomainBed's ``results.jsonl``); both pickle, so a SLURM launcher can ship them to a node.
"""

import dataclasses
import os
import pathlib
import subprocess
import sys
from typing import Callable, Sequence

from overfocus_jax.overrides import CONFIG_PREFIX
from overfocus_jax.train import lock
from overfocus_jax.train.preemption import EXIT_CODES  # numpy only, like the CLI's import

DONE_FILE, FAILED_FILE, SUMMARY_FILE = "done", "failed", "summary.json"
INTERRUPTED_EXIT_CODE = EXIT_CODES["SIGINT"]  # overfocus train's exit code after a SIGINT
STATES = ("done", "running", "failed", "pending")


@dataclasses.dataclass(frozen=True)
class Job:
  """One run: ``overfocus train --workdir OUT/<name> [--config CONFIG] --no-progress --config.FIELD=TEXT ...``.

  ``overrides``: (field, text) pairs in order (a later one wins); ``finish(workdir)``, when given, runs after a
  successful run and raises ValueError when the run's files cannot make results.
  """

  name: str
  overrides: tuple[tuple[str, str], ...] = ()
  config: str | None = None
  finish: Callable[[pathlib.Path], None] | None = None

  def command(self, out: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "overfocus_jax", "train", "--workdir", str(out / self.name),
            *(("--config", str(self.config)) if self.config else ()), "--no-progress",
            *(f"{CONFIG_PREFIX}{field}={text}" for field, text in self.overrides)]


def state(workdir: pathlib.Path) -> str:
  """``done``, ``running`` (its lock is held by a live process), ``failed`` or ``pending``."""
  if (workdir / DONE_FILE).exists():
    return "done"
  if lock.holder(workdir):
    return "running"
  return "failed" if (workdir / FAILED_FILE).exists() else "pending"


def failure(workdir: pathlib.Path) -> str:
  """Why the job failed: its ``failed`` marker's line."""
  return last_line(workdir / FAILED_FILE)


def last_line(path: pathlib.Path) -> str:
  try:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
  except OSError:
    return ""
  return lines[-1].strip() if lines else ""


def child_command(command: Sequence[str], cpus: Sequence[int] = ()) -> list[str]:
  """``command`` started through :mod:`overfocus_jax.sweeps.child`: stopped (at a checkpoint) if the launcher dies,
  and pinned to ``cpus`` when given."""
  pinned = ("--cpus", ",".join(map(str, cpus))) if cpus else ()
  return [sys.executable, "-m", "overfocus_jax.sweeps.child", *pinned, "--", *command]


def run(job: Job, out: pathlib.Path, cpus: Sequence[int] = (), env: dict | None = None) -> str | None:
  """Trains ``job`` in ``out/<name>``, then runs its ``finish`` and writes ``done``; None on success, else why it
  failed (one line, also written to the ``failed`` marker).

  ``cpus``: the cores the run is pinned to (default: this process's); ``env``: its environment (default: this
  process's). If this process dies, the run gets SIGTERM, saves a checkpoint and exits. A run that a SIGINT stopped (exit 130: it saved its checkpoint) stops the
  caller too (``KeyboardInterrupt``). A run that exits 0 without its ``summary.json`` was stopped by SIGTERM or
  SIGUSR1 (which exit 0, so that a scheduler requeues it) before its last epoch: it is pending, not failed, and
  resumes on the next attempt.
  """
  workdir = out / job.name
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / FAILED_FILE).unlink(missing_ok=True)
  env = dict(os.environ if env is None else env, OVERFOCUS_LAUNCHER_PID=str(os.getpid()))
  with open(workdir / "out.txt", "a") as stdout, open(workdir / "err.txt", "a") as stderr:
    process = subprocess.Popen(child_command(job.command(out), cpus), stdout=stdout, stderr=stderr,
                               stdin=subprocess.DEVNULL, env=env)
    try:
      code = process.wait()
    except KeyboardInterrupt:  # the run got the same SIGINT: let it save its checkpoint first
      process.wait()
      raise
  if code == INTERRUPTED_EXIT_CODE:
    raise KeyboardInterrupt
  if code == 0 and not (workdir / SUMMARY_FILE).is_file():
    return (f"stopped before its last epoch (its checkpoint is kept; the next attempt resumes it): "
            f"{last_line(workdir / 'err.txt') or 'no stderr'}")
  reason = None
  if code != 0:
    reason = f"exit {code}: {last_line(workdir / 'err.txt') or 'no stderr'} (log: {workdir / 'err.txt'})"
  elif job.finish is not None:
    try:
      job.finish(workdir)
    except ValueError as e:
      reason = f"no results: {e}"
  if reason is None:
    (workdir / DONE_FILE).touch()
  else:
    (workdir / FAILED_FILE).write_text(reason + "\n")
  return reason


def stopped_early(reason: str | None) -> bool:
  """Whether :func:`run`'s outcome is a run stopped by a scheduler's signal (pending, not failed)."""
  return reason is not None and reason.startswith("stopped before its last epoch")
