"""Placing a pool's rows on a device mesh, and bringing results back, on one or many processes.

The selection code that splits the nodes over devices (`gcn_sharded`, `kcenter_sharded`) takes
host arrays that are the same on every process (the loop's pool is) and lays them out with the
helpers here, so the same code runs on one process with several devices and on several
processes: every input of a jitted program is either built from host data with
`jax.make_array_from_callback` or a NumPy value (replicated).
"""

import functools
from typing import Optional, Sequence, Tuple

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
  return shard_rows_along(mesh, host, num_rows, 0)


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


# ------------------------------------------------------------------ collectives and a row driver
# Used inside `jax.shard_map` over the axis 'data' (BADGE and the score-ranking samplers).

_NO_INDEX = np.iinfo(np.int32).max


def shard_rows_along(mesh: Mesh, host, num_rows: int, axis: int) -> jax.Array:
  """`shard_rows` for an array whose node axis is `axis` (e.g. 1 for [T, N, C]): the global
  array has `num_rows` >= N entries on that axis, split over 'data', zeros past N; each device's
  block is copied from the host array alone."""
  host = np.asarray(host)
  shape = host.shape[:axis] + (num_rows,) + host.shape[axis + 1:]

  def rows(index):
    block = host[index]
    want = len(range(*index[axis].indices(num_rows)))
    if block.shape[axis] < want:
      pad = list(block.shape)
      pad[axis] = want - block.shape[axis]
      block = np.concatenate([block, np.zeros(pad, host.dtype)], axis=axis)
    return block

  spec = P(*([None] * axis + [DATA_AXIS]))
  return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), rows)


def row_offset(num_local: int) -> jax.Array:
  """Inside `shard_map` over 'data': the global index of this shard's first row (int32)."""
  return (jax.lax.axis_index(DATA_AXIS) * num_local).astype(jnp.int32)


def varying(x):
  """Inside `shard_map` over 'data': a value created identically on every shard, marked as
  per-shard (the initial value of a loop carry that becomes so)."""
  return jax.lax.pcast(x, DATA_AXIS, to="varying")


def owner_rows(values: jax.Array, ids) -> jax.Array:
  """Inside `shard_map` over 'data': rows `ids` (global indices, a scalar or an array) of the
  row-split `values` [n_local, ...], on every shard: a `psum` of the owners' rows, to which the
  other shards add zeros (exact)."""
  local = ids - row_offset(values.shape[0])
  owned = (local >= 0) & (local < values.shape[0])
  rows = values[jnp.clip(local, 0, values.shape[0] - 1)]
  owned = jnp.reshape(owned, owned.shape + (1,) * (rows.ndim - owned.ndim))
  return jax.lax.psum(jnp.where(owned, rows, jnp.zeros_like(rows)), DATA_AXIS)


