"""The host-memory settings (overfocus_jax/host_memory.py): applied when the package is imported on a CPU run,
with the effect they exist for — a large block freed and allocated again is not faulted in again — and the reasons
when they are not applied."""

import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: the status after importing the package, then the minor page faults of writing a 256 MiB
# malloc'd block a second time after freeing it (glibc's default maps it anew: one fault per 4 KiB page).
PROBE = r"""
import ctypes, json, resource, sys
import overfocus_jax
from overfocus_jax import host_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 256 << 20
def touch():
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(json.dumps({"status": host_memory.status(),
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(**env) -> dict:
  environment = {key: value for key, value in os.environ.items() if key not in ("OVERFOCUS_HOST_MEMORY",)}
  environment.update({"JAX_PLATFORMS": "cpu", **env})
  done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, timeout=120)
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_importing_the_package_keeps_freed_blocks_mapped():
  kept = probe()
  assert kept["status"] == "retained"
  assert kept["faults"] < 1000, kept  # the second pass reuses the mapped pages
  default = probe(OVERFOCUS_HOST_MEMORY="default")
  assert default["status"] == "off ($OVERFOCUS_HOST_MEMORY=default)"
  assert default["faults"] > 30_000, default  # 65,536 pages: glibc mapped them again


def run_status(code: str, **env) -> str:
  environment = {key: value for key, value in os.environ.items() if key != "OVERFOCUS_HOST_MEMORY"}
  environment.update(env)
  done = subprocess.run([sys.executable, "-c", code + "\nfrom overfocus_jax import host_memory\n"
                         "print(host_memory.status())"], capture_output=True, text=True, env=environment, timeout=120)
  assert done.returncode == 0, done.stderr
  return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_the_reasons_it_is_not_applied():
  assert run_status("", JAX_PLATFORMS="cuda") == "JAX_PLATFORMS=cuda: not a CPU run"
  late = run_status("import jax.numpy as jnp; (jnp.ones(2) + 1).block_until_ready()", JAX_PLATFORMS="cpu")
  assert late == "JAX had already computed before overfocus_jax was imported; import the package first"
  # Importing JAX alone does not start its backends: the package still applies them.
  assert run_status("import jax", JAX_PLATFORMS="cpu") == "retained"


def test_the_reason_off_glibc(monkeypatch):
  from overfocus_jax import host_memory
  monkeypatch.delenv("OVERFOCUS_HOST_MEMORY", raising=False)
  monkeypatch.setattr(host_memory.platform, "system", lambda: "Darwin")
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
  assert host_memory.why_not().startswith("not glibc (Darwin")


def test_an_error_while_deciding_never_stops_the_package_from_loading(monkeypatch):
  from overfocus_jax import host_memory
  monkeypatch.setitem(host_memory._status, "reason", "not applied yet")

  def broken():
    raise RuntimeError("a private JAX module changed")

  monkeypatch.setattr(host_memory, "why_not", broken)
  assert host_memory.apply() is False
  assert host_memory.status() == "not applied (RuntimeError: a private JAX module changed)"
