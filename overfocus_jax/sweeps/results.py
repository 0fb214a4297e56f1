"""What a sweep's finished runs left, read one way for every table: each done run's ``results.jsonl`` (DomainBed's
records) or, for any other run, its ``summary.json`` with the job's name and fields.

    records = results.read("sweeps/example")        # one dict per record, in the sweep's job order
"""

import json
import pathlib

from overfocus_jax.errors import UserError
from overfocus_jax.sweeps import jobs as jobs_lib

SWEEP_FILE = "sweep.json"  # the launch's job list: names, fields and commands
RESULTS_FILE = "results.jsonl"


def job_names(out: pathlib.Path) -> list[str]:
  """The sweep's jobs in order: its ``sweep.json``'s, else every subfolder that holds a run (name order)."""
  listing = out / SWEEP_FILE
  if listing.is_file():
    try:
      return [job["name"] for job in json.loads(listing.read_text())["jobs"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError(f"cannot read {listing} ({e})", "run the sweep's command again to rewrite it") from None
  return sorted(path.name for path in out.iterdir()
                if path.is_dir() and any((path / f).exists() for f in ("out.txt", "config.json", jobs_lib.DONE_FILE)))


def job_fields(out: pathlib.Path) -> dict[str, dict]:
  """Each job's config fields as launched (from ``sweep.json``; empty without it)."""
  listing = out / SWEEP_FILE
  if not listing.is_file():
    return {}
  return {job["name"]: dict(job.get("overrides", [])) for job in json.loads(listing.read_text())["jobs"]}


def results_files(out, results_file: str = RESULTS_FILE, finished_only: bool = True) -> list[pathlib.Path]:
  """The ``results_file`` of each run of the sweep in ``out`` that has one, in the sweep's job order: of its done runs,
  or (``finished_only=False``, as DomainBed's reporting reads its sweeps) of every run, finished or not.

  Raises:
    UserError: no such folder.
  """
  out = pathlib.Path(out)
  if not out.is_dir():
    raise UserError(f"no sweep folder {str(out)!r}", "pass the --out of a sweep")
  names = job_names(out)
  if not finished_only:  # runs started outside a sweep command have no out.txt: every subfolder with the file
    names += sorted(path.name for path in out.iterdir() if path.is_dir() and path.name not in names)
  return [out / name / results_file for name in names
          if (out / name / results_file).is_file() and (not finished_only or jobs_lib.state(out / name) == "done")]


def read(out, results_file: str = RESULTS_FILE) -> list[dict]:
  """The records of every done run of the sweep in ``out``: its ``results_file`` lines where it has one, else its
  ``summary.json`` with ``job`` (the name) and ``fields`` (the overrides it was launched with).

  Raises:
    UserError: no such folder, or a file that is not JSON.
  """
  out = pathlib.Path(out)
  if not out.is_dir():
    raise UserError(f"no sweep folder {str(out)!r}", "pass the --out of a sweep")
  fields = job_fields(out)
  records = []
  for name in job_names(out):
    workdir = out / name
    if jobs_lib.state(workdir) != "done":
      continue
    path = workdir / results_file
    try:
      if path.is_file():
        records.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
      else:
        summary = json.loads((workdir / jobs_lib.SUMMARY_FILE).read_text())
        records.append({"job": name, "fields": fields.get(name, {}), **summary})
    except (OSError, ValueError) as e:
      raise UserError(f"cannot read the results of {workdir} ({e})", "rerun that job (delete its 'done')") from None
  return records
