"""k-means (Lloyd) with k-means++ seeding, jitted, in O(N k) memory (TypiClust's clustering).

`k_means(key, features, k)` clusters every row of `features` [N, d] into k clusters:

1. Seeding, k-means++ (Arthur & Vassilvitskii 2007): the first centre is a uniform node (from
   `key`), each next one a node drawn with probability proportional to D^2, its squared distance
   to the nearest centre so far. Nodes already chosen get weight 0 (rounding leaves their own
   distance slightly above 0); when every remaining D^2 is 0 (duplicate rows), the draw is
   uniform among the nodes not chosen yet. k distance rows: O(k N d) time, O(N) memory.
2. Lloyd iterations: assign every node to its nearest centroid (squared distances from the Gram
   expansion |x|^2 - 2 x.c + |c|^2 of the mean-centred features, one [N, k] matrix product at
   `HIGHEST` precision; ties go to the lowest centroid index), then move each centroid to the
   mean of its nodes. A centroid that loses all its nodes stays where it is (its cluster is
   empty). At most `iterations` updates; the loop stops early once an update changes no
   assignment (a fixed point: further iterations would change nothing, so the result equals the
   full count's).

Memory O(N k + N d): the largest array is the [N, k] distance matrix; no N x N array.
Time O(k N d) seeding plus O(N k d) per iteration.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_seqgcn import checks

DEFAULT_ITERATIONS = 20
MAX_ITERATIONS = 10 ** 4
# Full float32 products on every backend (TPU: not bfloat16 passes); see selection/__init__.py.
HIGHEST = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
  """What `k_means` returns.

  Attributes:
    centroids: [k, d] cluster means (an empty cluster keeps its last centroid).
    assignments: [N] int32 cluster of each node, in [0, k).
    inertia: sum over nodes of the squared distance to their centroid.
    iterations: int32 Lloyd updates run (at most the `iterations` asked for).
    converged: bool, the last update changed no assignment (a fixed point).
    seeds: [k] int32 the k-means++ seed nodes (the initial centroids).
  """
  centroids: jax.Array
  assignments: jax.Array
  inertia: jax.Array
  iterations: jax.Array
  converged: jax.Array
  seeds: jax.Array


def sq_distances(features: jax.Array, centroids: jax.Array) -> jax.Array:
  """[N, k] squared Euclidean distances (Gram expansion, clamped at 0)."""
  sq = (jnp.sum(jnp.square(features), axis=-1)[:, None]
        - 2.0 * jnp.matmul(features, centroids.T, precision=HIGHEST)
        + jnp.sum(jnp.square(centroids), axis=-1)[None, :])
  return jnp.maximum(sq, 0.0)


def _draw(key, weights):
  """One index with probability proportional to `weights` [N] (>= 0, positive sum)."""
  cdf = jnp.cumsum(weights)
  pick = jnp.searchsorted(cdf, jax.random.uniform(key, dtype=cdf.dtype) * cdf[-1], side="right")
  # u * total can round up to the total: take the last index with positive weight instead.
  return jnp.where(pick < cdf.shape[0], pick, jnp.argmax(cdf)).astype(jnp.int32)


def kmeans_pp_seeds(key: jax.Array, features: jax.Array, k: int) -> jax.Array:
  """k-means++ seeding (module docstring): [k] int32 distinct node indices, in draw order.

  Traceable (call inside `jax.jit` with a static `k`); k <= N.
  """
  n = features.shape[0]
  first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, n, dtype=jnp.int32)

  def body(t, state):
    min_sq, chosen, seeds = state
    centre = features[seeds[t - 1]]
    min_sq = jnp.minimum(min_sq, jnp.sum(jnp.square(features - centre[None, :]), axis=-1))
    weights = jnp.where(chosen, 0.0, min_sq)
    weights = jnp.where(jnp.sum(weights) > 0.0, weights, (~chosen).astype(weights.dtype))
    pick = _draw(jax.random.fold_in(key, t), weights)
    return min_sq, chosen.at[pick].set(True), seeds.at[t].set(pick)

  state = (jnp.full((n,), jnp.inf, features.dtype), jnp.zeros((n,), bool).at[first].set(True),
           jnp.zeros((k,), jnp.int32).at[0].set(first))
  return jax.lax.fori_loop(1, k, body, state)[2]


def lloyd(features: jax.Array, centroids: jax.Array, iterations):
  """At most `iterations` Lloyd updates from `centroids` [k, d] (module docstring).

  Traceable; `iterations` may be traced. Returns (centroids, assignments, sq_dist [N] to the
  assigned centroid, updates run, converged).
  """
  k = centroids.shape[0]

  def assign(centroids):
    sq = sq_distances(features, centroids)
    labels = jnp.argmin(sq, axis=1).astype(jnp.int32)
    return labels, jnp.take_along_axis(sq, labels[:, None], axis=1)[:, 0]

  def update(centroids, labels):
    sums = jax.ops.segment_sum(features, labels, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones_like(labels, features.dtype), labels, num_segments=k)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)

  def cond(state):
    it, _, _, _, changed = state
    return (it < iterations) & changed

  def body(state):
    it, centroids, labels, _, _ = state
    centroids = update(centroids, labels)
    new_labels, sq = assign(centroids)
    return it + 1, centroids, new_labels, sq, jnp.any(new_labels != labels)

  labels, sq = assign(centroids)
  it, centroids, labels, sq, changed = jax.lax.while_loop(
      cond, body, (jnp.int32(0), centroids, labels, sq, jnp.bool_(True)))
  return centroids, labels, sq, it, ~changed


@functools.partial(jax.jit, static_argnames="k")
def _kmeans(key, features, iterations, *, k):
  # Mean-centred: the same clusters, smaller terms in the Gram expansion.
  mean = jnp.mean(features, axis=0)
  features = features - mean
  seeds = kmeans_pp_seeds(key, features, k)
  centroids, labels, sq, it, converged = lloyd(features, features[seeds], iterations)
  return KMeansResult(centroids + mean, labels, jnp.sum(sq), it, converged, seeds)


def check_iterations(iterations, name: str = "iterations") -> None:
  """ValueError unless `iterations` is an int in [0, MAX_ITERATIONS] (bools refused)."""
  if not checks.is_int(iterations) or not 0 <= iterations <= MAX_ITERATIONS:
    raise ValueError(f"{name} must be an int in [0, {MAX_ITERATIONS}] (0: the k-means++ seeds "
                     f"as centroids), got {iterations!r}")


def k_means(key: jax.Array, features: jax.Array, k: int, *,
           iterations: int = DEFAULT_ITERATIONS) -> KMeansResult:
  """k-means of every row of `features` into `k` clusters (module docstring).

  Args:
    key: PRNG key for the k-means++ seeding.
    features: [N, d] real numbers (computed in at least float32).
    k: number of clusters, an int in [1, N] (static: one compile per k and shape).
    iterations: most Lloyd updates, an int in [0, MAX_ITERATIONS]; 0 assigns to the seeds.
  Returns:
    `KMeansResult`.
  Raises:
    ValueError: bad features (NaN, inf, empty), k or iterations.
  """
  features = checks.features(features)
  n = features.shape[0]
  if not checks.is_int(k) or not 1 <= k <= n:
    raise ValueError(f"k must be an int in [1, {n}] (the number of rows), got {k!r}")
  check_iterations(iterations)
  return _kmeans(key, features, jnp.int32(iterations), k=int(k))
