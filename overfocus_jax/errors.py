"""User-facing errors.

Everything a user can get wrong (a config value, a dataset path, a workdir, a checkpoint) raises
:class:`UserError` with a one-line message that names the problem and the fix. The CLI turns it into
one line on stderr and exit code 2, with no traceback.
"""


class UserError(Exception):
  """Bad input from the user: the message names the problem and how to fix it."""

  exit_code = 2

  def __init__(self, problem: str, fix: str | None = None):
    message = problem if fix is None else f"{problem}; {fix}"
    super().__init__(" ".join(message.split()))  # always one line
