"""k-medoids with the nodes split over a device mesh (multi-device `kmedoids.k_medoids`).

The same algorithm as `kmedoids` (k-means++ seeding, then FasterPAM eager swaps, matrix-free)
run inside `jax.shard_map` over the 1-D mesh axis 'data'. Every per-node array is split: each
device holds N / P rows of the (centred) features and their squared norms, of the candidate
mask, of the [N, k] distances to the medoids and of the nearest-two tables. Replicated: the [k]
medoids, the candidate visiting order ([N] int32, 4 bytes a node) and the scalars.

* Seeding, per medoid: each shard sums its k-means++ weights; an `all_gather` of the P shard
  totals gives the global total and, by an exclusive prefix, the shard owning the inverse-CDF
  draw, which finds the pick with a local cumsum + searchsorted; a `psum` broadcasts it
  (`kmedoids._seed`'s `last_open` clamp kept). The new medoid's row is broadcast by a `psum` of
  the owner's row and every shard fills its rows of the distance column.
* Swap phase, per block of candidates: their feature rows (and squared norms) are broadcast by
  one `psum` of the owners' rows and each shard computes its [block, N / P] distance tile. Per
  visited candidate the [k] swap gains are local partial sums (`kmedoids._swap_gains`) and one
  `psum`; the slot argmin and the improve test are then the same on every shard, and so is the
  commit of the replicated medoids. The nearest-two update after a swap is local
  (`kmedoids._tables_after_swap`: its lost-node loop runs a per-shard trip count with no
  collective inside); the new TD is a `psum`. Whether the candidate is a medoid is read off the
  replicated [k] medoids (exactly `is_medoid[x]`, with no collective).
* The centring mean and the candidate count are `psum`s; one compiled call per sweep, as
  `k_medoids`, so `on_sweep` still reports each pass.

Results: the algorithm and its decisions are those of `k_medoids`; only sums are taken in
another order (over shards, then across them). In float64 (`jax_enable_x64`) the medoids,
sweeps and swaps equal `k_medoids`' on the same key and the cost agrees to rounding
(tests/test_kmedoids_sharded.py, 8 devices and 2 processes). In float32 a rounding difference
can flip a near-tie (a seeding draw at a CDF boundary, a swap gain at the `rel_tol` threshold,
two equal gains), and the medoids may then differ; the guarantee (swap-optimal on `converged`)
is the same.

N is padded to a multiple of the shards with zero rows that are not candidates: never drawn,
never visited, never counted in TD. Inputs are built from host arrays that are the same on every
process (`sharding.shard_rows`), so this runs across processes too; results come back to every
process's host.
"""

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_seqgcn import checks
from jax_seqgcn.selection import kmedoids
from jax_seqgcn.selection import sharding
from jax_seqgcn.selection.kcenter_sharded import default_mesh
from jax_seqgcn.selection.kmedoids import KMedoidsResult

DATA_AXIS = sharding.DATA_AXIS
HIGHEST = kmedoids.HIGHEST
_ROWS = P(DATA_AXIS)
# pylint: disable=protected-access
_two_nearest = kmedoids._two_nearest
_swap_gains = kmedoids._swap_gains
_tables_after_swap = kmedoids._tables_after_swap
# pylint: enable=protected-access


class _Prepared(NamedTuple):
  features: jax.Array        # [N_pad, d] split, centred on the candidates' mean
  sq_norms: jax.Array        # [N_pad] split
  candidate: jax.Array       # [N_pad] split, False on padding rows
  order: jax.Array           # [N] replicated: candidates first, in a random order
  num_candidates: jax.Array  # int32


class _State(NamedTuple):
  """`kmedoids._SwapState` without `is_medoid` (read off `medoids`), split as noted."""
  medoids: jax.Array     # [k] replicated
  dist: jax.Array        # [N_pad, k] split
  nearest: jax.Array     # [N_pad] split
  d1: jax.Array          # [N_pad] split
  second: jax.Array      # [N_pad] split
  d2: jax.Array          # [N_pad] split
  cost: jax.Array
  start: jax.Array
  sweep: jax.Array
  since_swap: jax.Array
  swaps: jax.Array


