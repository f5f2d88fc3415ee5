"""FeatProp (Wu et al. 2019, "Active Learning for Graph Neural Networks via Node Feature
Propagation") as the SeqGCN paper compares with it: k-medoids on propagated learner features.

Wu et al. propagate the node features over the graph, X_k = A^k X, and label the k-medoids of
the propagated features: nodes that are central in both feature space and graph neighbourhood.
The SeqGCN paper has no input graph, so here the graph is the sampler GCN's own similarity graph
over the learner embeddings (`graph.factored_adjacency`: A = (S - I) D^-1 + I, S the cosine
similarities), applied matrix-free (A X = V (V^T (X / d)) - X / d + X, no N x N array):

1. Build A from ALL nodes (labelled and unlabelled) and propagate the learner features
   (not normalised, as CoreSet uses them) `featprop_hops` times: A^hops X. Wu et al. use
   2 hops (their released k-medoids grid runs 2 propagation layers, with the symmetric
   normalisation D^-1/2 (A + I) D^-1/2 of a citation graph where we use the GCN's graph).
2. k-medoids with k = budget over the UNLABELLED nodes only (`kmedoids.k_medoids`: k-means++
   seeding, FasterPAM swaps to a swap-local optimum or `featprop_max_sweeps` passes); the
   medoids are the picks.

Deliberate deviation: the original FeatProp clusters all nodes of a graph once (a one-shot
selection). In the pool-based loop the labelled nodes still shape the graph and, through A,
the propagated features of their neighbours, but they neither count in the k-medoids cost nor
can be medoids: each round picks `budget` representatives of what is still unlabelled. So the
picks are `budget` distinct unlabelled nodes, and FeatProp also works with no labelled node.
"""

import logging

import jax
import jax.numpy as jnp

from jax_seqgcn import checks
from jax_seqgcn.selection import graph
from jax_seqgcn.selection import kmedoids
from jax_seqgcn.samplers import base
from jax_seqgcn.training import progress

_LOG = logging.getLogger(__name__)

HOPS = 2
# Each hop roughly doubles the feature scale (every column of A sums to 2) and smooths nodes
# towards one point; far beyond a few hops distances lose meaning (and float32 range).
MAX_HOPS = 16
OPTIONS = dict(featprop_hops=HOPS, featprop_max_sweeps=kmedoids.DEFAULT_MAX_SWEEPS)


def check_options(options) -> None:
  """ValueError for FeatProp options out of range (all problems in one message)."""
  problems = []
  hops = options.get("featprop_hops", HOPS)
  if not isinstance(hops, int) or isinstance(hops, bool) or not 0 <= hops <= MAX_HOPS:
    problems.append(f"featprop_hops must be an int in [0, {MAX_HOPS}], got {hops!r}")
  try:
    kmedoids.check_max_sweeps(options.get("featprop_max_sweeps", kmedoids.DEFAULT_MAX_SWEEPS),
                              name="featprop_max_sweeps")
  except ValueError as error:
    problems.append(str(error))
  if problems:
    raise ValueError("bad FeatProp option(s): " + "; ".join(problems))


@jax.jit
def _propagate_hops(adjacency, features, hops):
  return jax.lax.fori_loop(0, hops, lambda _, x: graph.propagate(adjacency, x), features)


def propagate_features(features: jax.Array, hops: int = HOPS) -> jax.Array:
  """A^hops X over the normalised similarity graph of all the nodes, never forming A.

  Args:
    features: [num_nodes, dim] learner embeddings X; the graph is built from their
      L2-normalised rows (as the GCN samplers build it), the propagated signal is X itself.
    hops: number of applications of A, 0 <= hops <= MAX_HOPS (0 returns X).
  Returns:
    [num_nodes, dim] array equal to `normalized_adjacency(X)^hops @ X` up to float rounding,
    computed in O(hops N dim^2) time and O(N dim) memory; one compile per shape.
  Raises:
    ValueError: non-finite or degenerate features (see `graph.factored_adjacency`), bad hops.
  """
  check_options({"featprop_hops": hops})
  features = checks.features(features)
  adjacency = graph.factored_adjacency(features)
  return _propagate_hops(adjacency, features, jnp.int32(hops))


def featprop_medoids(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
                     *, hops: int = HOPS,
                     max_sweeps: int = kmedoids.DEFAULT_MAX_SWEEPS) -> kmedoids.KMedoidsResult:
  """FeatProp with its diagnostics: propagate, then k-medoids over the unlabelled nodes.

  Args:
    key: PRNG key for the k-medoids seeding and swap order.
    features: [N, dim] learner embeddings.
    labelled_mask: [N] bool; every node is in the graph, only the unlabelled are clustered.
    budget: number of picks (k), 1 <= budget <= number of unlabelled nodes.
    hops: propagation steps (`featprop_hops`).
    max_sweeps: cap on FasterPAM passes (`featprop_max_sweeps`).
  Returns:
    `kmedoids.KMedoidsResult`; `.medoids` are the picks, `.converged` says whether they are
    swap-optimal or the sweep cap was hit.
  Raises:
    ValueError: as `propagate_features`, a bad mask, budget or option.
  """
  check_options({"featprop_hops": hops, "featprop_max_sweeps": max_sweeps})
  pool = base.validate_pool(base.Pool(labelled_mask, features=features), budget, ("features",),
                            name="FeatProp")
  propagated = propagate_features(pool.features, hops)

  def report(sweeps, cost, swaps):  # after each swap pass: live progress at large N
    progress.report("kmedoids", {"cost": [cost], "swaps": [swaps]}, first_step=sweeps - 1,
                    total_steps=max_sweeps)

  result = kmedoids.k_medoids(key, propagated, ~jnp.asarray(pool.labelled_mask), int(budget),
                              max_sweeps=max_sweeps, on_sweep=report)
  if bool(result.converged):
    _LOG.info("FeatProp: k-medoids converged after %d sweep(s), %d swaps, cost %.6g",
              int(result.sweeps), int(result.swaps), float(result.cost))
  else:
    _LOG.info("FeatProp: k-medoids stopped at the sweep cap (featprop_max_sweeps=%d) after %d "
              "swaps, cost %.6g: medoids not verified swap-optimal", max_sweeps,
              int(result.swaps), float(result.cost))
  return result


@base.register("FeatProp", needs=("features",), options=OPTIONS, check=check_options,
               description="k-medoids of the unlabelled nodes on learner features propagated "
                           "over the similarity graph (Wu et al. 2019)")
def _featprop(key, pool, budget, *, featprop_hops, featprop_max_sweeps):
  return featprop_medoids(key, pool.features, pool.labelled_mask, budget, hops=featprop_hops,
                          max_sweeps=featprop_max_sweeps).medoids


def featprop(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
             **options) -> jax.Array:
  """FeatProp on a features array: the registered sampler's picks.

  Args:
    key: PRNG key.
    features: [N, dim] learner embeddings.
    labelled_mask: [N] bool.
    budget: number of picks.
    **options: `featprop_hops` (default 2), `featprop_max_sweeps` (default
      `kmedoids.DEFAULT_MAX_SWEEPS`).
  Returns:
    [budget] int32 distinct unlabelled node indices (the medoids, in medoid-slot order).
  Raises:
    ValueError: bad features, mask, budget or options (unknown names included).
  """
  return base.SAMPLERS["FeatProp"](key, base.Pool(labelled_mask, features=features), budget,
                                   **options)
