"""k-medoids by k-means++ seeding and FasterPAM swaps (Schubert & Rousseeuw 2021), matrix-free.

`k_medoids` picks `k` candidate nodes (the medoids) minimising the k-medoids cost
TD = sum over candidates o of the Euclidean distance from o to its nearest medoid. It never forms
an N x N matrix; the largest arrays are [N, k] (distances of every node to the current medoids)
and [block, N] (distances of a block of swap candidates to every node).

Algorithm:

1. Seeding, k-means++ style: the first medoid is a uniform candidate, each next one a candidate
   drawn with probability proportional to its squared distance to the nearest medoid so far
   (duplicates of a medoid are never drawn while another candidate is left). k distance rows,
   O(k N d).
2. Swap phase, FasterPAM: visit the non-medoid candidates x in a random (key) order; for each,
   the change of TD for swapping x with *every* medoid comes from one distance row d(., x) in
   O(N + k), using each node's nearest and second-nearest medoid: nodes closer to x than to
   their nearest medoid gain d(o, x) - d1(o) whichever medoid leaves; the others lose
   min(d(o, x), d2(o)) - d1(o) only when their nearest medoid leaves (a segment sum over it).
   The best swap for x is applied at once if it lowers TD (eager swapping); the nearest-two
   bookkeeping is then updated in O(N) plus O(k) for each node whose nearest or second-nearest
   medoid left. The phase ends when a full pass over the candidates since the last swap finds
   no improving swap, or after `max_sweeps` passes.

The alternating (Voronoi) medoid update is not run: it needs within-cluster distance matrices of
dynamic size, and every Voronoi update is itself a single swap (medoid -> point of its cluster)
whose TD gain is at least the cluster's, so a swap-optimal result is also Voronoi-stable.

Cost: one sweep over M candidates computes their [M, N] distances to every node block by block
as matrix products (O(M N d), the dominant term, at matrix-multiply speed) and O(M (N + k)) gain
work, plus O(N + k L) per applied swap, L the nodes whose nearest or second-nearest medoid left
(~2 N / k on average). Seeding costs O(k N d) in k matrix-vector products. Memory
O((k + block) N + N d). Measured on 2 shared CPU cores: N = 11,000, d = 512, k = 1,000 takes
~3 s seeding and ~2-5 s per sweep (most swaps happen in the first), converging in 3-4 sweeps.

Guarantee: on return with `converged`, no single swap of a medoid with a non-medoid candidate
lowers TD by more than `rel_tol` x TD (a local optimum of the swap neighbourhood, as PAM's; TD is
evaluated on float32 distances from the Gram expansion of mean-centred features, so "lowers"
means beyond that rounding). With `converged` False the sweep cap was hit: the medoids are the
seeding improved by every swap made so far, with no optimality claim. Each applied swap lowers
TD, so no medoid set repeats and the phase always terminates.
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jax_seqgcn import checks

# Swap candidates whose distance rows are computed in one matrix product.
SWAP_BLOCK = 256
# After a swap, the nodes that lost a medoid are re-examined this many at a time (~2 N / k of
# them on average).
LOST_CHUNK = 32
DEFAULT_MAX_SWEEPS = 10
# A swap must lower the cost by more than this fraction of it: float32 rounding of the gains
# must not make the phase swap back and forth.
DEFAULT_REL_TOL = 1e-6
# Full float32 products on every backend (TPU: not bfloat16 passes); see selection/__init__.py.
HIGHEST = jax.lax.Precision.HIGHEST


class KMedoidsResult(NamedTuple):
  """Output of `k_medoids`.

  Attributes:
    medoids: [k] int32 distinct candidate indices.
    cost: scalar, sum over candidates of the distance to the nearest medoid.
    sweeps: int32, passes over the candidates made by the swap phase (the last may be partial).
    swaps: int32, swaps applied.
    converged: bool, True if a full pass found no improving swap (False: the cap was hit).
  """
  medoids: jax.Array
  cost: jax.Array
  sweeps: jax.Array
  swaps: jax.Array
  converged: jax.Array


class _SwapState(NamedTuple):
  medoids: jax.Array     # [k] node indices
  is_medoid: jax.Array   # [N] bool
  dist: jax.Array        # [N, k] distance of every node to each medoid
  nearest: jax.Array     # [N] slot of the nearest medoid
  d1: jax.Array          # [N] distance to it
  second: jax.Array      # [N] slot of the second nearest (any slot when k = 1)
  d2: jax.Array          # [N] distance to it (+inf when k = 1)
  cost: jax.Array        # scalar TD
  start: jax.Array       # position in `order` of the current block
  sweep: jax.Array       # completed passes
  since_swap: jax.Array  # candidates visited since the last swap
  swaps: jax.Array


def _distance_rows(features, sq_norms, rows):
  """[len(rows), N] Euclidean distances from nodes `rows` to every node, exactly 0 to itself."""
  gram = jnp.matmul(features[rows], features.T, precision=HIGHEST)
  sq = sq_norms[rows][:, None] + sq_norms[None, :] - 2.0 * gram
  dist = jnp.sqrt(jnp.maximum(sq, 0.0))
  return dist.at[jnp.arange(rows.shape[0]), rows].set(0.0)


def _two_nearest(dist):
  """Nearest and second-nearest medoid slot and distance for each row of [n, k] `dist`."""
  slots = jnp.arange(dist.shape[1])[None, :]
  nearest = jnp.argmin(dist, axis=1).astype(jnp.int32)
  other = jnp.where(slots == nearest[:, None], jnp.inf, dist)
  second = jnp.argmin(other, axis=1).astype(jnp.int32)
  return nearest, jnp.min(dist, axis=1), second, jnp.min(other, axis=1)


def _seed(draws, features, sq_norms, candidate, k):
  """k-means++ seeding among the candidates from k uniform `draws`: medoids [k], dist [N, k]."""
  n = features.shape[0]
  positions = jnp.arange(n)

  def body(t, state):
    medoids, dist, min_dist, is_medoid = state
    open_ = candidate & ~is_medoid
    weight = jnp.where(jnp.isinf(min_dist), 1.0, jnp.square(min_dist))
    weight = jnp.where(open_, weight, 0.0)
    # Only duplicates of the medoids are left: draw uniformly among them.
    weight = jnp.where(jnp.sum(weight) > 0, weight, open_.astype(weight.dtype))
    # Inverse-CDF draw (one PRNG call for the whole program keeps compilation short); the
    # first index whose cumulative weight exceeds the draw has weight > 0, so it is open.
    cumulative = jnp.cumsum(weight)
    pick = jnp.searchsorted(cumulative, draws[t] * cumulative[-1], side="right")
    last_open = jnp.max(jnp.where(open_, positions, -1))
    pick = jnp.minimum(pick, last_open).astype(jnp.int32)
    row = _distance_rows(features, sq_norms, pick[None])[0]
    return (medoids.at[t].set(pick), dist.at[:, t].set(row), jnp.minimum(min_dist, row),
            is_medoid.at[pick].set(True))

  state = (jnp.zeros((k,), jnp.int32), jnp.zeros((n, k), features.dtype),
           jnp.full((n,), jnp.inf, features.dtype), jnp.zeros((n,), bool))
  medoids, dist, _, is_medoid = jax.lax.fori_loop(0, k, body, state)
  return medoids, dist, is_medoid


def _swap_gains(state, candidate, dx, k):
  """[k] change of TD for swapping each medoid slot with the node whose distance row is dx."""
  closer = dx < state.d1
  shared = jnp.sum(jnp.where(candidate & closer, dx - state.d1, 0.0))
  lost = jnp.where(candidate & ~closer, jnp.minimum(dx, state.d2) - state.d1, 0.0)
  return shared + jax.ops.segment_sum(lost, state.nearest, num_segments=k)


def _tables_after_swap(state, candidate, slot, dx, chunk):
  """Nearest-two tables (nearest, d1, second, d2) after medoid `slot` is replaced by a node
  with distance row dx; reads `state.dist` (still the old row at `slot`) without writing it."""
  n = dx.shape[0]
  # Nodes that keep both their medoids only compare them with the new one.
  closer = dx < state.d1
  closer_than_second = ~closer & (dx < state.d2)
  compared = (jnp.where(closer, slot, state.nearest), jnp.where(closer, dx, state.d1),
              jnp.where(closer, state.nearest,
                        jnp.where(closer_than_second, slot, state.second)),
              jnp.where(closer, state.d1, jnp.where(closer_than_second, dx, state.d2)))
  # Nodes that lost their nearest or second nearest medoid look at every medoid again, `chunk`
  # rows of the node-major table at a time: O(k) work per such node, as in FasterPAM.
  lost = candidate & ((state.nearest == slot) | (state.second == slot))
  rank = jnp.cumsum(lost) - 1
  # Their indices packed first, padded with n (dropped by the scatters below).
  packed = jnp.full((n + chunk,), n, jnp.int32).at[jnp.where(lost, rank, n + chunk)].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop")

  def update(i, tables):
    idx = jax.lax.dynamic_slice(packed, (i * chunk,), (chunk,))
    rows = jnp.take(state.dist, idx, axis=0, mode="clip")
    fresh = _two_nearest(rows.at[:, slot].set(jnp.take(dx, idx, mode="clip")))
    return tuple(v.at[idx].set(u, mode="drop") for v, u in zip(tables, fresh))

  num_chunks = (jnp.sum(lost) + chunk - 1) // chunk
  return jax.lax.fori_loop(0, num_chunks, update, compared)


def _commit_swap(state, candidate, slot, x, dx, tables, improves):
  """The state with medoid `slot` replaced by node `x` if `improves`, else unchanged.

  Called outside any conditional: written inside one, the [N, k] `dist` would be copied.
  """
  old = state.medoids[slot]
  nearest, d1, second, d2 = tables
  return state._replace(
      medoids=state.medoids.at[slot].set(jnp.where(improves, x, old)),
      is_medoid=state.is_medoid.at[old].set(~improves).at[x].set(improves | state.is_medoid[x]),
      dist=state.dist.at[:, slot].set(jnp.where(improves, dx, state.dist[:, slot])),
      nearest=nearest, d1=d1, second=second, d2=d2,
      cost=jnp.where(improves, jnp.sum(jnp.where(candidate, d1, 0.0)), state.cost),
      swaps=state.swaps + improves.astype(jnp.int32))


def _apply_swap(state, candidate, slot, x, dx, chunk=LOST_CHUNK):
  """Replaces medoid `slot` by node `x` (distance row dx) and updates the nearest-two tables."""
  tables = _tables_after_swap(state, candidate, slot, dx, chunk)
  return _commit_swap(state, candidate, slot, x, dx, tables, jnp.bool_(True))


class _Prepared(NamedTuple):
  features: jax.Array        # [N, d] centred on the candidates' mean
  sq_norms: jax.Array        # [N]
  order: jax.Array           # [N] candidates first, in a random order
  num_candidates: jax.Array  # int32


def _setup(key, features, candidate, *, k):
  """The swap phase's fixed inputs and its state after seeding."""
  n = features.shape[0]
  draws = jax.random.uniform(key, (n + k,))
  # Centring shrinks |x|^2 against |x - y|^2: less cancellation in the Gram expansion.
  weights = candidate.astype(features.dtype)
  features = features - jnp.matmul(weights, features, precision=HIGHEST) / jnp.sum(weights)
  sq_norms = jnp.sum(jnp.square(features), axis=-1)
  # Candidates first, in a random order.
  order = jnp.argsort(jnp.where(candidate, draws[:n], 2.0)).astype(jnp.int32)
  medoids, dist, is_medoid = _seed(draws[n:], features, sq_norms, candidate, k)
  nearest, d1, second, d2 = _two_nearest(dist)
  zero = jnp.int32(0)
  state = _SwapState(medoids, is_medoid, dist, nearest, d1, second, d2,
                     jnp.sum(jnp.where(candidate, d1, 0.0)), zero, zero, zero, zero)
  return _Prepared(features, sq_norms, order, jnp.sum(candidate).astype(jnp.int32)), state


