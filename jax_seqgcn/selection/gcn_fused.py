"""The factored two-layer GCN's training with hand-written gradients, in linear memory.

The same arithmetic as `gcn_training.train_chunk` on a `FactoredAdjacency` with `num_layers=2`
(the samplers' default, and what "auto" picks for pools larger than twice the feature width),
arranged for large pools (1.28M nodes x 512 features on one 2-core host, docs/performance.md):

* no L2-normalised copy of the features: V = F / |F| row by row, so V x = (F x) / |F| and
  V^T s = F^T (s / |F|) read the caller's features F directly;
* A V (the first layer's fixed input) and the [dim, dim] Gram matrix behind it are built in row
  blocks, so the build needs no [N, dim] temporary besides A V itself;
* each step's gradient is written out (no autodiff): the first layer's weight gradient is
  computed as dH^T (A V) ([hidden, dim], the fast orientation of XLA's CPU matrix product) and
  Adam keeps that kernel transposed inside a chunk; the masks of ReLU and dropout are recomputed
  from H instead of stored.

Every reduction over nodes goes through `_sum`, a `psum` over `axis_name` when one is given, so
the same functions run on one device or on a shard of the rows inside `jax.shard_map`
(`selection.gcn_sharded`); `row_offset` gives the shard's first global row to the dropout hash.
Rows that are neither labelled nor unlabelled (padding) do not enter the loss, and rows of zero
features contribute nothing to the graph.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jax_seqgcn.selection.adjacency import HIGHEST
from jax_seqgcn.selection.adjacency import IdentityAdjacency
from jax_seqgcn.selection.gcn_model import GCN
from jax_seqgcn.selection.gcn_model import adam_coupled
from jax_seqgcn.selection.gcn_model import dropout_keep
from jax_seqgcn.selection.gcn_model import layer_key

# Rows per block when building the Gram matrix and A V: an [ROW_BLOCK, dim] tile at a time.
ROW_BLOCK = 8192
# torch F.normalize's eps (as `adjacency.l2_normalize`).
_EPS = 1e-12


class FusedGraph(NamedTuple):
  """The graph of a factored GCN, kept as the features themselves (all rows of one shard).

  Attributes:
    features: [N, dim] features F (not normalised).
    norms: [N] max(|F_i|, eps), so V = F / norms.
    column_sums: [N] d = column sums of V V^T - I.
    propagated: [N, dim] A V.
  """
  features: jax.Array
  norms: jax.Array
  column_sums: jax.Array
  propagated: jax.Array


def _sum(x, axis_name, axis=None):
  total = jnp.sum(x, axis=axis)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def _varying(x, axis_name):
  """A loop's initial value, made per-device inside `shard_map` (its carry becomes so)."""
  return x if axis_name is None else jax.lax.pcast(x, axis_name, to="varying")


def _left(weights, features, axis_name):
  """sum_i weights_i F_i: [dim] (F^T w over every shard)."""
  out = jnp.matmul(weights, features, precision=HIGHEST)
  return out if axis_name is None else jax.lax.psum(out, axis_name)


