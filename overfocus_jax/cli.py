"""The ``overfocus`` command: ``train``, ``eval``, ``explain`` and ``bench``.

    overfocus train --workdir DIR [--config FILE] [--config.FIELD=VALUE ...]
                    [--coordinator HOST:PORT --num-processes N --process-id I] [--distributed-timeout S]
    overfocus eval  --workdir DIR [--dataset SOURCE]
    overfocus explain --workdir DIR [--dataset SOURCE] [--out DIR] [--n N] [--methods a,b] [--compare DIR]
    overfocus bench [--config FILE] [--config.FIELD=VALUE ...] [--steps N] [--repeats N] [--warmup N]
                    [--end-to-end-epochs N]

Bad input ends in one line on stderr naming the problem and the fix, exit code 2, no traceback. ``eval``,
``explain`` and ``bench`` print one JSON object as their last stdout line. ``train`` stops cleanly on SIGTERM or
SIGUSR1 (exit 0, so that a scheduler requeues the job) and on SIGINT (exit 130) after saving a checkpoint; a second
signal exits at once (:mod:`overfocus_jax.train.preemption`). Compiled programs are cached across runs
(:mod:`overfocus_jax.compilation_cache`: ``~/.cache/overfocus_jax/xla``; ``OVERFOCUS_COMPILATION_CACHE=DIR|off``).
"""

import argparse
import json
import os
import sys

from overfocus_jax import errors
from overfocus_jax.errors import UserError
from overfocus_jax.overrides import CONFIG_PREFIX, split_overrides
from overfocus_jax.train.preemption import Stopped  # numpy only: the CLI still starts without importing JAX



