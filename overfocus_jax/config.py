"""Configs: ml_collections ``ConfigDict``s from ``experiments/configs/*.py``, overridden from the command line.

A config file defines ``get_config() -> ConfigDict``. ``--config.FIELD=VALUE`` overrides are parsed against the
type of the field they replace (so ``--config.batch_size=abc`` is an error, not a string), and unknown fields are
errors. :func:`validate` checks every value once, before anything is built or written.
"""

import ast
import importlib.util
import json
import math
import pathlib
import sys

import ml_collections

from overfocus_jax import fields, models, optimization, platform_tuning, regularizers
from overfocus_jax.data import settings as data_settings
from overfocus_jax.errors import UserError

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG_NAME = "default.py"


def default_config_path() -> pathlib.Path:
  """The default config shipped with the package (also found in ``experiments/configs/`` of a checkout)."""
  return PACKAGE_ROOT / "configs" / DEFAULT_CONFIG_NAME


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Imports ``path`` and returns its ``get_config()``."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"config file {str(path)!r} not found", "pass --config PATH to an existing .py config "
                    "(see experiments/configs/)")
  spec = importlib.util.spec_from_file_location(f"overfocus_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"config file {str(path)!r} has a syntax error at line {e.lineno}", "fix the file") from None
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {str(path)!r} defines no get_config()", "add def get_config() -> ConfigDict")
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"get_config() in {str(path)!r} returned {type(config).__name__}",
                    "return an ml_collections.ConfigDict")
  return config


def load_sweep_file(path: str | pathlib.Path) -> list:
  """Imports ``path`` and returns its ``get_sweep()``: one dict of config fields per run
  (:mod:`overfocus_jax.sweeps.grid`)."""
  path = pathlib.Path(path)
  load_config_file(path)  # the same checks: the file exists, imports, and has get_config()
  spec = importlib.util.spec_from_file_location(f"overfocus_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise UserError(f"config file {str(path)!r} defines no get_sweep()",
                    "add def get_sweep() -> list of dicts of config fields, one per run")
  return module.get_sweep()


def _parse_value(text: str, current):
  """Parses ``text`` to the type of ``current`` (the value it overrides)."""
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError("expected true or false")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, (tuple, list)):
    value = ast.literal_eval(text)
    if isinstance(value, (int, float, str)):
      value = (value,)
    if not isinstance(value, (tuple, list)):
      raise ValueError("expected a tuple such as (1,2,3)")
    return tuple(value)
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  if current == "auto":  # a field that is "auto" or a value: a number where the text reads as one
    value = _literal(text)
    return value if fields.is_number(value) else text
  return text


# Groups whose fields the user names: the keyword arguments of a model or regularizer given by import path.
OPEN_GROUPS = ("model_args", "regularizer.args")


