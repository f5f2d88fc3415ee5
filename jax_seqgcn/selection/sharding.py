"""Placing a pool's rows on a device mesh, and bringing results back, on one or many processes.

The selection code that splits the nodes over devices (`gcn_sharded`, `kcenter_sharded`) takes
host arrays that are the same on every process (the loop's pool is) and lays them out with the
helpers here, so the same code runs on one process with several devices and on several
processes: every input of a jitted program is either built from host data with
`jax.make_array_from_callback` or a NumPy value (replicated).
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# The mesh axis the nodes are split over (as `training.parallel.DATA_AXIS`).
DATA_AXIS = "data"


def spans_devices(mesh: Optional[Mesh]) -> bool:
  """Whether `mesh` splits work: more than one device, or several processes."""
  return mesh is not None and (mesh.size > 1 or jax.process_count() > 1)


def check_mesh(mesh: Mesh) -> int:
  """The number of shards of the axis 'data'; ValueError for a mesh without one."""
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"the mesh needs an axis {DATA_AXIS!r}, got axes {mesh.axis_names}")
  return mesh.shape[DATA_AXIS]


def padded_rows(num_rows: int, mesh: Mesh) -> int:
  """`num_rows` rounded up to a multiple of the mesh's 'data' shards."""
  shards = check_mesh(mesh)
  return -(-num_rows // shards) * shards


def shard_rows(mesh: Mesh, host, num_rows: int) -> jax.Array:
  """Host rows [N, ...] (the same on every process) as a global array of `num_rows` >= N rows
  split over the mesh axis 'data'; rows past N are zeros (False for bools). Each device's block
  is copied from the host array alone: no device ever holds all rows."""
  host = np.asarray(host)

  def rows(index):
    block = host[index[0]]
    want = len(range(*index[0].indices(num_rows)))
    if len(block) < want:
      block = np.concatenate([block, np.zeros((want - len(block),) + host.shape[1:], host.dtype)])
    return block

  return jax.make_array_from_callback((num_rows,) + host.shape[1:],
                                      NamedSharding(mesh, P(DATA_AXIS)), rows)


def to_host(x) -> np.ndarray:
  """A (global) array on this process's host: an all-gather across processes when its shards
  live on several processes, else a plain copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def key_parts(key: jax.Array) -> Tuple[np.ndarray, Optional[str]]:
  """A PRNG key as (host key data, implementation name or None for a raw uint32 key), to pass
  into a program spanning processes; `from_key_parts` rebuilds it inside."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(key)), str(jax.random.key_impl(key))
  return np.asarray(key), None


def from_key_parts(data, impl: Optional[str]) -> jax.Array:
  """The key of `key_parts` (traceable)."""
  return data if impl is None else jax.random.wrap_key_data(data, impl=impl)
