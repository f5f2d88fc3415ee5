"""TypiClust (Hacohen et al., ICML 2022, "Active Learning on a Budget"), its TPC-RP variant.

1. k-means (`selection.kmeans`: k-means++ seeding, `typiclust_iterations` Lloyd updates) of the
   features of ALL nodes of the pool, labelled and unlabelled, into
   k = min(L + budget, `typiclust_max_clusters`) clusters, L the number of labelled nodes (the
   authors' `min(len(lSet) + budgetSize, MAX_NUM_CLUSTERS)`, 500).
2. `budget` times: among the clusters that still hold an unlabelled node not picked yet, take the
   one with the fewest labelled nodes, picks so far counting as labelled (the paper's "picked
   points are added to the labelled set"); ties go to the largest cluster, then the lowest
   cluster index. Pick its most typical unlabelled, unpicked node.
3. Typicality (paper Eq. 4): 1 / the mean Euclidean distance from a node to its K nearest
   neighbours within its cluster (all its nodes, labelled included), K = min(`typiclust_knn`
   (20, as the authors), cluster size - 1). The most typical node has the smallest mean distance
   (ties: lowest index); a node alone in its cluster has no neighbour and is picked as is.

Named deviations from the authors' code (avihu111/TypiClust, `typiclust.py`), which the paper's
text does not ask for: their cluster order is sorted once and cycled, where we re-rank after each
pick as the paper describes (they coincide while each cluster gets at most one pick); they drop
clusters of 5 nodes or fewer, we do not; they compute typicality among the cluster's remaining
unlabelled nodes only, with K = min(20, size // 2) and squared distances (faiss `IndexFlatL2`),
where we follow the paper's definition above; sklearn's (MiniBatch)KMeans with its own
convergence test there, a fixed cap of Lloyd iterations here.

Cost: k-means O(k N d) seeding plus O(N k d) per iteration, O(N k) memory. Typicality is needed
only for the unlabelled nodes of the clusters picked from (the cluster order does not depend on
it, so it is settled first): M such nodes, their distances to every node a [block, N] tile at a
time (one matrix product at `HIGHEST` precision each, then a top-K over same-cluster columns):
O(M N d) time, O(block N) memory. No N x N array.
"""

import functools

import jax
import jax.numpy as jnp

from jax_seqgcn import checks
from jax_seqgcn.samplers import base
from jax_seqgcn.selection import kmeans as kmeans_lib

MAX_CLUSTERS = 500
KNN = 20
# Rows of the typicality distance tiles: a [TILE_ROWS, N] tile at a time.
TILE_ROWS = 256
# Full float32 products on every backend (TPU: not bfloat16 passes); see selection/__init__.py.
HIGHEST = jax.lax.Precision.HIGHEST
OPTIONS = dict(typiclust_max_clusters=MAX_CLUSTERS, typiclust_knn=KNN,
               typiclust_iterations=kmeans_lib.DEFAULT_ITERATIONS)
# Upper bounds, with why (k-means holds an [N, k] matrix; the kNN a [block, K] top-k).
LIMITS = dict(typiclust_max_clusters=(10 ** 5, "k-means holds an [N, k] distance matrix"),
              typiclust_knn=(10 ** 4, "the typicality of a node needs its K nearest neighbours"))


def check_options(options) -> None:
  """ValueError (every problem in one line) for TypiClust options out of range."""
  get = lambda name: options.get(name, OPTIONS[name])
  problems = []
  for name, (bound, why) in LIMITS.items():
    if not checks.is_int(get(name)) or get(name) < 1:
      problems.append(f"{name} must be an int >= 1, got {get(name)!r}")
    elif get(name) > bound:
      problems.append(f"{name} must be <= {bound}, got {get(name)!r}: {why}")
  try:
    kmeans_lib.check_iterations(get("typiclust_iterations"), name="typiclust_iterations")
  except ValueError as error:
    problems.append(str(error))
  if problems:
    raise ValueError("bad TypiClust option(s): " + "; ".join(problems))


def cluster_order(assignments, labelled_mask, *, budget: int, k: int) -> jax.Array:
  """The cluster of each of the `budget` picks (step 2 of the module docstring); traceable.

  Args:
    assignments: [N] int32 cluster of each node, in [0, k).
    labelled_mask: [N] bool.
    budget: static, at most the number of unlabelled nodes.
    k: static number of clusters.
  Returns:
    [budget] int32 cluster indices, in pick order.
  """
  sizes = jax.ops.segment_sum(jnp.ones_like(assignments), assignments, num_segments=k)
  labelled = jax.ops.segment_sum(labelled_mask.astype(jnp.int32), assignments, num_segments=k)

  def body(t, state):
    labelled, order = state
    eligible = labelled < sizes  # an unlabelled, unpicked node is left
    fewest = jnp.min(jnp.where(eligible, labelled, jnp.iinfo(jnp.int32).max))
    cluster = jnp.argmax(jnp.where(eligible & (labelled == fewest), sizes, -1)).astype(jnp.int32)
    return labelled.at[cluster].add(1), order.at[t].set(cluster)

  return jax.lax.fori_loop(0, budget, body, (labelled, jnp.zeros((budget,), jnp.int32)))[1]


