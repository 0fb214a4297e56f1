"""Filesystem helpers shared by the layers above (no JAX, no config)."""

import os
import pathlib
import socket

WRITE_PROBE = ".write_test"


def user_cache_directory() -> pathlib.Path:
  """The package's per-user cache: ``$XDG_CACHE_HOME/overfocus_jax`` (``~/.cache/overfocus_jax`` without it)."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "overfocus_jax"


def make_writable_directory(path: pathlib.Path) -> None:
  """Creates ``path`` (with its parents) and proves it writable by writing and removing a probe file; raises
  ``OSError`` when it cannot — before any real work depends on it. Safe when several processes (of one
  multi-process run) do it at once: each writes its own probe."""
  path.mkdir(parents=True, exist_ok=True)
  probe = path / f"{WRITE_PROBE}.{socket.gethostname()}.{os.getpid()}"
  probe.write_text("ok")
  probe.unlink()
