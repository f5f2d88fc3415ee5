"""The factored two-layer GCN's hand-written training (selection.gcn_fused) against autodiff,
NumPy, and its dropout hash."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn.selection import gcn_fused
from jax_seqgcn.selection import gcn_model
from jax_seqgcn.selection import gcn_training
from jax_seqgcn.selection import graph


def _problem(n=120, dim=12, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return np.abs(rng.normal(size=(n, dim))).astype(dtype), np.arange(n) >= n - 25


def _autodiff(key, x, mask, steps, **net):
  """The generic path (flax GCN, `jax.value_and_grad`) on the same factored graph."""
  unit = graph.l2_normalize(jnp.asarray(x))
  return gcn_training.train_in_chunks(
      key, unit, jnp.asarray(mask), None, 1.2, 1e-3, 5e-4, steps=steps, chunk_steps=50,
      on_chunk=None, adjacency_mode="factored", num_layers=2, architecture="gcn", **net)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_fused_training_equals_autodiff(dtype, rtol):
  with jax.enable_x64(dtype == np.float64):
    x, mask = _problem(dtype=dtype)
    net = dict(hidden=8, dropout_rate=0.3)
    fused = graph.train_gcn(jax.random.key(1), x, mask, steps=25, adjacency="factored", **net)
    auto = _autodiff(jax.random.key(1), x, mask, 25, **net)
    assert fused.scores.dtype == dtype
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(auto), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * 1e-2)


def test_fused_training_uses_given_params_and_chunks_exactly():
  x, mask = _problem(seed=3)
  params = graph.GCN(hidden=8).init(jax.random.key(9), jnp.ones((2, 12)),
                                    graph.IdentityAdjacency(), train=False)["params"]
  whole = graph.train_gcn(jax.random.key(2), x, mask, steps=10, hidden=8, params=params,
                          adjacency="factored")
  chunked = graph.train_gcn(jax.random.key(2), x, mask, steps=10, hidden=8, params=params,
                            adjacency="factored", chunk_steps=4)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  auto = _autodiff(jax.random.key(2), x, mask, 10, hidden=8, dropout_rate=0.3)
  assert not np.allclose(np.asarray(whole.scores), np.asarray(auto.scores))  # params were used


def test_graph_build_equals_numpy_across_row_blocks(monkeypatch):
  monkeypatch.setattr(gcn_fused, "ROW_BLOCK", 7)  # 50 rows: 8 blocks, the last one overlapping
  with jax.enable_x64(True):
    x, _ = _problem(n=50, dim=6, dtype=np.float64)
    norms, sums = gcn_fused.norms_and_column_sums(jnp.asarray(x))
    fused = gcn_fused.build_graph(jnp.asarray(x), norms, sums)
    v = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = v @ v.T - np.eye(50)
    adjacency = s / s.sum(axis=0)[None, :] + np.eye(50)
    np.testing.assert_allclose(np.asarray(sums), s.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(fused.propagated), adjacency @ v, rtol=1e-11)


def test_padding_rows_change_nothing():
  # Rows of zero features that are neither labelled nor unlabelled: how a sharded pool is padded.
  x, mask = _problem(n=60, seed=4)
  key, num_pad = jax.random.key(5), 4
  params = graph.GCN(hidden=8).init(jax.random.key(0), jnp.ones((2, 12)),
                                    graph.IdentityAdjacency(), train=False)["params"]

  @jax.jit
  def run(features, labelled, unlabelled):
    norms, sums = gcn_fused.norms_and_column_sums(features)
    fused = gcn_fused.build_graph(features, norms, sums)
    out, _, losses = gcn_fused.train_chunk(
        key, fused, labelled, unlabelled, params, gcn_fused.init_state(params), 0, 6, 1.2, 1e-3,
        5e-4, dropout_rate=0.3, steps=6)
    return out, losses, gcn_fused.evaluate(fused, out)

  plain = run(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(~mask))
  padded = run(jnp.concatenate([jnp.asarray(x), jnp.zeros((num_pad, 12))]),
               jnp.concatenate([jnp.asarray(mask), jnp.zeros(num_pad, bool)]),
               jnp.concatenate([jnp.asarray(~mask), jnp.zeros(num_pad, bool)]))
  for a, b in zip(jax.tree.leaves(plain[:2]), jax.tree.leaves(padded[:2]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-8)
  np.testing.assert_allclose(np.asarray(plain[2][0]), np.asarray(padded[2][0][:60]), rtol=2e-6)


def test_dropout_keep_rate_and_row_offsets():
  key = jax.random.key(7)
  keep = np.asarray(graph.dropout_keep(key, (4000, 250), 0.3))
  # 1e6 Bernoulli(0.7) draws: 6 standard deviations is 0.0027.
  assert abs(keep.mean() - 0.7) < 0.0028
  assert abs(keep[:, 0].mean() - 0.7) < 0.05 and abs(keep[0].mean() - 0.7) < 0.2
  # Rows 1000.. of the whole mask are the mask of a shard that starts at row 1000.
  np.testing.assert_array_equal(
      keep[1000:1500], np.asarray(graph.dropout_keep(key, (500, 250), 0.3, row_offset=1000)))
  other = np.asarray(graph.dropout_keep(jax.random.key(8), (4000, 250), 0.3))
  assert 0.35 < (keep != other).mean() < 0.49  # independent masks disagree on 2 * 0.3 * 0.7
  assert np.asarray(graph.dropout_keep(key, (50, 50), 0.0)).all()
  assert gcn_model.dropout_threshold(0.25) == 2 ** 30
  assert gcn_model.dropout_threshold(1 - 2 ** -40) == 2 ** 32 - 1
