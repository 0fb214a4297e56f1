"""Interleaved timing of benchmark cases that live in separate worker processes.

Each case (a JAX train step with some config or XLA flags, a torch train step, one convolution gradient, ...)
is built once in its own Python process (``python -m benchmarks.cases``, started in the repository root): XLA
flags must be set before JAX starts, and the two frameworks' thread pools then never share a process. The parent
asks the workers for timed blocks in turn — case A, case B, case C, case A, ... — so every case sees the same
machine load, and the ratios of their medians are meaningful on a noisy shared machine even when the absolute
numbers drift.

    workers = start({"jax": {"kind": "jax_step", ...}, "torch": {"kind": "torch_step", ...}})
    seconds = interleave(workers, steps=10, repeats=5)   # {"jax": [s/step, ...], "torch": [...]}

The harness leaves the platform to JAX (a GPU when jax has one) unless asked: ``start(..., platform="cpu")``
sets ``JAX_PLATFORMS=cpu`` for every worker — what the CPU benchmarks ``step_time`` and ``profile_cpu`` do — and a
case's own ``env`` overrides it. ``start(..., parallel=True)`` builds the cases at the same time (compilation
overlaps on a many-core machine); timing never overlaps.

Protocol: the worker reads one JSON spec from stdin, builds the case (compiling and warming it up), answers
``@@{"ready": ..., "info": {...}}``; then each ``{"steps": N}`` line is answered ``@@{"seconds": per_step}``.
Only lines starting with ``@@`` are protocol; anything else the libraries print goes to stderr.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PROTOCOL = "@@"


class Worker:
  """One benchmark case in its own process (see the module docstring)."""

  def __init__(self, name: str, spec: dict, *, env: dict | None = None, cpus: list[int] | None = None,
               platform: str | None = None, wait: bool = True):
    self.name, self.spec = name, spec
    self.cpu_per_wall = []  # process CPU time / wall time of each timed block: ~threads kept busy
    self.minor_faults = []  # minor page faults per call in each timed block (pages mapped on first touch)
    self.info = None
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **worker_env(platform), **(env or {})}
    cmd = [sys.executable, "-m", "benchmarks.cases"]  # cwd: the repository root, where `benchmarks` is a package
    if cpus is not None:
      cmd = ["taskset", "-c", ",".join(map(str, cpus))] + cmd
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=full_env, text=True,
                                 cwd=str(ROOT))
    self._send(spec)
    if wait:
      self.wait_ready()

  def wait_ready(self) -> dict:
    """Blocks until the case is built (compiled and warmed up); returns its info."""
    if self.info is None:
      self.info = self._receive().get("info", {})
    return self.info

  def _send(self, message: dict) -> None:
    self.proc.stdin.write(json.dumps(message) + "\n")
    self.proc.stdin.flush()

  def _receive(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"worker {self.name!r} ({self.spec}) died; exit code {self.proc.wait()}")
      if line.startswith(PROTOCOL):
        message = json.loads(line[len(PROTOCOL):])
        if "error" in message:
          raise RuntimeError(f"worker {self.name!r}: {message['error']}")
        return message

  def time(self, steps: int) -> float:
    """Seconds per call over ``steps`` consecutive calls (results awaited)."""
    self._send({"steps": steps})
    reply = self._receive()
    self.cpu_per_wall.append(reply.get("cpu_per_wall"))
    self.minor_faults.append(reply.get("minor_faults"))
    return reply["seconds"]

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()


def worker_env(platform: str | None) -> dict:
  """The environment a worker gets for ``platform``: JAX_PLATFORMS only when a platform is asked for."""
  return {"JAX_PLATFORMS": platform} if platform else {}


def start(cases: dict[str, dict], *, log=print, platform: str | None = None, parallel: bool = False,
          failed: dict | None = None) -> dict[str, Worker]:
  """Starts one worker per case ({name: spec, with optional "env" and "cpus"}); closes all on failure.

  ``platform``: JAX_PLATFORMS for every worker (None: JAX picks). ``parallel``: build all cases at once.
  ``failed``: a dict to collect the cases that fail to build ({name: error}), which are then left out instead
  of failing the whole start.
  """
  workers = {}

  def give_up(name, error):
    if failed is None:
      raise error
    failed[name] = str(error)
    log(f"  {name} failed: {error}")

  try:
    t = time.perf_counter()
    for name, spec in cases.items():
      spec = dict(spec)
      env, cpus = spec.pop("env", None), spec.pop("cpus", None)
      try:
        workers[name] = Worker(name, spec, env=env, cpus=cpus, platform=platform, wait=not parallel)
      except RuntimeError as e:
        give_up(name, e)
        continue
      if not parallel:
        log(f"  started {name} ({time.perf_counter() - t:.0f} s)")
        t = time.perf_counter()
    if parallel:
      for name in list(workers):
        try:
          workers[name].wait_ready()
        except RuntimeError as e:
          workers.pop(name).close()
          give_up(name, e)
          continue
        log(f"  started {name} ({time.perf_counter() - t:.0f} s since the start of all)")
  except BaseException:
    for worker in workers.values():
      worker.close()
    raise
  return workers


def interleave(workers: dict[str, Worker], *, steps: int, repeats: int, log=None) -> dict[str, list[float]]:
  """``repeats`` rounds; in each, every worker times ``steps`` calls, one worker after the other."""
  seconds = {name: [] for name in workers}
  for r in range(repeats):
    order = list(workers.items())
    if r % 2:  # alternate the order so that neither case always follows the other
      order.reverse()
    for name, worker in order:
      seconds[name].append(worker.time(steps))
    if log:
      log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {s[-1] * 1e3:.1f} ms" for n, s in seconds.items()))
  return seconds


def close(workers: dict[str, Worker]) -> None:
  for worker in workers.values():
    worker.close()


def median_ms(values: list[float]) -> float:
  return statistics.median(values) * 1e3


def machine() -> dict:
  """What the numbers were measured on."""
  info = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
  try:
    load = os.getloadavg()
    info["load_average_at_start"] = [round(x, 2) for x in load]
  except OSError:
    pass
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        info["cpu_model"] = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return info


def versions() -> dict:
  from importlib import metadata
  out = {}
  for package in ("jax", "jaxlib", "flax", "optax", "torch"):
    try:
      out[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      out[package] = None
  return out