_PREPARED_SPECS = _Prepared(_ROWS, _ROWS, _ROWS, P(), P())
_STATE_SPECS = _State(P(), _ROWS, _ROWS, _ROWS, _ROWS, _ROWS, P(), P(), P(), P(), P())


def _distance_rows(features, sq_norms, ids):
  """[len(ids), n_local] distances from the global nodes `ids` to this shard's nodes, exactly 0
  to themselves (`kmedoids._distance_rows` on a shard): the rows and their squared norms are
  broadcast by one `psum` of the owners' rows (the other shards add zeros: exact)."""
  n_local = features.shape[0]
  offset = sharding.row_offset(n_local)
  local = ids - offset
  owned = (local >= 0) & (local < n_local)
  local = jnp.clip(local, 0, n_local - 1)
  packed = jnp.concatenate([features[local], sq_norms[local][:, None]], axis=1)
  packed = jax.lax.psum(jnp.where(owned[:, None], packed, 0.0), DATA_AXIS)
  rows, sq_rows = packed[:, :-1], packed[:, -1]
  gram = jnp.matmul(rows, features.T, precision=HIGHEST)
  sq = sq_rows[:, None] + sq_norms[None, :] - 2.0 * gram
  dist = jnp.sqrt(jnp.maximum(sq, 0.0))
  return jnp.where(offset + jnp.arange(n_local)[None, :] == ids[:, None], 0.0, dist)


def _draw(weight, open_, target_fraction):
  """The inverse-CDF pick of `kmedoids._seed` over the split weights (open candidates' only;
  all open ones alike when no weight is left): a global int32 index, the same on every shard."""
  n_local = weight.shape[0]
  offset = sharding.row_offset(n_local)
  shard = jax.lax.axis_index(DATA_AXIS)
  cumulative = jnp.stack([jnp.cumsum(weight), jnp.cumsum(open_.astype(weight.dtype))])
  totals = jax.lax.all_gather(cumulative[:, -1], DATA_AXIS, to="invarying")  # [P, 2]
  inclusive = jnp.cumsum(totals, axis=0)
  # Only duplicates of the medoids are left (every weight 0): draw uniformly among them.
  by_weight = inclusive[-1, 0] > 0
  inclusive = jnp.where(by_weight, inclusive[:, 0], inclusive[:, 1])
  cumulative = jnp.where(by_weight, cumulative[0], cumulative[1])
  positive = jnp.where(by_weight, weight > 0, open_)
  target = target_fraction * inclusive[-1]
  past = inclusive > target
  owner = jnp.argmax(past)  # the first shard whose cumulative weight exceeds the target
  exclusive = jnp.concatenate([jnp.zeros((1,), inclusive.dtype), inclusive[:-1]])
  local = jnp.searchsorted(exclusive[shard] + cumulative, target, side="right")
  # Rounding between the shard's total and its own cumsum: stay on a positive weight.
  local = jnp.minimum(local, jnp.max(jnp.where(positive, jnp.arange(n_local), 0)))
  pick = jax.lax.psum(jnp.where(shard == owner, offset + local, 0), DATA_AXIS)
  last_open = jax.lax.pmax(jnp.max(jnp.where(open_, offset + jnp.arange(n_local), -1)), DATA_AXIS)
  # As `jnp.searchsorted` past the end, clamped to the last open candidate (kmedoids._seed).
  return jnp.minimum(jnp.where(jnp.any(past), pick, last_open), last_open).astype(jnp.int32)