def _sweep(prepared, candidate, state, max_sweeps, rel_tol, *, k, block, chunk=LOST_CHUNK):
  """Swap-phase blocks until convergence or until `max_sweeps` (traced) passes are complete;
  `k_medoids` passes one more than done so far, to report after each pass."""
  features, sq_norms, order, num_candidates = prepared
  block = min(block, features.shape[0])

  def running(s):
    return (s.since_swap < num_candidates) & (s.sweep < max_sweeps)

  def visit_block(s):
    rows = jnp.take(order, s.start + jnp.arange(block), mode="clip")
    tile = _distance_rows(features, sq_norms, rows)

    def visit(b, s):
      x, dx = rows[b], tile[b]
      active = (s.start + b < num_candidates) & running(s)
      unchanged = (jnp.int32(0), jnp.bool_(False), (s.nearest, s.d1, s.second, s.d2))

      def try_swap(_):
        gains = _swap_gains(s, candidate, dx, k)
        slot = jnp.argmin(gains).astype(jnp.int32)
        improves = gains[slot] < -rel_tol * s.cost
        return jax.lax.cond(
            improves,
            lambda _: (slot, improves, _tables_after_swap(s, candidate, slot, dx, chunk)),
            lambda _: unchanged, None)

      slot, improves, tables = jax.lax.cond(active & ~s.is_medoid[x], try_swap,
                                            lambda _: unchanged, None)
      s = _commit_swap(s, candidate, slot, x, dx, tables, improves)
      return s._replace(since_swap=jnp.where(improves, 0, s.since_swap + active.astype(jnp.int32)))

    s = jax.lax.fori_loop(0, block, visit, s)
    wraps = s.start + block >= num_candidates
    return s._replace(start=jnp.where(wraps, 0, s.start + block),
                      sweep=s.sweep + wraps.astype(jnp.int32))

  return jax.lax.while_loop(running, visit_block, state)


