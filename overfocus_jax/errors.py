"""User-facing errors.

Everything a user can get wrong (a config value, a dataset path, a workdir, a checkpoint) raises
:class:`UserError` with a one-line message that names the problem and the fix. The CLI turns it into
one line on stderr and exit code 2, with no traceback.

Library code below the config edge (data, models, parallel) does not know how a value was set — a
``--config.FIELD`` flag, a config file, a Python argument — so for a bad setting it raises
:class:`SettingError` with the facts (the setting's config name, the problem, what would work), and the edge
words the fix: :meth:`SettingError.as_flag` for the command line. Entry points end in :func:`report`.
"""

import os
import sys


class UserError(Exception):
  """Bad input from the user: the message names the problem and how to fix it."""

  exit_code = 2

  def __init__(self, problem: str, fix: str | None = None):
    message = problem if fix is None else f"{problem}; {fix}"
    super().__init__(" ".join(message.split()))  # always one line


class WriteError(UserError):
  """A write to disk failed (a full disk, a read-only or vanished workdir): what, where, and how to go on. The CLI
  ends the process right after its line, before interpreter shutdown, when background writers (orbax's) would
  print their own tracebacks; everything already complete on disk stays as it is."""


class SettingError(UserError):
  """A setting's value cannot work: ``setting`` (its config name, e.g. ``batch_size``), the ``problem`` and a
  ``remedy`` that completes "set it to …" (e.g. ``a multiple of 8, e.g. 96``)."""

  def __init__(self, setting: str, problem: str, remedy: str):
    self.setting, self.problem, self.remedy = setting, problem, remedy
    super().__init__(problem, f"set {setting} to {remedy}")

  def as_flag(self, prefix: str = "--config.") -> UserError:
    """The same error with the fix worded as the command-line flag that sets it."""
    return UserError(self.problem, f"set {prefix}{self.setting} to {self.remedy}")


def report(error: UserError, program: str = "overfocus", flag_prefix: str = "--config.") -> int:
  """Prints ``error`` as an entry point's one line on stderr — ``PROGRAM: error: …``, a :class:`SettingError`'s fix
  worded as the flag that sets it — and returns the exit code (2)."""
  if isinstance(error, SettingError):
    error = error.as_flag(flag_prefix)
  print(f"{program}: error: {error}", file=sys.stderr)
  return UserError.exit_code


def closed_pipe() -> int:
  """For an entry point whose reader went away (``... | head``): stdout is pointed at the null device so that the
  interpreter's final flush cannot fail again, and the exit code is a pipe's, 141 (128 + SIGPIPE). No traceback."""
  try:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  except (OSError, ValueError):
    pass
  return 141
