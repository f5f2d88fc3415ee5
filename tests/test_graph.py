"""Tests of jax_seqgcn.selection.graph against the reference outputs (tests/data), NumPy and hand math."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn.selection import gcn_fused
from jax_seqgcn.selection import gcn_training
from jax_seqgcn.selection import graph
from tests.conftest import has_square_array


def numpy_adjacency(features):
  x = np.asarray(features, np.float64)
  v = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  s = v @ v.T - np.eye(len(v))
  return s / s.sum(axis=0)[None, :] + np.eye(len(v))


def reference_params(ref, dtype=jnp.float32):
  return jax.tree.map(lambda p: jnp.asarray(p, dtype), graph.params_from_torch(ref.gcn_init))


def test_adjacency_matches_reference(ref):
  # The reference's dense adjacency is kept as a fixed sample of entries (the diagonal, six full
  # rows and columns, 50k random entries) and as its product with a probe matrix (next test).
  adj = np.asarray(graph.normalized_adjacency(ref.features))
  rows, cols, values = ref.adj_sample
  np.testing.assert_allclose(adj[rows, cols], values, rtol=0, atol=1e-6)
  np.testing.assert_allclose(adj.sum(axis=0), 2.0, atol=1e-4)


def test_adjacency_matches_numpy_on_random_features():
  x = np.abs(np.random.default_rng(1).normal(size=(50, 7))).astype(np.float32)
  np.testing.assert_allclose(graph.normalized_adjacency(x), numpy_adjacency(x), atol=1e-6)


def test_factored_propagation_equals_dense(ref):
  x, reference_adj_times_x = ref.adj_probe  # x: default_rng(2).normal(size=(3000, 5)), float32
  dense = graph.propagate(graph.normalized_adjacency(ref.features), x)
  factored = graph.propagate(graph.factored_adjacency(ref.features), x)
  np.testing.assert_allclose(factored, dense, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dense, reference_adj_times_x, rtol=1e-4, atol=1e-5)


def test_step0_loss_scores_and_gradients_match_reference(ref):
  v = jnp.asarray(ref.features_l2)
  adj = graph.normalized_adjacency(v)
  model = graph.GCN(dropout_rate=0.0)

  def loss_fn(params):
    scores, _ = model.apply({"params": params}, v, adj, train=True)
    return graph.gcn_loss(scores, ref.labelled_mask), scores

  (loss, scores), grads = jax.value_and_grad(loss_fn, has_aux=True)(reference_params(ref))
  assert abs(float(loss) - float(ref.gcn_loss_all[0])) < 1e-5
  np.testing.assert_allclose(scores, ref.gcn_outputs_by_step["step0"], atol=1e-5)
  for layer in ("gc1", "gc3"):
    np.testing.assert_allclose(grads[layer]["kernel"], ref.gcn_grad0[f"{layer}.weight"], atol=1e-5)
    np.testing.assert_allclose(grads[layer]["bias"], ref.gcn_grad0[f"{layer}.bias"], atol=1e-5)


@pytest.mark.parametrize("steps", [1, 10])
def test_early_trajectory_float32(ref, steps):
  result = graph.train_gcn(jax.random.key(0), ref.features_l2, ref.labelled_mask,
                           dropout_rate=0.0, params=reference_params(ref), steps=steps,
                           adjacency="dense")
  np.testing.assert_allclose(result.scores, ref.gcn_outputs_by_step[f"step{steps}"], atol=1e-5)
  np.testing.assert_allclose(result.losses, ref.gcn_loss_all[:steps], atol=3e-5)


@pytest.mark.parametrize("adjacency", ["dense", "factored"])
def test_trajectory_and_picks_float64(ref, adjacency):
  # tests/data/README.md: the last steps amplify rounding, so the trajectory and the final picks are
  # compared in float64 (the float32 reference vs a float64 recompute: 7e-6 at step 100).
  from jax_seqgcn import samplers  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    v = jnp.asarray(ref.features_l2, jnp.float64)
    kwargs = dict(dropout_rate=0.0, params=reference_params(ref, jnp.float64),
                  adjacency=adjacency)
    at100 = graph.train_gcn(jax.random.key(0), v, ref.labelled_mask, steps=100, **kwargs)
    np.testing.assert_allclose(at100.scores, ref.gcn_outputs_by_step["step100"], atol=1e-4)
    np.testing.assert_allclose(at100.losses, ref.gcn_loss_all[:100], atol=1e-5)
    final = graph.train_gcn(jax.random.key(0), v, ref.labelled_mask, steps=200, **kwargs)
    uncertain = samplers.uncertain_gcn_select(final.scores, ref.labelled_mask, 200)
    core = samplers.core_gcn_select(final.embedding, ref.labelled_mask, 200)
  assert len(np.intersect1d(uncertain, ref.uncertaingcn_idx)) >= 190
  assert len(np.intersect1d(core, ref.coregcn_idx)) >= 190


def test_gcn_shapes_and_layer_names():
  x = jax.random.normal(jax.random.key(0), (20, 6))
  adj = graph.normalized_adjacency(jnp.abs(x))
  for num_layers, names, width in [(1, {"gc3"}, 6), (2, {"gc1", "gc3"}, 16),
                                   (3, {"gc1", "gc2", "gc3"}, 16)]:
    model = graph.GCN(hidden=16, num_layers=num_layers)
    params = model.init(jax.random.key(1), x, adj, train=False)["params"]
    assert set(params) == names
    scores, embedding = model.apply({"params": params}, x, adj, train=False)
    chex.assert_shape([scores, embedding], [(20,), (20, width + 1)])
    np.testing.assert_allclose(jax.nn.sigmoid(embedding[:, -1]), scores, rtol=1e-6)


def test_init_is_uniform_in_reference_bounds():
  params = graph.GCN(hidden=64).init(jax.random.key(0), jnp.ones((5, 32)) / 32 ** 0.5,
                                     jnp.eye(5), train=False)["params"]
  assert float(jnp.abs(params["gc1"]["kernel"]).max()) <= 1 / 8
  assert float(jnp.abs(params["gc1"]["kernel"]).max()) > 0.9 / 8
  assert float(jnp.abs(params["gc3"]["kernel"]).max()) <= 1.0


def test_loss_by_hand():
  scores = jnp.array([0.9, 0.2, 0.6, 0.3])
  mask = jnp.array([True, False, True, False])
  expected = -(np.log(0.9) + np.log(0.6)) / 2 - 1.2 * (np.log(0.8) + np.log(0.7)) / 2
  np.testing.assert_allclose(graph.gcn_loss(scores, mask), expected, rtol=1e-6)
  logits = jnp.log(scores / (1 - scores))
  np.testing.assert_allclose(graph.gcn_loss_from_logits(logits, mask), expected, rtol=1e-5)
  assert np.isfinite(graph.gcn_loss_from_logits(jnp.array([40.0, -40.0]),
                                                jnp.array([False, True])))


def test_adam_coupled_equals_torch_formula():
  p = jnp.array([1.0, -1.5, 0.5])  # no exact cancellation of g + decay * p
  grads = [jnp.array([0.1, 0.2, -0.3]), jnp.array([-0.05, 0.4, 0.1])]
  tx = graph.adam_coupled(1e-2, 0.1)
  state, params = tx.init(p), p
  m = v = np.zeros(3)
  expected = np.asarray(p, np.float64)
  for t, g in enumerate(grads, start=1):
    updates, state = tx.update(g, state, params)
    params = params + updates
    g_total = np.asarray(g) + 0.1 * expected  # torch: grad = grad + weight_decay * param
    m = 0.9 * m + 0.1 * g_total
    v = 0.999 * v + 0.001 * g_total ** 2
    expected = expected - 1e-2 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
  np.testing.assert_allclose(params, expected, rtol=1e-5)


def test_dropout_uses_key_and_eval_is_deterministic():
  x = jnp.abs(jax.random.normal(jax.random.key(0), (40, 8)))
  mask = jnp.arange(40) >= 30
  a = graph.train_gcn(jax.random.key(3), x, mask, steps=5, hidden=8)
  b = graph.train_gcn(jax.random.key(3), x, mask, steps=5, hidden=8)
  c = graph.train_gcn(jax.random.key(4), x, mask, steps=5, hidden=8)
  np.testing.assert_array_equal(a.scores, b.scores)
  assert not np.allclose(a.scores, c.scores)


def test_factored_training_never_forms_an_n_by_n_array():
  n = 48
  jaxpr = jax.make_jaxpr(functools.partial(
      graph.train_steps, hidden=8, dropout_rate=0.3, num_layers=2, steps=2,
      adjacency_mode="factored"))(jax.random.key(0), jnp.ones((n, 5)), jnp.arange(n) > 40, None,
                                  1.2, 1e-3, 5e-4)
  assert not has_square_array(jaxpr, n)
  dense = jax.make_jaxpr(functools.partial(
      graph.train_steps, hidden=8, dropout_rate=0.3, num_layers=2, steps=2,
      adjacency_mode="dense"))(jax.random.key(0), jnp.ones((n, 5)), jnp.arange(n) > 40, None,
                               1.2, 1e-3, 5e-4)
  assert has_square_array(dense, n)  # the check itself can fail


def test_choose_adjacency(caplog):
  assert graph.choose_adjacency(1000, 512, memory_bytes=10 ** 9) == "dense"
  assert graph.choose_adjacency(1000, 128, memory_bytes=10 ** 9) == "factored"
  assert not caplog.records
  with caplog.at_level("WARNING", logger="jax_seqgcn.selection.adjacency"):
    assert graph.choose_adjacency(40_000, 30_000, memory_bytes=24 * 2 ** 30) == "factored"
  assert "dense N=40000 needs" in caplog.text


@pytest.mark.parametrize("bad, message", [
    (lambda x, m: (x.at[3, 1].set(jnp.nan), m), "NaN or inf"),
    (lambda x, m: (x.at[5, 0].set(jnp.inf), m), "NaN or inf"),
    (lambda x, m: (x.at[7].set(0.0), m), "column sum"),
    (lambda x, m: (x, m[:-1]), "shape"),
    (lambda x, m: (x, jnp.ones_like(m)), "both labelled and unlabelled"),
    (lambda x, m: (x[:, :0], m), "empty"),
])
def test_bad_input_raises_before_work(bad, message, monkeypatch):
  for module, name in ((gcn_training, "train_setup_jit"), (gcn_fused, "propagated_features_jit")):
    monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("work started"))
  x = jnp.abs(jax.random.normal(jax.random.key(0), (20, 4)))
  mask = jnp.arange(20) >= 15
  x, mask = bad(x, mask)
  with pytest.raises(ValueError, match=message):
    graph.train_gcn(jax.random.key(0), x, mask, steps=2)


def test_adjacency_rejects_degenerate_rows():
  x = np.eye(4, dtype=np.float32)  # mutually orthogonal rows: every column sum is 0
  with pytest.raises(ValueError, match="column sum"):
    graph.normalized_adjacency(x)
  with pytest.raises(ValueError, match="column sum"):
    graph.factored_adjacency(x)


@pytest.mark.parametrize("architecture, adjacency", [("gcn", "factored"), ("gcn", "dense"),
                                                     ("mlp", "auto")])
def test_training_in_chunks_equals_one_scan(architecture, adjacency):
  rng = np.random.default_rng(5)
  x = np.abs(rng.normal(size=(50, 6))).astype(np.float32)
  mask = np.arange(50) >= 38
  options = dict(steps=11, hidden=8, architecture=architecture, adjacency=adjacency)
  whole = graph.train_gcn(jax.random.key(2), x, mask, **options)
  seen = []
  chunked = graph.train_gcn(jax.random.key(2), x, mask, chunk_steps=3,
                            on_chunk=lambda first, losses: seen.append((first, losses)), **options)
  # ceil(11 / 3) = 4 chunks of one compiled length 3; the last one's extra step is a no-op. The
  # default (50) runs the 11 steps as one chunk.
  assert [(first, len(losses)) for first, losses in seen] == [(0, 3), (3, 3), (6, 3), (9, 2)]
  np.testing.assert_array_equal(np.concatenate([l for _, l in seen]), np.asarray(whole.losses))
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit on CPU
  with pytest.raises(ValueError, match="chunk_steps must be an int >= 2"):
    graph.train_gcn(jax.random.key(2), x, mask, chunk_steps=0, **options)


_GENERIC_PARTS = (("train_setup_jit", gcn_training.train_setup,
                   ("hidden", "dropout_rate", "num_layers", "architecture", "adjacency_mode")),
                  ("train_chunk_jit", gcn_training.train_chunk,
                   ("hidden", "dropout_rate", "num_layers", "architecture", "steps")),
                  ("train_evaluate_jit", gcn_training.train_evaluate,
                   ("hidden", "dropout_rate", "num_layers", "architecture")))
_FUSED_PARTS = (("norms_and_column_sums_jit", gcn_fused.norms_and_column_sums, ()),
                ("propagated_features_jit", gcn_fused.propagated_features, ()),
                ("train_chunk_jit", gcn_fused.train_chunk, ("dropout_rate", "steps", "axis_name")),
                ("evaluate_jit", gcn_fused.evaluate, ()))


@pytest.mark.parametrize("adjacency", ["dense", "factored"])
def test_train_gcn_traces_each_part_once_per_shape(monkeypatch, adjacency):
  module, parts = ((gcn_fused, _FUSED_PARTS) if adjacency == "factored"
                   else (gcn_training, _GENERIC_PARTS))
  for name, fn, static in parts:
    monkeypatch.setattr(module, name, jax.jit(chex.assert_max_traces(fn, n=1),
                                              static_argnames=static))
  rng = np.random.default_rng(0)
  mask = np.arange(30) >= 20
  for seed, steps in [(0, 9), (1, 8), (2, 7)]:  # 3 chunks of 3 each time
    x = np.abs(rng.normal(size=(30, 8))).astype(np.float32)
    graph.train_gcn(jax.random.key(seed), x, mask, steps=steps, hidden=8, chunk_steps=3,
                    adjacency=adjacency)