class _Parser(argparse.ArgumentParser):
  """argparse that raises :class:`UserError` (one line, exit 2) instead of printing usage."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message}", f"see '{self.prog} --help'")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="overfocus", description=__doc__.split("\n\n")[0], allow_abbrev=False)
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  train = sub.add_parser("train", help="train a model; resumes from DIR/checkpoints", allow_abbrev=False)
  train.add_argument("--workdir", help="where checkpoints, logs and metrics go (required)")
  train.add_argument("--config", help="ml_collections config file (default: the residual CNN on mnist5k)")
  train.add_argument("--help-config", action="store_true",
                     help="list every config field with its value in this config and one line of help, then exit")
  train.add_argument("--no-progress", action="store_true", help="no progress bar")
  cluster = train.add_argument_group("several processes (hosts)", "without these, a SLURM, Open MPI or TPU-pod "
                                     "environment with more than one process starts jax.distributed by itself")
  cluster.add_argument("--coordinator", help="HOST:PORT of process 0, which serves it")
  cluster.add_argument("--num-processes", type=int, help="how many processes take part")
  cluster.add_argument("--process-id", type=int, help="this process's id, 0 .. num-processes - 1")
  cluster.add_argument("--distributed-timeout", type=float, default=300.0,
                       help="seconds to wait for every process to join (default 300)")
  sweep = sub.add_parser("sweep", help="run a sweep of training runs, or show one's status", allow_abbrev=False)
  sweep_sub = sweep.add_subparsers(dest="sweep_command", required=True, parser_class=_Parser)
  sweep_run = sweep_sub.add_parser("run", help="train every run of a config file's get_sweep()", allow_abbrev=False)
  sweep_run.add_argument("--config", required=True, help="a config file with get_config() and get_sweep()")
  sweep_run.add_argument("--out", required=True, help="the sweep's folder: one subfolder (workdir) per run")
  sweep_run.add_argument("--only", nargs="+", metavar="GLOB",
                         help="only the runs whose names match one of these shell patterns, e.g. '*seed=0'")
  from overfocus_jax.sweeps.command import add_launcher_arguments  # numpy only
  add_launcher_arguments(sweep_run)
  sweep_status = sweep_sub.add_parser("status", help="each run's state: done, running, failed (why) or pending",
                                      allow_abbrev=False)
  sweep_status.add_argument("out", help="the sweep's folder")
  evaluate = sub.add_parser("eval", help="evaluate the latest checkpoint on a test split", allow_abbrev=False)
  evaluate.add_argument("--workdir", required=True)
  evaluate.add_argument("--dataset", help="test on this source instead of the training dataset")
  explain = sub.add_parser("explain", help="attribution maps, overfocus metrics and figures of a trained run",
                           allow_abbrev=False)
  explain.add_argument("--workdir", required=True, help="a run made by 'overfocus train'")
  explain.add_argument("--dataset", help="explain this source's test split instead of the training dataset's")
  explain.add_argument("--out", help="where figures and explain.json go (default: WORKDIR/explain)")
  explain.add_argument("--n", type=int, default=8, help="test images drawn")
  explain.add_argument("--images", type=int, default=128, help="test images measured (the first ones)")
  explain.add_argument("--methods", help="comma-separated: latent, grad_cam, input_gradient, smoothgrad, "
                       "integrated_gradients (default: all the model supports)")
  explain.add_argument("--layer", default="encoder", help="Grad-CAM layer, a module path (default: encoder = z)")
  explain.add_argument("--target", default="true", help="attribute the true or the predicted class")
  explain.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps (midpoint rule)")
  explain.add_argument("--ig-baseline", default="mean",
                       help="integrated-gradients baseline: mean (every pixel at the dataset mean) or black (zeros)")
  explain.add_argument("--compare", help="a second run's workdir, drawn beside this one")
  explain.add_argument("--no-progress", action="store_true", help="no progress bar")
  bench = sub.add_parser("bench", help="time the compiled train step and the train loop end to end",
                         allow_abbrev=False)
  bench.add_argument("--config", help="ml_collections config file")
  bench.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  bench.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
  bench.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  bench.add_argument("--end-to-end-epochs", type=int, default=1,
                     help="epochs of the train loop timed after an untimed one (data stream + K steps per dispatch); "
                          "0: skip")
  return parser


def check_distributed_flags(args):
  """The multi-process flags as a :class:`parallel.Distributed`, or a one-line error."""
  from overfocus_jax import parallel
  if args.distributed_timeout <= 0:
    raise UserError(f"--distributed-timeout {args.distributed_timeout} must be positive", "e.g. 300 seconds")
  spec = parallel.Distributed(args.coordinator, args.num_processes, args.process_id)
  parallel.check_distributed(spec)
  return spec


def start_distributed(args, spec) -> None:
  """Joins a multi-process run (``spec``: :func:`check_distributed_flags`, or a detected cluster) before anything
  touches a device. JAX aborts the process when the other processes never join; a watchdog ends it first, with one
  line and exit code 2."""
  import threading
  from overfocus_jax import parallel
  where = f"coordinator {spec.coordinator}" if spec.explicit else f"the {parallel.detected_cluster()} cluster"

  def give_up():
    print(f"overfocus: error: not every process joined {where} within {args.distributed_timeout:g} s: start all "
          f"{spec.num_processes or ''} processes with the same --coordinator and --num-processes (process 0 on the "
          "coordinator's host), or raise --distributed-timeout", file=sys.stderr, flush=True)
    os._exit(UserError.exit_code)

  watchdog = threading.Timer(args.distributed_timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:  # JAX's own deadline comes later, so the watchdog's line is what the user sees
    parallel.start_distributed(spec, timeout_s=args.distributed_timeout + 30)
  finally:
    watchdog.cancel()


def cmd_train(args, overrides) -> None:
  from overfocus_jax import config as config_lib
  from overfocus_jax.train import loop, workdir
  if args.help_config:  # the config with its overrides, each field's value and help; nothing is trained
    print(config_lib.describe(config_lib.build_config(args.config, overrides)))
    return
  if not args.workdir:
    raise UserError("overfocus train: the following arguments are required: --workdir",
                    "see 'overfocus train --help'")
  spec = check_distributed_flags(args)  # what can fail in one process alone is checked before it joins the others
  config = config_lib.build_config(args.config, overrides)
  workdir.prepare_workdir(args.workdir)
  start_distributed(args, spec)
  summary = loop.train_and_evaluate(config, args.workdir, progress=False if args.no_progress else None)
  if summary.get("process_index", 0) == 0:  # several processes: process 0 speaks for the run
    print(json.dumps(summary))


def cmd_eval(args, overrides) -> None:
  from overfocus_jax.train import evaluation, workdir
  if overrides:
    raise UserError("eval takes no --config.FIELD overrides", "it uses the config saved in the workdir")
  run = workdir.load_trained(args.workdir)
  source, name = evaluation.evaluation_split(run.exp, args.dataset)
  result = evaluation.evaluate(run.exp, run.state, source)
  print(json.dumps({**result, "dataset": name, "step": run.step}))


def cmd_explain(args, overrides) -> None:
  from overfocus_jax.explain import report
  if overrides:
    raise UserError("explain takes no --config.FIELD overrides", "it uses the config saved in the workdir")
  methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
  if methods == []:
    raise UserError("--methods is empty", f"name one or more of {', '.join(report.METHODS)}")
  options = report.Options(n=args.n, images=args.images, methods=methods, layer=args.layer, target=args.target,
                           ig_steps=args.ig_steps, ig_baseline=args.ig_baseline)
  summary = report.explain(args.workdir, dataset=args.dataset, out=args.out, compare=args.compare, options=options,
                           progress=False if args.no_progress else None)
  for name, path in summary["figures"].items():
    print(f"{name}: {path}")
  print(json.dumps(summary))


def cmd_bench(args, overrides) -> None:
  from overfocus_jax import config as config_lib
  from overfocus_jax.train import bench, experiment
  for name in ("steps", "repeats"):
    if getattr(args, name) < 1:
      raise UserError(f"--{name}={getattr(args, name)} must be at least 1", f"pass --{name}=20")
  for name, default in (("warmup", 3), ("end_to_end_epochs", 1)):
    if getattr(args, name) < 0:
      flag = "--" + name.replace("_", "-")
      raise UserError(f"{flag}={getattr(args, name)} must be at least 0", f"pass {flag}={default}")
  config = config_lib.build_config(args.config, overrides)
  exp = experiment.build_experiment(config)
  result = bench.time_train_step(exp, steps=args.steps, repeats=args.repeats, warmup=args.warmup)
  if args.end_to_end_epochs:
    result.update(bench.time_end_to_end(exp, epochs=args.end_to_end_epochs))
  print(json.dumps(result))


def quiet_background_writers() -> None:
  """A failed checkpoint write makes orbax's background threads log it at ERROR with its traceback, and TensorStore's
  callbacks then print one "Event loop is closed" traceback per pending write (as unraisable exceptions), all before
  the run reports the failure in one line of its own (:class:`errors.WriteError`). The CLI shows orbax's fatal
  messages only and drops those callbacks' tracebacks; every other unraisable exception prints as before."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.FATAL)
  default_hook = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    default_hook(unraisable)

  sys.unraisablehook = hook


