"""Config fields declared where they are used: each part of the library (data, models, regularizers, optimization,
the run) declares its fields with their defaults, one line of help each and the check of its own values, and
:mod:`overfocus_jax.config` puts the parts together into the config a run reads.

    RESNET = Group("resnet", "the pre-activation residual CNN (model=resnet, resnet18)", {
        "stem_features": Field(16, "the stem convolution's output channels"),
        ...}, validate=check_resnet)

A group's ``validate(config)`` reads the whole config (``config.<group>`` is its own part) and raises
:class:`~overfocus_jax.errors.UserError` naming the field and a value that works; the ``require*`` helpers below
word those errors alike. Nothing here imports ml_collections: a group's defaults are plain dicts.
"""

import dataclasses
import math
from typing import Any, Callable

from overfocus_jax.errors import UserError

AUTO = "auto"  # a field's value chosen by the library (from the images, the model, the platform) until one is set


@dataclasses.dataclass(frozen=True)
class Field:
  """One config value: its default and one line saying what it does (``a | b | c`` lists the choices)."""

  default: Any
  help: str


@dataclasses.dataclass(frozen=True)
class Group:
  """Fields that belong together: ``config.<name>.<field>``, or top-level fields when ``name`` is ``""``.

  ``fields`` maps each name to a :class:`Field` or to a nested :class:`Group` (its own name is the key);
  ``validate(config)``, when given, checks this group's values in the whole config.
  """

  name: str
  help: str
  fields: dict[str, "Field | Group"]
  validate: Callable[[Any], None] | None = None

  def defaults(self) -> dict:
    """The group's default values, nested groups as nested dicts."""
    return {key: value.defaults() if isinstance(value, Group) else value.default for key, value in self.fields.items()}

  def check(self, config) -> None:
    """Runs ``validate`` of this group and of every nested group."""
    if self.validate is not None:
      self.validate(config)
    for value in self.fields.values():
      if isinstance(value, Group):
        value.check(config)

  def describe(self, values, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted name, value, help)`` for every field, with the values of ``values`` (the group's part of a
    config, or its defaults); nested groups follow their parent's own fields."""
    rows, nested = [], []
    for key, value in self.fields.items():
      if isinstance(value, Group):
        nested.append((key, value))
      else:
        rows.append((prefix + key, values[key] if key in values else value.default, value.help))
    for key, group in nested:
      rows.extend(group.describe(values[key] if key in values else group.defaults(), f"{prefix}{key}."))
    return rows


def merge(groups) -> dict:
  """The defaults of ``groups`` as one nested dict: top-level groups' fields at the top, the others under their name.

  Raises:
    ValueError: two groups declare the same field.
  """
  merged = {}
  for group in groups:
    part = group.defaults() if not group.name else {group.name: group.defaults()}
    clash = set(part) & set(merged)
    if clash:
      raise ValueError(f"config fields declared twice: {sorted(clash)}")
    merged.update(part)
  return merged


# -------------------------------------------------------------------------------------------- checking the values


def require(condition: bool, problem: str, fix: str) -> None:
  """Raises :class:`UserError(problem, fix)` unless ``condition``."""
  if not condition:
    raise UserError(problem, fix)


def require_choice(value, choices, field: str) -> None:
  """``config.<field>`` is one of ``choices``."""
  require(value in choices, f"unknown {field} {value!r}", f"use one of {', '.join(choices)} (--config.{field}=...)")


def is_number(value) -> bool:
  """A real number (an int or a float, not a bool)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_positive_ints(values, field: str) -> None:
  """``config.<field>`` is a non-empty tuple of positive integers."""
  ok = len(values) > 0 and all(isinstance(v, int) and v > 0 for v in values)
  require(ok, f"config.{field}={values!r} must be a non-empty tuple of positive integers",
          f"e.g. --config.{field}=(1,2,3)")


def require_positive_int(value, field: str, example) -> None:
  """``config.<field>`` is an integer of at least 1."""
  require(isinstance(value, int) and value > 0, f"config.{field}={value!r} must be a positive integer",
          f"set --config.{field}, e.g. {example}")


def require_positive_number(value, field: str, example) -> None:
  """``config.<field>`` is a finite number above 0."""
  require(is_number(value) and math.isfinite(value) and value > 0,
          f"config.{field}={value!r} must be a positive number", f"set --config.{field}, e.g. {example}")


def require_bool(value, field: str) -> None:
  """``config.<field>`` is true or false."""
  require(isinstance(value, bool), f"config.{field}={value!r} must be true or false",
          f"set --config.{field}=true or false")


def require_fraction(value, field: str, *, upper_inclusive: bool = False) -> None:
  """``config.<field>`` is in [0, 1) (or [0, 1])."""
  ok = is_number(value) and (0 <= value <= 1 if upper_inclusive else 0 <= value < 1)
  bounds = "[0, 1]" if upper_inclusive else "[0, 1)"
  require(ok, f"config.{field}={value!r} must be in {bounds}", f"set --config.{field} to a value in {bounds}")
