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

Inside `samplers.on_mesh(mesh)` over several devices both steps split the nodes over the mesh
axis 'data': the propagation is linear in N in its factored form (each hop one [dim, dim]
`psum` of V^T (X / d); `propagate_features_sharded`) and the k-medoids is
`kmedoids_sharded.k_medoids_rows` on the propagated rows as they lie. The picks are the same on
every process (in float64 those of one device; in float32 a near-tie may differ).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_seqgcn import checks
from jax_seqgcn.selection import adjacency
from jax_seqgcn.selection import graph
from jax_seqgcn.selection import kmedoids
from jax_seqgcn.selection import kmedoids_sharded
from jax_seqgcn.selection import sharding
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


_ROWS = P(sharding.DATA_AXIS)


def _psum(x):
  return jax.lax.psum(x, sharding.DATA_AXIS)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _graph_sharded(rows, *, mesh):
  """(V, d) of `graph.factored_adjacency` on each shard: V^T 1 is a `psum`."""
  def local(rows):
    unit = adjacency.l2_normalize(rows)
    total = _psum(jnp.sum(unit, axis=0))
    return unit, jnp.matmul(unit, total, precision=adjacency.HIGHEST) - 1.0
  return jax.shard_map(local, mesh=mesh, in_specs=_ROWS, out_specs=(_ROWS, _ROWS))(rows)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _propagate_hops_sharded(unit, sums, rows, hops, *, mesh):
  def local(unit, sums, rows, hops):
    def hop(_, x):  # `adjacency.propagate` of the factored form, V^T (x / d) all-reduced
      scaled = x / sums[:, None]
      inner = _psum(jnp.matmul(unit.T, scaled, precision=adjacency.HIGHEST))
      return jnp.matmul(unit, inner, precision=adjacency.HIGHEST) - scaled + x
    return jax.lax.fori_loop(0, hops, hop, rows)
  return jax.shard_map(local, mesh=mesh, in_specs=(_ROWS, _ROWS, _ROWS, P()),
                       out_specs=_ROWS)(unit, sums, rows, hops)


def propagate_features_sharded(features: np.ndarray, hops: int, mesh: Mesh) -> jax.Array:
  """`propagate_features` with the nodes split over `mesh`'s axis 'data'.

  Args:
    features: [N, dim] checked host features (float32, or float64 under x64), the same on
      every process.
    hops: number of applications of A, 0 <= hops <= MAX_HOPS.
    mesh: a mesh with an axis 'data'.
  Returns:
    [N_pad, dim] global array split over 'data' (N_pad = N padded to a multiple of the shards,
    zero rows past N): A^hops X, each device computing N / P rows; per hop one [dim, dim]
    all-reduce. Equal to `propagate_features` up to the order of float additions.
  Raises:
    ValueError: degenerate features (a column sum of the similarity graph ~0), as there.
  """
  check_options({"featprop_hops": hops})
  num_nodes = features.shape[0]
  rows = sharding.shard_rows(mesh, features, sharding.padded_rows(num_nodes, mesh))
  # Padding rows: V = 0, d = -1, so they stay 0 and add nothing to V^T (x / d).
  unit, sums = _graph_sharded(rows, mesh=mesh)
  checks.column_sums(sharding.to_host(sums)[:num_nodes])
  return _propagate_hops_sharded(unit, sums, rows, np.int32(hops), mesh=mesh)


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
    swap-optimal or the sweep cap was hit. Inside `samplers.on_mesh` over several devices
    (both steps split over the mesh), NumPy values, the same on every process.
  Raises:
    ValueError: as `propagate_features`, a bad mask, budget or option.
  """
  check_options({"featprop_hops": hops, "featprop_max_sweeps": max_sweeps})
  pool = base.validate_pool(base.Pool(labelled_mask, features=features), budget, ("features",),
                            name="FeatProp")

  def report(sweeps, cost, swaps):  # after each swap pass: live progress at large N
    progress.report("kmedoids", {"cost": [cost], "swaps": [swaps]}, first_step=sweeps - 1,
                    total_steps=max_sweeps)

  mesh = base.current_mesh()
  if sharding.spans_devices(mesh):  # inside `base.on_mesh`: the nodes split over the devices
    num_nodes = pool.labelled_mask.shape[0]
    num_rows = sharding.padded_rows(num_nodes, mesh)
    propagated = propagate_features_sharded(np.asarray(pool.features), hops, mesh)
    unlabelled = sharding.shard_rows(mesh, ~np.asarray(pool.labelled_mask), num_rows)
    result = kmedoids_sharded.k_medoids_rows(key, propagated, unlabelled, num_nodes, int(budget),
                                             mesh=mesh, max_sweeps=max_sweeps, on_sweep=report)
  else:
    propagated = propagate_features(pool.features, hops)
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