def _seed(draws, features, sq_norms, candidate, k):
  """`kmedoids._seed` on a shard: medoids [k] (replicated), local dist [n_local, k]."""
  n_local = features.shape[0]

  def body(t, state):
    medoids, dist, min_dist, is_medoid = state
    open_ = candidate & ~is_medoid
    weight = jnp.where(jnp.isinf(min_dist), 1.0, jnp.square(min_dist))
    pick = _draw(jnp.where(open_, weight, 0.0), open_, draws[t])
    row = _distance_rows(features, sq_norms, pick[None])[0]
    mine = sharding.row_offset(n_local) + jnp.arange(n_local) == pick
    return (medoids.at[t].set(pick), dist.at[:, t].set(row), jnp.minimum(min_dist, row),
            is_medoid | mine)

  state = (jnp.zeros((k,), jnp.int32), sharding.varying(jnp.zeros((n_local, k), features.dtype)),
           sharding.varying(jnp.full((n_local,), jnp.inf, features.dtype)),
           sharding.varying(jnp.zeros((n_local,), bool)))
  medoids, dist, _, _ = jax.lax.fori_loop(0, k, body, state)
  return medoids, dist


def _local_setup(draws, features, candidate, *, k, num_nodes):
  """`kmedoids._setup` on a shard."""
  weights = candidate.astype(features.dtype)
  mean = (jax.lax.psum(jnp.matmul(weights, features, precision=HIGHEST), DATA_AXIS)
          / jax.lax.psum(jnp.sum(weights), DATA_AXIS))
  features = features - mean
  sq_norms = jnp.sum(jnp.square(features), axis=-1)
  every = jax.lax.all_gather(candidate, DATA_AXIS, tiled=True, to="invarying")[:num_nodes]
  order = jnp.argsort(jnp.where(every, draws[:num_nodes], 2.0)).astype(jnp.int32)
  medoids, dist = _seed(draws[num_nodes:], features, sq_norms, candidate, k)
  nearest, d1, second, d2 = _two_nearest(dist)
  cost = jax.lax.psum(jnp.sum(jnp.where(candidate, d1, 0.0)), DATA_AXIS)
  num_candidates = jax.lax.psum(jnp.sum(candidate, dtype=jnp.int32), DATA_AXIS)
  zero = jnp.int32(0)
  return (_Prepared(features, sq_norms, candidate, order, num_candidates),
          _State(medoids, dist, nearest, d1, second, d2, cost, zero, zero, zero, zero))


@functools.partial(jax.jit, static_argnames=("k", "num_nodes", "mesh", "key_impl"))
def _setup(key_data, features, candidate, *, k, num_nodes, mesh, key_impl):
  draws = jax.random.uniform(sharding.from_key_parts(key_data, key_impl), (num_nodes + k,))
  local = functools.partial(_local_setup, k=k, num_nodes=num_nodes)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), _ROWS, _ROWS),
                       out_specs=(_PREPARED_SPECS, _STATE_SPECS))(draws, features, candidate)


def _local_sweep(prepared, state, max_sweeps, rel_tol, *, k, block, chunk):
  """`kmedoids._sweep` on a shard: the same blocks, visits and decisions."""
  features, sq_norms, candidate, order, num_candidates = prepared
  block = min(block, order.shape[0])

  def running(s):
    return (s.since_swap < num_candidates) & (s.sweep < max_sweeps)

  def visit_block(s):
    rows = jnp.take(order, s.start + jnp.arange(block), mode="clip")
    tile = _distance_rows(features, sq_norms, rows)

    def visit(b, s):
      x, dx = rows[b], tile[b]
      active = (s.start + b < num_candidates) & running(s)
      unchanged = (jnp.int32(0), jnp.bool_(False), (s.nearest, s.d1, s.second, s.d2), s.cost)

      def try_swap(_):
        gains = jax.lax.psum(_swap_gains(s, candidate, dx, k), DATA_AXIS)
        slot = jnp.argmin(gains).astype(jnp.int32)
        improves = gains[slot] < -rel_tol * s.cost

        def swap(_):
          tables = _tables_after_swap(s, candidate, slot, dx, chunk)
          cost = jax.lax.psum(jnp.sum(jnp.where(candidate, tables[1], 0.0)), DATA_AXIS)
          return slot, improves, tables, cost

        return jax.lax.cond(improves, swap, lambda _: unchanged, None)

      slot, improves, tables, cost = jax.lax.cond(active & ~jnp.any(s.medoids == x), try_swap,
                                                  lambda _: unchanged, None)
      # The commit outside any conditional (as `kmedoids._commit_swap`): no copy of `dist`.
      nearest, d1, second, d2 = tables
      s = s._replace(
          medoids=s.medoids.at[slot].set(jnp.where(improves, x, s.medoids[slot])),
          dist=s.dist.at[:, slot].set(jnp.where(improves, dx, s.dist[:, slot])),
          nearest=nearest, d1=d1, second=second, d2=d2, cost=cost,
          swaps=s.swaps + improves.astype(jnp.int32))
      return s._replace(since_swap=jnp.where(improves, 0, s.since_swap + active.astype(jnp.int32)))

    s = jax.lax.fori_loop(0, block, visit, s)
    wraps = s.start + block >= num_candidates
    return s._replace(start=jnp.where(wraps, 0, s.start + block),
                      sweep=s.sweep + wraps.astype(jnp.int32))

  return jax.lax.while_loop(running, visit_block, state)


