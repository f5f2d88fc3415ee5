"""ProbCover (Yehuda et al., NeurIPS 2022, "Active Learning Through a Covering Lens").

ProbCover picks the nodes whose delta-balls cover the most of the pool not covered yet
(greedy maximum coverage, a (1 - 1/e) approximation of the best coverage):

1. Embeddings are L2-normalised (rows of norm 0 stay 0); the delta-ball graph has an edge u -> v
   when ||x_u - x_v|| < delta (`probcover_delta`), every node in its own ball.
2. The nodes in the balls of the labelled nodes are covered from the start.
3. `budget` times: pick the unlabelled node whose ball holds the most uncovered nodes (ties:
   lowest index, as the authors' `np.argmax`), and mark its ball covered.
4. When no unlabelled node covers anything new (the pool is covered), the remaining picks are
   uniform random unlabelled nodes (from `key`). Named deviation: the paper does not say, and
   the authors' code then returns `argmax` of all-zero degrees (node 0, possibly labelled, again
   and again); we keep the picks distinct and unlabelled.

Choosing delta: the authors take the largest delta whose balls are pure, "purity" >= alpha =
0.95, where a ball is pure when all its nodes share one k-means pseudo-label (k = the number of
classes) and purity is the fraction of pure balls; their CIFAR-10 runs use delta = 0.75 on
unit SimCLR features, and more classes give smaller radii. Our default, 0.6 on unit vectors, is
not tuned: learner embeddings differ from SimCLR's, so choose it for your data by the same rule
(`--config.sampler.probcover_delta=...`); smaller gives sparser graphs and more, smaller balls.

Another named deviation: the authors build the graph in batches of 500 rows and drop the last,
partial batch (`range(len // batch_size)`), so its nodes' balls are missing; every row is here.

Cost (`selection.coverage`): the graph is built once per call, O(N^2 d) in [512, N] distance
tiles (one matrix product at `HIGHEST` precision each) and kept as an edge list, O(E) memory
(8 bytes per edge; refused past 2^27 edges, lower delta then); the greedy loop is one jitted
program of O(budget (E + N)). No dense N x N array is ever formed.
"""

import jax
import jax.numpy as jnp

from jax_seqgcn import checks
from jax_seqgcn.samplers import base
from jax_seqgcn.selection import coverage

DELTA = 0.6
# Unit vectors are at most 2 apart: any delta > 2 joins every pair.
MAX_DELTA = 2.0
OPTIONS = dict(probcover_delta=DELTA)


def check_options(options) -> None:
  """ValueError unless `probcover_delta` is a number in (0, 2] (a bool is refused)."""
  delta = options.get("probcover_delta", DELTA)
  if not checks.is_finite_real(delta) or not 0 < delta <= MAX_DELTA:
    raise ValueError(f"bad ProbCover option(s): probcover_delta must be a number in (0, "
                     f"{MAX_DELTA:g}] (a radius on unit vectors, which are at most 2 apart), "
                     f"got {delta!r}")


@jax.jit
def unit_rows(features: jax.Array) -> jax.Array:
  """Rows scaled to norm 1; all-zero rows stay 0."""
  norms = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
  return features / jnp.where(norms > 0.0, norms, 1.0)


def probcover_graph(features: jax.Array, delta: float = DELTA) -> coverage.BallGraph:
  """The delta-ball graph of the L2-normalised `features` (its `degrees` are the ball sizes).

  Raises:
    ValueError: bad features or delta; a graph past `coverage.MAX_EDGES` edges.
  """
  check_options({"probcover_delta": delta})
  return coverage.ball_edges(unit_rows(checks.features(features)), float(delta))


@base.register("ProbCover", needs=("features",), options=OPTIONS, check=check_options,
               description="greedy max coverage of delta-balls on unit embeddings "
                           "(Yehuda et al. 2022)")
def _probcover(key, pool: base.Pool, budget: int, *, probcover_delta) -> jax.Array:
  graph = probcover_graph(pool.features, probcover_delta)
  return coverage.greedy_max_coverage(key, graph, pool.labelled_mask, int(budget))


def probcover(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
              **options) -> jax.Array:
  """ProbCover on a features array: the registered sampler's picks.

  Args:
    key: PRNG key (only for the random picks once everything is covered).
    features: [N, d] embeddings of every node of the pool.
    labelled_mask: [N] bool.
    budget: number of picks, 1 <= budget <= number of unlabelled nodes.
    **options: `probcover_delta` (0.6).
  Returns:
    [budget] int32 distinct unlabelled node indices, in pick order.
  Raises:
    ValueError: bad features, mask, budget or option; a graph too large (lower the delta).
  """
  return base.SAMPLERS["ProbCover"](key, base.Pool(labelled_mask, features=features), budget,
                                    **options)
