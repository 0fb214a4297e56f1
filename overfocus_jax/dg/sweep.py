r"""DomainBed's sweep: every (trial seed, dataset, algorithm, test environments, hparams seed) trained by
``overfocus train``, each run leaving DomainBed's ``results.jsonl`` and ``done`` in its folder; the runs are jobs of
:mod:`overfocus_jax.sweeps`, run one after another, in parallel on this machine's devices, or as a SLURM array.

    python -m overfocus_jax.dg.sweep --out DIR [--datasets colored_mnist ...] [--algorithms erm irm ...]
                                     [--n-hparams N] [--n-trials T] [--test-envs I ...] [--leave-one-out]
                                     [--config FILE] [--epochs N | --steps N] [--dry-run] [--config.FIELD=VALUE ...]
                                     [--launcher local|parallel|slurm] [--workers N] [--retry-failed] [--slurm-...]
    overfocus sweep status DIR
    python -m overfocus_jax.dg.tables DIR

Source: facebookresearch/DomainBed, ``domainbed/scripts/sweep.py`` (``make_args_list``, ``Job``),
``domainbed/hparams_registry.py`` (``_hparams``, ``random_hparams``), ``domainbed/scripts/train.py`` (how a run
picks its hparams) and ``domainbed/lib/misc.py`` (``seed_hash``: :func:`overfocus_jax.data.environments.seed_hash`).

The runs, in DomainBed's order: trial seeds ``0 .. T-1``, then datasets, algorithms, test environments, hparams
seeds ``0 .. N-1``. Test environments: each environment alone (DomainBed's ``--single_test_envs``), or those of
``--test-envs``; ``--leave-one-out`` adds, for each test environment ``t``, the runs holding out ``[t, v]`` for every
other ``v`` (each pair once, ``[min, max]``), which :mod:`overfocus_jax.dg.selection`'s leave-one-domain-out method
needs — over all environments, DomainBed's ``all_test_env_combinations``. A run's folder is
``DIR/<dataset>-<algorithm>-te<envs>-h<hparams_seed>-t<trial_seed>`` (``te0_2`` for ``[0, 2]``; a dataset spec with
characters other than letters, digits, ``.``, ``_``, ``-`` has them replaced by ``_`` and its md5's first 8 hex
digits appended); its ``config.seed`` is DomainBed's per-job seed ``seed_hash(dataset, algorithm, test_envs,
hparams_seed, trial_seed)`` (already below 2**31), of the names as given here (``'colored_mnist'``, ``'erm'``).

The trial seed picks the runs' seeds, their hparams draws and, as ``config.environments.trial_seed``, every
environment's in/out split, as in DomainBed: each trial splits the environments anew (the environments themselves —
which digits, their colours or angles — are the same in every trial, as DomainBed's with its fixed data seed).

Algorithms, as config overrides (the name is recorded as given): ``erm`` → objective erm, regularizer none; ``irm``,
``vrex`` → that objective (regularizer none); ``rsc_domainbed``, ``rsc``, ``sgdrop`` → that regularizer (objective
erm). Hparams: seed 0 changes nothing (the config's values, as DomainBed's seed 0 is its defaults; its batch_size is
the whole batch of ``config.environments.balanced``, the same for every run, so a leave-one-out run, one training
environment fewer, draws more of each). Seed ``h > 0`` draws DomainBed's random hparams:
``random_hparams(algorithm, dataset, seed_hash(h, trial_seed))``, each hparam from its own
``np.random.RandomState(seed_hash(that seed, name))`` — so a value depends on its name alone, never on the other
hparams — in :data:`HPARAMS`: DomainBed's names, ranges and order (the algorithm's first, then lr, weight_decay,
batch_size), DomainBed's ``SMALL_IMAGES`` ranges for colored_mnist and rotated_mnist and its general ranges for
other datasets (``imagefolder:DIR:domains``; its DomainNet and ARM cases do not arise). batch_size is DomainBed's
per environment: ``config.batch_size`` = the draw × the run's training environments. DomainBed's other hparams
(data_augmentation, resnet18, resnet_dropout, class_balanced, nonlinear_classifier) change nothing of these runs and
are not drawn. The last three rows — our rsc's spatial and channel fractions U(0, 0.5) and sgdrop's mass
U(0.2, 0.8) — are ours, not DomainBed's (names and ranges chosen here), drawn the same way. ``--config.FIELD=VALUE``
overrides go to every run after the sweep's own, so they win over a draw, as DomainBed's ``--hparams``.

Each run is ``python -m overfocus_jax train --workdir RUN --config FILE --no-progress --config.FIELD=VALUE ...``
in a subprocess (stdout and stderr appended to ``RUN/out.txt`` and ``RUN/err.txt``, as DomainBed's), then, if it
succeeded, ``RUN/results.jsonl`` — one DomainBed record per line of its ``metrics.jsonl``::

    {"args": {"algorithm", "dataset", "test_envs", "hparams_seed", "trial_seed", "seed", "output_dir"},
     "hparams": {config field: value as trained, from RUN/config.json}, "step", "epoch", "env0_in_acc", ...}

and an empty ``RUN/done``. Resumable: a run with ``done`` is skipped, one whose workdir another process is training
too; one that failed (``RUN/failed`` holds why) is skipped unless ``--retry-failed``; any other is launched again
(``overfocus train`` resumes its checkpoint). One status line per run (done, skipped, or failed with the last stderr
line); a failed run does not stop the sweep, and the exit code is then 1. ``--dry-run`` prints the commands of the
runs to do (with ``--launcher slurm``, the sbatch file first), and runs nothing.

Length: ``--epochs N`` sets every run's ``config.num_epochs``; ``--steps N`` trains each run for at least ``N`` steps,
DomainBed's budget (``--steps 5000``): ``num_epochs = ⌈N / S⌉`` with ``S`` the run's steps per epoch (its balanced
layout's: the smallest training environment's in-split over the examples of each environment per batch), so a run
ends on the first epoch boundary at or past step ``N`` and is evaluated after each epoch (DomainBed: every 100
steps on the MNISTs).

Bad input (an unknown algorithm, a dataset without environments, a test environment out of
range, a bad ``--config.FIELD``, a batch that needs more examples of a training environment than it has, ...) is found before the first run: one line on stderr naming the problem and the
fix, exit code 2, no traceback. Importing this module loads numpy and PIL only; checking a sweep loads the config
(JAX) and the datasets.
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import pathlib
import re
import shlex
import sys
from typing import Callable, Sequence

import numpy as np

from overfocus_jax import errors
from overfocus_jax.data.environments import KINDS as SMALL_IMAGE_KINDS
from overfocus_jax.data.environments import seed_hash
from overfocus_jax.dg.selection import record_problem
from overfocus_jax.errors import SettingError, UserError
from overfocus_jax.overrides import CONFIG_PREFIX, split_overrides
from overfocus_jax.sweeps import command as sweep_command
from overfocus_jax.sweeps import jobs as sweep_jobs
from overfocus_jax.sweeps.grid import override_text

PROG = "python -m overfocus_jax.dg.sweep"
DEFAULT_CONFIG = "mnist_cnn.py"
PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS_FILE = "results.jsonl"

# Algorithm → the config overrides that make it.
ALGORITHMS = {
    "erm": (("objective.name", "erm"), ("regularizer.name", "none")),
    "irm": (("objective.name", "irm"), ("regularizer.name", "none")),
    "vrex": (("objective.name", "vrex"), ("regularizer.name", "none")),
    "rsc_domainbed": (("objective.name", "erm"), ("regularizer.name", "rsc_domainbed")),
    "rsc": (("objective.name", "erm"), ("regularizer.name", "rsc")),
    "sgdrop": (("objective.name", "erm"), ("regularizer.name", "sgdrop")),
}

# Fields the sweep sets for every run: an override of them would be ignored or break the sweep.
RESERVED_FIELDS = {
    "dataset": "pass the datasets with --datasets",
    "seed": "each run's seed is DomainBed's seed_hash of its arguments; more trials: --n-trials",
    "environments.test_envs": "pass the test environments with --test-envs (and --leave-one-out)",
    "environments.train_envs": "leave it out: each run trains on every environment it does not hold out, as DomainBed",
    "objective.name": "pick algorithms with --algorithms",
    "regularizer.name": "pick algorithms with --algorithms",
}

# The config fields each record's "hparams" holds, besides the drawn and overridden ones.
RECORDED_FIELDS = ("model", "optimizer", "learning_rate", "batch_size", "weight_decay", "schedule", "num_epochs",
                   "augment", "environments.balanced", "objective.name", "regularizer.name")

Draw = Callable[[np.random.RandomState], float | int]


def pow10(low: float, high: float) -> Draw:
  return lambda r: float(10 ** r.uniform(low, high))


def uniform(low: float, high: float) -> Draw:
  return lambda r: float(r.uniform(low, high))


def int_pow2(low: float, high: float) -> Draw:
  return lambda r: int(2 ** r.uniform(low, high))


def int_pow10(low: float, high: float) -> Draw:
  return lambda r: int(10 ** r.uniform(low, high))


def constant(value: float) -> Draw:
  return lambda r: value  # DomainBed's lambda r: 0. draws nothing


ALL = ""  # an hparam of every algorithm


@dataclasses.dataclass(frozen=True)
class Hparam:
  """One random hparam: DomainBed's ``name`` (it seeds the draw), the config ``field`` it sets, the ``algorithm`` it
  belongs to (:data:`ALL`: every one), its draw on MNIST-sized datasets (DomainBed's SMALL_IMAGES) and on the others
  (``large``, None: the same)."""
  name: str
  field: str
  algorithm: str
  small: Draw
  large: Draw | None = None
  per_environment: bool = False  # DomainBed's batch_size: examples of each training environment


HPARAMS = (
    # Hparam(DomainBed's name, config field, algorithm, draw on MNIST-sized datasets[, draw on the others]), in
    # DomainBed's order; its ranges.
    Hparam("rsc_f_drop_factor", "regularizer.rsc_domainbed.feature_drop", "rsc_domainbed", uniform(0, 0.5)),
    Hparam("rsc_b_drop_factor", "regularizer.rsc_domainbed.batch_drop", "rsc_domainbed", uniform(0, 0.5)),
    Hparam("irm_lambda", "objective.irm.penalty_weight", "irm", pow10(-1, 5)),
    Hparam("irm_penalty_anneal_iters", "objective.irm.anneal_steps", "irm", int_pow10(0, 4)),
    Hparam("vrex_lambda", "objective.vrex.penalty_weight", "vrex", pow10(-1, 5)),
    Hparam("vrex_penalty_anneal_iters", "objective.vrex.anneal_steps", "vrex", int_pow10(0, 4)),
    Hparam("lr", "learning_rate", ALL, pow10(-4.5, -2.5), pow10(-5, -3.5)),
    Hparam("weight_decay", "weight_decay", ALL, constant(0.0), pow10(-6, -2)),
    Hparam("batch_size", "batch_size", ALL, int_pow2(3, 9), int_pow2(3, 5.5), per_environment=True),
    # Ours, not DomainBed's: the strengths of this library's rsc and sgdrop (names and ranges chosen here).
    Hparam("rsc_spatial_fraction", "regularizer.rsc.spatial_fraction", "rsc", uniform(0, 0.5)),
    Hparam("rsc_channel_fraction", "regularizer.rsc.channel_fraction", "rsc", uniform(0, 0.5)),
    Hparam("sgdrop_mass", "regularizer.sgdrop.mass", "sgdrop", uniform(0.2, 0.8)),
)


# ------------------------------------------------------------------------------------------------ hparams


def small_images(dataset: str) -> bool:
  """Whether DomainBed's SMALL_IMAGES ranges apply: its ColoredMNIST and RotatedMNIST, whatever their base."""
  return dataset.partition(":")[0].strip() in SMALL_IMAGE_KINDS


def algorithm_hparams(algorithm: str) -> tuple[Hparam, ...]:
  return tuple(h for h in HPARAMS if h.algorithm in (ALL, algorithm))


def draw(hparam: Hparam, random_seed: int, small: bool) -> float | int:
  """One hparam's value, from its own ``np.random.RandomState(seed_hash(random_seed, name))`` as DomainBed's
  ``_hparam``."""
  sample = hparam.small if small or hparam.large is None else hparam.large
  return sample(np.random.RandomState(seed_hash(random_seed, hparam.name)))


def random_hparams(algorithm: str, dataset: str, random_seed: int) -> dict[str, float | int]:
  """DomainBed's ``random_hparams(algorithm, dataset, random_seed)`` over :data:`HPARAMS`: name → value."""
  return {h.name: draw(h, random_seed, small_images(dataset)) for h in algorithm_hparams(algorithm)}


def hparam_overrides(algorithm: str, dataset: str, hparams_seed: int, trial_seed: int,
                     train_envs: int) -> dict[str, float | int]:
  """Config field → value of a run's hparams: none for hparams seed 0 (the config's own), else DomainBed's draws for
  ``seed_hash(hparams_seed, trial_seed)`` (as its train.py), per-environment ones × ``train_envs``."""
  if hparams_seed == 0:
    return {}
  drawn = random_hparams(algorithm, dataset, seed_hash(hparams_seed, trial_seed))
  return {h.field: drawn[h.name] * (train_envs if h.per_environment else 1) for h in algorithm_hparams(algorithm)}


# ------------------------------------------------------------------------------------------------ jobs


def job_seed(dataset: str, algorithm: str, test_envs: Sequence[int], hparams_seed: int, trial_seed: int) -> int:
  """DomainBed's per-job seed (sweep.py's ``train_args['seed']``); ``test_envs`` hashes as a list, as there."""
  return seed_hash(dataset, algorithm, list(test_envs), hparams_seed, trial_seed) % 2**31


def test_env_sets(n_envs: int, test_envs: Sequence[int] | None, leave_one_out: bool) -> list[tuple[int, ...]]:
  """The test environments of a dataset's runs: each of ``test_envs`` (default: every environment) alone, followed
  with ``leave_one_out`` by its pairs with every other environment; each set once, pairs sorted."""
  sets = []
  for test in (range(n_envs) if test_envs is None else test_envs):
    sets.append((test,))
    if leave_one_out:
      sets += [tuple(sorted((test, other))) for other in range(n_envs) if other != test]
  return list(dict.fromkeys(sets))


def safe_name(dataset: str) -> str:
  """``dataset`` as a folder-name part: itself if plain, else its odd characters as ``_`` and a short hash."""
  if re.fullmatch(r"[A-Za-z0-9._-]+", dataset):
    return dataset
  return re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_") + "-" + hashlib.md5(dataset.encode()).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of the sweep and the config overrides the sweep gives it (before the user's)."""
  dataset: str
  algorithm: str
  test_envs: tuple[int, ...]
  hparams_seed: int
  trial_seed: int
  seed: int
  overrides: tuple[tuple[str, object], ...]

  @property
  def name(self) -> str:
    envs = "_".join(map(str, self.test_envs))
    return f"{safe_name(self.dataset)}-{self.algorithm}-te{envs}-h{self.hparams_seed}-t{self.trial_seed}"


def make_job(dataset: str, n_envs: int, algorithm: str, test_envs: tuple[int, ...], hparams_seed: int,
             trial_seed: int, epochs: int | None) -> Job:
  seed = job_seed(dataset, algorithm, test_envs, hparams_seed, trial_seed)
  hparams = hparam_overrides(algorithm, dataset, hparams_seed, trial_seed, n_envs - len(test_envs))
  overrides = (("dataset", dataset), *ALGORITHMS[algorithm], ("environments.test_envs", test_envs),
               ("environments.trial_seed", trial_seed), ("seed", seed), *hparams.items(), *((("num_epochs", epochs),) if epochs is not None else ()))
  return Job(dataset, algorithm, test_envs, hparams_seed, trial_seed, seed, overrides)


def make_jobs(env_counts: dict[str, int], algorithms: Sequence[str], n_hparams: int, n_trials: int,
              test_envs: Sequence[int] | None = None, leave_one_out: bool = False,
              epochs: int | None = None) -> list[Job]:
  """Every run, in DomainBed's order (trial, dataset, algorithm, test environments, hparams seed);
  ``env_counts``: dataset → its number of environments."""
  return [make_job(dataset, n_envs, algorithm, envs, hparams_seed, trial_seed, epochs)
          for trial_seed in range(n_trials)
          for dataset, n_envs in env_counts.items()
          for algorithm in algorithms
          for envs in test_env_sets(n_envs, test_envs, leave_one_out)
          for hparams_seed in range(n_hparams)]


def config_pairs(job: Job, user_overrides: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  """(field, text) of every override of a run: the sweep's, then the user's (which win)."""
  return [(field, override_text(value)) for field, value in job.overrides] + list(user_overrides)


def sweep_job(job: Job, config_path: pathlib.Path, user_overrides: Sequence[tuple[str, str]]) -> sweep_jobs.Job:
  """The run as a job of :mod:`overfocus_jax.sweeps`: its overrides, and DomainBed's results written when it
  finishes."""
  user_fields = tuple(field for field, _ in user_overrides)
  return sweep_jobs.Job(name=job.name, overrides=tuple(config_pairs(job, user_overrides)), config=str(config_path),
                        finish=functools.partial(write_results, job, user_fields=user_fields))


# ------------------------------------------------------------------------------------------------ results


def config_value(config: dict, field: str):
  """``config.<field>`` of a saved config.json (nested dicts); None where it has no such field."""
  node = config
  for part in field.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def recorded_hparams(job: Job, config: dict, user_fields: Sequence[str]) -> dict:
  """The config values a record keeps: the usual ones, the algorithm's hparams, whatever the sweep or the user
  overrode (the dataset, seed and test environments are in the record's args)."""
  fields = [*RECORDED_FIELDS, *(h.field for h in algorithm_hparams(job.algorithm)),
            *(field for field, _ in job.overrides), *user_fields]
  kept = [f for f in dict.fromkeys(fields)
          if f not in ("dataset", "seed", "environments.test_envs", "environments.trial_seed")]
  return {field: config_value(config, field) for field in kept}


def results_records(job: Job, workdir: pathlib.Path, metrics: Sequence[dict], config: dict,
                    user_fields: Sequence[str] = ()) -> list[dict]:
  """One DomainBed record per line of the run's metrics.jsonl."""
  args = {"algorithm": job.algorithm, "dataset": job.dataset, "test_envs": list(job.test_envs),
          "hparams_seed": job.hparams_seed, "trial_seed": job.trial_seed, "seed": job.seed,
          "output_dir": str(workdir)}
  hparams = recorded_hparams(job, config, user_fields)
  return [{"args": args, "hparams": hparams, "step": line["step"], "epoch": line.get("epoch"),
           **{k: v for k, v in line.items() if re.fullmatch(r"env\d+_(in|out)_acc", k)}} for line in metrics]


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_results(job: Job, workdir: pathlib.Path, user_fields: Sequence[str]) -> None:
  """``results.jsonl`` from the run's metrics.jsonl and config.json, checked as the selection reads it.

  Raises:
    ValueError: a missing or unreadable file, or a record the model selection could not read.
  """
  try:
    metrics, config = read_jsonl(workdir / "metrics.jsonl"), json.loads((workdir / "config.json").read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read the run's metrics.jsonl and config.json ({e})") from None
  records = results_records(job, workdir, metrics, config, user_fields)
  if not records:
    raise ValueError("metrics.jsonl holds no epoch")
  for number, record in enumerate(records, start=1):
    problem = record_problem(record)
    if problem is not None:
      raise ValueError(f"metrics.jsonl line {number}: {problem}")
  partial = workdir / (RESULTS_FILE + ".tmp")  # renamed when whole: a crash never leaves half a file
  partial.write_text("".join(json.dumps(record) + "\n" for record in records))
  partial.replace(workdir / RESULTS_FILE)


# ------------------------------------------------------------------------------------------------ checks


def default_config_path() -> pathlib.Path:
  """experiments/configs/mnist_cnn.py: shipped with the package, or in the checkout that holds it."""
  for path in (PACKAGE_ROOT / "configs" / DEFAULT_CONFIG, PACKAGE_ROOT.parent / "experiments" / "configs" /
               DEFAULT_CONFIG):
    if path.is_file():
      return path
  raise UserError(f"the default config {DEFAULT_CONFIG} is not in this installation",
                  "pass --config FILE (e.g. experiments/configs/mnist_cnn.py of a checkout)")


def check_user_overrides(overrides: Sequence[tuple[str, str]], epochs: int | None, steps: int | None = None) -> None:
  for field, _ in overrides:
    if field in RESERVED_FIELDS:
      raise UserError(f"--config.{field} is set by the sweep for each run", RESERVED_FIELDS[field])
    if field == "num_epochs" and (epochs is not None or steps is not None):
      flag = "--epochs" if epochs is not None else "--steps"
      raise UserError(f"both {flag} and --config.num_epochs are given", "pass one of them")


def check_counts(args) -> None:
  unknown = [a for a in args.algorithms if a not in ALGORITHMS]
  if unknown:
    raise UserError(f"unknown algorithm {unknown[0]!r}", f"use some of {', '.join(ALGORITHMS)}")
  if args.epochs is not None and args.steps is not None:
    raise UserError("both --epochs and --steps are given", "pass one of them")
  for flag, value in (("--n-hparams", args.n_hparams), ("--n-trials", args.n_trials), ("--epochs", args.epochs),
                      ("--steps", args.steps)):
    if value is not None and value < 1:
      raise UserError(f"{flag}={value} must be at least 1", f"pass {flag}=1 or more")


def environment_datasets(datasets: Sequence[str], config) -> dict:
  """Dataset spec → the dataset of environments it loads (each once, with the config's data_dir)."""
  from overfocus_jax.data import sources  # loaded only when a sweep is checked
  loaded = {}
  for spec in dict.fromkeys(datasets):
    dataset = sources.load_dataset(spec, data_dir=config.data_dir or None, skip_bad_images=config.skip_bad_images,
                                   image_size=config.image_size)
    if not tuple(getattr(dataset, "domain_names", ()) or ()):
      raise UserError(f"dataset {spec!r} has no environments",
                      "use colored_mnist, rotated_mnist (each [:BASE]) or imagefolder:DIR:domains in --datasets")
    loaded[spec] = dataset
  return loaded


def check_test_envs(env_counts: dict[str, int], test_envs: Sequence[int] | None, leave_one_out: bool) -> None:
  for dataset, n_envs in env_counts.items():
    outside = [env for env in test_envs or () if not 0 <= env < n_envs]
    if outside:
      raise UserError(f"--test-envs {outside[0]} is not an environment of {dataset!r}",
                      f"use environments 0 to {n_envs - 1}")
    if leave_one_out and n_envs < 3:
      raise UserError(f"--leave-one-out needs 3 or more environments and {dataset!r} has {n_envs}",
                      "leave out --leave-one-out for this dataset")


def run_steps_per_epoch(config, dataset) -> int:
  """The run's training steps per epoch on ``dataset`` (as ``overfocus train`` counts them), its balanced batches
  checked against its training environments as ``overfocus train`` checks them on start.

  Raises:
    SettingError: a batch that does not divide over the training environments, or needs more of one than it has.
  """
  import jax
  from overfocus_jax.data import balanced, pipeline  # JAX: loaded only when a sweep is checked
  envs = config.environments
  if envs.balanced:  # the batch overfocus train takes: the nearest that divides over the environments and devices
    train_envs = balanced.training_environments(dataset, envs.test_envs, envs.train_envs)
    batch = balanced.fitting_batch_size(config.batch_size, len(train_envs), jax.device_count())
    return balanced.make_layout(dataset.train.domains, batch, train_envs, dataset.domain_names).steps_per_epoch
  # Unbalanced batches: pipeline's count over the run's own training view, as overfocus train takes it.
  return pipeline.steps_per_epoch(balanced.training_view(dataset, envs.test_envs, envs.train_envs), config.batch_size)


def check_jobs(jobs: Sequence[Job], config_path: pathlib.Path, user_overrides: Sequence[tuple[str, str]],
               datasets: dict | None = None) -> list[int | None]:
  """Builds and validates every run's config as ``overfocus train`` will, and with ``datasets`` (spec → dataset)
  its batches over the training environments, so that no run fails on its flags or its batch size; returns each
  run's steps per epoch (None without its dataset)."""
  from overfocus_jax import config as config_lib  # JAX: loaded only when a sweep is checked
  steps = []
  for job in jobs:
    try:
      config = config_lib.build_config(str(config_path), config_pairs(job, user_overrides))
      dataset = (datasets or {}).get(job.dataset)
      steps.append(None if dataset is None else run_steps_per_epoch(config, dataset))
    except UserError as e:
      e = e.as_flag(CONFIG_PREFIX) if isinstance(e, SettingError) else e
      raise UserError(f"run {job.name}: {e}") from None
  return steps


def with_steps(job: Job, steps: int, steps_per_epoch: int) -> Job:
  """``job`` trained for the fewest whole epochs that reach ``steps`` steps."""
  epochs = -(-steps // steps_per_epoch)
  return dataclasses.replace(job, overrides=(*job.overrides, ("num_epochs", epochs)))


def _parser() -> argparse.ArgumentParser:
  class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, instead of argparse's usage text
      raise UserError(f"{self.prog}: {message}", f"see '{self.prog} --help'")

  parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
  parser.add_argument("--out", required=True, help="the sweep's folder: one subfolder per run")
  parser.add_argument("--datasets", nargs="+", help="datasets of environments (default: the config's dataset)")
  parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS),
                      help=f"some of {' '.join(ALGORITHMS)} (default: all)")
  parser.add_argument("--n-hparams", type=int, default=1,
                      help="hparams seeds 0 .. N-1; 0 is the config's values (default 1; DomainBed: 20)")
  parser.add_argument("--n-trials", type=int, default=1, help="trial seeds 0 .. T-1 (default 1; DomainBed: 3)")
  parser.add_argument("--test-envs", nargs="+", type=int, help="test environments (default: each one alone)")
  parser.add_argument("--leave-one-out", action="store_true",
                      help="also hold out each pair [t, v] (leave-one-domain-out model selection)")
  parser.add_argument("--config", help=f"config file (default: experiments/configs/{DEFAULT_CONFIG})")
  parser.add_argument("--epochs", type=int, help="config.num_epochs of every run (default: the config's)")
  parser.add_argument("--steps", type=int,
                      help="train each run for the fewest whole epochs that reach N steps (DomainBed: 5000)")
  sweep_command.add_launcher_arguments(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  try:
    args, extra = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    user_overrides = split_overrides(extra, PROG)
    check_counts(args)
    check_user_overrides(user_overrides, args.epochs, args.steps)
    config_path = pathlib.Path(args.config).expanduser().resolve() if args.config else default_config_path()
    from overfocus_jax import config as config_lib  # JAX: only once the arguments are known good
    base = config_lib.build_config(str(config_path), user_overrides)
    datasets = environment_datasets(args.datasets or [base.dataset], base)
    env_counts = {spec: len(dataset.domain_names) for spec, dataset in datasets.items()}
    check_test_envs(env_counts, args.test_envs, args.leave_one_out)
    test_envs = None if args.test_envs is None else list(dict.fromkeys(args.test_envs))
    jobs = make_jobs(env_counts, list(dict.fromkeys(args.algorithms)), args.n_hparams, args.n_trials, test_envs,
                     args.leave_one_out, args.epochs)
    steps_per_epoch = check_jobs(jobs, config_path, user_overrides, datasets)
    if args.steps is not None:
      jobs = [with_steps(job, args.steps, per_epoch) for job, per_epoch in zip(jobs, steps_per_epoch)]
    out = pathlib.Path(args.out).expanduser().resolve()
    code = sweep_command.launch([sweep_job(job, config_path, user_overrides) for job in jobs], out, args,
                                name="domainbed-sweep")
    if not args.dry_run:
      print(f"tables: python -m overfocus_jax.dg.tables {shlex.quote(str(out))}")
    return code
  except UserError as e:  # a SettingError is worded as the flag that sets it
    return errors.report(e, flag_prefix=CONFIG_PREFIX)
  except KeyboardInterrupt:
    print("overfocus: interrupted; run the same command again to resume the sweep", file=sys.stderr)
    return 130
  except BrokenPipeError:  # --dry-run piped into a reader that stopped early
    return errors.closed_pipe()


if __name__ == "__main__":
  sys.exit(main())
