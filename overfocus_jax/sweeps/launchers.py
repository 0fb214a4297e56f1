"""How a sweep's jobs are run, separate from which jobs there are (as DomainBed's ``command_launchers``):

- ``local``: one after another in this process's shell;
- ``parallel``: N workers on this machine pulling jobs from the list, each on its own device: one GPU each
  (``CUDA_VISIBLE_DEVICES``) where GPUs are visible, else an equal share of this process's CPU cores (the run is
  pinned to them, :mod:`overfocus_jax.sweeps.child`, so its XLA and oneDNN thread pools size themselves to the share);
- ``slurm``: a SLURM job array through submitit, one task per job, each requeued after a preemption or a time limit
  with its run resumed from its checkpoint (the run saves on the signal, :mod:`overfocus_jax.train.preemption`).

Every launcher skips jobs that are done, or running elsewhere (their workdir's lock is held), and, unless
``retry_failed``, those that failed; a rerun of the same command after the launcher itself was killed picks up
what is left, and a run that was cut off resumes from its checkpoint, so no finished job trains twice.
"""

import concurrent.futures
import dataclasses
import importlib.util
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from overfocus_jax.errors import UserError
from overfocus_jax.sweeps import jobs as jobs_lib
from overfocus_jax.sweeps.jobs import Job

LAUNCHERS = ("local", "parallel", "slurm")
SUBMITIT_LOG_VARIABLE = "SUBMITIT_LOG_LEVEL"


@dataclasses.dataclass
class Tally:
  """What a launch did, for its last line."""

  done: int = 0
  skipped: int = 0
  failed: int = 0
  busy: int = 0
  stopped: int = 0
  submitted: int = 0

  def line(self) -> str:
    parts = [f"{self.done} done", f"{self.skipped} skipped (done before)", f"{self.failed} failed"]
    if self.busy:
      parts.append(f"{self.busy} in use elsewhere")
    if self.stopped:
      parts.append(f"{self.stopped} stopped by a signal (rerun to resume)")
    if self.submitted:
      parts.append(f"{self.submitted} submitted")
    return ", ".join(parts)


def to_run(all_jobs: Sequence[Job], out: pathlib.Path, retry_failed: bool, report: Callable[[str], None],
           tally: Tally) -> list[tuple[str, Job]]:
  """The jobs a launch runs, each with its place in the sweep (``[i/N]``): not done, not running elsewhere, and not
  failed unless ``retry_failed``."""
  chosen = []
  for i, job in enumerate(all_jobs, start=1):
    state = jobs_lib.state(out / job.name)
    prefix = f"[{i}/{len(all_jobs)}] {job.name}"
    if state == "done":
      tally.skipped += 1
      report(f"{prefix}: skipped (done)")
    elif state == "running":
      tally.busy += 1
      report(f"{prefix}: skipped (its workdir is in use by {jobs_lib.lock.holder(out / job.name)})")
    elif state == "failed" and not retry_failed:
      tally.failed += 1
      report(f"{prefix}: skipped (failed before: {jobs_lib.failure(out / job.name)}; --retry-failed runs it again)")
    else:
      chosen.append((f"[{i}/{len(all_jobs)}]", job))
  return chosen


def _outcome(tally: Tally, reason: str | None, seconds: float) -> str:
  if reason is None:
    tally.done += 1
    return f"done ({seconds:.0f} s)"
  if jobs_lib.stopped_early(reason):
    tally.stopped += 1
    return reason
  tally.failed += 1
  return f"failed, {reason}"


def run_local(chosen: Sequence[tuple[str, Job]], out: pathlib.Path, report: Callable[[str], None],
              tally: Tally) -> None:
  """One job after another; its line starts before it runs and ends when it is done."""
  for place, job in chosen:
    print(f"{place} {job.name}: ", end="", flush=True)
    start = time.perf_counter()
    reason = jobs_lib.run(job, out)
    report(_outcome(tally, reason, time.perf_counter() - start))


# ------------------------------------------------------------------------------------------------------ parallel


def visible_gpus() -> list[str]:
  """The NVIDIA GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``), as CUDA ids."""
  listed = os.environ.get("CUDA_VISIBLE_DEVICES")
  if listed is not None:
    return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    lines = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.splitlines()
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(line for line in lines if line.startswith("GPU "))]


def cpu_shares(workers: int, cores: Sequence[int] | None = None) -> list[list[int]]:
  """This process's CPU cores in ``workers`` contiguous shares, as equal as they go (more workers than cores: each
  worker one core, shared round-robin)."""
  cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
  if workers >= len(cores):
    return [[cores[i % len(cores)]] for i in range(workers)]
  size, extra = divmod(len(cores), workers)
  shares, start = [], 0
  for i in range(workers):
    end = start + size + (i < extra)
    shares.append(cores[start:end])
    start = end
  return shares