def _literal(text: str):
  """A Python literal (number, bool, tuple, ...) when ``text`` reads as one, else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """Sets ``config.<dotted>`` from the command-line string ``text``."""
  *parents, leaf = dotted.split(".")
  if ".".join(parents) in OPEN_GROUPS:  # a new argument of the user's factory
    group = config
    for name in parents:
      group = group[name]
    with group.unlocked():
      group[leaf] = _literal(text) if leaf not in group else _parse_value(text, group[leaf])
    return
  node = config
  for i, name in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise UserError(f"unknown config field 'config.{'.'.join(parents[:i + 1])}'",
                      f"valid fields here: {', '.join(sorted(node.keys()))}")
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
    raise UserError(f"unknown config field 'config.{dotted}'", f"valid fields here: {valid}")
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise UserError(f"config.{dotted} is a group of fields, not a value", f"set one of its fields, e.g. "
                    f"--config.{dotted}.{sorted(current.keys())[0]}=...")
  try:
    value = _parse_value(text, current)
  except (ValueError, SyntaxError) as e:
    raise UserError(f"cannot read --config.{dotted}={text!r} as {type(current).__name__} ({e})",
                    f"give a {type(current).__name__} value") from None
  with node.unlocked(), node.ignore_type():  # ignore_type: an "auto" field takes a number
    node[leaf] = value


def build_config(config_path: str | None, overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Loads a config file (the default one when ``config_path`` is None), applies overrides, validates."""
  config = load_config_file(config_path or default_config_path())
  for dotted, text in overrides:
    apply_override(config, dotted, text)
  config = resolved(config)
  validate(config)
  return config


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with its training recipe's ``auto`` fields given the model's values
  (:func:`overfocus_jax.optimization.resolve_recipe`); ``config`` itself when none is ``auto``."""
  return optimization.resolve_recipe(config, models.recipe_of(config.model))


BATCH_NORM_MODES = ("global", "local")


def check_run(config) -> None:
  """The fields every run has: its length, batches, seed, checkpoints and how it uses the devices."""
  for field in ("batch_size", "eval_batch_size", "num_epochs", "keep_checkpoints"):
    value = config[field]
    fields.require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                   f"config.{field}={value!r} must be a positive integer", f"set --config.{field} to a value of at "
                   "least 1")
  fields.require(isinstance(config.seed, int) and not isinstance(config.seed, bool),
                 f"config.seed={config.seed!r} must be an integer", "set --config.seed, e.g. 0")
  fields.require(isinstance(config.steps_per_dispatch, int) and config.steps_per_dispatch >= 0,
                 f"config.steps_per_dispatch={config.steps_per_dispatch!r} must be an integer of at least 0",
                 "set --config.steps_per_dispatch to K >= 1 steps per compiled call, or 0 for the platform's default")
  fields.require(isinstance(config.checkpoint_every_steps, int) and config.checkpoint_every_steps >= 0,
                 f"config.checkpoint_every_steps={config.checkpoint_every_steps!r} must be an integer of at least 0",
                 "set --config.checkpoint_every_steps to N >= 1 steps between checkpoints inside an epoch, or 0 for "
                 "off")
  fields.require(fields.is_number(config.checkpoint_every_minutes) and math.isfinite(config.checkpoint_every_minutes)
                 and config.checkpoint_every_minutes >= 0,
                 f"config.checkpoint_every_minutes={config.checkpoint_every_minutes!r} must be a number of at least 0",
                 "set --config.checkpoint_every_minutes, e.g. 30, or 0 for off")
  fields.require_choice(config.batch_norm, BATCH_NORM_MODES, "batch_norm")
  fields.require_choice(config.platform_tuning, platform_tuning.MODES, "platform_tuning")


RUN = fields.Group("", "the run", {
    "seed": fields.Field(0, "seeds the model's initialisation, the data order, augmentation and the regularizers"),
    "num_epochs": fields.Field(10, "epochs to train"),
    "batch_size": fields.Field(128, "examples per step, over all devices"),
    "eval_batch_size": fields.Field(256, "examples per evaluation step (divisible by 8 devices; the last batch is "
                                    "padded)"),
    "keep_checkpoints": fields.Field(3, "the newest N checkpoints stay (epoch ends and those in between)"),
    "checkpoint_every_steps": fields.Field(0, "also save every N steps inside an epoch (0: off)"),
    "checkpoint_every_minutes": fields.Field(30.0, "and every N minutes (0: off), so a preempted job loses at most "
                                             "that"),
    "steps_per_dispatch": fields.Field(0, "K train steps per compiled call (one host sync each), at most an epoch; "
                                       "0: 1 on CPUs, 20 on accelerators"),
    "batch_norm": fields.Field("global", "global: statistics over the whole batch, across devices (as on one "
                               "device) | local: each device's own rows"),
    "platform_tuning": fields.Field("auto", "auto: the CPU-only speed-ups on one CPU device, oneDNN's convolutions "
                                    "among them | xla: the same with XLA's convolutions | off: plain XLA (same "
                                    "maths either way)"),
}, validate=check_run)


def parts() -> tuple[fields.Group, ...]:
  """Every part of the config, in the order ``--help-config`` shows them: the run, the data and its environments,
  the model and each shipped model's group, the regularizer, the objective and the optimization."""
  return (RUN, data_settings.DATA, data_settings.ENVIRONMENTS, models.FIELDS, *models.model_groups(),
          regularizers.REGULARIZER, regularizers.OBJECTIVE, optimization.FIELDS)


AUTO = fields.AUTO


def _auto_fields_take_any_type(values: dict) -> dict:
  """``values`` with every ``"auto"`` default as a field of any type, so that a config file may set a number
  (``config.vgg.max_pools = 3``) where ml_collections would lock the field to ``str``."""
  return {key: _auto_fields_take_any_type(value) if isinstance(value, dict) else
          ml_collections.FieldReference(AUTO, field_type=object) if value == AUTO else value
          for key, value in values.items()}