def global_argmax(values: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Inside `shard_map` over 'data': the largest of the row-split `values` and its global index.

  Args:
    values: [n_local] this shard's values (no NaN).
  Returns:
    (max, index): the global max and the smallest global index holding it (`jnp.argmax`'s first
    index on ties), both the same on every shard: a scalar `pmax` and a scalar `pmin`.
  """
  local_arg = jnp.argmax(values)
  local_max = values[local_arg]
  global_max = jax.lax.pmax(local_max, DATA_AXIS)
  index = row_offset(values.shape[0]) + local_arg.astype(jnp.int32)
  index = jax.lax.pmin(jnp.where(local_max == global_max, index, _NO_INDEX), DATA_AXIS)
  return global_max, index.astype(jnp.int32)


def global_top_k(values: jax.Array, k: int) -> Tuple[jax.Array, jax.Array]:
  """Inside `shard_map` over 'data': the `k` largest of the row-split `values`, as `lax.top_k`
  of the whole [N] vector (ties: lowest global index first).

  Each shard takes its local top min(k, n_local) (lowest index first on ties), an `all_gather`
  lays the P candidate lists out in shard order, and a last `top_k` over the P * min(k, n_local)
  candidates keeps, among equal values, the earliest position, which is the lowest global index.

  Args:
    values: [n_local] this shard's values (no NaN; -inf for rows that must come last).
    k: static int, k <= P * n_local.
  Returns:
    ([k] values, [k] int32 global indices), largest first, the same on every shard.
  """
  local_k = min(int(k), values.shape[0])
  local_values, local_index = jax.lax.top_k(values, local_k)
  local_index = row_offset(values.shape[0]) + local_index.astype(jnp.int32)
  all_values = jax.lax.all_gather(local_values, DATA_AXIS, tiled=True, to="invarying")
  all_index = jax.lax.all_gather(local_index, DATA_AXIS, tiled=True, to="invarying")
  top_values, position = jax.lax.top_k(all_values, int(k))
  return top_values, all_index[position]


def top_available(scores: jax.Array, available: jax.Array, *, budget: int) -> jax.Array:
  """Inside `shard_map` over 'data' (a `map_rows` body): the `budget` available rows with the
  largest scores, as `samplers.base.top_unlabelled` on the whole vector (ties: lowest index).

  Args:
    scores: [n_local] float scores (no NaN).
    available: [n_local] bool, False for labelled and padding rows.
    budget: static int, at most the number of available rows.
  Returns:
    [budget] int32 global indices, largest score first, the same on every shard.
  """
  return global_top_k(jnp.where(available, scores, -jnp.inf), budget)[1]


def _in_spec(axis: int):
  return P(*([None] * axis + [DATA_AXIS]))


@functools.partial(jax.jit, static_argnames=("local_fn", "mesh", "axes", "options"))
def _map_rows(rows, replicated, *, local_fn, mesh, axes, options):
  def local(rows, replicated):
    return local_fn(*rows, *replicated, **dict(options))

  return jax.shard_map(local, mesh=mesh, in_specs=(tuple(_in_spec(a) for a in axes), P()),
                       out_specs=P())(tuple(rows), tuple(replicated))


def map_rows(local_fn, mesh: Mesh, rows: Sequence, replicated: Sequence = (), *,
             axes: Optional[Sequence[int]] = None, **options) -> np.ndarray:
  """Runs `local_fn(*local_rows, *replicated, **options)` on every shard of `mesh`'s axis 'data'
  and returns its (replicated) result on this process's host.

  The host arrays `rows` (the same on every process) are split over 'data' along their node
  axis (`axes`, default 0 for each) and padded with zeros (False) to a multiple of the shards;
  `local_fn` sees its shard of each, e.g. a node mask [n_local] whose padding rows are False.
  Its result must be the same on every shard (from collectives such as `global_top_k`).
  One compile per (local_fn, shapes, mesh, axes, options): pass a module-level function and
  hashable `options` (ints, floats, strings), not a fresh lambda or partial per call.

  Args:
    local_fn: per-shard function, traceable inside `jax.shard_map`.
    mesh: a mesh with an axis 'data'.
    rows: host arrays, each with the N nodes on its axis `axes[i]`.
    replicated: host values every shard sees whole (scalars, PRNG key data).
    axes: the node axis of each of `rows` (default all 0).
    **options: static keyword arguments of `local_fn`.
  Returns:
    `local_fn`'s result as a NumPy array, the same on every process.
  Raises:
    ValueError: a mesh without an axis 'data'.
  """
  axes = tuple(0 for _ in rows) if axes is None else tuple(int(a) for a in axes)
  num_nodes = np.shape(rows[0])[axes[0]]
  num_rows = padded_rows(num_nodes, mesh)  # ValueError without a 'data' axis
  laid_out = tuple(shard_rows_along(mesh, r, num_rows, a) for r, a in zip(rows, axes))
  result = _map_rows(laid_out, tuple(np.asarray(r) for r in replicated), local_fn=local_fn,
                     mesh=mesh, axes=axes, options=tuple(sorted(options.items())))
  return to_host(result)
