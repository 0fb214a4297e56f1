"""DomainBed's model selection: which checkpoint of which hyperparameters a domain-generalization sweep reports.

Source: Gulrajani & Lopez-Paz 2021, "In Search of Lost Domain Generalization" (arXiv 2007.01434), section 3, and
facebookresearch/DomainBed: ``domainbed/model_selection.py`` (the three methods), ``domainbed/lib/reporting.py``
(``load_records``, ``get_grouped_records``) and ``domainbed/lib/query.py`` (``Q.group``, ``Q.argmax``,
``Q.sorted``), whose semantics this module reproduces in plain Python, ties included.

A record is one checkpoint of one run, one JSON object per line of a ``results.jsonl``::

    {"args": {"algorithm": "ERM", "dataset": "colored_mnist", "test_envs": [2], "hparams_seed": 0, "trial_seed": 0},
     "hparams": {...}, "step": 100, "env0_in_acc": 0.71, "env0_out_acc": 0.70, ..., "env2_out_acc": 0.10}

(other keys are ignored). Accuracies are in [0, 1]: ``env{i}_in_acc`` on the larger split of environment ``i``,
``env{i}_out_acc`` on its held-out split; the environments are ``env0_out_acc``, ``env1_out_acc``, ... up to the first
one missing. A run trains on every environment but its ``test_envs``.

Grouping. Records are grouped per (trial_seed, dataset, algorithm, test_env), a record with two test envs falling in
both groups; inside a group, per ``hparams_seed`` — a run of the sweep, with the extra runs leave-one-out needs. A
method picks in each run a checkpoint with a validation accuracy ``val_acc`` and a ``test_acc`` =
``env{test}_in_acc``, and keeps, across the group's runs, the one of the highest ``val_acc``:

- ``training_domain`` (training-domain validation set): ``val_acc`` = mean over training environments ``i`` of
  ``env{i}_out_acc``; the step of the highest ``val_acc`` in each run; only records with one test env.
- ``leave_one_out`` (leave-one-domain-out cross-validation): the sweep also trains, per hparams and training
  environment ``v``, a run with test envs ``[test, v]``; at a step, ``val_acc`` = mean over the ``n_envs - 1``
  environments ``v`` of that run's ``env{v}_in_acc``; a step lacking the run with one test env, or any of those
  runs, is skipped; the step of the highest ``val_acc`` in each run.
- ``oracle`` (test-domain validation set): ``val_acc`` = ``env{test}_out_acc`` at each run's last (largest) step, no
  early stopping; only records with one test env.

Ties, as DomainBed breaks them: in a run, the first best checkpoint — in record order for ``training_domain``
(``Q.argmax`` is Python's ``max``), in increasing step order for ``leave_one_out`` (``Q.group`` sorts the steps);
for ``oracle``, of several records at the last step, the last one in record order (a stable sort); across runs, the
largest ``hparams_seed`` of the highest ``val_acc`` (runs in increasing ``hparams_seed``, stably sorted by
``val_acc``, reversed, first taken); a NaN ``val_acc`` ranks lowest across runs.

Over trial seeds a cell reports, like DomainBed's ``collect_results.format_mean``, the mean and the *standard error*
``np.std(accs / sqrt(n))`` — the ``ddof=0`` standard deviation over ``sqrt(n)``, not the standard deviation itself
(:class:`Summary` holds both), in percent.
"""

import dataclasses
import itertools
import json
import math
import pathlib
from typing import Callable, Iterable, NamedTuple

import numpy as np

from overfocus_jax.errors import UserError
from overfocus_jax.sweeps import results as sweep_results

RECORD_FORMAT = ('each line must hold one DomainBed record: {"args": {"algorithm": ..., "dataset": ..., '
                 '"test_envs": [...], "hparams_seed": ..., "trial_seed": ...}, "step": ..., "env0_in_acc": ..., '
                 '"env0_out_acc": ..., ...}')


# ------------------------------------------------------------------------------------------------ records


def env_count(record: dict) -> int:
  """The environments of a record: ``env0_out_acc``, ``env1_out_acc``, ... up to the first missing (DomainBed's
  count)."""
  return next(i for i in itertools.count() if f"env{i}_out_acc" not in record)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record) -> str | None:
  """What keeps ``record`` from being a DomainBed record that the selection methods can read; None if nothing."""
  if not isinstance(record, dict):
    return "not a JSON object"
  args = record.get("args")
  if not isinstance(args, dict):
    return 'no "args" object'
  for key in ("algorithm", "dataset"):
    if not isinstance(args.get(key), str):
      return f"args.{key} is missing or not a string"
  for key in ("hparams_seed", "trial_seed"):
    if not _is_int(args.get(key)):
      return f"args.{key} is missing or not an integer"
  test_envs = args.get("test_envs")
  if not (isinstance(test_envs, list) and test_envs and all(map(_is_int, test_envs))):
    return "args.test_envs is missing or not a non-empty list of environment numbers"
  if len(set(test_envs)) != len(test_envs):
    return f"args.test_envs {test_envs} repeats an environment"
  if not _is_number(record.get("step")):
    return '"step" is missing or not a number'
  n_envs = env_count(record)
  if n_envs == 0:
    return 'no "env0_out_acc"'
  for i in range(n_envs):
    for key in (f"env{i}_in_acc", f"env{i}_out_acc"):
      if not _is_number(record.get(key)):
        return f'"{key}" is missing or not a number'
  outside = [env for env in test_envs if not 0 <= env < n_envs]
  if outside:
    return f"test env {outside[0]} is not one of the record's {n_envs} environments"
  return None


