"""Your own model, regularizer or dataset by import path: ``PACKAGE.MODULE:NAME``, the convention of hydra and its
kin. ``overfocus train --config.model=my_pkg.nets:TinyNet`` imports ``my_pkg.nets`` (from the working directory or
``PYTHONPATH``) and calls ``TinyNet``; what it must return is each caller's (the model builder, the regularizer
builder, the dataset loader). Every way it can fail — no such module, a module that does not import, no such name,
a factory that refuses its arguments — is a one-line :class:`UserError` naming the field and the path.
"""

import importlib
import importlib.util
import inspect
import os
import re
import sys
from typing import Any, Callable

from overfocus_jax.errors import UserError

# a dotted module path, a colon, a dotted attribute path
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_import_path(spec) -> bool:
  """Whether ``spec`` reads as ``package.module:name``."""
  return isinstance(spec, str) and IMPORT_PATH.fullmatch(spec.strip()) is not None


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _search_working_directory() -> None:
  if os.getcwd() not in sys.path:
    sys.path.append(os.getcwd())


def module_exists(spec: str) -> bool:
  """Whether the top-level package of ``spec``'s module can be found (the working directory searched too)."""
  _search_working_directory()
  top = spec.strip().partition(":")[0].split(".")[0]
  return importlib.util.find_spec(top) is not None


def load_object(spec: str, field: str) -> Any:
  """The object ``spec`` (``package.module:name``) names; ``field`` is the config field that gave it (for the
  message). The working directory is searched too, as ``python -m`` would."""
  module_name, _, attribute = spec.strip().partition(":")
  _search_working_directory()
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.split(".")[0] == e.name.split(".")[0] and module_name.startswith(e.name):
      raise UserError(f"{field}={spec!r}: there is no module {e.name!r}",
                      "run from the folder that holds it, or add that folder to PYTHONPATH") from None
    raise UserError(f"{field}={spec!r}: module {module_name!r} does not import ({_first_line(e)})",
                    "fix the module or install what it needs") from None
  except Exception as e:  # noqa: BLE001 — any error while the user's module runs
    raise UserError(f"{field}={spec!r}: module {module_name!r} does not import ({_first_line(e)})",
                    "fix the module") from None
  value = module
  for part in attribute.split("."):
    if not hasattr(value, part):
      raise UserError(f"{field}={spec!r}: {module_name} has no {attribute!r}",
                      f"name one of its callables after the colon, e.g. {module_name}:{_a_callable(module)}")
    value = getattr(value, part)
  return value


def _a_callable(module) -> str:
  names = [n for n in sorted(vars(module)) if not n.startswith("_") and callable(getattr(module, n))]
  return names[0] if names else "factory"


def call_factory(factory: Callable, spec: str, field: str, **kwargs) -> Any:
  """``factory(**kwargs)``; an argument it does not take (or lacks) is a one-line error naming the options."""
  if not callable(factory):
    raise UserError(f"{field}={spec!r} names a {type(factory).__name__}, not a callable",
                    "name a function or class that builds it")
  try:
    inspect.signature(factory).bind(**kwargs)
  except TypeError as e:
    options = ", ".join(kwargs) or "none"
    raise UserError(f"{field}={spec!r} does not take the options given ({e}; given: {options})",
                    "pass only the options it takes") from None
  except ValueError:  # a builtin without a signature: let the call decide
    pass
  return factory(**kwargs)
