"""The command line every sweep shares (``overfocus sweep run``, ``python -m overfocus_jax.dg.sweep``): the launcher
and its options, ``--dry-run``, ``--retry-failed``; and ``overfocus sweep status``."""

import argparse
import dataclasses
import json
import pathlib
import shlex
from typing import Sequence

from overfocus_jax.errors import UserError
from overfocus_jax.sweeps import jobs as jobs_lib
from overfocus_jax.sweeps import launchers, results
from overfocus_jax.sweeps.jobs import Job

SLURM_FLAGS = {  # flag → SlurmOptions field
    "slurm_partition": "partition", "slurm_time": "time_min", "slurm_gpus": "gpus_per_job",
    "slurm_cpus": "cpus_per_job", "slurm_mem_gb": "mem_gb", "slurm_array_parallelism": "array_parallelism",
    "slurm_account": "account", "slurm_qos": "qos", "slurm_requeues": "max_requeues", "slurm_cluster": "cluster",
}


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("launching", "how the runs are run; a rerun of the same command skips the runs "
                                    "done and resumes the others")
  group.add_argument("--launcher", choices=launchers.LAUNCHERS, default="local",
                     help="local: one after another (default) | parallel: --workers at once on this machine, each "
                          "on its own GPU or share of the CPU cores | slurm: a SLURM job array through submitit")
  group.add_argument("--workers", type=int, help="parallel: runs at once (default: the visible GPUs, else 2)")
  group.add_argument("--retry-failed", action="store_true", help="run the runs that failed before again")
  group.add_argument("--dry-run", action="store_true",
                     help="print what would run (the commands; for slurm, the sbatch file) and run nothing")
  slurm = parser.add_argument_group("slurm", "each run is one task of an array; a preempted or timed-out task "
                                    "saves its run's checkpoint and is requeued")
  defaults = launchers.SlurmOptions()
  slurm.add_argument("--slurm-partition", help="the partition")
  slurm.add_argument("--slurm-time", type=int, help=f"minutes per task (default {defaults.time_min})")
  slurm.add_argument("--slurm-gpus", type=int, help=f"GPUs per task (default {defaults.gpus_per_job})")
  slurm.add_argument("--slurm-cpus", type=int, help=f"CPU cores per task (default {defaults.cpus_per_job})")
  slurm.add_argument("--slurm-mem-gb", type=int, help="memory per task (default: the partition's)")
  slurm.add_argument("--slurm-array-parallelism", type=int,
                     help=f"tasks running at once (default {defaults.array_parallelism})")
  slurm.add_argument("--slurm-account", help="the account to charge")
  slurm.add_argument("--slurm-qos", help="the quality of service")
  slurm.add_argument("--slurm-requeues", type=int,
                     help=f"time limits a task survives by requeueing (default {defaults.max_requeues})")
  slurm.add_argument("--slurm-cluster", choices=("slurm", "local"),
                     help="local: run the array's tasks on this machine through submitit's local executor, to try "
                          "a submission (default: slurm)")
  slurm.add_argument("--slurm-wait", action="store_true", help="wait for every task and report each")


def slurm_options(args) -> launchers.SlurmOptions:
  given = {field: getattr(args, flag) for flag, field in SLURM_FLAGS.items() if getattr(args, flag) is not None}
  return dataclasses.replace(launchers.SlurmOptions(), **given)


def check_launcher_arguments(args) -> None:
  """One line for a launcher option given to another launcher, or a count below 1."""
  if args.workers is not None and args.launcher != "parallel":
    raise UserError(f"--workers is for --launcher parallel, and the launcher is {args.launcher}",
                    "add --launcher parallel, or drop --workers")
  if args.workers is not None and args.workers < 1:
    raise UserError(f"--workers={args.workers} must be at least 1", "pass --workers N with N >= 1")
  given = [flag for flag in (*SLURM_FLAGS, "slurm_wait") if getattr(args, flag) not in (None, False)]
  if given and args.launcher != "slurm":
    flag = "--" + given[0].replace("_", "-")
    raise UserError(f"{flag} is for --launcher slurm, and the launcher is {args.launcher}",
                    f"add --launcher slurm, or drop {flag}")
  for flag in ("slurm_time", "slurm_gpus", "slurm_array_parallelism"):
    value = getattr(args, flag)
    if value is not None and value < (0 if flag == "slurm_gpus" else 1):
      raise UserError(f"--{flag.replace('_', '-')}={value} is too small", "pass a positive number")


