"""DomainBed's result tables, in markdown: one per dataset and selection method, and one of averages.

Source: facebookresearch/DomainBed, ``domainbed/scripts/collect_results.py`` (``print_results_tables``,
``format_mean``). Per dataset, rows are algorithms (every algorithm of the records, in order of first appearance —
DomainBed puts those of its own registry first, in its order), columns the test environments and "Avg". A cell is
``"%.1f ± %.1f"`` of the mean and the standard error (``np.std(accs / sqrt(n))``, DomainBed's ±; ``--spread std``
for the standard deviation ``np.std(accs)``) over trial seeds of the selected test accuracies × 100
(:func:`overfocus_jax.dg.selection.trial_summary`), "X" where no trial has one;
"Avg" is ``"%.1f"`` of the mean of the row's means, "X" unless every environment has a cell. The averages table has
a column per dataset (in name order): per trial seed the mean over whichever test environments it has — DomainBed
does not require them all there — then mean ± standard error over trial seeds.

    python -m overfocus_jax.dg.tables RESULTS.jsonl [--selection training_domain|leave_one_out|oracle|all]
                                      [--dataset NAME] [--spread stderr|std]

prints the tables (all three methods by default; the averages table unless ``--dataset`` picks one), their columns
named as the dataset names its environments (ColoredMNIST's +90%, +80%, -90%; RotatedMNIST's 0°, 15°, …; env0,
env1, … for any other dataset). ``RESULTS`` is
a ``results.jsonl`` or a DomainBed sweep's output directory. Bad input ends in one line on stderr naming the problem
and the fix, exit code 2, no traceback.
"""

import argparse
import sys
from typing import Iterable, Sequence

import numpy as np

from overfocus_jax.data.environments import ANGLES, COLORED, COLORED_NAMES, ROTATED
from overfocus_jax.dg.selection import (SELECTION_METHODS, Choice, Summary, env_count, load_records, select,
                                        selection_method, summarize, trial_summary)
from overfocus_jax import errors
from overfocus_jax.errors import UserError

PROG = "python -m overfocus_jax.dg.tables"
SPREADS = {"stderr": "standard error (DomainBed's)", "std": "standard deviation"}


def algorithms_in(records: Iterable[dict]) -> list[str]:
  """The algorithms of ``records`` in order of first appearance: the table's rows."""
  return list(dict.fromkeys(r["args"]["algorithm"] for r in records))


def datasets_in(records: Iterable[dict]) -> list[str]:
  return sorted({r["args"]["dataset"] for r in records})


def environment_names(dataset: str, n_envs: int) -> list[str]:
  """The table's column names for ``dataset``'s environments: DomainBed's names for ColoredMNIST and RotatedMNIST
  (whatever their base), env0, env1, ... otherwise."""
  kind = dataset.partition(":")[0].strip()
  if kind == COLORED and n_envs == len(COLORED_NAMES):
    return list(COLORED_NAMES)
  if kind == ROTATED and n_envs == len(ANGLES):
    return [f"{angle}°" for angle in ANGLES]
  return [f"env{i}" for i in range(n_envs)]


def format_cell(summary: Summary | None, spread: str = "stderr") -> str:
  """``mean ± spread`` (``spread``: ``stderr``, DomainBed's, or ``std``), "X" for no summary."""
  return "X" if summary is None else f"{summary.mean:.1f} ± {getattr(summary, spread):.1f}"


def format_average(summaries: Sequence[Summary | None]) -> str:
  """The mean of the cells' means, "X" if a cell is missing."""
  if any(summary is None for summary in summaries):
    return "X"
  return f"{sum(summary.mean for summary in summaries) / len(summaries):.1f}"


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  lines = [header, ["---"] * len(header), *rows]
  return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def markdown_table(records: Sequence[dict], dataset: str, method: str,
                   environments: Sequence[str] | None = None, spread: str = "stderr") -> str:
  """The table of ``dataset`` under the selection ``method``; columns are named ``environments`` (default:
  :func:`environment_names`), cells ``mean ± spread`` (:func:`format_cell`). Rows are the algorithms of all ``records``, as in DomainBed, so an algorithm not run on ``dataset``
  is a row of X."""
  own = [r for r in records if r["args"]["dataset"] == dataset]
  if not own:
    raise UserError(f"no records of dataset {dataset!r}", f"pick one of: {', '.join(datasets_in(records))}")
  n_envs = max(map(env_count, own))
  labels = environment_names(dataset, n_envs) if environments is None else list(environments)
  if len(labels) != n_envs:
    raise ValueError(f"{len(labels)} environment names for the {n_envs} environments of {dataset}")
  summaries = summarize(select(own, method))
  rows = []
  for algorithm in algorithms_in(records):
    cells = [summaries.get((dataset, algorithm, test_env)) for test_env in range(n_envs)]
    rows.append([algorithm, *(format_cell(cell, spread) for cell in cells), format_average(cells)])
  return markdown(["Algorithm", *labels, "Avg"], rows)


