"""Filesystem helpers shared by the layers above (no JAX, no config)."""

import pathlib

WRITE_PROBE = ".write_test"


def make_writable_directory(path: pathlib.Path) -> None:
  """Creates ``path`` (with its parents) and proves it writable by writing and removing a probe file; raises
  ``OSError`` when it cannot — before any real work depends on it."""
  path.mkdir(parents=True, exist_ok=True)
  probe = path / WRITE_PROBE
  probe.write_text("ok")
  probe.unlink()