@dataclasses.dataclass(frozen=True)
class Slot:
  """One worker's device: a GPU id, or CPU cores."""

  gpu: str | None = None
  cores: tuple[int, ...] = ()

  def describe(self) -> str:
    return f"GPU {self.gpu}" if self.gpu is not None else f"CPU cores {','.join(map(str, self.cores))}"

  def env(self) -> dict:
    env = dict(os.environ)
    if self.gpu is not None:
      env["CUDA_VISIBLE_DEVICES"] = self.gpu
    else:
      env["OMP_NUM_THREADS"] = str(len(self.cores))  # oneDNN's OpenMP pool: the share, not the machine
    return env


def slots(workers: int) -> list[Slot]:
  """One slot per worker: the visible GPUs round-robin, else equal CPU shares."""
  gpus = visible_gpus()
  if gpus:
    return [Slot(gpu=gpus[i % len(gpus)]) for i in range(workers)]
  return [Slot(cores=tuple(share)) for share in cpu_shares(workers)]


def run_parallel(chosen: Sequence[tuple[str, Job]], out: pathlib.Path, report: Callable[[str], None], tally: Tally,
                 workers: int) -> None:
  """``workers`` threads, each on its own slot, pulling the next job until none is left. A SIGINT (Ctrl-C) reaches
  every run in the terminal's process group: each saves its checkpoint, no new job starts, and the launch stops."""
  pending = list(reversed(chosen))
  guard = threading.Lock()
  interrupted = threading.Event()
  report(f"parallel: {workers} workers on " + "; ".join(slot.describe() for slot in slots(workers)))

  def work(slot: Slot) -> None:
    while not interrupted.is_set():
      with guard:
        if not pending:
          return
        place, job = pending.pop()
      start = time.perf_counter()
      try:
        reason = jobs_lib.run(job, out, slot.cores, slot.env())
      except KeyboardInterrupt:
        interrupted.set()
        return
      with guard:
        report(f"{place} {job.name} ({slot.describe()}): "
               f"{_outcome(tally, reason, time.perf_counter() - start)}")

  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = [pool.submit(work, slot) for slot in slots(workers)]
    try:
      for future in concurrent.futures.as_completed(futures):
        future.result()
    except KeyboardInterrupt:
      interrupted.set()
      raise
  if interrupted.is_set():
    raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------------------- slurm


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
  """What each array task asks of SLURM (submitit's parameter names on the right)."""

  partition: str | None = None         # slurm_partition
  time_min: int = 240                  # timeout_min: each task's time limit; a task past it is requeued
  gpus_per_job: int = 1                # gpus_per_node
  cpus_per_job: int = 8                # cpus_per_task
  mem_gb: int | None = None            # mem_gb
  array_parallelism: int = 64          # slurm_array_parallelism: tasks running at once
  account: str | None = None           # slurm_account
  qos: str | None = None               # slurm_qos
  max_requeues: int = 3                # slurm_max_num_timeout: time limits survived by requeueing
  cluster: str = "slurm"               # submitit's "local" runs the same tasks on this machine (tests)

  def parameters(self, name: str) -> dict:
    parameters = {"name": name, "timeout_min": self.time_min, "gpus_per_node": self.gpus_per_job,
                  "cpus_per_task": self.cpus_per_job, "tasks_per_node": 1, "nodes": 1}
    if self.cluster == "slurm":
      parameters.update(slurm_array_parallelism=self.array_parallelism, slurm_signal_delay_s=120)
      for key, value in (("slurm_partition", self.partition), ("slurm_account", self.account),
                         ("slurm_qos", self.qos), ("mem_gb", self.mem_gb)):
        if value is not None:
          parameters[key] = value
    return parameters


class SlurmTask:
  """One job as a submitit callable: runs it, and on SLURM's signal (a preemption, or the time limit near) passes
  SIGUSR1 to the run, which saves a checkpoint and exits, then requeues itself with the same job; the requeued task
  resumes the run from that checkpoint."""

  def __init__(self, job: Job, out: pathlib.Path):
    self.job, self.out = job, out

  def __call__(self) -> str:
    if jobs_lib.state(self.out / self.job.name) == "done":
      return "done"
    reason = jobs_lib.run(self.job, self.out)
    return "done" if reason is None else reason

  def checkpoint(self, *args, **kwargs):
    """submitit's hook on SLURM's signal (it calls a callable's ``checkpoint``): stop the run at a checkpoint, then
    requeue this task."""
    import signal
    submitit = _submitit()
    for child in _children():
      try:
        os.kill(child, signal.SIGUSR1)
      except ProcessLookupError:
        pass
    deadline = time.monotonic() + 100  # within submitit's signal delay
    while _children() and time.monotonic() < deadline:
      time.sleep(1)
    return submitit.helpers.DelayedSubmission(SlurmTask(self.job, self.out), *args, **kwargs)


