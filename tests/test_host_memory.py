"""The host-memory settings (overfocus_jax/host_memory.py): nothing changes when the package is imported; the
effect they exist for once ``retain_host_memory()`` is called (the CLI does, first thing) — a large block freed and
allocated again is not faulted in again — and the reasons when they are not applied."""

import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: {setup}, then the status and the minor page faults of writing a 256 MiB malloc'd block a
# second time after freeing it (glibc's default maps it anew: one fault per 4 KiB page).
PROBE = r"""
import ctypes, json, resource, sys
import overfocus_jax as ofx
from overfocus_jax import host_memory
{setup}
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
print(json.dumps({{"status": host_memory.status(),
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""
# Every public name and the pure modules, imported: what a library user's script does.
IMPORT_ALL = ("[getattr(ofx, name) for name in ofx.__all__]\n"
              "import overfocus_jax.challenge, overfocus_jax.models, overfocus_jax.explain.metrics")


def probe(setup: str, **env) -> dict:
  environment = {key: value for key, value in os.environ.items() if key not in ("OVERFOCUS_HOST_MEMORY",)}
  environment.update({"JAX_PLATFORMS": "cpu", **env})
  done = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True,
                        env=environment, timeout=120)
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_importing_the_package_leaves_glibc_as_it_is():
  plain = probe(IMPORT_ALL)
  assert plain["status"] == "not applied (call retain_host_memory())"
  assert plain["faults"] > 30_000, plain  # 65,536 pages: glibc returned the block and mapped it again


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_retain_host_memory_keeps_freed_blocks_mapped():
  kept = probe("ofx.retain_host_memory()")
  assert kept["status"] == "retained"
  assert kept["faults"] < 1000, kept  # the second pass reuses the mapped pages
  default = probe("ofx.retain_host_memory()", OVERFOCUS_HOST_MEMORY="default")
  assert default["status"] == "off ($OVERFOCUS_HOST_MEMORY=default)"
  assert default["faults"] > 30_000, default


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_the_cli_retains_host_memory_at_its_entry_point():
  code = ("import contextlib, io\nfrom overfocus_jax import cli, host_memory\n"
          "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
          "  cli.main(['--help'])\nprint(host_memory.status())")
  environment = {key: value for key, value in os.environ.items() if key != "OVERFOCUS_HOST_MEMORY"}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**environment, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "retained", done.stderr


def run_status(code: str, **env) -> str:
  environment = {key: value for key, value in os.environ.items() if key != "OVERFOCUS_HOST_MEMORY"}
  environment.update(env)
  done = subprocess.run([sys.executable, "-c", code + "\nimport overfocus_jax as ofx\nofx.retain_host_memory()\n"
                         "from overfocus_jax import host_memory\nprint(host_memory.status())"],
                        capture_output=True, text=True, env=environment, timeout=120)
  assert done.returncode == 0, done.stderr
  return done.stdout.strip().splitlines()[-1]


def test_the_reasons_it_is_not_applied():
  assert run_status("", JAX_PLATFORMS="cuda") == "JAX_PLATFORMS=cuda: not a CPU run"
  late = run_status("import jax.numpy as jnp; (jnp.ones(2) + 1).block_until_ready()", JAX_PLATFORMS="cpu")
  assert late == "JAX had already computed; call retain_host_memory() before the first computation"
  # Importing JAX alone does not start its backends: the settings still apply.
  assert run_status("import jax", JAX_PLATFORMS="cpu") == "retained"


def test_the_reason_off_glibc(monkeypatch):
  from overfocus_jax import host_memory
  monkeypatch.delenv("OVERFOCUS_HOST_MEMORY", raising=False)
  monkeypatch.setattr(host_memory.platform, "system", lambda: "Darwin")
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
  assert host_memory.why_not().startswith("not glibc (Darwin")


def test_an_error_while_deciding_is_a_status_never_an_exception(monkeypatch):
  from overfocus_jax import host_memory
  monkeypatch.setitem(host_memory._status, "reason", "not applied yet")

  def broken():
    raise RuntimeError("a private JAX module changed")

  monkeypatch.setattr(host_memory, "why_not", broken)
  assert host_memory.apply() is False
  assert host_memory.status() == "not applied (RuntimeError: a private JAX module changed)"