def cmd_sweep(args, overrides) -> int:
  import pathlib
  from overfocus_jax.sweeps import command
  if args.sweep_command == "status":
    if overrides:
      raise UserError("sweep status takes no --config.FIELD overrides", "pass the sweep's folder alone")
    print(command.status(pathlib.Path(args.out).expanduser().resolve()))
    return 0
  from overfocus_jax import config as config_lib
  from overfocus_jax.sweeps import grid
  config_path = str(pathlib.Path(args.config).expanduser().resolve())
  sweep = grid.jobs_from_sweep(config_lib.load_sweep_file(config_path), config_path, overrides)
  chosen = grid.matching(sweep, args.only) if args.only else sweep
  for job in chosen:  # every run's config is checked before the first one starts
    try:
      config_lib.build_config(job.config, list(job.overrides))
    except UserError as e:
      raise UserError(f"run {job.name}: {e}") from None
  # sweep.json lists the whole sweep, so status and the results see every run, whichever part this launch runs.
  return command.launch(chosen, pathlib.Path(args.out).expanduser().resolve(), args, listed=sweep)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "explain": cmd_explain, "bench": cmd_bench, "sweep": cmd_sweep}


def main(argv: list[str] | None = None) -> int:
  """The ``overfocus`` command. Its process-wide settings are made here, at the entry point, and nowhere else: glibc
  keeps the memory XLA:CPU frees between steps (:func:`overfocus_jax.host_memory.retain_host_memory`, before JAX
  computes anything) and compiled programs are cached across runs."""
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  quiet_background_writers()
  try:
    args, extra = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = split_overrides(extra)
    from overfocus_jax import compilation_cache
    compilation_cache.enable()  # before anything compiles; $OVERFOCUS_COMPILATION_CACHE=off turns it off
    code = COMMANDS[args.command](args, overrides)
    if code:
      return code
  except errors.WriteError as e:  # a full or read-only disk: the line, then out before orbax's threads print theirs
    code = errors.report(e, flag_prefix=CONFIG_PREFIX)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  except UserError as e:  # a SettingError is worded as the flag that sets it
    return errors.report(e, flag_prefix=CONFIG_PREFIX)
  except KeyboardInterrupt:
    print("overfocus: interrupted; the last checkpoint is kept", file=sys.stderr)
    return 130
  except Stopped as e:  # a scheduler's signal: the checkpoint is saved; SIGTERM exits 0 so that the job requeues
    print(f"overfocus: {e}", file=sys.stderr)
    return e.exit_code
  except BrokenPipeError:  # printed into a reader that stopped early (sweep run --dry-run | head)
    return errors.closed_pipe()
  return 0


if __name__ == "__main__":
  sys.exit(main())