def _result(state, num_candidates):
  sweeps = state.sweep + (state.start > 0).astype(jnp.int32)
  return KMedoidsResult(state.medoids, state.cost, sweeps, state.swaps,
                        state.since_swap >= num_candidates)


def _k_medoids(key, features, candidate, max_sweeps, rel_tol, *, k, block,
               chunk=LOST_CHUNK):
  """The whole of `k_medoids` as one traceable program (for inspection: `jax.make_jaxpr`)."""
  prepared, state = _setup(key, features, candidate, k=k)
  state = _sweep(prepared, candidate, state, max_sweeps, rel_tol, k=k, block=block, chunk=chunk)
  return _result(state, prepared.num_candidates)


_setup_jit = jax.jit(_setup, static_argnames=("k",))
# The swap state (its [N, k] distances) is updated in place from sweep to sweep.
_sweep_jit = jax.jit(_sweep, static_argnames=("k", "block", "chunk"), donate_argnums=(2,))


def k_medoids(key: jax.Array, features: jax.Array, candidate_mask: jax.Array, k: int, *,
              max_sweeps: int = DEFAULT_MAX_SWEEPS, rel_tol: float = DEFAULT_REL_TOL,
              block: int = SWAP_BLOCK,
              on_sweep: Optional[Callable[[int, float, int], None]] = None) -> KMedoidsResult:
  """k-medoids over the candidate nodes: k-means++ seeding, then FasterPAM swaps.

  Minimises TD = sum over candidates of the Euclidean distance to the nearest medoid, medoids
  among the candidates; non-candidates are ignored. One compile per (shape, k, block): the
  sweep cap, the tolerance and the candidate set are traced values. See the module docstring
  for the algorithm, its cost per sweep and its guarantee.

  Args:
    key: PRNG key (seeding and the order in which candidates are tried).
    features: [num_nodes, dim] float array.
    candidate_mask: [num_nodes] bool, the nodes that count in TD and may become medoids.
    k: static int, number of medoids, 1 <= k <= number of candidates.
    max_sweeps: cap on passes over the candidates in the swap phase (0: seeding only).
    rel_tol: a swap is applied only if it lowers TD by more than rel_tol x TD.
    block: static int, swap candidates per distance-tile matrix product.
    on_sweep: optional `on_sweep(sweeps, cost, swaps)` called after each pass of the swap phase
      (progress of a long phase; the FeatProp sampler reports it as "kmedoids").
  Returns:
    `KMedoidsResult(medoids [k] int32, cost, sweeps, swaps, converged)`.
  Raises:
    ValueError: non-finite features, a mask of the wrong shape, bad k or options.
  """
  features = checks.features(features)
  candidate_mask = checks.mask(candidate_mask, features.shape[0], name="candidate_mask")
  num_candidates = int(jnp.sum(candidate_mask))
  check_options(num_candidates, k, max_sweeps, rel_tol, block)
  prepared, state = _setup_jit(key, features, candidate_mask, k=int(k))
  tol = jnp.asarray(rel_tol, features.dtype)
  # One compiled call per sweep (the same arithmetic as one while loop), so a long phase can
  # report its progress after each.
  while int(state.since_swap) < num_candidates and int(state.sweep) < max_sweeps:
    state = _sweep_jit(prepared, candidate_mask, state, jnp.int32(int(state.sweep) + 1), tol,
                       k=int(k), block=int(block))
    if on_sweep is not None:
      result = _result(state, prepared.num_candidates)
      on_sweep(int(result.sweeps), float(result.cost), int(result.swaps))
  return _result(state, prepared.num_candidates)


