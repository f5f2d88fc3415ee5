"""Greedy k-center selection (CoreSet, Sener & Savarese 2018; protocol §4).

`k_center_greedy` keeps one [N] vector of distances to the nearest centre and never forms an
N x N matrix. Distances are Euclidean and computed from exact differences sqrt(sum((x - c)^2)):
the expansion |x|^2 - 2 x.c + |c|^2 loses precision for near points and can flip near-ties, so it
is used only to *shortlist* the two nearest initial centres of each node, whose exact distances
are then recomputed (reproducing the reference's indices exactly, see tests).
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax_seqgcn import checks

# Initial centres are processed in blocks of this many rows: an [N, block] distance tile at a time.
CENTRE_BLOCK = 256
# Full float32 products on every backend (TPU: not bfloat16 passes); see selection/__init__.py.
HIGHEST = jax.lax.Precision.HIGHEST
# Marks nodes that are centres or already picked: never the argmax among candidates.
_TAKEN = -1.0
# Padding rows of the greedy sweep: below _TAKEN, never the argmax.
_PAD = -2.0
# Rows per block of the greedy loop's sweep (each pick's update and argmax in one pass over the
# features; measured 1.6x faster than an update followed by a separate argmax, docs/performance.md).
SWEEP_BLOCK = 4096


class KCenterState(NamedTuple):
  """Loop state: distance of each node to its nearest centre (`_TAKEN` for centres), picks."""
  min_dist: jax.Array
  picks: jax.Array


def exact_distances(features: jax.Array, centre: jax.Array) -> jax.Array:
  """Euclidean distances [N] from every row of `features` [N, d] to one `centre` [d]."""
  return jnp.sqrt(jnp.sum(jnp.square(features - centre[None, :]), axis=-1))


def _nearest_two(features, sq_norms, centre_rows, centre_ids, best_d2, best_ids):
  """Merges one block of centres into each node's running two nearest (approximate d^2)."""
  approx = (sq_norms[:, None] - 2.0 * jnp.matmul(features, centre_rows.T, precision=HIGHEST)
            + jnp.sum(jnp.square(centre_rows), axis=-1)[None, :])
  d2 = jnp.concatenate([best_d2, approx], axis=1)
  ids = jnp.concatenate([best_ids, jnp.broadcast_to(centre_ids, approx.shape)], axis=1)
  neg, order = jax.lax.top_k(-d2, 2)
  return -neg, jnp.take_along_axis(ids, order, axis=1)


def initial_min_distances(features: jax.Array, is_centre: jax.Array,
                          block: int = CENTRE_BLOCK) -> jax.Array:
  """Distance of every node to its nearest centre, +inf if there is no centre.

  Blocks of `block` centres (a dynamic number of blocks, so any centre count compiles once)
  shortlist each node's two nearest centres by matrix products; their distances are then
  recomputed exactly. Memory O(N * block).

  Args:
    features: [N, d] float.
    is_centre: [N] bool.
    block: static block size.
  Returns:
    [N] float distances.
  """
  n = features.shape[0]
  num_centres = jnp.sum(is_centre)
  # Centre indices first, padded (with repeats of the first centre, harmless for a minimum).
  centre_idx = jnp.nonzero(is_centre, size=n + block, fill_value=jnp.argmax(is_centre))[0]
  sq_norms = jnp.sum(jnp.square(features), axis=-1)
  best_d2 = jnp.full((n, 2), jnp.inf, features.dtype)
  best_ids = jnp.zeros((n, 2), jnp.int32)

  def body(state):
    b, best_d2, best_ids = state
    ids = jax.lax.dynamic_slice(centre_idx, (b * block,), (block,)).astype(jnp.int32)
    best_d2, best_ids = _nearest_two(features, sq_norms, features[ids], ids, best_d2, best_ids)
    return b + 1, best_d2, best_ids

  num_blocks = (num_centres + block - 1) // block
  _, best_d2, best_ids = jax.lax.while_loop(lambda s: s[0] < num_blocks, body,
                                            (0, best_d2, best_ids))
  exact = jnp.sqrt(jnp.sum(jnp.square(features[:, None, :] - features[best_ids]), axis=-1))
  exact = jnp.where(jnp.isinf(best_d2), jnp.inf, exact)
  return jnp.min(exact, axis=1)


