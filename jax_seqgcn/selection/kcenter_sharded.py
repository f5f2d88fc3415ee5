"""Greedy k-center over a pool sharded across devices (protocol §4, multi-device `k_center_greedy`).

The node axis is split over the 1-D mesh axis 'data' with `jax.shard_map`: each device holds
N / devices rows of the features and of min_dist, so no device ever holds all features, let
alone an N x N array. Per pick:

1. every shard finds its local max of min_dist and its first (global) index;
2. `pmax` gives the global max and `pmin` over the indices of the shards that reach it gives the
   smallest index, i.e. exactly `jnp.argmax`'s first-index-on-ties rule;
3. the owner's row of the pick is broadcast with a `psum` (all other shards contribute zeros, so
   the sum is exact) and every shard updates its min_dist with exact differences.

Initial centres are processed in the same blocks of `kcenter.CENTRE_BLOCK` as the single-device
version (each block's rows gathered with a `psum`), shortlisting each node's two nearest centres
by matrix products and keeping their exact distances. The result equals `k_center_greedy` index
for index (see tests/test_kcenter_sharded.py).

N is padded up to a multiple of the device count with zero rows whose min_dist stays below every
real node's (never picked) and that are never centres.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_seqgcn.selection import kcenter
from jax_seqgcn.selection import sharding

DATA_AXIS = sharding.DATA_AXIS
# Padding rows: below kcenter._TAKEN (-1), so never the argmax even once every real node is taken.
_PAD = -2.0


def _merge_nearest_two(features, sq_norms, centre_rows, centre_ids, best):
  """Merges one block of centres into each local node's two nearest: (d2, ids, exact distance).

  Same shortlist as `kcenter._nearest_two` (approximate d^2 by a matrix product, `top_k` keeps
  the earlier entry on ties); the exact distance of each newly shortlisted centre is computed
  from the block's rows, which every device has, instead of gathering rows after the loop.
  """
  best_d2, best_ids, best_exact = best
  approx = (sq_norms[:, None]
            - 2.0 * jnp.matmul(features, centre_rows.T, precision=kcenter.HIGHEST)
            + jnp.sum(jnp.square(centre_rows), axis=-1)[None, :])
  d2 = jnp.concatenate([best_d2, approx], axis=1)
  ids = jnp.concatenate([best_ids, jnp.broadcast_to(centre_ids, approx.shape)], axis=1)
  neg, order = jax.lax.top_k(-d2, 2)
  from_block = order >= 2
  new_rows = centre_rows[jnp.clip(order - 2, 0, centre_rows.shape[0] - 1)]  # [n, 2, d]
  new_exact = jnp.sqrt(jnp.sum(jnp.square(features[:, None, :] - new_rows), axis=-1))
  old_exact = jnp.take_along_axis(best_exact, jnp.clip(order, 0, 1), axis=1)
  return (-neg, jnp.take_along_axis(ids, order, axis=1),
          jnp.where(from_block, new_exact, old_exact))


def _initial_min_distances(features, all_centres, block):
  """Local [n_local] distances to the nearest centre (+inf without centres)."""
  n_local, n_total = features.shape[0], all_centres.shape[0]
  num_centres = jnp.sum(all_centres)
  centre_idx = jnp.nonzero(all_centres, size=n_total + block,
                           fill_value=jnp.argmax(all_centres))[0].astype(jnp.int32)
  sq_norms = jnp.sum(jnp.square(features), axis=-1)
  best = (sharding.varying(jnp.full((n_local, 2), jnp.inf, features.dtype)),
          sharding.varying(jnp.zeros((n_local, 2), jnp.int32)),
          sharding.varying(jnp.full((n_local, 2), jnp.inf, features.dtype)))

  def body(state):
    b, best = state
    ids = jax.lax.dynamic_slice(centre_idx, (b * block,), (block,))
    rows = sharding.owner_rows(features, ids)
    return b + 1, _merge_nearest_two(features, sq_norms, rows, ids, best)

  num_blocks = (num_centres + block - 1) // block
  _, (_, _, exact) = jax.lax.while_loop(lambda s: s[0] < num_blocks, body, (0, best))
  return jnp.min(exact, axis=1)


def _local_greedy(features, is_centre, first_pick, num_nodes, *, budget, block):
  """Per-device body: features [n_local, d], is_centre [n_local]; returns [budget] picks."""
  n_local = features.shape[0]
  global_idx = sharding.row_offset(n_local) + jnp.arange(n_local, dtype=jnp.int32)
  all_centres = jax.lax.all_gather(is_centre, DATA_AXIS, tiled=True, to="invarying")
  has_centres = jnp.any(all_centres)
  min_dist = _initial_min_distances(features, all_centres, block)
  min_dist = jnp.where(is_centre, kcenter._TAKEN, min_dist)  # pylint: disable=protected-access
  min_dist = jnp.where(global_idx < num_nodes, min_dist, _PAD)

  def body(t, state):
    _, pick = sharding.global_argmax(state.min_dist)  # first index on ties
    pick = jnp.where((t == 0) & ~has_centres & (first_pick >= 0), first_pick, pick)
    row = sharding.owner_rows(features, pick)
    dist = jnp.minimum(state.min_dist, kcenter.exact_distances(features, row))
    dist = jnp.where(global_idx == pick, kcenter._TAKEN, dist)  # pylint: disable=protected-access
    return kcenter.KCenterState(dist, state.picks.at[t].set(pick))

  state = kcenter.KCenterState(min_dist, jnp.zeros((budget,), jnp.int32))
  return jax.lax.fori_loop(0, budget, body, state).picks


@functools.partial(jax.jit, static_argnames=("budget", "mesh", "block"))
def _greedy_sharded(features, is_centre, first_pick, num_nodes, *, budget, mesh, block):
  local = functools.partial(_local_greedy, budget=budget, block=block)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(), P()),
                       out_specs=P())(features, is_centre, first_pick, num_nodes)


def default_mesh() -> Mesh:
  """A 1-D mesh with axis 'data' over all devices."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))