def _row_blocks(num_rows):
  block = min(ROW_BLOCK, num_rows)
  return block, -(-num_rows // block)


def _block(x, b, block, num_rows):
  """Rows [start, start + block) of x with start = min(b * block, N - block): the last block is
  moved back to fit, overlapping its predecessor (the caller masks or rewrites the overlap)."""
  start = jnp.minimum(b * block, num_rows - block)
  return start, jax.lax.dynamic_slice_in_dim(x, start, block)


def norms_and_column_sums(features, axis_name=None):
  """(norms [N], column sums d [N]) of V = F / norms, without forming V (checked by the caller)."""
  norms = jnp.maximum(jnp.linalg.norm(features, axis=-1), _EPS)
  total = _left(1.0 / norms, features, axis_name)  # V^T 1 = F^T (1 / norms)
  return norms, jnp.matmul(features, total, precision=HIGHEST) / norms - 1.0


def propagated_features(features, norms, column_sums, axis_name=None) -> jax.Array:
  """A V [N, dim] = (F M - F / d + F) / norms with the Gram matrix
  M = V^T (V / d) = F^T diag(1 / (norms^2 d)) F, both built in `ROW_BLOCK` row blocks."""
  num_rows, dim = features.shape
  block, count = _row_blocks(num_rows)
  weights = 1.0 / (jnp.square(norms) * column_sums)

  def gram(b, acc):
    start, rows = _block(features, b, block, num_rows)
    _, w = _block(weights, b, block, num_rows)
    fresh = start + jnp.arange(block) >= b * block  # overlap of the last block counted once
    w = jnp.where(fresh, w, 0.0)
    return acc + jnp.matmul(rows.T, rows * w[:, None], precision=HIGHEST)

  gram_matrix = jax.lax.fori_loop(0, count, gram,
                                  _varying(jnp.zeros((dim, dim), features.dtype), axis_name))
  if axis_name is not None:
    gram_matrix = jax.lax.psum(gram_matrix, axis_name)

  def fill(b, out):
    start, rows = _block(features, b, block, num_rows)
    _, d = _block(column_sums, b, block, num_rows)
    _, n = _block(norms, b, block, num_rows)
    av = (jnp.matmul(rows, gram_matrix, precision=HIGHEST) - rows / d[:, None] + rows) / n[:, None]
    return jax.lax.dynamic_update_slice_in_dim(out, av, start, 0)

  return jax.lax.fori_loop(0, count, fill, jnp.zeros_like(features))  # per-device already


def build_graph(features, norms, column_sums, axis_name=None) -> FusedGraph:
  """`FusedGraph` of these features (traceable; see `build_graph_jit`)."""
  return FusedGraph(features, norms, column_sums,
                    propagated_features(features, norms, column_sums, axis_name))


def _propagate_1d(graph, x, axis_name):
  """A x for one signal x [N]: V (V^T (x / d)) - x / d + x (as `adjacency.propagate`)."""
  scaled = x / graph.column_sums
  u = _left(scaled / graph.norms, graph.features, axis_name)
  return jnp.matmul(graph.features, u, precision=HIGHEST) / graph.norms - scaled + x


def _propagate_1d_transposed(graph, g, axis_name):
  """A^T g = D^-1 (V V^T - I) g + g: the gradient of `_propagate_1d` (V V^T is symmetric)."""
  u = _left(g / graph.norms, graph.features, axis_name)
  return (jnp.matmul(graph.features, u, precision=HIGHEST) / graph.norms - g) / graph.column_sums + g


def _to_fused(tree):
  """A params-shaped tree (params or Adam moments) with gc1's kernel transposed ([hidden, dim])."""
  def swap(path, leaf):
    names = [getattr(p, "key", None) for p in path]
    return leaf.T if names[-2:] == ["gc1", "kernel"] else leaf
  return jax.tree_util.tree_map_with_path(swap, tree)


def _keep_mask(key, step, shape, rate, row_offset):
  if rate == 0.0:
    return jnp.ones(shape, bool)
  return dropout_keep(layer_key(jax.random.fold_in(key, step), 0), shape, rate, row_offset)


def _loss_and_grads(params, graph, labelled, unlabelled, counts, dropout_key, step, lambda_, *,
                    dropout_rate, axis_name, row_offset):
  """Eq. 6 loss and its gradient for fused-layout params (gc1 kernel [hidden, dim])."""
  kernel_t, bias1 = params["gc1"]["kernel"], params["gc1"]["bias"]
  w3, bias3 = params["gc3"]["kernel"][:, 0], params["gc3"]["bias"]
  # [dim, hidden] row-major for the forward product: transposed here, once per step.
  kernel = jax.lax.optimization_barrier(kernel_t.T)
  pre = jnp.matmul(graph.propagated, kernel, precision=HIGHEST) + bias1  # H = (A V) W1 + b1
  keep = (pre > 0) & _keep_mask(dropout_key, step, pre.shape, dropout_rate, row_offset)
  hidden = jnp.where(keep, pre / (1.0 - dropout_rate), 0.0)
  x = jnp.sum(hidden * w3, axis=1)  # h W3
  logits = _propagate_1d(graph, x, axis_name) + bias3[0]
  num_labelled, num_unlabelled = counts
  loss = (-_sum(jnp.where(labelled, jax.nn.log_sigmoid(logits), 0.0), axis_name) / num_labelled
          - lambda_ * _sum(jnp.where(unlabelled, jax.nn.log_sigmoid(-logits), 0.0), axis_name)
          / num_unlabelled)
  sig = jax.nn.sigmoid(logits)
  grad_logits = (jnp.where(labelled, (sig - 1.0) / num_labelled, 0.0)
                 + jnp.where(unlabelled, lambda_ * sig / num_unlabelled, 0.0))
  grad_x = _propagate_1d_transposed(graph, grad_logits, axis_name)
  grad_pre = jnp.where(keep, grad_x[:, None] * w3[None, :] / (1.0 - dropout_rate), 0.0)
  grad_kernel_t = jax.lax.dot_general(grad_pre, graph.propagated, (((0,), (0,)), ((), ())),
                                      precision=HIGHEST)
  if axis_name is not None:
    grad_kernel_t = jax.lax.psum(grad_kernel_t, axis_name)
  grads = {"gc1": {"kernel": grad_kernel_t, "bias": _sum(grad_pre, axis_name, axis=0)},
           "gc3": {"kernel": _sum(hidden * grad_x[:, None], axis_name, axis=0)[:, None],
                   "bias": _sum(grad_logits, axis_name)[None]}}
  return loss, grads


def counts(labelled, unlabelled, axis_name=None):
  """(number labelled, number unlabelled) over every shard, in the features' float dtype."""
  return (_sum(labelled.astype(jnp.float32), axis_name),
          _sum(unlabelled.astype(jnp.float32), axis_name))


def train_chunk(key, graph: FusedGraph, labelled, unlabelled, params, opt_state, first_step,
                total_steps, lambda_, learning_rate, weight_decay, *, dropout_rate, steps,
                axis_name: Optional[str] = None, row_offset=0):
  """Adam steps first_step .. first_step + steps - 1 of the factored two-layer GCN, as
  `gcn_training.train_chunk` (no-op steps at or past `total_steps`, step s's dropout from
  fold_in(split(key)[1], s)), with params and Adam state in the flax layout at both ends.

  Args:
    key: the training's PRNG key.
    graph: `FusedGraph` of this device's rows.
    labelled, unlabelled: [N] bool (padding rows are False in both).
    params, opt_state: flax-layout GCN parameters and `adam_coupled` state.
    first_step, total_steps, lambda_, learning_rate, weight_decay: traced scalars.
    dropout_rate, steps: static.
    axis_name: the mesh axis the rows are split over, or None on one device.
    row_offset: global index of this device's first row (for the dropout hash).
  Returns:
    (params, opt_state, losses [steps]).
  """
  dropout_key = jax.random.split(key)[1]
  num = counts(labelled, unlabelled, axis_name)
  num = tuple(c.astype(graph.features.dtype) for c in num)
  tx = adam_coupled(learning_rate, weight_decay)
  grads_of = functools.partial(_loss_and_grads, graph=graph, labelled=labelled,
                               unlabelled=unlabelled, counts=num, dropout_key=dropout_key,
                               lambda_=lambda_, dropout_rate=dropout_rate, axis_name=axis_name,
                               row_offset=row_offset)

  def step_fn(carry, step):
    loss, grads = grads_of(carry[0], step=step)
    updates, opt_state = tx.update(grads, carry[1], carry[0])
    new = (optax.apply_updates(carry[0], updates), opt_state)
    return jax.tree.map(lambda n, o: jnp.where(step < total_steps, n, o), new, carry), loss

  (params, opt_state), losses = jax.lax.scan(step_fn, (_to_fused(params), _to_fused(opt_state)),
                                             first_step + jnp.arange(steps))
  return _to_fused(params), _to_fused(opt_state), losses


def evaluate(graph: FusedGraph, params, axis_name: Optional[str] = None):
  """The eval-mode pass: (scores [N], embedding [N, hidden + 1]) as `GCN` (no dropout)."""
  hidden = jax.nn.relu(jnp.matmul(graph.propagated, params["gc1"]["kernel"], precision=HIGHEST)
                       + params["gc1"]["bias"])
  x = jnp.matmul(hidden, params["gc3"]["kernel"], precision=HIGHEST)[:, 0]
  logits = _propagate_1d(graph, x, axis_name) + params["gc3"]["bias"][0]
  return jax.nn.sigmoid(logits), jnp.concatenate([hidden, logits[:, None]], axis=-1)


def init_params(key, dim: int, hidden: int, dropout_rate: float, dtype):
  """Initial parameters of the two-layer `GCN` (from split(key)[0], as `gcn_training`): they
  depend only on the key and the shapes, so a constant [2, dim] probe initialises them."""
  probe = jnp.ones((2, dim), dtype) / jnp.sqrt(jnp.asarray(dim, dtype))
  return GCN(hidden, dropout_rate, 2, param_dtype=dtype).init(
      jax.random.split(key)[0], probe, IdentityAdjacency(), train=False)["params"]


def init_state(params):
  """The `adam_coupled` state of `params` (it does not depend on the learning rate or decay)."""
  return adam_coupled(0.0, 0.0).init(params)


norms_and_column_sums_jit = jax.jit(norms_and_column_sums)
propagated_features_jit = jax.jit(propagated_features)


def build_graph_jit(features, norms, column_sums) -> FusedGraph:
  """`build_graph` with A V compiled; the features stay the caller's array (a jitted function
  that returned them would copy them: [N, dim] more memory)."""
  return FusedGraph(features, norms, column_sums,
                    propagated_features_jit(features, norms, column_sums))
train_chunk_jit = jax.jit(train_chunk, static_argnames=("dropout_rate", "steps", "axis_name"))
evaluate_jit = jax.jit(evaluate)
