"""The factored two-layer GCN's training with the nodes split over the devices of a mesh.

`train_gcn_sharded` runs `selection.gcn_fused` inside `jax.shard_map`: each device of the mesh
axis 'data' holds N / P rows of the features, of A V and of every per-node array, and the
reductions over nodes are `psum`s:

* the graph: one all-reduce of the [dim] vector F^T (1 / |F|) (column sums) and one of the
  [dim, dim] Gram matrix behind A V;
* each step: two all-reduces of a [dim] vector (V^T x / d forward, V^T g backward), the loss
  sums and the gradients ([hidden, dim] and smaller).

The parameters and Adam state are replicated: every device applies the same all-reduced
gradient, so one set of parameters comes out, and in a multi-process run every process runs the
same SPMD program and gets the same result. The dropout hash is a function of the global row
(`gcn_model.dropout_keep`), so the masks, and therefore the training, do not depend on the
number of devices: the results equal `graph.train_gcn`'s up to the order of float additions
(tests/test_gcn_sharded.py: float64 on 8 devices and on 2 processes).

N is padded to a multiple of P with zero rows that are neither labelled nor unlabelled; they
enter no sum. The scores and embedding are gathered to every process's host at the end
([N] and [N, hidden + 1]: small next to the [N, dim] features).
"""

import functools
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_seqgcn import checks
from jax_seqgcn.selection import gcn_fused
from jax_seqgcn.selection import gcn_training
from jax_seqgcn.selection import sharding
from jax_seqgcn.selection.gcn_model import GCNResult

DATA_AXIS = sharding.DATA_AXIS
_ROWS = P(DATA_AXIS)


def _offset(local_rows):
  return jax.lax.axis_index(DATA_AXIS) * local_rows


@functools.partial(jax.jit, static_argnames=("mesh",))
def _norms_and_sums(features, *, mesh):
  local = functools.partial(gcn_fused.norms_and_column_sums, axis_name=DATA_AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=_ROWS, out_specs=(_ROWS, _ROWS))(features)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _propagated(features, norms, sums, *, mesh):
  local = functools.partial(gcn_fused.propagated_features, axis_name=DATA_AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(_ROWS,) * 3, out_specs=_ROWS)(
      features, norms, sums)


def _graph(features, mesh, num_nodes=None) -> gcn_fused.FusedGraph:
  """The graph of sharded features; with `num_nodes`, the column sums of the real (unpadded)
  rows are checked before A V is built. The features stay the caller's array (a jitted function
  returning them would copy them)."""
  norms, sums = _norms_and_sums(features, mesh=mesh)
  if num_nodes is not None:
    checks.column_sums(sharding.to_host(sums)[:num_nodes])
  return gcn_fused.FusedGraph(features, norms, sums, _propagated(features, norms, sums, mesh=mesh))


@functools.partial(jax.jit, static_argnames=("mesh", "dropout_rate", "steps", "key_impl"))
def _chunk(key_data, graph, labelled, unlabelled, params, opt_state, first_step, total_steps, lambda_,
           learning_rate, weight_decay, *, mesh, dropout_rate, steps, key_impl):
  key = sharding.from_key_parts(key_data, key_impl)

  def local(key, graph, labelled, unlabelled, params, opt_state, *scalars):
    return gcn_fused.train_chunk(key, graph, labelled, unlabelled, params, opt_state, *scalars,
                                 dropout_rate=dropout_rate, steps=steps, axis_name=DATA_AXIS,
                                 row_offset=_offset(labelled.shape[0]))
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), _ROWS, _ROWS, _ROWS) + (P(),) * 7,
                       out_specs=P())(key, graph, labelled, unlabelled, params, opt_state,
                                      first_step, total_steps, lambda_, learning_rate,
                                      weight_decay)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _evaluate(graph, params, *, mesh):
  local = functools.partial(gcn_fused.evaluate, axis_name=DATA_AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(_ROWS, P()),
                       out_specs=(_ROWS, _ROWS))(graph, params)


def build_graph_sharded(features: np.ndarray, mesh: Mesh) -> gcn_fused.FusedGraph:
  """The `gcn_fused.FusedGraph` of host features [N, dim] (float32, or float64 under x64; the
  same on every process), its rows padded to a multiple of the shards and split over `mesh`'s
  axis 'data': each device holds N / P rows of each of its arrays."""
  features = np.asarray(features)
  sharded = sharding.shard_rows(mesh, features, sharding.padded_rows(len(features), mesh))
  return _graph(sharded, mesh)


def train_gcn_sharded(key: jax.Array, features, labelled_mask, mesh: Mesh, *, hidden: int,
                      dropout_rate: float, lambda_: float, steps: int, learning_rate: float,
                      weight_decay: float, params=None, chunk_steps: int = 50,
                      on_chunk: Optional[Callable[[int, np.ndarray], None]] = None) -> GCNResult:
  """`graph.train_gcn` of the factored two-layer GCN with the nodes split over `mesh`'s axis
  'data' (called by `train_gcn(..., mesh=...)`, which checks the options first).

  Args:
    key: PRNG key (the same on every process).
    features: [N, dim] host features, the same on every process.
    labelled_mask: [N] bool, with both labelled and unlabelled nodes.
    mesh: a mesh with an axis 'data' (`training.parallel.make_mesh`).
    hidden, dropout_rate, lambda_, steps, learning_rate, weight_decay, params, chunk_steps,
      on_chunk: as `graph.train_gcn`.
  Returns:
    `GCNResult` with host (NumPy) arrays: params, scores [N], embedding [N, hidden + 1] and
    losses [steps], the same on every process.
  Raises:
    ValueError: a mesh without an axis 'data', bad features or mask, degenerate column sums.
  """
  sharding.check_mesh(mesh)
  features = np.asarray(checks.numeric(features, "features"))
  # The dtype rules of `checks.features` (float32, or float64 under x64), checked on host:
  # the whole [N, dim] array never goes to one device.
  dtype = checks.features(features[:1]).dtype
  checks.finite_rows(features, "features")
  features = features.astype(dtype, copy=False)
  num_nodes, dim = features.shape
  labelled_mask = np.asarray(checks.mask(labelled_mask, num_nodes, need_both=True))
  num_rows = sharding.padded_rows(num_nodes, mesh)
  graph = _graph(sharding.shard_rows(mesh, features, num_rows), mesh, num_nodes)
  labelled = sharding.shard_rows(mesh, labelled_mask, num_rows)
  unlabelled = sharding.shard_rows(mesh, ~labelled_mask, num_rows)
  key_data, key_impl = sharding.key_parts(key)
  if params is None:
    params = gcn_fused.init_params(key, dim, hidden, dropout_rate, features.dtype)
  params = jax.tree.map(lambda p: np.asarray(p, features.dtype), params)  # host: replicated

  def chunk(params, opt_state, first, length):
    return _chunk(key_data, graph, labelled, unlabelled, params, opt_state, first, steps, lambda_,
                  learning_rate, weight_decay, mesh=mesh, dropout_rate=float(dropout_rate),
                  steps=length, key_impl=key_impl)

  opt_state = jax.tree.map(np.asarray, gcn_fused.init_state(params))
  params, losses = gcn_training.run_chunks(chunk, params, opt_state,
                                           steps=steps, chunk_steps=chunk_steps,
                                           on_chunk=on_chunk)
  scores, embedding = _evaluate(graph, params, mesh=mesh)
  params = jax.tree.map(sharding.to_host, params)
  return GCNResult(params, sharding.to_host(scores)[:num_nodes],
                   sharding.to_host(embedding)[:num_nodes],
                   np.asarray(losses, features.dtype))