def k_center_greedy_sharded(features: jax.Array, is_centre: jax.Array, budget: int, *,
                            mesh: Optional[Mesh] = None,
                            key: Optional[jax.Array] = None) -> jax.Array:
  """`kcenter.k_center_greedy` with the node axis sharded over the mesh axis 'data'.

  Same picks, same validation, same cold start: each device keeps N / devices rows of the
  features and of min_dist; the global argmax and the picked row are exchanged with collectives
  (per pick: a scalar `pmax`, a scalar `pmin` and a [dim] `psum`). Memory per device
  O(N / devices * (dim + block)); never an N x N array. One compile per (shape, budget, mesh).

  Args:
    features: [num_nodes, dim] float array (host or device; it is padded to a multiple of the
      number of shards and laid out with `NamedSharding(mesh, P('data'))`).
    is_centre: [num_nodes] bool, the initial centres (labelled nodes).
    budget: static int, number of picks, 1 <= budget <= number of non-centres.
    mesh: a mesh with an axis 'data' (default: 1-D over all devices, `default_mesh()`).
    key: PRNG key for the first centre of a cold start (no centres), as `k_center_greedy`.
  Returns:
    [budget] int32 distinct candidate indices in pick order, replicated over the mesh.
  Raises:
    ValueError: as `k_center_greedy`, or a mesh without a 'data' axis.
  """
  features, is_centre, first_pick = kcenter.validate(features, is_centre, budget, key)
  mesh = default_mesh() if mesh is None else mesh
  num_nodes = features.shape[0]
  num_rows = sharding.padded_rows(num_nodes, mesh)  # ValueError without a 'data' axis
  # Built from host copies, the same on every process: works across processes too.
  features = sharding.shard_rows(mesh, np.asarray(features), num_rows)
  is_centre = sharding.shard_rows(mesh, np.asarray(is_centre), num_rows)
  return _greedy_sharded(features, is_centre, np.asarray(first_pick, np.int32),
                         np.int32(num_nodes), budget=int(budget), mesh=mesh,
                         block=kcenter.CENTRE_BLOCK)
