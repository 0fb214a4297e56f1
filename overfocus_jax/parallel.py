"""Data parallelism with ``jax.sharding``: one ``Mesh`` with a ``data`` axis over every device of every process.

The batch is sharded along its first axis (``P('data')``); parameters, optimizer state and batch statistics are
replicated (``P()``). ``jax.jit`` then inserts the gradient all-reduce itself, and batch-norm statistics are
computed over the global batch, so a run on 1 device and on 8 gives the same numbers up to float rounding.
No ``pmap``.

On several processes (hosts), :func:`start_distributed` first (``jax.distributed.initialize``); the mesh then spans
every global device, process-major, and each process feeds only the rows its own devices hold
(:func:`process_rows`): :func:`shard_batch` takes them out of a global host batch, the host train stream reads only
them (:mod:`overfocus_jax.train.streams`), and :func:`put` copies host arrays that every process holds alike.
"""

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from overfocus_jax.errors import SettingError, UserError

DATA_AXIS = "data"
SHUTDOWN_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Distributed:
  """How to join a multi-process run: ``coordinator`` ``HOST:PORT`` (process 0 serves it), the process count and
  this process's id. All None: JAX's own cluster detection (SLURM, Open MPI, TPU pods, ``JAX_COORDINATOR_ADDRESS``)."""

  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))


# What each cluster sets in every task's environment (JAX's own detectors read the same variables).
CLUSTER_VARIABLES = {
    "SLURM": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    "Open MPI": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    "TPU pod": ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID"),
    "JAX": ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"),
}
CLUSTER_SIZE_VARIABLES = {"SLURM": "SLURM_NTASKS", "Open MPI": "OMPI_COMM_WORLD_SIZE", "JAX": "JAX_NUM_PROCESSES"}


def detected_cluster(environ=None) -> str | None:
  """The cluster this process runs in with more than one process, from its environment (None: run alone)."""
  environ = os.environ if environ is None else environ
  for name, variables in CLUSTER_VARIABLES.items():
    if not all(environ.get(v) for v in variables):
      continue
    if name == "TPU pod":
      size = len(environ["TPU_WORKER_HOSTNAMES"].split(","))
    else:
      size = int(environ[CLUSTER_SIZE_VARIABLES[name]]) if environ[CLUSTER_SIZE_VARIABLES[name]].isdigit() else 1
    if size > 1:
      return name
  return None


def check_distributed(spec: Distributed) -> None:
  """Explicit arguments: all three, a ``HOST:PORT`` coordinator, 1 ≤ processes, 0 ≤ id < processes."""
  if not spec.explicit:
    return
  if None in (spec.coordinator, spec.num_processes, spec.process_id):
    raise UserError("--coordinator, --num-processes and --process-id go together",
                    "pass all three (e.g. --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0) or none")
  host, _, port = spec.coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"--coordinator {spec.coordinator!r} is not HOST:PORT", "e.g. --coordinator 10.0.0.1:1234")
  if spec.num_processes < 1:
    raise UserError(f"--num-processes {spec.num_processes} must be at least 1", "pass the number of processes")
  if not 0 <= spec.process_id < spec.num_processes:
    raise UserError(f"--process-id {spec.process_id} is out of range for --num-processes {spec.num_processes}",
                    f"give each process its own id from 0 to {spec.num_processes - 1}")


def start_distributed(spec: Distributed, *, timeout_s: float = 300.0) -> bool:
  """``jax.distributed.initialize`` with the explicit arguments, or with JAX's cluster detection when the
  environment names a multi-process cluster (:func:`detected_cluster`); returns whether it started. Must run
  before anything touches a device. One process and no cluster: nothing happens.

  A coordinator that never answers makes JAX abort the process after ``timeout_s`` (the caller may want a
  watchdog that fails first, with a message: the CLI has one)."""
  check_distributed(spec)
  if spec.explicit and spec.num_processes == 1:
    return False
  if not spec.explicit and detected_cluster() is None:
    return False
  if "jax_cpu_collectives_implementation" in jax.config.values:  # CPU devices talk across processes over gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # A process that ends early (an error) waits this long at exit for the others before JAX aborts it (default 300).
  options = {"initialization_timeout": int(timeout_s), "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S}
  if spec.explicit:
    jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                               process_id=spec.process_id, cluster_detection_method="deactivate", **options)
  else:
    jax.distributed.initialize(**options)
  return True


def is_primary() -> bool:
  """Whether this is process 0, the one that writes logs, metrics and summaries."""
  return jax.process_index() == 0


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh named :data:`DATA_AXIS` (``"data"``) over ``devices`` (default: every device of every
  process, ``jax.devices()``, process-major).

  Examples:
    >>> import overfocus_jax as ofx
    >>> mesh = ofx.make_mesh()
    >>> mesh.axis_names, mesh.devices.size == len(__import__("jax").devices())
    (('data',), True)
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that puts a whole copy of an array on every device of ``mesh`` (parameters, optimizer and
  regularizer states): ``NamedSharding(mesh, P())``."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding that splits an array's first (batch) axis over ``mesh``'s ``data`` axis, each device holding its
  rows: ``NamedSharding(mesh, P("data"))``. The batch size must divide by the device count."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  devices = mesh.devices.size
  if batch_size % devices:
    raise SettingError(field, f"{field}={batch_size} does not divide evenly over {devices} devices",
                       f"a multiple of {devices}, e.g. {max(devices, batch_size // devices * devices)}")


def process_rows(batch_size: int, mesh: Mesh) -> slice:
  """The rows of a global batch of ``batch_size`` that this process's devices hold (all of them on one process):
  a contiguous block, since the mesh is process-major."""
  index_map = data_sharded(mesh).addressable_devices_indices_map((batch_size,))
  starts = sorted(index[0].indices(batch_size)[:2] for index in index_map.values())
  start, stop = starts[0][0], starts[-1][1]
  if stop - start != sum(b - a for a, b in starts):
    raise ValueError(f"this process's rows of the mesh are not contiguous: {starts}")
  return slice(start, stop)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """A global host batch (a pytree of arrays with a common first axis; every process holds the same) → global
  arrays sharded over the ``data`` axis (:func:`data_sharded`); each process sends only its own rows
  (:func:`process_rows`). A ``jax.jit`` step given these and parameters put by :func:`replicate` runs on every
  device, its gradient mean over the batch one all-reduce."""
  sharding = data_sharded(mesh)
  rows = process_rows(len(next(iter(jax.tree.leaves(batch)))), mesh)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)[rows]), batch)


def put(tree, sharding: NamedSharding):
  """Host arrays that every process holds alike → global arrays laid out as ``sharding`` (each process copies only
  what its own devices hold; on one process, ``jax.device_put``)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda index: np.asarray(a)[index]),
                      tree)


def replicate(tree, mesh: Mesh):
  """A pytree of host arrays (every process holding the same) → global arrays with a whole copy on every device of
  ``mesh`` (:func:`replicated`): the parameters and states a step reads everywhere."""
  return put(tree, replicated(mesh))
