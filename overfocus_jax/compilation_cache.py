"""JAX's persistent compilation cache for the CLI: a second run of the same config reuses the first run's compiled
programs instead of compiling them again.

Where it lives: ``$OVERFOCUS_COMPILATION_CACHE`` if set (a directory, or ``off``), otherwise
``$XDG_CACHE_HOME/overfocus_jax/xla`` (``~/.cache/overfocus_jax/xla`` without ``XDG_CACHE_HOME``). JAX keys each
entry by the program, the compile options, the devices and the jax/jaxlib versions, so a changed model, config,
machine or upgrade compiles afresh; deleting the directory is always safe. Library code (``loop.train_and_evaluate``
in your own script) does not turn it on: call :func:`enable` yourself, or set JAX's own ``jax_compilation_cache_dir``.
"""

import os
import pathlib
import sys

import jax

from overfocus_jax.files import make_writable_directory, user_cache_directory

ENV = "OVERFOCUS_COMPILATION_CACHE"
OFF = "off"
# Cache even quick compilations: the train step's many small helpers add up, and a hit costs a file read.
MIN_COMPILE_TIME_S = 0.0


def default_location() -> pathlib.Path:
  return user_cache_directory() / "xla"


def location() -> pathlib.Path | None:
  """The directory the CLI caches into, or None when ``$OVERFOCUS_COMPILATION_CACHE`` is ``off``."""
  setting = os.environ.get(ENV, "").strip()
  if setting.lower() == OFF:
    return None
  return pathlib.Path(setting).expanduser() if setting else default_location()


def enable(directory: pathlib.Path | None = None) -> pathlib.Path | None:
  """Turns the cache on in ``directory`` (default: :func:`location`); returns it, or None if it is off or cannot be
  written — then one warning line says why and the run goes on without it (a cache is never worth failing for)."""
  directory = location() if directory is None else directory
  if directory is None:
    return None
  try:
    make_writable_directory(directory)
  except OSError as e:
    print(f"overfocus: warning: compilation cache {str(directory)!r} is not writable ({e.strerror}); compiling "
          f"without it (set {ENV} to a writable directory, or to {OFF})", file=sys.stderr)
    return None
  try:
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  except AttributeError as e:  # a jax without these options: run uncached rather than not at all
    print(f"overfocus: warning: this jax has no persistent compilation cache ({e}); compiling without it",
          file=sys.stderr)
    return None
  return directory