def defaults() -> ml_collections.ConfigDict:
  """The default config: every part's fields with their defaults (``overfocus train`` with no --config)."""
  return ml_collections.ConfigDict(_auto_fields_take_any_type(fields.merge(parts())))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field a run depends on, each part its own; raises :class:`UserError` naming the field and a valid
  value."""
  for part in parts():
    part.check(config)


def describe(config: ml_collections.ConfigDict) -> str:
  """Every field of ``config`` with its value and one line of help, part by part, and the shipped models: what
  ``overfocus train --help-config`` prints."""
  lines = ["Config fields (set any with --config.FIELD=VALUE; values shown are this config's):"]
  for part in parts():
    values = config if not part.name else config[part.name]
    prefix = "" if not part.name else part.name + "."
    lines += ["", f"{part.name or part.help}:" + (f" {part.help}" if part.name else "")]
    rows = part.describe(values, prefix)
    width = max(len(name) for name, _, _ in rows)
    lines += [f"  {name.ljust(width)} = {_shown(value)}  # {text}" for name, value, text in rows]
  lines += ["", "Models (--config.model=NAME):"]
  width = max(map(len, models.MODELS))
  lines += [f"  {name.ljust(width)}  {spec.help}" + (f" (recipe: {_recipe_text(spec.recipe)})" if spec.recipe else "")
            for name, spec in models.REGISTRY.items()]
  return "\n".join(lines)


def _recipe_text(recipe) -> str:
  return ", ".join(f"{name}={value}" for name, value in recipe.items())


def _shown(value) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


# config.json's "format": 2 since SGDrop's rule "quantile" means the formula 1[A ≤ quantile(A, 1 − ρ)] as written
# and the RSCs follow their reference code's counts by default; in a config.json without it, SGDrop's "quantile" and
# both RSCs counted exactly ⌈f·N⌉ units: today's rule "topk".
CONFIG_FORMAT = 2
FORMAT_KEY = "format"


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps({**config.to_dict(), FORMAT_KEY: CONFIG_FORMAT}, indent=2, sort_keys=True, default=list)


# The exact-count rule (⌈f·N⌉ units) as a format-1 config.json names it: SGDrop's rule "quantile", or no rule field
# (the RSCs); format 2 calls it "topk".
EARLIER_RULES = {"sgdrop": "quantile", "rsc": None, "rsc_domainbed": None}


def trained_rule(saved: dict) -> str | None:
  """The regularizer of a format-1 config.json whose masks counted exactly ⌈f·N⌉ under the name format 1 gives that
  rule (:data:`EARLIER_RULES`; format 2 calls it "topk" and gives "quantile" and "reference" other rules), or None."""
  if saved.get(FORMAT_KEY, 1) >= CONFIG_FORMAT:
    return None
  regularizer = saved.get("regularizer", {})
  name = regularizer.get("name")
  if name not in EARLIER_RULES or regularizer.get(name, {}).get("rule") != EARLIER_RULES[name]:
    return None
  return name


def trained_rule_note(name: str) -> str:
  return (f"overfocus: note: this run was trained with {name}'s exact-count rule (⌈f·N⌉ units), which its "
          f"config.json names as the earlier default; it keeps that rule, now rule 'topk'")


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a saved config on top of today's defaults, so a run saved before a field existed still loads
  (the new field takes its default); lists become tuples again so overrides keep their types. A saved true/false
  where a field has since become a word (``resnet_tv.zero_init_residual``: auto | true | false) is read as that
  word; and a format-1 run's regularizer that counted exactly ⌈f·N⌉ (:func:`trained_rule`) keeps that rule,
  "topk" (one line on stderr says so)."""

  def tuples(node):
    if isinstance(node, dict):
      return {k: tuples(v) for k, v in node.items()}
    if isinstance(node, list):
      return tuple(tuples(v) for v in node)
    return node

  def overlay(base: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
      if isinstance(value, dict) and isinstance(base.get(key), ml_collections.ConfigDict):
        overlay(base[key], value)
      else:
        if isinstance(value, bool) and isinstance(base.get(key), str):
          value = str(value).lower()
        with base.unlocked(), base.ignore_type():  # a field that is "auto" today may hold a saved number
          base[key] = value

  saved = json.loads(text)
  earlier = trained_rule(saved)
  saved.pop(FORMAT_KEY, None)
  config = load_config_file(default_config_path())
  overlay(config, tuples(saved))
  if earlier:  # the run keeps the rule it was trained with
    print(trained_rule_note(earlier), file=sys.stderr)
    config.regularizer[earlier].rule = "topk"
  return config