@functools.partial(jax.jit, static_argnames=("k", "block", "chunk", "mesh"), donate_argnums=(1,))
def _sweep(prepared, state, max_sweeps, rel_tol, *, k, block, chunk, mesh):
  local = functools.partial(_local_sweep, k=k, block=block, chunk=chunk)
  return jax.shard_map(local, mesh=mesh, in_specs=(_PREPARED_SPECS, _STATE_SPECS, P(), P()),
                       out_specs=_STATE_SPECS)(prepared, state, max_sweeps, rel_tol)


@jax.jit
def _row_flags(rows):
  """Per row: all finite, all within float32 range (for `checks.finite_rows`' messages)."""
  finite = jnp.all(jnp.isfinite(rows), axis=1)
  return finite, jnp.all(jnp.abs(rows) <= checks.FLOAT32_MAX, axis=1) | ~finite


def _check_rows(rows, num_nodes, name="features"):
  """`checks.finite_rows` of split rows, from two [N] flags gathered to the host."""
  finite, inside = (sharding.to_host(f)[:num_nodes] for f in _row_flags(rows))
  if not (finite.all() and inside.all()):
    # One float64 value per row with the row's fault (float32 rows are never out of range).
    checks.finite_rows(np.where(finite, np.where(inside, 0.0, 1e300), np.nan)[:, None], name)


def k_medoids_rows(key: jax.Array, rows: jax.Array, candidate_rows: jax.Array, num_nodes: int,
                   k: int, *, mesh: Mesh, max_sweeps: int = kmedoids.DEFAULT_MAX_SWEEPS,
                   rel_tol: float = kmedoids.DEFAULT_REL_TOL, block: int = kmedoids.SWAP_BLOCK,
                   on_sweep: Optional[Callable[[int, float, int], None]] = None) -> KMedoidsResult:
  """`k_medoids_sharded` of rows already split over `mesh` (e.g. FeatProp's propagated features).

  Args:
    rows: [N_pad, dim] float global array split over 'data' (`sharding.shard_rows`), N_pad a
      multiple of the shards; rows past `num_nodes` are padding (their values are not used).
    candidate_rows: [N_pad] bool, laid out the same way, False on padding rows.
    num_nodes: N, the real rows.
    key, k, mesh, max_sweeps, rel_tol, block, on_sweep: as `k_medoids_sharded`.
  Returns:
    as `k_medoids_sharded`.
  Raises:
    ValueError: non-finite rows, bad k or options.
  """
  _check_rows(rows, num_nodes)
  num_candidates = int(sharding.to_host(jnp.sum(candidate_rows, dtype=jnp.int32)))
  kmedoids.check_options(num_candidates, k, max_sweeps, rel_tol, block)
  key_data, key_impl = sharding.key_parts(key)
  prepared, state = _setup(key_data, rows, candidate_rows, k=int(k), num_nodes=int(num_nodes),
                           mesh=mesh, key_impl=key_impl)
  tol = np.asarray(rel_tol, rows.dtype)

  def host(s):
    since, sweep, start, cost, swaps = (sharding.to_host(v) for v in
                                        (s.since_swap, s.sweep, s.start, s.cost, s.swaps))
    return int(since), int(sweep) + int(start > 0), int(sweep), float(cost), int(swaps)

  since, sweeps, sweep, cost, swaps = host(state)
  # One compiled call per sweep, as `k_medoids`, so a long phase reports after each pass.
  while since < num_candidates and sweep < max_sweeps:
    state = _sweep(prepared, state, np.int32(sweep + 1), tol, k=int(k), block=int(block),
                   chunk=kmedoids.LOST_CHUNK, mesh=mesh)
    since, sweeps, sweep, cost, swaps = host(state)
    if on_sweep is not None:
      on_sweep(sweeps, cost, swaps)
  return KMedoidsResult(sharding.to_host(state.medoids), sharding.to_host(state.cost),
                        np.int32(sweeps), np.int32(swaps), np.bool_(since >= num_candidates))


