r"""Host memory for XLA:CPU: keep the memory a step frees, so that the next step does not fault every page in again.

XLA:CPU gives each execution of a compiled program one block for all its temporaries and frees it at the end; for
a train step that block is far above glibc's mmap threshold (at most 32 MiB on 64-bit glibc). glibc serves a block
that large from ``mmap`` (a worker thread's arena cannot hold it) and unmaps it on ``free``, so every step the
kernel maps fresh zeroed pages again — one minor page fault per page of the block, each page written with zeros
before the step can use it. With

    M_ARENA_MAX = 1              every thread allocates from the main heap, which can grow to any size
    M_MMAP_MAX = 0               no allocation is served by mmap
    M_TRIM_THRESHOLD = 2³¹ − 1   freed memory stays in the heap instead of going back to the kernel

the block comes from the heap and stays mapped between steps, as PyTorch's tensors do (each is below glibc's mmap
threshold). The process keeps its peak host memory instead of shrinking after each step. ``python -m
benchmarks.host_memory`` measures the page faults and the step time with and without these settings (figures in
``docs/guide/performance.md``, "Host memory").

glibc assigns a thread its arena at the thread's first allocation, so this must run before JAX's first computation.
Importing the package changes nothing: the ``overfocus`` CLI calls :func:`retain_host_memory` first thing, and so do
the experiment and benchmark scripts; a script of your own opts in with ``ofx.retain_host_memory()`` before it
computes anything. It applies only where JAX will compute on the CPU (no accelerator plugin installed, or
``JAX_PLATFORMS=cpu``), on glibc. ``OVERFOCUS_HOST_MEMORY=default`` leaves glibc's settings alone; :func:`status`
says what happened, and ``overfocus bench`` reports it (``host_memory``).
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

ENV = "OVERFOCUS_HOST_MEMORY"  # "default" leaves glibc's malloc settings alone
# mallopt parameters (glibc's malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")

_status = {"reason": "not applied (call retain_host_memory())"}


def _jax_has_run() -> bool:
  """Whether JAX has created its backends (and with them the threads whose arenas are already fixed)."""
  bridge = sys.modules.get("jax._src.xla_bridge")  # not imported: JAX cannot have run
  if bridge is None:
    return False
  initialized = getattr(bridge, "backends_are_initialized", None)  # a private module: read it defensively
  return initialized() if callable(initialized) else bool(getattr(bridge, "_backends", None))


def _accelerator_installed() -> str | None:
  """The name of an installed JAX accelerator plugin, if any (JAX would compute there by default)."""
  plugin = next(iter(importlib.metadata.entry_points(group="jax_plugins")), None)
  if plugin is not None:
    return plugin.name
  return next((name for name in ACCELERATOR_MODULES if importlib.util.find_spec(name) is not None), None)


def why_not() -> str | None:
  """Why the settings would not apply in this process now, or None when they would."""
  if os.environ.get(ENV, "").strip().lower() == "default":
    return f"off (${ENV}=default)"
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return f"not glibc ({platform.system()} {' '.join(platform.libc_ver()).strip()})"
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms and platforms.split(",")[0] != "cpu":
    return f"JAX_PLATFORMS={platforms}: not a CPU run"
  if not platforms:
    accelerator = _accelerator_installed()
    if accelerator:
      return f"an accelerator plugin ({accelerator}) is installed; JAX_PLATFORMS=cpu applies them"
  if _jax_has_run():
    return "JAX had already computed; call retain_host_memory() before the first computation"
  return None


def apply() -> bool:
  """Sets glibc's malloc to keep freed memory (see the module docstring) unless :func:`why_not`; True if set."""
  if _status["reason"] == "retained":
    return True
  try:
    reason = why_not() or _call_mallopt()
  except Exception as e:  # noqa: BLE001 — runs on import: never stop the package from loading
    reason = f"not applied ({type(e).__name__}: {e})"
  _status["reason"] = reason
  return reason == "retained"


def _call_mallopt() -> str:
  """Sets :data:`SETTINGS`; returns "retained", or why they could not be set."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError) as e:
    return f"no mallopt ({e})"
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  if all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS):
    return "retained"
  return "mallopt refused a setting"


def retain_host_memory() -> bool:
  """Keeps the memory XLA:CPU frees between steps mapped (glibc's ``mallopt``; see the module docstring): a
  process-wide setting, for a CPU run, made before JAX's first computation. Returns whether it is in effect; where it
  does not apply (an accelerator, another libc, ``OVERFOCUS_HOST_MEMORY=default``, JAX already running) it changes
  nothing, and :func:`status` says why."""
  return apply()


def status() -> str:
  """``"retained"`` when the settings are in effect, else why not."""
  return _status["reason"]
