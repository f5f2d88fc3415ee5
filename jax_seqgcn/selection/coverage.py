"""Greedy maximum coverage on a delta-ball graph, as a sparse edge list (ProbCover's selection).

The delta-ball graph of N points has an edge u -> v when ||x_u - x_v|| < delta (every node is in
its own ball: the self-edge is always there). `ball_edges` builds it as an edge list, `ProbCover`
(samplers/probcover.py) then runs `greedy_max_coverage` on it:

1. Nodes covered by a labelled node's ball are covered from the start.
2. `budget` times: pick the available (unlabelled, not yet picked) node whose ball holds the most
   uncovered nodes (ties: lowest index), and mark its ball covered. When no available node
   covers anything new, the pick is a uniform random available node instead (from `key`), as
   are all later ones.

Cost and memory:

* `ball_edges`: the N x N distances are computed once, a [block, N] tile at a time (squared
  distances from the Gram expansion, one matrix product at `HIGHEST` precision per tile, O(N^2 d)
  in all); each tile's edges go to the host (`np.nonzero`), so memory is O(block N) on the device
  plus the edge list, O(E) (8 bytes per edge) on the host. The graph is refused (ValueError) past
  `max_edges` edges: a delta that makes the graph nearly complete makes coverage meaningless.
* `greedy_max_coverage`: one jitted loop of `budget` rounds on the device. Every node's count
  of uncovered out-neighbours is computed once (one pass over the edges, sorted by source);
  each round picks the largest count (O(N)), marks the pick's ball covered (a slice of at most
  the largest degree) and subtracts 1 from the count of every source of an edge into a newly
  covered node (the in-edges, from the same list sorted by target). Every node is newly
  covered at most once, so the loop costs O(E + budget (N + max degree)) in all, and memory
  O(E + N): 12 bytes per edge on the device (source, target, and sources by target; padded to
  a power of two). No N x N array anywhere.

The edge list is the graph: whatever float32 rounding decides at distance ~delta, the counts and
the balls are read from the same list, so they always agree.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_seqgcn import checks

# Rows of the distance matrix per tile: a [EDGE_BLOCK, N] tile at a time.
EDGE_BLOCK = 512
# Refuse larger graphs (src + dst int32: 1 GiB on the host, twice that on the device).
MAX_EDGES = 2 ** 27
# Full float32 products on every backend (TPU: not bfloat16 passes); see selection/__init__.py.
HIGHEST = jax.lax.Precision.HIGHEST


class BallGraph(NamedTuple):
  """A delta-ball graph as an edge list sorted by source (NumPy, on the host).

  Attributes:
    src: [E] int32 source of each edge (the ball's centre), ascending.
    dst: [E] int32 target (a node inside the ball), ascending within each source.
    num_nodes: N.
  """
  src: np.ndarray
  dst: np.ndarray
  num_nodes: int

  @property
  def degrees(self) -> np.ndarray:
    """[N] ball sizes (self included): the coverage counts when nothing is covered."""
    return np.bincount(self.src, minlength=self.num_nodes)


@functools.partial(jax.jit, static_argnames="block")
def _tile(features, sq_norms, start, delta_sq, *, block):
  """[block, N] bool: rows start..start+block of the graph (rows past N are all False)."""
  n = features.shape[0]
  rows = start + jnp.arange(block)
  valid = rows < n
  rows = jnp.minimum(rows, n - 1)
  sq = (sq_norms[rows][:, None] + sq_norms[None, :]
        - 2.0 * jnp.matmul(features[rows], features.T, precision=HIGHEST))
  edges = (sq < delta_sq) | (rows[:, None] == jnp.arange(n)[None, :])
  return edges & valid[:, None]


def ball_edges(features: jax.Array, delta: float, *, block: int = EDGE_BLOCK,
               max_edges: int = MAX_EDGES) -> BallGraph:
  """The delta-ball graph of `features` as an edge list (module docstring).

  Args:
    features: [N, d] real numbers (computed in at least float32).
    delta: ball radius, a finite number > 0; edge u -> v iff ||x_u - x_v|| < delta.
    block: rows per distance tile (static).
    max_edges: the most edges accepted.
  Returns:
    `BallGraph` with E >= N edges (the self-edges).
  Raises:
    ValueError: bad features or delta; more than `max_edges` edges (the message gives the mean
      degree so far).
  """
  features = checks.features(features)
  if not checks.is_finite_real(delta) or delta <= 0:
    raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
  n = features.shape[0]
  block = int(min(block, n))
  sq_norms = jnp.sum(jnp.square(features), axis=-1)
  delta_sq = jnp.asarray(float(delta) ** 2, features.dtype)
  srcs, dsts, total = [], [], 0
  for start in range(0, n, block):
    tile = np.asarray(_tile(features, sq_norms, jnp.int32(start), delta_sq, block=block))
    rows, cols = np.nonzero(tile)
    total += rows.size
    if total > max_edges:
      raise ValueError(
          f"the delta-ball graph has more than {max_edges} edges (mean degree "
          f"{total / min(start + block, n):.0f} over the first {min(start + block, n)} of {n} "
          f"nodes) at delta={delta!r}: the radius is too large for this pool (nearly every "
          "node covers every other), lower it")
    srcs.append((rows + start).astype(np.int32))
    dsts.append(cols.astype(np.int32))
  return BallGraph(np.concatenate(srcs), np.concatenate(dsts), n)


class _Edges(NamedTuple):
  """The edge list on the device, padded to a power-of-two length (few compiles).

  `dst` by source (`out_offsets`: CSR of the out-edges), `in_src` by target (`in_offsets`: CSR
  of the in-edges, the same edges transposed); `num_edges` of them are real.
  """
  src: jax.Array
  dst: jax.Array
  out_offsets: jax.Array
  in_src: jax.Array
  in_offsets: jax.Array
  num_edges: jax.Array


class _State(NamedTuple):
  covered: jax.Array
  counts: jax.Array
  available: jax.Array
  picks: jax.Array


def _uncover(edges: _Edges, counts, newly, ball, *, chunk):
  """counts[u] -= 1 for every edge u -> v into a newly covered node v of `ball`.

  The in-edges of the newly covered nodes are visited `chunk` at a time as one flat list (their
  in-degrees' prefix sums say which node each position belongs to): the work is their number,
  and each node is newly covered once, so O(E) over the whole greedy loop.
  """
  n = counts.shape[0]
  safe = jnp.where(newly, ball, 0)
  lengths = jnp.where(newly, edges.in_offsets[safe + 1] - edges.in_offsets[safe], 0)
  ends = jnp.cumsum(lengths)
  starts = ends - lengths

  def body(state):
    c, counts = state
    position = c * chunk + jnp.arange(chunk)
    owner = jnp.minimum(jnp.searchsorted(ends, position, side="right"), ball.shape[0] - 1)
    edge = edges.in_offsets[safe[owner]] + position - starts[owner]
    source = jnp.where(position < ends[-1], edges.in_src[jnp.clip(edge, 0)], n)
    return c + 1, counts.at[source].add(-1, mode="drop")

  num_chunks = (ends[-1] + chunk - 1) // chunk
  return jax.lax.while_loop(lambda s: s[0] < num_chunks, body, (jnp.int32(0), counts))[1]


@functools.partial(jax.jit, static_argnames=("budget", "max_degree", "chunk"))
def _greedy(key, edges: _Edges, labelled_mask, *, budget, max_degree, chunk):
  n = labelled_mask.shape[0]
  edge_ok = jnp.arange(edges.src.shape[0]) < edges.num_edges
  from_labelled = edge_ok & labelled_mask[edges.src]
  covered = jnp.zeros((n,), bool).at[jnp.where(from_labelled, edges.dst, n)].set(
      True, mode="drop")
  # Uncovered out-neighbours of every node: one pass over the edges (sorted by source); later
  # rounds only subtract the newly covered nodes' in-edges.
  uncovered = (edge_ok & ~covered[jnp.minimum(edges.dst, n - 1)]).astype(jnp.int32)
  cumulative = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(uncovered)])
  counts = cumulative[edges.out_offsets[1:]] - cumulative[edges.out_offsets[:-1]]
  out_degrees = edges.out_offsets[1:] - edges.out_offsets[:-1]
  # The fallback order: a uniform random permutation of the nodes (from `key`).
  priority = jax.random.uniform(key, (n,))

  def body(t, state):
    greedy = jnp.argmax(jnp.where(state.available, state.counts, -1)).astype(jnp.int32)
    fallback = jnp.argmax(jnp.where(state.available, priority, -1.0)).astype(jnp.int32)
    pick = jnp.where(state.counts[greedy] > 0, greedy, fallback)
    ball = jax.lax.dynamic_slice(edges.dst, (edges.out_offsets[pick],), (max_degree,))
    in_ball = jnp.arange(max_degree) < out_degrees[pick]
    ball = jnp.where(in_ball, ball, 0)
    newly = in_ball & ~state.covered[ball]
    counts = _uncover(edges, state.counts, newly, ball, chunk=chunk)
    return _State(state.covered.at[jnp.where(newly, ball, n)].set(True, mode="drop"), counts,
                  state.available.at[pick].set(False), state.picks.at[t].set(pick))

  state = _State(covered, counts, ~labelled_mask, jnp.zeros((budget,), jnp.int32))
  return jax.lax.fori_loop(0, budget, body, state).picks


def _capacity(size: int) -> int:
  """The next power of two >= size: the edge arrays' static length (few compiles)."""
  return 1 << max(0, int(size) - 1).bit_length()


def _device_edges(graph: BallGraph, max_degree: int) -> _Edges:
  n, num_edges = graph.num_nodes, graph.src.size
  # Padding: the dynamic slice of a ball must fit inside the array (else it would be shifted).
  pad = _capacity(num_edges + max_degree) - num_edges
  offsets = lambda ids: np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=n))])
  by_target = np.argsort(graph.dst, kind="stable")
  padded = lambda a, fill: jnp.asarray(np.concatenate([a, np.full(pad, fill, np.int32)]))
  return _Edges(padded(graph.src, 0), padded(graph.dst, n),
                jnp.asarray(offsets(graph.src), jnp.int32), padded(graph.src[by_target], 0),
                jnp.asarray(offsets(graph.dst), jnp.int32), jnp.int32(num_edges))


# In-edges of newly covered nodes visited per step of the decrement loop.
UNCOVER_CHUNK = 4096


def greedy_max_coverage(key: jax.Array, graph: BallGraph, labelled_mask, budget: int) -> jax.Array:
  """Greedy max coverage of `graph` from the labelled nodes' balls (module docstring).

  Args:
    key: PRNG key, used only once no available node covers anything new.
    graph: `ball_edges(...)`.
    labelled_mask: [N] bool; labelled nodes cover their balls and are never picked.
    budget: number of picks, 1 <= budget <= number of unlabelled nodes.
  Returns:
    [budget] int32 distinct unlabelled node indices, in pick order.
  Raises:
    ValueError: a bad mask or budget.
  """
  n = graph.num_nodes
  labelled_mask = checks.mask(labelled_mask, n)
  checks.budget(budget, int(n - jnp.sum(labelled_mask)))
  max_degree = _capacity(int(graph.degrees.max()))
  return _greedy(key, _device_edges(graph, max_degree), labelled_mask, budget=int(budget),
                 max_degree=max_degree, chunk=UNCOVER_CHUNK)