def _children() -> list[int]:
  """This process's live child processes (the run), from /proc."""
  me = os.getpid()
  found = []
  for entry in pathlib.Path("/proc").iterdir():
    if not entry.name.isdigit():
      continue
    try:
      fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == me and fields[0] != "Z":
      found.append(int(entry.name))
  return found


def _submitit():
  """submitit, imported without its logging set-up: its ``logging.config.dictConfig`` closes every handler already
  installed in the process (absl's, a test runner's); its logger then logs through the root logger's handlers."""
  previous = os.environ.get(SUBMITIT_LOG_VARIABLE)
  os.environ[SUBMITIT_LOG_VARIABLE] = "NOCONFIG"
  try:
    import submitit
    from submitit.slurm import slurm  # noqa: F401  (loaded here, under the same setting)
  finally:
    if previous is None:
      os.environ.pop(SUBMITIT_LOG_VARIABLE, None)
    else:
      os.environ[SUBMITIT_LOG_VARIABLE] = previous
  return submitit


def _executor(folder: pathlib.Path, options: SlurmOptions, name: str):
  submitit = _submitit()
  executor = submitit.AutoExecutor(folder=folder / "%j", cluster=options.cluster,
                                   **({"slurm_max_num_timeout": options.max_requeues}
                                      if options.cluster == "slurm" else {}))
  executor.update_parameters(**options.parameters(name))
  return executor


def sbatch_script(chosen: Sequence[Job], out: pathlib.Path, options: SlurmOptions, name: str) -> str:
  """The sbatch file that submitting ``chosen`` makes (an array of one task per job), written by submitit's own
  template without a SLURM installation, for ``--dry-run``."""
  slurm = _submitit().slurm.slurm
  folder = out / ".slurm" / "%j"
  parameters = {"job_name": name, "time": options.time_min, "nodes": 1, "ntasks_per_node": 1,
                "cpus_per_task": options.cpus_per_job, "gpus_per_node": options.gpus_per_job,
                "array_parallelism": options.array_parallelism, "signal_delay_s": 120, "map_count": len(chosen),
                "partition": options.partition, "account": options.account, "qos": options.qos,
                "mem": None if options.mem_gb is None else f"{options.mem_gb}GB"}
  command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
  return slurm._make_sbatch_string(command=command, folder=folder, **parameters)  # pylint: disable=protected-access


def check_slurm_available(options: SlurmOptions) -> None:
  if options.cluster == "slurm" and shutil.which("sbatch") is None:
    raise UserError("--launcher slurm needs SLURM's sbatch, and it is not on this machine's PATH",
                    "run it on a SLURM login node, add --dry-run to see the submission, or use --launcher parallel")
  if importlib.util.find_spec("submitit") is None:
    raise UserError("--launcher slurm needs submitit, which is not installed", "pip install submitit")


def run_slurm(chosen: Sequence[tuple[str, Job]], out: pathlib.Path, report: Callable[[str], None], tally: Tally,
              options: SlurmOptions, name: str, wait: bool) -> None:
  """Submits ``chosen`` as one array; with ``wait`` (always for submitit's local cluster), waits for every task."""
  check_slurm_available(options)
  executor = _executor(out / ".slurm", options, name)
  with executor.batch():
    submitted = [executor.submit(SlurmTask(job, out)) for _, job in chosen]
  tally.submitted += len(submitted)
  if submitted:
    report(f"slurm: submitted {len(submitted)} tasks as job {submitted[0].job_id.split('_')[0]} (logs: "
           f"{out / '.slurm'}); overfocus sweep status {shlex.quote(str(out))} follows them")
  if not (wait or options.cluster != "slurm"):
    return
  for (place, job), task in zip(chosen, submitted):
    try:
      outcome = task.result()
    except Exception as e:  # noqa: BLE001 — submitit's failed task: the run's own marker says more
      outcome = f"task failed ({type(e).__name__})"
    reason = None if outcome == "done" else outcome
    report(f"{place} {job.name}: {_outcome(tally, reason, 0).replace(' (0 s)', '')}")
