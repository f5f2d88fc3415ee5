"""BADGE's k-means++ seeding with the nodes split over a device mesh (`badge.kmeans_pp_seeding`).

The node arrays (features [N, D], probabilities [N, C], the available mask and the running min
D^2) are split over the 1-D mesh axis 'data' with `jax.shard_map`: each device holds N / devices
rows, and the gradient factors (`badge.gradient_factors`) are computed per row, on the device
that holds the row. Per pick:

1. the previous centre's residual [C], features [D] and |g|^2 are broadcast with a `psum` of
   the owner's row (the other shards add zeros: exact);
2. every shard updates its local min D^2 (`badge.sq_distances_to_row`);
3. the D^2 draw without a global cumulative sum: each shard's total weight (the end of its local
   cumsum) is all-gathered, the target u * total uses the single-device uniform
   (`jax.random.uniform(jax.random.fold_in(key, t))`), the owning shard is the first whose
   inclusive prefix of the shard totals exceeds the target, and that shard alone searches its
   local cumsum offset by the exclusive prefix; the pick is broadcast with a `psum`.

Same semantics as the single-device seeding: the first centre is the unlabelled node with the
largest |g|^2 (first index on ties, by `pmax` then `pmin` of the indices); labelled and picked
nodes weigh 0; when every weight is 0 the draw is uniform among the available nodes; and when
u * total rounds up to the total, the last node with positive weight is taken. Padding rows
(N rounded up to a multiple of the device count) are never available, so never picked.

Exactness: each row's factors and distances do not depend on the split, but the cumulative
weights are summed in another order (per shard, then shard offsets), so a draw whose target
falls within rounding of a boundary between two nodes can pick the neighbour. In float64
(`jax_enable_x64`) that is ~1e-16 of the mass per draw and the picks equal `badge`'s on the same
key (tests/test_samplers_sharded.py); in float32 (~1e-7 of the mass per draw) they may differ
where that summation order flips a draw, after which the two sequences diverge.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_seqgcn.samplers import badge
from jax_seqgcn.samplers import base
from jax_seqgcn.samplers import uncertainty
from jax_seqgcn.selection import sharding

DATA_AXIS = sharding.DATA_AXIS


class BadgeRows(NamedTuple):
  """BADGE's node arrays laid out over a mesh (`layout`), each split over the axis 'data'.

  Attributes:
    features: [N_pad, D] penultimate-layer features (zero rows past N).
    probabilities: [N_pad, C] softmax outputs (zero rows past N).
    available: [N_pad] bool, unlabelled (False for labelled and padding rows).
  """
  features: jax.Array
  probabilities: jax.Array
  available: jax.Array


def layout(features, probabilities, labelled_mask, mesh: Mesh) -> BadgeRows:
  """The node arrays as the sharded seeding reads them: N padded to a multiple of the mesh's
  'data' shards, each device's block copied from the host arrays alone.

  Args:
    features: [N, D] host (or device) array, the same on every process.
    probabilities: [N, C].
    labelled_mask: [N] bool.
    mesh: a mesh with an axis 'data'.
  Returns:
    `BadgeRows` of global arrays, sharded `NamedSharding(mesh, P('data'))`.
  Raises:
    ValueError: a mesh without an axis 'data'.
  """
  num_nodes = np.shape(labelled_mask)[0]
  num_rows = sharding.padded_rows(num_nodes, mesh)
  return BadgeRows(sharding.shard_rows(mesh, np.asarray(features), num_rows),
                   sharding.shard_rows(mesh, np.asarray(probabilities), num_rows),
                   sharding.shard_rows(mesh, ~np.asarray(labelled_mask, bool), num_rows))


def draw_proportional_sharded(key: jax.Array, weights: jax.Array) -> jax.Array:
  """`badge.draw_proportional` over row-split weights, inside `shard_map` over 'data'.

  No global cumulative sum: the P shard totals are all-gathered, the shard whose inclusive
  prefix first exceeds u * total owns the draw and searches its local cumsum (plus the exclusive
  prefix); the index is broadcast with a `psum` (module docstring).

  Args:
    key: PRNG key (the same on every shard).
    weights: [n_local] this shard's weights (>= 0; a positive total over all shards).
  Returns:
    int32 global index, the same on every shard; never one of weight 0.
  """
  num_local = weights.shape[0]
  cdf = jnp.cumsum(weights)
  totals = jax.lax.all_gather(cdf[-1], DATA_AXIS, to="invarying")  # [P]
  inclusive = jnp.cumsum(totals)
  exclusive = jnp.concatenate([jnp.zeros((1,), inclusive.dtype), inclusive[:-1]])
  target = jax.random.uniform(key, dtype=cdf.dtype) * inclusive[-1]
  owner = jnp.searchsorted(inclusive, target, side="right")
  # u * total can round up to the total: the last shard with positive weight, whose local
  # search below then falls back to its last positive index (as `jnp.argmax(cdf)` on one device).
  num_shards = totals.shape[0]
  owner = jnp.where(owner < num_shards, owner,
                    num_shards - 1 - jnp.argmax(totals[::-1] > 0.0))
  me = jax.lax.axis_index(DATA_AXIS)
  local = jnp.searchsorted(exclusive[me] + cdf, target, side="right")
  local = jnp.where(local < num_local, local, jnp.argmax(cdf)).astype(jnp.int32)
  pick = jnp.where(me == owner, sharding.row_offset(num_local) + local, 0)
  return jax.lax.psum(pick, DATA_AXIS).astype(jnp.int32)


def _local_seeding(features, probabilities, available, key_data, *, key_impl, budget):
  """Per-device body: [n_local, D], [n_local, C], [n_local] bool -> [budget] picks."""
  key = sharding.from_key_parts(key_data, key_impl)
  num_local = features.shape[0]
  offset = sharding.row_offset(num_local)
  global_idx = offset + jnp.arange(num_local, dtype=jnp.int32)
  factors = badge.gradient_factors(features, probabilities)
  _, first = sharding.global_argmax(jnp.where(available, factors.sq_norms, -jnp.inf))

  def body(t, state):
    centre = state.picks[t - 1]
    sq_dist = jnp.minimum(state.min_sq_dist, badge.sq_distances_to_row(
        factors, sharding.owner_rows(factors.residual, centre),
        sharding.owner_rows(factors.features, centre),
        sharding.owner_rows(factors.sq_norms, centre)))
    weights = jnp.where(state.available, sq_dist, 0.0)
    any_weight = jax.lax.psum(jnp.sum(weights), DATA_AXIS) > 0.0
    weights = jnp.where(any_weight, weights, state.available.astype(weights.dtype))
    pick = draw_proportional_sharded(jax.random.fold_in(key, t), weights)
    return badge.BadgeState(sq_dist, state.available & (global_idx != pick),
                            state.picks.at[t].set(pick))

  state = badge.BadgeState(
      min_sq_dist=sharding.varying(jnp.full((num_local,), jnp.inf, factors.sq_norms.dtype)),
      available=available & (global_idx != first),
      picks=jnp.zeros((budget,), jnp.int32).at[0].set(first))
  return jax.lax.fori_loop(1, budget, body, state).picks


@functools.partial(jax.jit, static_argnames=("key_impl", "budget", "mesh"))
def _seeding_sharded(rows: BadgeRows, key_data, *, key_impl, budget, mesh):
  local = functools.partial(_local_seeding, key_impl=key_impl, budget=budget)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS),) * 3 + (P(),),
                       out_specs=P())(*rows, key_data)


def kmeans_pp_seeding_sharded(key: jax.Array, features, probabilities, labelled_mask, *,
                              budget: int, mesh: Optional[Mesh] = None) -> jax.Array:
  """`badge.kmeans_pp_seeding` with the nodes split over `mesh`'s axis 'data' (unchecked).

  Memory per device O(N / devices * (D + C)); per pick a [C] + [D] + scalar `psum`, a [P]
  `all_gather` and two scalar collectives. One compile per (shapes, budget, mesh, key type).

  Args:
    key: PRNG key for the D^2 draws (typed or raw).
    features: [N, D] penultimate-layer features (host or device; the same on every process).
    probabilities: [N, C] softmax outputs.
    labelled_mask: [N] bool.
    budget: static int, 1 <= budget <= number of unlabelled nodes.
    mesh: a mesh with an axis 'data' (default: 1-D over all devices).
  Returns:
    [budget] int32 node indices in pick order, the same on every process (module docstring for
    when they can differ from `badge.kmeans_pp_seeding`'s).
  """
  mesh = jax.make_mesh((jax.device_count(),), (DATA_AXIS,)) if mesh is None else mesh
  rows = layout(features, probabilities, labelled_mask, mesh)
  key_data, key_impl = sharding.key_parts(key)
  picks = _seeding_sharded(rows, key_data, key_impl=key_impl, budget=int(budget), mesh=mesh)
  return jnp.asarray(sharding.to_host(picks))


def badge_sharded(key: jax.Array, features, probabilities, labelled_mask, budget: int, *,
                  mesh: Optional[Mesh] = None) -> jax.Array:
  """`badge.badge` with the nodes split over `mesh`'s axis 'data': same validation, and the
  same picks in float64 (module docstring for float32).

  Args:
    key: PRNG key for the D^2 draws (the first pick is deterministic).
    features: [N, D] penultimate-layer features of the learner (eval mode).
    probabilities: [N, C] the learner's softmax outputs, C >= 2.
    labelled_mask: [N] bool; labelled nodes are never picked and are not centres.
    budget: number of picks, 1 <= budget <= number of unlabelled nodes.
    mesh: a mesh with an axis 'data' (default: 1-D over all devices).
  Returns:
    [budget] int32 distinct unlabelled node indices, in pick order.
  Raises:
    ValueError: missing or malformed features or probabilities, a bad mask or budget, a mesh
      without an axis 'data'.
  """
  uncertainty.check_probabilities(probabilities, "BADGE")
  pool = base.validate_pool(
      base.Pool(labelled_mask, features=features, probabilities=probabilities), budget,
      ("features", "probabilities"), name="BADGE")
  return kmeans_pp_seeding_sharded(key, pool.features, pool.probabilities, pool.labelled_mask,
                                   budget=int(budget), mesh=mesh)