def check_options(num_candidates: int, k, max_sweeps, rel_tol, block) -> None:
  """ValueError for `k_medoids`'s k and options (also `kmedoids_sharded`'s), given the number
  of candidates."""
  if num_candidates == 0:
    raise ValueError("candidate_mask selects no node: nothing to cluster")
  if not checks.is_int(k) or not 1 <= k <= num_candidates:
    raise ValueError(f"k must be an int in [1, {num_candidates}] (the number of candidates), "
                     f"got {k!r}")
  check_max_sweeps(max_sweeps)
  if not checks.is_real(rel_tol) or not 0.0 <= rel_tol < 1.0:
    raise ValueError(f"rel_tol must be a number in [0, 1), got {rel_tol!r}")
  if not checks.is_int(block) or block < 1:
    raise ValueError(f"block must be an int >= 1, got {block!r}")


def check_max_sweeps(max_sweeps, name: str = "max_sweeps") -> None:
  """ValueError unless `max_sweeps` is an int in [0, 10**6]."""
  if not checks.is_int(max_sweeps) or not 0 <= max_sweeps <= 10 ** 6:
    raise ValueError(f"{name} must be an int in [0, 10**6], got {max_sweeps!r}")


@jax.jit
def medoid_cost(features: jax.Array, candidate_mask: jax.Array, medoids: jax.Array) -> jax.Array:
  """TD of the given medoids [k]: sum over candidates of the distance to the nearest, O(k N d).

  Uses the same distances as `k_medoids`, so it reproduces `KMedoidsResult.cost`.
  """
  weights = candidate_mask.astype(features.dtype)
  features = features - jnp.matmul(weights, features, precision=HIGHEST) / jnp.sum(weights)
  sq_norms = jnp.sum(jnp.square(features), axis=-1)
  dist = _distance_rows(features, sq_norms, medoids)
  return jnp.sum(jnp.where(candidate_mask, jnp.min(dist, axis=0), 0.0))
