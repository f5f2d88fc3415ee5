"""Data parallelism with `jax.jit` + shardings over a 1-D 'data' mesh, single- or multi-host.

One code path for 1 CPU, 1 GPU, all devices of a host and many hosts (no `pmap`): model
state is replicated (`P()`), batches are split along their leading axis (`P('data')`), and
jitted functions declare those shardings. Under jit, BatchNorm statistics computed over a
sharded batch are global (XLA inserts the all-reduce), so results match a single-device run
up to float summation order.

Multi-host: call `initialize_distributed` first in every process (before any other JAX
call); `jax.devices()` then lists the devices of all processes and `make_mesh()` spans them.
Global arrays come either from data every process holds in full (`replicate`,
`shard_batch`) or from each process's own part (`global_batch_from_local`, via
`jax.make_array_from_process_local_data`).
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int,
                           *, cpu_collectives: str = "gloo",
                           local_device_ids: Optional[Sequence[int]] = None) -> None:
  """Joins this process to a multi-process JAX job; call before any other JAX call.

  On CPU, cross-process collectives need an implementation; gloo works on localhost and
  across hosts (protocol §8). The setting only affects the CPU backend, so it is harmless on GPU.

  Args:
    coordinator_address: "host:port" of process 0's coordinator, e.g. "127.0.0.1:12345".
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    cpu_collectives: value of `jax_cpu_collectives_implementation` ("gloo" or "mpi"), or
      None to leave it unchanged.
    local_device_ids: optional devices of this process (GPU hosts running one process per
      device).
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} not in [0, {num_processes}).")
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)


def is_main_process() -> bool:
  """True in process 0 (the one that should log, write results and checkpoints' metadata)."""
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """Barrier: returns once every process has reached `sync_processes(name)` (no-op in 1 process).

  Args:
    name: the same string in every process (a mismatch is an error, not a silent desync).
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes).

  The axis type is `Auto` (sharding propagated by XLA), so Flax modules need no sharding
  annotations.

  Args:
    devices: devices to use, or None for `jax.devices()`.
  Returns:
    `Mesh` of shape [num_devices] named ('data',).
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device.")
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device of `mesh` (model state, scalars)."""
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the 'data' axis of `mesh`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def num_data_shards(mesh: Mesh) -> int:
  """Number of devices along the 'data' axis."""
  return mesh.shape[DATA_AXIS]


def check_divisible(mesh: Mesh, batch_size: int, *, name: str = "batch_size") -> None:
  """Raises ValueError unless the global `batch_size` splits evenly over the mesh."""
  shards = num_data_shards(mesh)
  if batch_size <= 0 or batch_size % shards:
    raise ValueError(
        f"{name}={batch_size} must be a positive multiple of the number of devices in the "
        f"data mesh ({shards}); choose e.g. {max(shards, batch_size // shards * shards)}.")


def _put(x, sharding: NamedSharding):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x  # Already a global array; resharding across hosts is the caller's business.
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Puts every leaf of `tree` fully replicated on the mesh.

  Multi-host: every process must pass the same full values.

  Args:
    mesh: the data mesh.
    tree: pytree of arrays (NumPy or JAX) or scalars.
  Returns:
    The same pytree of global `jax.Array`s with sharding `replicated(mesh)`.
  """
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: _put(x, sharding), tree)


def shard_batch(mesh: Mesh, batch: Any) -> Any:
  """Splits the leading axis of every leaf over the 'data' axis.

  Multi-host: every process passes the full global batch and keeps only the rows of its
  own devices (use `global_batch_from_local` when each process holds only its part).

  Args:
    mesh: the data mesh.
    batch: pytree of [global_batch, ...] arrays; global_batch divisible by the device count.
  Returns:
    The same pytree of global `jax.Array`s with sharding `data_sharding(mesh)`.
  """
  sharding = data_sharding(mesh)

  def put(x):
    check_divisible(mesh, np.shape(x)[0], name="leading (batch) dimension")
    return _put(x, sharding)

  return jax.tree.map(put, batch)


def local_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold under `data_sharding`.

  Args:
    mesh: the data mesh.
    global_batch_size: static int, divisible by the device count.
  Returns:
    `slice` into [global_batch_size]: the part this process feeds to
    `global_batch_from_local`.
  """
  check_divisible(mesh, global_batch_size)
  index_map = data_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  starts = sorted({idx[0].start or 0 for idx in index_map.values()})
  stops = sorted({global_batch_size if idx[0].stop is None else idx[0].stop
                  for idx in index_map.values()})
  if stops[-1] - starts[0] != len(starts) * (global_batch_size // num_data_shards(mesh)):
    raise ValueError("This process's devices are not contiguous in the mesh; build the mesh "
                     "with devices ordered by process (the default of make_mesh).")
  return slice(starts[0], stops[-1])


def global_batch_from_local(mesh: Mesh, local_batch: Any) -> Any:
  """Assembles a global batch from each process's part (`jax.make_array_from_process_local_data`).

  Args:
    mesh: the data mesh.
    local_batch: pytree of [global_batch / num_processes, ...] arrays: this process's rows,
      `local_rows(mesh, global_batch)` of the global batch.
  Returns:
    Pytree of [global_batch, ...] global arrays sharded `P('data')`.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def _fetch(x):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError("to_host needs replicated arrays in a multi-process run; got sharding "
                       f"{x.sharding}.")
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def to_host(tree: Any) -> Any:
  """Fetches a pytree of (fully replicated, if multi-host) arrays as NumPy arrays."""
  return jax.tree.map(_fetch, tree)


def broadcast_from_main(tree: Any) -> Any:
  """Process 0's value of `tree` (NumPy arrays of equal shapes in every process), everywhere.

  What a process decides alone (the sampler's picks, the candidate draw, a resumed labelled
  set) can differ between hosts: GPU reductions that are not deterministic, per-host
  autotuning, a host that read another file. Broadcasting process 0's value makes it one value
  for the whole run, and no run dies for a rounding difference. A no-op in one process.

  Args:
    tree: pytree of arrays with the same shapes and dtypes in every process.
  Returns:
    The pytree as NumPy arrays, equal in every process to process 0's.
  """
  tree = jax.tree.map(np.asarray, tree)
  if jax.process_count() == 1:
    return tree
  # The collective runs in JAX's default int/float width: restore each leaf's own dtype.
  out = multihost_utils.broadcast_one_to_all(tree)
  return jax.tree.map(lambda x, mine: np.asarray(x).astype(mine.dtype), out, tree)

