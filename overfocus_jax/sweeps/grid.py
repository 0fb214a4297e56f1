"""Jobs from a config file: beside ``get_config()``, a ``get_sweep()`` returns one dict of config fields per run
(as big_vision's and scenic's sweeps do):

    def get_sweep():
      return [{"regularizer.name": name, "seed": seed} for name in ("none", "sgdrop") for seed in range(3)]

A dict may give its run's folder name as ``"name"``; otherwise it is the fields' last parts and values,
``regularizer=sgdrop-seed=1`` (characters other than letters, digits, ``.``, ``_``, ``-``, ``=`` replaced by ``_``).
A dict may also give another config file for its run as ``"config"`` (a path, relative to the sweep's file), so one
sweep spans several configs; its fields then apply to that file's ``get_config()``.
"""

import fnmatch
import hashlib
import pathlib
import re
from typing import Sequence

from overfocus_jax.errors import UserError
from overfocus_jax.sweeps.jobs import Job

NAME_KEY = "name"
CONFIG_KEY = "config"
MAX_NAME = 120


def override_text(value) -> str:
  """A value as ``--config.FIELD=`` text that the config parser reads back to it."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
  return repr(value) if isinstance(value, float) else str(value)


def short_field(field: str) -> str:
  """A field's last part, or its group's where that part is ``name`` (``regularizer.name`` → ``regularizer``)."""
  parts = field.split(".")
  return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def job_name(fields: dict) -> str:
  """A run's folder name from its fields: ``short-field=value`` joined by ``-``; a long one is cut and hashed."""
  text = "-".join(f"{short_field(field)}={override_text(value)}" for field, value in fields.items()) or "run"
  name = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")
  if len(name) > MAX_NAME:
    name = name[:MAX_NAME - 9] + "-" + hashlib.md5(text.encode()).hexdigest()[:8]
  return name


def jobs_from_sweep(sweep, config_path: str, user_overrides: Sequence[tuple[str, str]] = ()) -> list[Job]:
  """The jobs of ``get_sweep()``'s list; the command line's ``--config.FIELD=VALUE`` overrides come after each
  run's own, so they win.

  Raises:
    UserError: not a list of dicts, a field that is not a string, or two runs with one name.
  """
  if not isinstance(sweep, (list, tuple)) or not all(isinstance(run, dict) for run in sweep):
    raise UserError(f"get_sweep() in {config_path!r} returned {type(sweep).__name__}, not a list of dicts",
                    "return one dict of config fields per run, e.g. [{'seed': 0}, {'seed': 1}]")
  jobs, seen = [], {}
  for number, run in enumerate(sweep, start=1):
    fields = {key: value for key, value in run.items() if key not in (NAME_KEY, CONFIG_KEY)}
    run_config = config_path
    if CONFIG_KEY in run:
      run_config = str((pathlib.Path(config_path).parent / str(run[CONFIG_KEY])).resolve())
      if not pathlib.Path(run_config).is_file():
        raise UserError(f"get_sweep() run {number}'s config {str(run[CONFIG_KEY])!r} is not a file beside "
                        f"{config_path!r}", "give a config file's path relative to the sweep's file")
    bad = [key for key in fields if not isinstance(key, str) or not key]
    if bad:
      raise UserError(f"get_sweep() run {number} has a field that is not a name: {bad[0]!r}",
                      "key each value by its config field, e.g. 'regularizer.name'")
    named = ({CONFIG_KEY: pathlib.Path(str(run[CONFIG_KEY])).stem} if CONFIG_KEY in run else {}) | fields
    name = str(run[NAME_KEY]) if NAME_KEY in run else job_name(named)
    if not re.fullmatch(r"[A-Za-z0-9._=-]+", name):
      raise UserError(f"get_sweep() run {number}'s name {name!r} is not a folder name",
                      "use letters, digits, '.', '_', '-' and '=' only")
    if name in seen:
      raise UserError(f"get_sweep() runs {seen[name]} and {number} are both named {name!r}",
                      "give each run its own fields, or its own 'name'")
    seen[name] = number
    overrides = tuple((field, override_text(value)) for field, value in fields.items()) + tuple(user_overrides)
    jobs.append(Job(name=name, overrides=overrides, config=run_config))
  if not jobs:
    raise UserError(f"get_sweep() in {config_path!r} returned no runs", "return at least one dict of fields")
  return jobs


def matching(jobs: Sequence[Job], patterns: Sequence[str]) -> list[Job]:
  """The jobs whose names match one of the shell ``patterns`` (``fnmatch``), in the sweep's order.

  Raises:
    UserError: no job matches.
  """
  chosen = [job for job in jobs if any(fnmatch.fnmatchcase(job.name, pattern) for pattern in patterns)]
  if not chosen:
    raise UserError(f"--only {' '.join(patterns)} matches none of the sweep's {len(jobs)} runs (e.g. "
                    f"{jobs[0].name})", "give a shell pattern of run names, e.g. '*seed=0'")
  return chosen