def trial_means(choices: Iterable[Choice], algorithm: str, dataset: str) -> list[float]:
  """Per trial seed (increasing), the mean chosen test accuracy over the test environments it has."""
  by_trial = {}
  for choice in choices:
    if (choice.algorithm, choice.dataset) == (algorithm, dataset):
      by_trial.setdefault(choice.trial_seed, []).append(choice.test_acc)
  return [float(np.mean(by_trial[trial])) for trial in sorted(by_trial)]


def averages_markdown_table(records: Sequence[dict], method: str, spread: str = "stderr") -> str:
  """Algorithms × datasets (and "Avg"): mean ± spread (:func:`format_cell`) over trial seeds of the per-trial
  averages."""
  choices = select(records, method)
  datasets = datasets_in(records)
  rows = []
  for algorithm in algorithms_in(records):
    cells = [trial_summary(trial_means(choices, algorithm, dataset)) for dataset in datasets]
    rows.append([algorithm, *(format_cell(cell, spread) for cell in cells), format_average(cells)])
  return markdown(["Algorithm", *datasets, "Avg"], rows)


def report(records: Sequence[dict], methods: Sequence[str], datasets: Sequence[str], averages: bool,
           spread: str = "stderr") -> str:
  """The tables of each method (a heading, a table per dataset, the averages table if asked), as markdown, after a
  line that says what the cells are."""
  sections = [f"Test-environment accuracy (%) of the selected model: mean ± {SPREADS[spread]} over trial seeds."]
  for method in methods:
    title = selection_method(method).title
    sections.append(f"# Model selection: {title}")
    for dataset in datasets:
      sections.append(f"## Dataset: {dataset}, model selection method: {title}")
      sections.append(markdown_table(records, dataset, method, spread=spread))
    if averages:
      sections.append(f"## Averages, model selection method: {title}")
      sections.append(averages_markdown_table(records, method, spread))
  return "\n\n".join(sections)


class _Parser(argparse.ArgumentParser):
  """argparse that raises :class:`UserError` (one line, exit 2) instead of printing usage."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message}", f"see '{self.prog} --help'")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
  parser.add_argument("results", help="a results.jsonl (one DomainBed record per line) or a sweep's output directory")
  parser.add_argument("--selection", default="all",
                      help=f"model selection: {' | '.join(SELECTION_METHODS)} | all (default: all)")
  parser.add_argument("--dataset", help="only this dataset's table (default: every dataset, and the averages)")
  parser.add_argument("--spread", default="stderr",
                      help="what follows the ±: stderr (standard error over trial seeds, DomainBed's) | std "
                           "(standard deviation) (default: stderr)")
  return parser


def main(argv: list[str] | None = None) -> int:
  try:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.selection != "all" and args.selection not in SELECTION_METHODS:
      raise UserError(f"unknown --selection {args.selection!r}", f"use one of {', '.join([*SELECTION_METHODS, 'all'])}")
    if args.spread not in SPREADS:
      raise UserError(f"unknown --spread {args.spread!r}", f"use one of {', '.join(SPREADS)}")
    methods = list(SELECTION_METHODS) if args.selection == "all" else [args.selection]
    records = load_records(args.results)
    if not records:
      raise UserError(f"{args.results} holds no records", "pass the results.jsonl of a sweep that has run")
    datasets = datasets_in(records)
    if args.dataset is not None and args.dataset not in datasets:
      raise UserError(f"no records of dataset {args.dataset!r} in {args.results}",
                      f"pick one of: {', '.join(datasets)}")
    print(report(records, methods, datasets if args.dataset is None else [args.dataset], args.dataset is None,
                 args.spread))
  except UserError as e:
    return errors.report(e)
  except BrokenPipeError:  # the tables piped into a reader that stopped early
    return errors.closed_pipe()
  return 0


if __name__ == "__main__":
  sys.exit(main())