def read_results_file(path: pathlib.Path) -> list[dict]:
  """The records of one ``results.jsonl``, checked; blank lines are skipped."""
  try:
    lines = path.read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read results file {path} ({e})", "pass a readable results.jsonl") from None
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{number}: not JSON ({e.msg}, column {e.colno})", RECORD_FORMAT) from None
    problem = record_problem(record)
    if problem is not None:
      raise UserError(f"{path}:{number}: {problem}", RECORD_FORMAT)
    records.append(record)
  return records


def load_records(path) -> list[dict]:
  """The records of a ``results.jsonl``, or of every ``*/results.jsonl`` of a DomainBed sweep's output directory
  (its subfolders in name order; DomainBed takes ``os.listdir``'s order), in file and line order."""
  path = pathlib.Path(path)
  if path.is_dir():
    # The sweeps' one reader; every run, finished or not, as DomainBed's reporting reads a sweep, in name order.
    files = sorted(sweep_results.results_files(path, finished_only=False))
    if not files:
      raise UserError(f"{path} is a directory with no */results.jsonl",
                      "pass a results.jsonl file or the output directory of a DomainBed sweep")
  elif path.exists():
    files = [path]
  else:
    raise UserError(f"no results file {path}",
                    "pass an existing results.jsonl (one DomainBed record per line) or a sweep's output directory")
  return [record for file in files for record in read_results_file(file)]


# ------------------------------------------------------------------------------------------------ one run


class Pick(NamedTuple):
  """A run's chosen checkpoint: its validation and test accuracy and its record (the one-test-env record)."""
  val_acc: float
  test_acc: float
  record: dict


def single_test_env(records: Iterable[dict]) -> list[dict]:
  """The records of runs with one test env (not the extra runs of leave-one-out)."""
  return [r for r in records if len(r["args"]["test_envs"]) == 1]


def training_domain_pick(record: dict) -> Pick:
  """``val_acc`` = mean of ``env{i}_out_acc`` over the training environments, ``test_acc`` = ``env{test}_in_acc``."""
  test_env = record["args"]["test_envs"][0]
  val_acc = np.mean([record[f"env{i}_out_acc"] for i in range(env_count(record)) if i != test_env])
  return Pick(float(val_acc), record[f"env{test_env}_in_acc"], record)


def pick_training_domain(run: list[dict]) -> Pick | None:
  """The checkpoint of the best training-domain validation accuracy; None without a one-test-env record."""
  records = single_test_env(run)
  if not records:
    return None
  return max(map(training_domain_pick, records), key=lambda p: p.val_acc)  # ties: first in record order, as Q.argmax


def pick_oracle(run: list[dict]) -> Pick | None:
  """The last checkpoint (largest step), validated on the test domain's held-out split; None without a
  one-test-env record."""
  records = single_test_env(run)
  if not records:
    return None
  last = sorted(records, key=lambda r: r["step"])[-1]  # stable: of equal last steps, the last record, as DomainBed
  test_env = last["args"]["test_envs"][0]
  return Pick(last[f"env{test_env}_out_acc"], last[f"env{test_env}_in_acc"], last)


def leave_one_out_pick(step_records: list[dict]) -> Pick | None:
  """One step of a run (with its extra two-test-env runs): ``val_acc`` = mean over the other environments ``v`` of
  ``env{v}_in_acc`` of the run that held ``v`` out too; None unless exactly one one-test-env record and a run for
  every ``v`` are there."""
  test_records = single_test_env(step_records)
  if len(test_records) != 1:
    return None
  test = test_records[0]
  test_env = test["args"]["test_envs"][0]
  val_accs = [None] * env_count(step_records[0])  # DomainBed counts the environments on the step's first record
  for record in step_records:
    envs = record["args"]["test_envs"]
    if len(envs) == 2:
      val_env = next(env for env in envs if env != test_env)
      val_accs[val_env] = record[f"env{val_env}_in_acc"]  # a repeated run overwrites, as in DomainBed
  others = val_accs[:test_env] + val_accs[test_env + 1:]
  if any(acc is None for acc in others):
    return None
  return Pick(float(np.sum(others) / (len(val_accs) - 1)), test[f"env{test_env}_in_acc"], test)


def pick_leave_one_out(run: list[dict]) -> Pick | None:
  """The step of the best leave-one-domain-out validation accuracy; None if no step has every run it needs."""
  by_step = {}
  for record in run:
    by_step.setdefault(record["step"], []).append(record)
  picks = [pick for step in sorted(by_step) if (pick := leave_one_out_pick(by_step[step])) is not None]
  return max(picks, key=lambda p: p.val_acc) if picks else None  # ties: the earliest step (Q.group sorts the steps)