def _greedy(features, is_centre, first_pick, *, budget):
  min_dist = initial_min_distances(features, is_centre)
  min_dist = jnp.where(is_centre, _TAKEN, min_dist)
  has_centres = jnp.any(is_centre)
  n, dim = features.shape
  # One pass per pick over [blocks, SWEEP_BLOCK] rows: the min-update, each block's max and
  # first argmax, then the argmax of the block maxima (first index on ties overall). Padding
  # rows (zeros, min_dist _PAD) are never the argmax.
  block = min(SWEEP_BLOCK, n)
  blocks = -(-n // block)
  padded = jnp.pad(features, ((0, blocks * block - n), (0, 0))).reshape(blocks, block, dim)
  dist0 = jnp.pad(min_dist, (0, blocks * block - n), constant_values=_PAD).reshape(blocks, block)
  index = jnp.arange(blocks * block, dtype=jnp.int32).reshape(blocks, block)

  def argmax(dist):
    best = jnp.argmax(jnp.max(dist, axis=1))
    return (best * block + jnp.argmax(dist[best])).astype(jnp.int32)

  def body(t, state):
    dist, pick, picks = state
    # Cold start: the first centre is a random candidate instead of "farthest from nothing".
    pick = jnp.where((t == 0) & ~has_centres & (first_pick >= 0), first_pick, pick)
    row = features[pick]
    dist = jnp.minimum(dist, jnp.sqrt(jnp.sum(jnp.square(padded - row), axis=-1)))
    # Taken nodes stay below every distance (minimum keeps _TAKEN), so picks are distinct even
    # when rows are duplicated.
    dist = jnp.where(index == pick, _TAKEN, dist)
    return dist, argmax(dist), picks.at[t].set(pick)

  state = (dist0, argmax(dist0), jnp.zeros((budget,), jnp.int32))
  return jax.lax.fori_loop(0, budget, body, state)[2]


_greedy_jit = jax.jit(_greedy, static_argnames="budget")


def k_center_greedy(features: jax.Array, is_centre: jax.Array, budget: int, *,
                    key: Optional[jax.Array] = None) -> jax.Array:
  """Greedy k-center: `budget` picks, each the node farthest from its nearest centre.

  protocol §4: min_dist_i starts as the distance from node i to the nearest initial centre; each
  step picks argmax_i min_dist_i (first index on ties) among non-centres and updates min_dist
  with distances to the pick. Euclidean, no N x N matrix, one compile per (shape, budget).

  Args:
    features: [num_nodes, dim] float array.
    is_centre: [num_nodes] bool, the initial centres (labelled nodes); the others are the
      candidates.
    budget: static int, number of picks, 1 <= budget <= number of candidates.
    key: PRNG key for the first centre when `is_centre` is all False (cold start); without a
      key the cold start begins at candidate 0.
  Returns:
    [budget] int32 distinct candidate indices, in pick order.
  Raises:
    ValueError: non-finite features, mask of the wrong length, bad budget.
  """
  features, is_centre, first_pick = validate(features, is_centre, budget, key)
  return _greedy_jit(features, is_centre, first_pick, budget=int(budget))


def validate(features, is_centre, budget, key=None):
  """Host-side checks shared by the k-center entry points, and the cold-start pick.

  Args:
    features: [N, d] array-like (ints are cast to float32).
    is_centre: [N] bool (or 0/1) array-like.
    budget: number of picks.
    key: optional PRNG key.
  Returns:
    (features [N, d] float, is_centre [N] bool, first_pick int32 scalar): the random candidate
    that starts a cold start when `key` is given, else -1.
  Raises:
    ValueError: as `k_center_greedy`.
  """
  features = checks.features(features)
  is_centre = checks.mask(is_centre, features.shape[0], name="is_centre")
  checks.budget(budget, int(features.shape[0] - jnp.sum(is_centre)))
  first_pick = -1
  if key is not None:
    candidates = ~is_centre
    first_pick = jax.random.choice(key, features.shape[0], p=candidates / jnp.sum(candidates))
  return features, is_centre, jnp.asarray(first_pick, jnp.int32)
