"""Tests of jax_seqgcn.selection.kmedoids and the FeatProp sampler against plain NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn import samplers
from jax_seqgcn import selection
from jax_seqgcn.samplers import featprop
from jax_seqgcn.selection import kmedoids
from tests.conftest import has_square_array

# Most tests share one shape and k, so they share one compilation.
N, DIM, K = 48, 3, 4


def _points(seed, n=N, d=DIM):
  rng = np.random.default_rng(seed)
  x = np.abs(rng.normal(size=(n, d))).astype(np.float32)
  candidate = np.ones(n, bool)
  candidate[rng.choice(n, n // 4, replace=False)] = False
  return x, candidate


def numpy_distances(x, columns):
  x = np.asarray(x, np.float64)
  return np.sqrt(((x[:, None, :] - x[np.asarray(columns)][None, :, :]) ** 2).sum(-1))


def numpy_cost(x, candidate, medoids):
  return numpy_distances(x, medoids).min(axis=1)[candidate].sum()


def best_swap_change(x, candidate, medoids):
  """The lowest cost change over every swap (medoid slot, non-medoid candidate), exhaustively."""
  medoids = np.asarray(medoids)
  others = np.flatnonzero(candidate & ~np.isin(np.arange(len(x)), medoids))
  to_medoids = numpy_distances(x, medoids)
  to_others = numpy_distances(x, others)
  cost = to_medoids.min(axis=1)[candidate].sum()
  best = np.inf
  for slot in range(len(medoids)):
    kept = np.delete(to_medoids, slot, axis=1).min(axis=1, initial=np.inf)
    swapped = np.minimum(kept[:, None], to_others)[candidate].sum(axis=0)
    best = min(best, float(swapped.min()) - cost)
  return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_result_is_swap_optimal_and_its_cost_matches_numpy(seed):
  x, candidate = _points(seed)
  result = kmedoids.k_medoids(jax.random.key(seed), x, candidate, K)
  medoids = np.asarray(result.medoids)
  assert medoids.dtype == np.int32 and len(set(medoids.tolist())) == K
  assert candidate[medoids].all()
  assert bool(result.converged) and int(result.sweeps) >= 1
  cost = numpy_cost(x, candidate, medoids)
  np.testing.assert_allclose(float(result.cost), cost, rtol=1e-5)
  np.testing.assert_allclose(float(kmedoids.medoid_cost(x, candidate, medoids)), cost, rtol=1e-5)
  assert best_swap_change(x, candidate, medoids) >= -1e-5 * cost
  # The check can fail: the k-means++ seeding alone is not swap-optimal, and swaps lowered it.
  seeded = kmedoids.k_medoids(jax.random.key(seed), x, candidate, K, max_sweeps=0)
  assert best_swap_change(x, candidate, seeded.medoids) < -1e-3 * cost
  assert float(seeded.cost) > float(result.cost)


def test_one_medoid_is_the_global_optimum():
  # With k = 1 every other medoid is one swap away, so swap-optimal means optimal.
  x, candidate = _points(3)
  result = kmedoids.k_medoids(jax.random.key(0), x, candidate, 1)
  sums = numpy_distances(x, np.arange(N))[candidate].sum(axis=0)
  sums[~candidate] = np.inf
  assert int(result.medoids[0]) == int(np.argmin(sums))
  np.testing.assert_allclose(float(result.cost), sums.min(), rtol=1e-5)


def test_sweep_cap_is_reported():
  x, candidate = _points(4)
  seeded = kmedoids.k_medoids(jax.random.key(0), x, candidate, K, max_sweeps=0)
  assert int(seeded.sweeps) == 0 and int(seeded.swaps) == 0 and not bool(seeded.converged)
  np.testing.assert_allclose(float(seeded.cost), numpy_cost(x, candidate, seeded.medoids),
                             rtol=1e-5)
  capped = kmedoids.k_medoids(jax.random.key(0), x, candidate, K, max_sweeps=1)
  full = kmedoids.k_medoids(jax.random.key(0), x, candidate, K)
  assert int(capped.sweeps) == 1
  # Converging takes a second pass at least: the one that finds no improving swap.
  assert not bool(capped.converged) and bool(full.converged) and int(full.sweeps) >= 2
  assert float(seeded.cost) >= float(capped.cost) >= float(full.cost)


def test_every_candidate_a_medoid_and_duplicates():
  x, _ = _points(5)
  candidate = np.zeros(N, bool)
  candidate[[3, 17, 30, 41]] = True
  result = kmedoids.k_medoids(jax.random.key(0), x, candidate, K)
  assert sorted(np.asarray(result.medoids).tolist()) == [3, 17, 30, 41]
  assert float(result.cost) == 0.0 and bool(result.converged)
  same = np.ones((N, DIM), np.float32)  # all nodes at distance 0: medoids must stay distinct
  result = kmedoids.k_medoids(jax.random.key(1), same, np.ones(N, bool), K)
  assert len(set(np.asarray(result.medoids).tolist())) == K and float(result.cost) == 0.0


def _clusters(seed, sizes=(10, 25, 40, 15, 30), dim=8):
  rng = np.random.default_rng(seed)
  # Far apart (centres ~60 apart, spread ~3) and in distinct directions, so both the Euclidean
  # clusters and the cosine-similarity graph separate them.
  centres = 40.0 * np.eye(dim)[:len(sizes)] + 5.0
  labels = np.repeat(np.arange(len(sizes)), sizes)
  x = centres[labels] + rng.normal(size=(len(labels), dim))
  return x.astype(np.float32), labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_medoid_per_well_separated_cluster(seed):
  x, labels = _clusters(seed)
  candidate = np.ones(len(x), bool)
  medoids = np.asarray(kmedoids.k_medoids(jax.random.key(seed), x, candidate, 5).medoids)
  assert sorted(labels[medoids].tolist()) == [0, 1, 2, 3, 4]
  # FeatProp too, with labelled nodes in every cluster: one pick per cluster, all unlabelled.
  labelled = np.random.default_rng(seed).random(len(x)) < 0.2
  picks = np.asarray(featprop.featprop(jax.random.key(seed), x, labelled, 5))
  assert sorted(labels[picks].tolist()) == [0, 1, 2, 3, 4] and not labelled[picks].any()


def numpy_adjacency(x):
  v = x / np.linalg.norm(x, axis=1, keepdims=True)
  off = v @ v.T - np.eye(len(x))
  return off / off.sum(axis=0, keepdims=True) + np.eye(len(x))


@pytest.mark.parametrize("hops", [0, 1, 2, 3])
def test_propagation_equals_dense_numpy(hops):
  x, _ = _points(6)
  x = x.astype(np.float64)
  expected = np.linalg.matrix_power(numpy_adjacency(x), hops) @ x
  np.testing.assert_allclose(featprop.propagate_features(x.astype(np.float32), hops), expected,
                             rtol=1e-4, atol=1e-5)


def test_featprop_is_k_medoids_of_the_unlabelled_on_propagated_features():
  x, candidate = _points(7)
  labelled = ~candidate
  picks = np.asarray(samplers.get_sampler("FeatProp")(
      jax.random.key(0), samplers.Pool(labelled, features=x), K))
  assert picks.shape == (K,) and picks.dtype == np.int32
  assert len(set(picks.tolist())) == K and not labelled[picks].any()
  propagated = featprop.propagate_features(x, featprop.HOPS)
  expected = kmedoids.k_medoids(jax.random.key(0), propagated, candidate, K).medoids
  np.testing.assert_array_equal(picks, expected)
  # The labelled nodes shape the graph: moving them changes the propagated features.
  moved = x.copy()
  moved[labelled] = moved[labelled][::-1] * 3.0
  assert not np.allclose(featprop.propagate_features(moved, 2)[candidate],
                         np.asarray(propagated)[candidate])
  # No labelled node at all: FeatProp still picks (the original one-shot setting).
  cold = featprop.featprop(jax.random.key(0), x, np.zeros(N, bool), K)
  assert len(set(np.asarray(cold).tolist())) == K


def test_deterministic_for_a_key():
  x, candidate = _points(8)
  a = featprop.featprop(jax.random.key(5), x, ~candidate, K)
  b = featprop.featprop(jax.random.key(5), x, ~candidate, K)
  np.testing.assert_array_equal(a, b)
  runs = {tuple(np.asarray(kmedoids.k_medoids(jax.random.key(s), x, candidate, K).medoids))
          for s in range(6)}
  assert len(runs) > 1  # the key drives seeding and swap order


def test_one_trace_per_shape():
  rng = np.random.default_rng(9)
  x = jnp.asarray(np.abs(rng.normal(size=(N, DIM))).astype(np.float32))
  kmedoids.k_medoids(jax.random.key(0), x, np.ones(N, bool), K)
  parts = (kmedoids._setup_jit, kmedoids._sweep_jit)  # pylint: disable=protected-access
  before = [part._cache_size() for part in parts]  # pylint: disable=protected-access
  for seed, sweeps, tol in [(1, 3, 1e-6), (2, 0, 0.0), (3, 7, 1e-3)]:
    candidate = rng.random(N) < 0.5 + 0.1 * seed
    kmedoids.k_medoids(jax.random.key(seed), x, candidate, K, max_sweeps=sweeps, rel_tol=tol)
  assert [part._cache_size() for part in parts] == before  # pylint: disable=protected-access
  featprop.propagate_features(x, 1)
  before = featprop._propagate_hops._cache_size()  # pylint: disable=protected-access
  for hops in (0, 2, 5):
    featprop.propagate_features(x, hops)
  assert featprop._propagate_hops._cache_size() == before  # pylint: disable=protected-access


def test_never_forms_an_n_by_n_array():
  n = 50

  def run(block):
    return jax.make_jaxpr(lambda key, x, c: kmedoids._k_medoids(  # pylint: disable=protected-access
        key, x, c, 3, 1e-6, k=3, block=block))(jax.random.key(0), jnp.ones((n, 5)),
                                                jnp.arange(n) > 5)

  assert not has_square_array(run(16), n)
  assert has_square_array(run(n), n)  # the check itself can fail: a block of all n nodes
  adjacency = selection.factored_adjacency(jnp.ones((n, 5)) + jnp.eye(n, 5))
  jaxpr = jax.make_jaxpr(featprop._propagate_hops)(  # pylint: disable=protected-access
      adjacency, jnp.ones((n, 5)), 2)
  assert not has_square_array(jaxpr, n)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), r"k must be an int in \[1, 36\]"),
    (dict(k=37), r"k must be an int in \[1, 36\]"),
    (dict(k=2.0), "k must be an int"),
    (dict(max_sweeps=-1), "max_sweeps must be an int"),
    (dict(max_sweeps=1.5), "max_sweeps must be an int"),
    (dict(rel_tol=-0.1), "rel_tol must be a number"),
    (dict(rel_tol=False), "rel_tol must be a number"),
    (dict(block=0), "block must be an int"),
    (dict(nan=True), "NaN"),
    (dict(short_mask=True), "candidate_mask must have shape"),
    (dict(no_candidate=True), "selects no node"),
])
def test_k_medoids_rejects_bad_input(kwargs, message):
  x, candidate = _points(10)
  if kwargs.pop("nan", False):
    x[3, 1] = np.nan
  if kwargs.pop("short_mask", False):
    candidate = candidate[:-1]
  if kwargs.pop("no_candidate", False):
    candidate[:] = False
  kwargs.setdefault("k", K)
  with pytest.raises(ValueError, match=message):
    kmedoids.k_medoids(jax.random.key(0), x, candidate, **kwargs)


@pytest.mark.parametrize("options, budget, message", [
    (dict(featprop_hops=-1), K, "featprop_hops must be an int in"),
    (dict(featprop_hops=17), K, "featprop_hops must be an int in"),
    (dict(featprop_hops="2"), K, "featprop_hops must be an int in"),
    (dict(featprop_max_sweeps=-2), K, "featprop_max_sweeps must be an int"),
    (dict(hops=2), K, r"unknown option\(s\) \['hops'\] for sampler 'FeatProp'"),
    ({}, 13, "larger than the 12 unlabelled"),
    ({}, 0, "budget must be a positive int"),
])
def test_featprop_rejects_bad_options_and_budget(options, budget, message):
  x, candidate = _points(11)
  with pytest.raises(ValueError, match=message):
    featprop.featprop(jax.random.key(0), x, candidate, budget, **options)


def test_featprop_rejects_bad_features_and_masks():
  x, candidate = _points(12)
  with pytest.raises(ValueError, match="column sum"):
    featprop.featprop(jax.random.key(0), np.where(np.arange(N)[:, None] == 5, 0.0, x),
                      ~candidate, K)
  with pytest.raises(ValueError, match="empty"):
    featprop.featprop(jax.random.key(0), x, np.ones(N, bool), K)
  with pytest.raises(ValueError, match="needs pool.features"):
    samplers.get_sampler("FeatProp")(jax.random.key(0), samplers.Pool(~candidate), K)
  with pytest.raises(ValueError, match="featprop_hops must be"):
    featprop.propagate_features(x, hops=-1)
  assert samplers.get_sampler("FeatProp").options == featprop.OPTIONS
  assert all(name.startswith("featprop_") for name in featprop.OPTIONS)



@pytest.mark.parametrize("chunk", [kmedoids.LOST_CHUNK, 1])
def test_swap_gains_and_nearest_two_updates_match_recomputation(chunk):
  # chunk=1: the nodes that lost a medoid are re-examined one per loop step, so a swap takes
  # several steps (the default chunk takes one or two).
  x, candidate = _points(14)
  features = jnp.asarray(x)
  sq_norms = jnp.sum(features ** 2, axis=1)
  rows = lambda idx: kmedoids._distance_rows(features, sq_norms, jnp.asarray(idx))  # pylint: disable=protected-access
  medoids = np.flatnonzero(candidate)[:K]
  state = kmedoids._SwapState(  # pylint: disable=protected-access
      jnp.asarray(medoids, jnp.int32), jnp.asarray(np.isin(np.arange(N), medoids)),
      rows(medoids).T, *kmedoids._two_nearest(rows(medoids).T),  # pylint: disable=protected-access
      jnp.float32(0), *([jnp.int32(0)] * 4))

  @jax.jit
  def step(state, node, slot):
    dx = rows(node[None])[0]
    gains = kmedoids._swap_gains(state, jnp.asarray(candidate), dx, K)  # pylint: disable=protected-access
    return gains, kmedoids._apply_swap(  # pylint: disable=protected-access
        state, jnp.asarray(candidate), slot, node, dx, chunk)

  rng = np.random.default_rng(0)
  for _ in range(8):
    node = int(rng.choice(np.flatnonzero(candidate & ~np.isin(np.arange(N), medoids))))
    slot = int(rng.integers(K))
    gains, state = step(state, jnp.int32(node), jnp.int32(slot))
    cost = numpy_cost(x, candidate, medoids)
    for i in range(K):
      swapped = medoids.copy()
      swapped[i] = node
      np.testing.assert_allclose(gains[i], numpy_cost(x, candidate, swapped) - cost, atol=1e-4)
    medoids[slot] = node
    np.testing.assert_array_equal(state.medoids, medoids)
    exact = numpy_distances(x, medoids)[candidate]
    order = np.argsort(exact, axis=1)
    np.testing.assert_array_equal(np.asarray(state.nearest)[candidate], order[:, 0])
    np.testing.assert_array_equal(np.asarray(state.second)[candidate], order[:, 1])
    np.testing.assert_allclose(np.asarray(state.d1)[candidate], exact.min(axis=1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.d2)[candidate], np.sort(exact, axis=1)[:, 1],
                               atol=1e-5)
    np.testing.assert_allclose(float(state.cost), numpy_cost(x, candidate, medoids), rtol=1e-5)


def test_swap_phase_reports_each_sweep_and_equals_one_program():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(300, 6)).astype(np.float32))
  candidate = rng.random(300) < 0.7
  seen = []
  result = kmedoids.k_medoids(jax.random.key(1), x, candidate, 15, block=32,
                              on_sweep=lambda *args: seen.append(args))
  # One compiled call per sweep gives what the whole algorithm gives as one program.
  whole = jax.jit(kmedoids._k_medoids, static_argnames=("k", "block"))(  # pylint: disable=protected-access
      jax.random.key(1), x, jnp.asarray(candidate), jnp.int32(kmedoids.DEFAULT_MAX_SWEEPS),
      jnp.float32(kmedoids.DEFAULT_REL_TOL), k=15, block=32)
  for a, b in zip(result, whole, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [s for s, _, _ in seen] == list(range(1, int(result.sweeps) + 1)) and len(seen) > 1
  costs = [c for _, c, _ in seen]
  assert costs == sorted(costs, reverse=True)  # every applied swap lowers the cost
  assert seen[-1][1:] == (float(result.cost), int(result.swaps))
  np.testing.assert_allclose(seen[-1][1], float(kmedoids.medoid_cost(x, candidate,
                                                                     result.medoids)), rtol=1e-5)