# ------------------------------------------------------------------------------------------------ methods


class SelectionMethod(NamedTuple):
  name: str  # as the command line spells it
  title: str  # DomainBed's name
  pick: Callable[[list[dict]], Pick | None]  # one run's records → its checkpoint


# In DomainBed's printing order.
SELECTION_METHODS = {method.name: method for method in (
    SelectionMethod("training_domain", "training-domain validation set", pick_training_domain),
    SelectionMethod("leave_one_out", "leave-one-domain-out cross-validation", pick_leave_one_out),
    SelectionMethod("oracle", "test-domain validation set (oracle)", pick_oracle),
)}


def selection_method(name: str) -> SelectionMethod:
  try:
    return SELECTION_METHODS[name]
  except KeyError:
    raise UserError(f"unknown selection method {name!r}", f"use one of {', '.join(SELECTION_METHODS)}") from None


# ------------------------------------------------------------------------------------------------ sweeps


@dataclasses.dataclass(frozen=True)
class Choice:
  """The checkpoint a method reports for one (dataset, algorithm, test_env, trial_seed): its run's hparams_seed (and
  hparams), its step, its validation and test accuracy (in [0, 1])."""
  dataset: str
  algorithm: str
  test_env: int
  trial_seed: int
  hparams_seed: int
  step: int
  val_acc: float
  test_acc: float
  hparams: dict


def group_by_test_env(records: Iterable[dict]) -> dict[tuple[int, str, str, int], list[dict]]:
  """(trial_seed, dataset, algorithm, test_env) → records, in order of first appearance; a record with several test
  envs is in the group of each (DomainBed's ``get_grouped_records``)."""
  groups = {}
  for record in records:
    args = record["args"]
    for test_env in args["test_envs"]:
      groups.setdefault((args["trial_seed"], args["dataset"], args["algorithm"], test_env), []).append(record)
  return groups


def group_by_hparams_seed(records: Iterable[dict]) -> list[tuple[int, list[dict]]]:
  """(hparams_seed, records) in increasing hparams_seed (``Q.group`` sorts its keys)."""
  runs = {}
  for record in records:
    runs.setdefault(record["args"]["hparams_seed"], []).append(record)
  return [(seed, runs[seed]) for seed in sorted(runs)]


def _rank(acc: float) -> float:
  return -math.inf if isinstance(acc, float) and math.isnan(acc) else acc  # Q.sorted ranks NaN lowest


def best_run(group: list[dict], method: SelectionMethod) -> tuple[int, Pick] | None:
  """(hparams_seed, pick) of the run whose pick has the highest ``val_acc``; None if no run has a pick."""
  picks = [(seed, pick) for seed, run in group_by_hparams_seed(group) if (pick := method.pick(run)) is not None]
  if not picks:
    return None
  # DomainBed sorts stably by val_acc, reverses and takes the first: of equal best val_acc, the largest hparams_seed.
  return sorted(picks, key=lambda seed_pick: _rank(seed_pick[1].val_acc))[-1]


def select(records: Iterable[dict], method: str) -> list[Choice]:
  """The checkpoint ``method`` (a name of :data:`SELECTION_METHODS`) reports for each (dataset, algorithm, test_env,
  trial_seed) that has one, in order of first appearance in ``records``."""
  chosen_method = selection_method(method)
  choices = []
  for (trial_seed, dataset, algorithm, test_env), group in group_by_test_env(records).items():
    best = best_run(group, chosen_method)
    if best is not None:
      hparams_seed, pick = best
      choices.append(Choice(dataset, algorithm, test_env, trial_seed, hparams_seed, pick.record["step"],
                            float(pick.val_acc), float(pick.test_acc), pick.record.get("hparams", {})))
  return choices


# ------------------------------------------------------------------------------------------------ over trials


class Summary(NamedTuple):
  """Test accuracies over trial seeds, in percent: ``stderr`` is what DomainBed's tables print after the ±."""
  n: int
  mean: float
  std: float  # np.std, ddof=0
  stderr: float  # np.std(accs / sqrt(n)) = std / sqrt(n)


def trial_summary(accs: Iterable[float]) -> Summary | None:
  """Mean, standard deviation and standard error of ``accs`` (in [0, 1]) in percent, computed as DomainBed's
  ``format_mean``; None for no accuracy (DomainBed's "X")."""
  accs = list(accs)
  if not accs:
    return None
  return Summary(len(accs), float(100 * np.mean(accs)), float(100 * np.std(accs)),
                 float(100 * np.std(np.asarray(accs) / np.sqrt(len(accs)))))


def summarize(choices: Iterable[Choice]) -> dict[tuple[str, str, int], Summary]:
  """(dataset, algorithm, test_env) → :class:`Summary` of the chosen test accuracies over trial seeds."""
  accs = {}
  for choice in choices:
    accs.setdefault((choice.dataset, choice.algorithm, choice.test_env), []).append(choice.test_acc)
  return {key: trial_summary(values) for key, values in accs.items()}
