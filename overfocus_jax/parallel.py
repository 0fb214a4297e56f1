"""Data parallelism with ``jax.sharding``: one ``Mesh`` with a ``data`` axis over every device.

The batch is sharded along its first axis (``P('data')``); parameters, optimizer state and batch statistics are
replicated (``P()``). ``jax.jit`` then inserts the gradient all-reduce itself, and batch-norm statistics are
computed over the global batch, so a run on 1 device and on 8 gives the same numbers up to float rounding.
No ``pmap``. On several hosts, call :func:`initialize_distributed` first; each process then feeds its local
part of the batch and :func:`shard_batch` assembles the global array.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from overfocus_jax.errors import SettingError

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
    raise SettingError(field, f"{field}={batch_size} does not divide evenly over {devices} devices",
                       f"a multiple of {devices}, e.g. {max(devices, batch_size // devices * devices)}")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host batch (this process's rows) → global arrays sharded over the ``data`` axis."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch)


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
