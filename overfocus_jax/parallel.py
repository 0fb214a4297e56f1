"""Data parallelism with ``jax.sharding``: one ``Mesh`` with a ``data`` axis over every device.

The batch is sharded along its first axis (``P('data')``); parameters, optimizer state and batch statistics are
replicated (``P()``). ``jax.jit`` then inserts the gradient all-reduce itself, and batch-norm statistics are
computed over the global batch, so a run on 1 device and on 8 gives the same numbers up to float rounding.
No ``pmap``. On several hosts, call :func:`initialize_distributed` first; each process then feeds its local
part of the batch and :func:`shard_batch` assembles the global array.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from overfocus_jax.errors import UserError
from overfocus_jax.models import conv

DATA_AXIS = "data"


def initialize_distributed() -> None:
  """Starts multi-host JAX when a cluster environment says so (no-op on one host)."""
  if int(os.environ.get("JAX_NUM_PROCESSES", os.environ.get("SLURM_NTASKS", "1"))) > 1:
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  devices = mesh.devices.size
  if batch_size % devices:
    raise UserError(f"config.{field}={batch_size} does not divide evenly over {devices} devices",
                    f"use a multiple of {devices}, e.g. --config.{field}={max(devices, batch_size // devices * devices)}")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host batch (this process's rows) → global arrays sharded over the ``data`` axis."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch)


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


# jaxlib 0.10's CPU backend sends convolutions to YNNPACK, which runs them on one core; Eigen's convolutions use
# every core and made the whole train step 1.8x faster on 2 cores with the same results up to float rounding
# (benchmarks/profile_cpu.py, BENCHMARKS.md). YNNPACK is kept for reductions, where it is the faster one.
# Only on a one-device CPU mesh: with several (simulated) CPU devices, Eigen's convolutions share the intra-op
# thread pool with the device threads that block in the all-reduce rendezvous, and under load a device can miss
# XLA's collective deadline (seen in CI with 8 simulated devices on 2 cores).
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_options_supported() -> bool:
  """The option is experimental: probe it once, and compile without it where this jaxlib does not know it."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS)(jnp.ones((1,), jnp.float32))
    return True
  except Exception:  # pylint: disable=broad-except  # an unknown option fails compilation (INVALID_ARGUMENT)
    return False


def compiler_options(mesh: Mesh) -> dict | None:
  """Per-``jax.jit`` XLA options for the mesh's platform (``None``: the defaults)."""
  if mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu" and _cpu_options_supported():
    return dict(_CPU_COMPILER_OPTIONS)
  return None


def conv_for_mesh(mesh: Mesh):
  """The convolution function the residual CNNs use on this mesh (``None``: ``lax.conv_general_dilated``).

  On a one-device CPU mesh, :func:`overfocus_jax.models.conv.conv_general_dilated`: the same convolution, with
  its weight gradient summed over batch slices where that is faster on XLA:CPU (1.16× on the default train
  step, BENCHMARKS.md). Elsewhere the batch is sharded, or the device is a GPU with one cuDNN call per gradient.
  """
  if mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu":
    return conv.conv_general_dilated
  return None


def jit_for_mesh(fun, mesh: Mesh, **kwargs):
  """``jax.jit`` with this module's compiler options for the mesh's platform."""
  return jax.jit(fun, compiler_options=compiler_options(mesh), **kwargs)