def mean_knn_distances(features, assignments, rows_mask, *, knn: int, block: int = TILE_ROWS):
  """[N] mean distance of each node in `rows_mask` to its K nearest same-cluster nodes.

  K = min(knn, cluster size - 1) per node; 0 where K = 0 (a node alone in its cluster) and for
  the nodes outside `rows_mask` (not computed). Traceable; `knn` and `block` static.
  """
  n = features.shape[0]
  knn = min(knn, n - 1)
  mean = jnp.zeros((n,), features.dtype)
  if knn == 0:
    return mean
  sizes = jax.ops.segment_sum(jnp.ones_like(assignments), assignments, num_segments=n)
  # Only same-cluster distances are used: centring each cluster on its mean keeps them exact
  # and the Gram expansion's terms small (far-apart clusters would cancel digits otherwise).
  means = jax.ops.segment_sum(features, assignments, num_segments=n) / jnp.maximum(
      sizes, 1).astype(features.dtype)[:, None]
  features = features - means[assignments]
  sizes = sizes[assignments]
  sq_norms = jnp.sum(jnp.square(features), axis=-1)
  rows_all = jnp.nonzero(rows_mask, size=n + block, fill_value=n)[0].astype(jnp.int32)

  def body(state):
    b, mean = state
    rows = jax.lax.dynamic_slice(rows_all, (b * block,), (block,))
    safe = jnp.minimum(rows, n - 1)
    sq = (sq_norms[safe][:, None] + sq_norms[None, :]
          - 2.0 * jnp.matmul(features[safe], features.T, precision=HIGHEST))
    same = (assignments[safe][:, None] == assignments[None, :]) & (
        safe[:, None] != jnp.arange(n)[None, :])
    nearest = -jax.lax.top_k(jnp.where(same, -jnp.maximum(sq, 0.0), -jnp.inf), knn)[0]
    count = jnp.minimum(knn, sizes[safe] - 1)
    use = jnp.arange(knn)[None, :] < count[:, None]
    total = jnp.sum(jnp.where(use, jnp.sqrt(jnp.where(use, nearest, 0.0)), 0.0), axis=1)
    row_mean = total / jnp.maximum(count, 1).astype(features.dtype)
    return b + 1, mean.at[rows].set(row_mean, mode="drop")

  num_blocks = (jnp.sum(rows_mask) + block - 1) // block
  return jax.lax.while_loop(lambda s: s[0] < num_blocks, body, (jnp.int32(0), mean))[1]


@functools.partial(jax.jit, static_argnames=("budget", "k", "knn", "block"))
def typiclust_select(features, assignments, labelled_mask, *, budget: int, k: int,
                     knn: int = KNN, block: int = TILE_ROWS) -> jax.Array:
  """TypiClust's picks on given clusters (steps 2-3 of the module docstring), jitted.

  Args:
    features: [N, d] float features.
    assignments: [N] int32 cluster of each node, in [0, k).
    labelled_mask: [N] bool.
    budget: static, 1 <= budget <= number of unlabelled nodes.
    k: static number of clusters.
    knn: static K of the typicality.
    block: static rows per distance tile.
  Returns:
    [budget] int32 distinct unlabelled node indices, in pick order.
  """
  labelled_mask = jnp.asarray(labelled_mask, bool)
  assignments = jnp.asarray(assignments, jnp.int32)
  order = cluster_order(assignments, labelled_mask, budget=budget, k=k)
  in_order = jnp.zeros((k,), bool).at[order].set(True)
  mean = mean_knn_distances(features, assignments, ~labelled_mask & in_order[assignments],
                            knn=knn, block=block)

  def body(t, state):
    available, picks = state
    candidates = available & (assignments == order[t])
    pick = jnp.argmin(jnp.where(candidates, mean, jnp.inf)).astype(jnp.int32)
    # Every candidate's mean is finite, but all could tie at inf only if none is left (never:
    # the order takes only clusters with a node left); argmin of all-inf would be 0.
    return available.at[pick].set(False), picks.at[t].set(pick)

  return jax.lax.fori_loop(0, budget, body, (~labelled_mask, jnp.zeros((budget,), jnp.int32)))[1]


def num_clusters(num_labelled: int, budget: int, max_clusters: int = MAX_CLUSTERS) -> int:
  """k = min(L + budget, max_clusters), the authors' rule."""
  return int(min(num_labelled + budget, max_clusters))


@base.register("TypiClust", needs=("features",), options=OPTIONS, check=check_options,
               description="most typical node of the least-labelled k-means clusters "
                           "(TPC-RP, Hacohen et al. 2022)")
def _typiclust(key, pool: base.Pool, budget: int, *, typiclust_max_clusters, typiclust_knn,
               typiclust_iterations) -> jax.Array:
  features = jnp.asarray(pool.features)
  labelled_mask = jnp.asarray(pool.labelled_mask)
  k = num_clusters(int(jnp.sum(labelled_mask)), int(budget), int(typiclust_max_clusters))
  clusters = kmeans_lib.k_means(key, features, k, iterations=int(typiclust_iterations))
  return typiclust_select(features, clusters.assignments, labelled_mask, budget=int(budget),
                          k=k, knn=int(typiclust_knn))


def typiclust(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
              **options) -> jax.Array:
  """TypiClust on a features array: the registered sampler's picks.

  Args:
    key: PRNG key (the k-means++ seeding).
    features: [N, d] embeddings of every node of the pool.
    labelled_mask: [N] bool.
    budget: number of picks, 1 <= budget <= number of unlabelled nodes.
    **options: `typiclust_max_clusters` (500), `typiclust_knn` (20), `typiclust_iterations`
      (20 Lloyd updates at most).
  Returns:
    [budget] int32 distinct unlabelled node indices, in pick order.
  Raises:
    ValueError: bad features, mask, budget or options.
  """
  return base.SAMPLERS["TypiClust"](key, base.Pool(labelled_mask, features=features), budget,
                                    **options)