def k_medoids_sharded(key: jax.Array, features, candidate_mask, k: int, *,
                      mesh: Optional[Mesh] = None, max_sweeps: int = kmedoids.DEFAULT_MAX_SWEEPS,
                      rel_tol: float = kmedoids.DEFAULT_REL_TOL, block: int = kmedoids.SWAP_BLOCK,
                      on_sweep: Optional[Callable[[int, float, int], None]] = None
                      ) -> KMedoidsResult:
  """`kmedoids.k_medoids` with the nodes split over the mesh axis 'data'.

  Same validation, same algorithm and (in float64) the same medoids; each device holds N / P
  rows of the features and of the [N, k] distances, plus the [block, N / P] tile of a block of
  swap candidates. Per visited candidate one [k] `psum` (the gains), per applied swap one scalar
  `psum` (TD), per block one [block, dim + 1] `psum` (the candidates' rows). One compile per
  (shape, k, block, mesh). See the module docstring for float32.

  Args:
    key: PRNG key (the same on every process).
    features: [num_nodes, dim] host (or device) array, the same on every process; checked on
      the host and laid out with `NamedSharding(mesh, P('data'))`, padded to a multiple of the
      shards (no device receives the whole array).
    candidate_mask: [num_nodes] bool, the nodes that count in TD and may become medoids.
    k: int, number of medoids, 1 <= k <= number of candidates.
    mesh: a mesh with an axis 'data' (default: 1-D over all devices).
    max_sweeps, rel_tol, block, on_sweep: as `k_medoids`.
  Returns:
    `KMedoidsResult` of NumPy values (medoids [k] int32, cost, sweeps, swaps, converged), the
    same on every process.
  Raises:
    ValueError: as `k_medoids`, or a mesh without an axis 'data'.
  """
  features = np.asarray(checks.numeric(features, "features"))
  if features.ndim != 2 or 0 in features.shape:
    checks.features(features)  # its ValueError for the shape
  dtype = checks.features(features[:1]).dtype  # float32, or float64 under x64
  checks.finite_rows(features, "features")
  features = features.astype(dtype, copy=False)
  num_nodes = features.shape[0]
  candidate_mask = np.asarray(checks.mask(candidate_mask, num_nodes, name="candidate_mask"))
  kmedoids.check_options(int(candidate_mask.sum()), k, max_sweeps, rel_tol, block)
  mesh = default_mesh() if mesh is None else mesh
  num_rows = sharding.padded_rows(num_nodes, mesh)  # ValueError without a 'data' axis
  return k_medoids_rows(key, sharding.shard_rows(mesh, features, num_rows),
                        sharding.shard_rows(mesh, candidate_mask, num_rows), num_nodes, k,
                        mesh=mesh, max_sweeps=max_sweeps, rel_tol=rel_tol, block=block,
                        on_sweep=on_sweep)