def write_listing(all_jobs: Sequence[Job], out: pathlib.Path) -> None:
  """``OUT/sweep.json``: the jobs in order, each with its fields and command (status and results read it)."""
  listing = {"jobs": [{"name": job.name, "overrides": [list(pair) for pair in job.overrides],
                       "command": shlex.join(job.command(out))} for job in all_jobs]}
  partial = out / (results.SWEEP_FILE + ".tmp")
  partial.write_text(json.dumps(listing, indent=1) + "\n")
  partial.replace(out / results.SWEEP_FILE)


def launch(all_jobs: Sequence[Job], out: pathlib.Path, args, name: str = "overfocus-sweep",
           listed: Sequence[Job] | None = None) -> int:
  """Runs ``all_jobs`` not done with the launcher ``args`` name; one status line per job and a last line. 1 if any
  run failed or was stopped before its end, else 0. ``--dry-run`` prints what would run and runs nothing.
  ``listed``: the whole sweep that ``OUT/sweep.json`` lists, when ``all_jobs`` is a part of it (``--only``)."""
  check_launcher_arguments(args)
  tally = launchers.Tally()
  report = lambda line: print(line, flush=True)  # noqa: E731
  if args.dry_run:
    states = {job.name: jobs_lib.state(out / job.name) for job in all_jobs}
    chosen = [(f"[{i}/{len(all_jobs)}]", job) for i, job in enumerate(all_jobs, start=1)
              if states[job.name] == "pending" or (states[job.name] == "failed" and args.retry_failed)]
    if args.launcher == "slurm":
      print(launchers.sbatch_script(chosen, out, slurm_options(args), name), end="")
      print(f"# {len(chosen)} array tasks, one per run:")
    for _, job in chosen:
      print(shlex.join(job.command(out)))
    return 0
  if args.launcher == "slurm":
    launchers.check_slurm_available(slurm_options(args))
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --out {str(out)!r} ({e.strerror or type(e).__name__})",
                    "pass a folder you can write to") from None
  write_listing(listed or all_jobs, out)
  done_before = sum(jobs_lib.state(out / job.name) == "done" for job in all_jobs)
  report(f"sweep: {len(all_jobs)} runs in {out} ({done_before} done, {len(all_jobs) - done_before} to run)")
  chosen = launchers.to_run(all_jobs, out, args.retry_failed, report, tally)
  if args.launcher == "local":
    launchers.run_local(chosen, out, report, tally)
  elif args.launcher == "parallel":
    gpus = launchers.visible_gpus()
    workers = args.workers or (len(gpus) if gpus else 2)
    launchers.run_parallel(chosen, out, report, tally, min(workers, max(len(chosen), 1)))
  else:
    launchers.run_slurm(chosen, out, report, tally, slurm_options(args), name, args.slurm_wait)
  report(f"sweep: {tally.line()}; status: overfocus sweep status {shlex.quote(str(out))}")
  return 1 if tally.failed or tally.stopped else 0


def status(out: pathlib.Path) -> str:
  """Each job's state (done / running / failed / pending; a failure's reason) and the counts."""
  if not out.is_dir():
    raise UserError(f"no sweep folder {str(out)!r}", "pass the --out of a sweep")
  names = results.job_names(out)
  if not names:
    raise UserError(f"{str(out)!r} holds no runs of a sweep", "pass the --out of a sweep")
  counts = dict.fromkeys(jobs_lib.STATES, 0)
  lines = []
  width = max(map(len, names))
  for name in names:
    state = jobs_lib.state(out / name)
    counts[state] += 1
    detail = {"failed": jobs_lib.failure(out / name), "running": jobs_lib.lock.holder(out / name) or ""}.get(state, "")
    lines.append(f"{name.ljust(width)}  {state}" + (f"  {detail}" if detail else ""))
  lines.append(f"{len(names)} runs: " + ", ".join(f"{counts[s]} {s}" for s in jobs_lib.STATES))
  return "\n".join(lines)

