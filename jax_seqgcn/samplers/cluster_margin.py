"""Cluster-Margin (Citovsky et al., NeurIPS 2021, "Batch Active Learning at Scale").

1. Candidates: the M = min(budget x `cluster_margin_m`, U) unlabelled nodes with the smallest
   margin p_(1) - p_(2) of the learner's softmax (`uncertainty.margin_scores`; ties: lowest
   index), U the number of unlabelled nodes. The paper's k_m = m k, m = 10 by default.
2. Hierarchical agglomerative clustering of the candidates' embeddings (pool.features),
   Euclidean, average linkage (`scipy.cluster.hierarchy.linkage(method="average")`), cut into at
   most `budget` clusters (`fcluster(criterion="maxclust", t=budget)`).
3. Round robin: clusters sorted from the smallest to the largest (ties: the order scipy numbers
   them in), one uniform random member (from `key`) taken from each cluster that still has one,
   round after round, until `budget` picks.

Named deviation: the paper clusters the whole pool once, before the first round, cutting the
dendrogram at a distance threshold epsilon, and reuses those clusters (restricted to each
round's candidates). We cluster the candidates themselves every round and cut at `budget`
clusters, so no threshold needs tuning and the clustering follows the learner's embeddings as
they change; with M = 10 x budget each cluster holds about ten candidates.

Runs on the host, not jitted: scipy's linkage is NumPy code (the margins and the round-robin
order are jitted). Cost O(M^2) time and memory for the M candidates' pairwise distances
(M (M - 1) / 2 float64 values: 400 MB at M = 10,000); M is refused past `MAX_CANDIDATES`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.cluster import hierarchy

from jax_seqgcn import checks
from jax_seqgcn.samplers import base
from jax_seqgcn.samplers import uncertainty

M = 10
OPTIONS = dict(cluster_margin_m=M)
# scipy's linkage holds M (M - 1) / 2 float64 distances: 3.6 GB at 30,000 candidates.
MAX_CANDIDATES = 30_000


def check_options(options) -> None:
  """ValueError unless `cluster_margin_m` is an int >= 1 (a bool is refused)."""
  m = options.get("cluster_margin_m", M)
  if not checks.is_int(m) or not 1 <= m <= MAX_CANDIDATES:
    raise ValueError(f"bad ClusterMargin option(s): cluster_margin_m must be an int in [1, "
                     f"{MAX_CANDIDATES}] (candidates per pick), got {m!r}")


@functools.partial(jax.jit, static_argnames="budget")
def _smallest_margins(probabilities, labelled_mask, *, budget):
  return base.top_unlabelled(-uncertainty.margin_scores(probabilities), labelled_mask, budget)


@functools.partial(jax.jit, static_argnames="budget")
def round_robin(key: jax.Array, labels: jax.Array, budget: int) -> jax.Array:
  """Positions of the round-robin picks over clusters (step 3 of the module docstring).

  Args:
    key: PRNG key: the order within each cluster (a uniform random permutation).
    labels: [M] int cluster of each candidate, in [0, M).
    budget: static, 1 <= budget <= M.
  Returns:
    [budget] int32 positions into `labels`, in pick order: round r takes the r-th member of
    every cluster with more than r members, clusters from the smallest to the largest (ties:
    lowest label).
  """
  labels = jnp.asarray(labels, jnp.int32)
  m = labels.shape[0]
  sizes = jax.ops.segment_sum(jnp.ones_like(labels), labels, num_segments=m)
  # Each cluster's place in the size order (unused labels, size 0, come first: harmless).
  place = jnp.zeros((m,), jnp.int32).at[jnp.lexsort((jnp.arange(m), sizes))].set(
      jnp.arange(m, dtype=jnp.int32))
  # Each candidate's rank inside its cluster, by a uniform random number.
  by_cluster = jnp.lexsort((jax.random.uniform(key, (m,)), labels))
  starts = jnp.cumsum(sizes) - sizes
  rank = jnp.zeros((m,), jnp.int32).at[by_cluster].set(
      jnp.arange(m, dtype=jnp.int32) - starts[labels[by_cluster]])
  return jnp.lexsort((place[labels], rank))[:budget].astype(jnp.int32)


def cluster_candidates(features: np.ndarray, num_clusters: int) -> np.ndarray:
  """Average-linkage clusters of `features` [M, d], cut at <= `num_clusters`: [M] in [0, C)."""
  if features.shape[0] == 1:
    return np.zeros(1, np.int32)
  tree = hierarchy.linkage(np.asarray(features, np.float64), method="average",
                           metric="euclidean")
  flat = hierarchy.fcluster(tree, t=num_clusters, criterion="maxclust")
  return np.unique(flat, return_inverse=True)[1].astype(np.int32)


@base.register("ClusterMargin", needs=("features", "probabilities"), options=OPTIONS,
               check=check_options,
               description="round robin over average-linkage clusters of the budget x m "
                           "smallest-margin nodes (Citovsky et al. 2021)")
def _cluster_margin(key, pool: base.Pool, budget: int, *, cluster_margin_m) -> jax.Array:
  uncertainty.check_probabilities(pool.probabilities, "ClusterMargin")
  labelled_mask = np.asarray(pool.labelled_mask)
  num_candidates = int(min(budget * cluster_margin_m, (~labelled_mask).sum()))
  if num_candidates > MAX_CANDIDATES:
    raise ValueError(f"ClusterMargin would cluster {num_candidates} candidates (budget {budget} x "
                     f"cluster_margin_m {cluster_margin_m}), more than {MAX_CANDIDATES}: "
                     "scipy's linkage needs their M^2 / 2 pairwise distances; lower "
                     "cluster_margin_m")
  candidates = np.asarray(_smallest_margins(jnp.asarray(pool.probabilities),
                                            jnp.asarray(labelled_mask), budget=num_candidates))
  labels = cluster_candidates(np.asarray(jnp.asarray(pool.features)[candidates]), int(budget))
  positions = np.asarray(round_robin(key, jnp.asarray(labels), int(budget)))
  return jnp.asarray(candidates[positions], jnp.int32)


def cluster_margin(key: jax.Array, features: jax.Array, probabilities: jax.Array,
                   labelled_mask: jax.Array, budget: int, **options) -> jax.Array:
  """Cluster-Margin on arrays: the registered sampler's picks.

  Args:
    key: PRNG key (the member taken from each cluster).
    features: [N, d] learner embeddings.
    probabilities: [N, C] softmax outputs, C >= 2.
    labelled_mask: [N] bool.
    budget: number of picks, 1 <= budget <= number of unlabelled nodes.
    **options: `cluster_margin_m` (10).
  Returns:
    [budget] int32 distinct unlabelled node indices, in pick order.
  Raises:
    ValueError: bad features, probabilities, mask, budget or option; too many candidates.
  """
  uncertainty.check_probabilities(probabilities, "ClusterMargin")
  return base.SAMPLERS["ClusterMargin"](
      key, base.Pool(labelled_mask, features=features, probabilities=probabilities), budget,
      **options)
