"""Command-line config overrides, ``--config.FIELD=VALUE``, split from the other arguments — for ``overfocus`` and
``python -m overfocus_jax.dg.sweep`` alike, without importing JAX (the values are parsed against the config's
types later, by :func:`overfocus_jax.config.apply_override`)."""

from overfocus_jax.errors import UserError

CONFIG_PREFIX = "--config."


def split_overrides(extra, prog: str = "overfocus") -> list[tuple[str, str]]:
  """``--config.a.b=1`` or ``--config.a.b 1`` → ``[("a.b", "1")]``; anything else is an error that points to
  ``prog --help``."""
  overrides, i = [], 0
  while i < len(extra):
    arg = extra[i]
    if not arg.startswith(CONFIG_PREFIX):
      raise UserError(f"unknown argument {arg!r}", f"fields are set as --config.FIELD=VALUE; see '{prog} --help'")
    field, eq, value = arg[len(CONFIG_PREFIX):].partition("=")
    if not eq:
      if i + 1 >= len(extra):
        raise UserError(f"{arg} has no value", f"write {arg}=VALUE")
      value, i = extra[i + 1], i + 1
    overrides.append((field, value))
    i += 1
  return overrides
