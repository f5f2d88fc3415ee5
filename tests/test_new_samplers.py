"""PowerEntropy, TypiClust, ProbCover and ClusterMargin against NumPy references of their papers'
definitions, on small hand-made or random pools; determinism per key, options, budget edges.

The generic guarantees (distinct unlabelled picks, declared needs, bad input, the loop end to
end, HIGHEST precision) come from the registry-wide tests in test_samplers.py, test_loop.py,
test_workdir.py and test_selection_precision.py.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.cluster import hierarchy

from jax_seqgcn import samplers
from jax_seqgcn.samplers import cluster_margin
from jax_seqgcn.samplers import power
from jax_seqgcn.samplers import probcover
from jax_seqgcn.samplers import typiclust
from jax_seqgcn.samplers import uncertainty
from jax_seqgcn.selection import coverage
from jax_seqgcn.selection import kmeans

NEW = ("PowerEntropy", "TypiClust", "ProbCover", "ClusterMargin")


def random_pool(n=40, n_labelled=10, d=4, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(n, d)).astype(np.float32)
  mask = np.zeros(n, bool)
  mask[rng.choice(n, n_labelled, replace=False)] = True
  logits = 2.0 * rng.normal(size=(n, classes))
  probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  return samplers.Pool(mask, features=features, probabilities=probabilities.astype(np.float32))


def pick(name, pool, budget, seed=0, **options):
  return np.asarray(samplers.get_sampler(name)(jax.random.key(seed), pool, budget, **options))


def pairwise(x):
  x = np.asarray(x, np.float64)
  return np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))


# ------------------------------------------------------------------------------ registry


def test_registered_with_prefixed_options_and_needs():
  expected = {"PowerEntropy": ({"probabilities"}, {"power_beta": 1.0}),
              "TypiClust": ({"features"}, {"typiclust_max_clusters": 500, "typiclust_knn": 20,
                                           "typiclust_iterations": 20}),
              "ProbCover": ({"features"}, {"probcover_delta": 0.6}),
              "ClusterMargin": ({"features", "probabilities"}, {"cluster_margin_m": 10})}
  for name, (needs, options) in expected.items():
    sampler = samplers.get_sampler(name)
    assert sampler.needs == needs and dict(sampler.options) == options, name
    assert sampler.description
  merged = samplers.all_options()  # one flat namespace, no clashes
  for _, options in expected.values():
    assert options.items() <= merged.items()


# Options that keep one compiled program per budget (TypiClust: k = min(L + budget, 5) = 5).
FEW_COMPILES = {"TypiClust": dict(typiclust_max_clusters=5)}


@pytest.mark.parametrize("name", NEW)
def test_budget_edges_deterministic_per_key(name):
  pool = random_pool()
  options = FEW_COMPILES.get(name, {})
  unlabelled = int((~pool.labelled_mask).sum())
  for budget in (1, 7, unlabelled):
    picks = pick(name, pool, budget, **options)
    assert picks.shape == (budget,) and picks.dtype == np.int32
    assert len(set(picks.tolist())) == budget and not pool.labelled_mask[picks].any()
  np.testing.assert_array_equal(pick(name, pool, 7, seed=3, **options),
                                pick(name, pool, 7, seed=3, **options))
  # No labelled node at all (a cold start).
  cold = pool._replace(labelled_mask=np.zeros_like(pool.labelled_mask))
  assert len(set(pick(name, cold, 7, **options).tolist())) == 7
  with pytest.raises(ValueError, match="larger than"):
    pick(name, pool, unlabelled + 1, **options)


@pytest.mark.parametrize("name", ["TypiClust", "ProbCover", "ClusterMargin"])
def test_float16_features_pick_as_their_float32_cast(name):
  pool = random_pool()
  options = FEW_COMPILES.get(name, {})
  low = pool.features.astype(np.float16)
  np.testing.assert_array_equal(
      pick(name, pool._replace(features=low), 7, **options),
      pick(name, pool._replace(features=low.astype(np.float32)), 7, **options))


@pytest.mark.parametrize("name, options, message", [
    ("PowerEntropy", dict(power_beta=-0.5), "power_beta must be a finite number >= 0"),
    ("PowerEntropy", dict(power_beta=True), "power_beta must be a finite number >= 0"),
    ("PowerEntropy", dict(power_beta=float("nan")), "power_beta must be a finite number >= 0"),
    ("PowerEntropy", dict(power_beta="2"), "power_beta must be a finite number >= 0"),
    ("TypiClust", dict(typiclust_max_clusters=0), "typiclust_max_clusters must be an int >= 1"),
    ("TypiClust", dict(typiclust_max_clusters=True), "typiclust_max_clusters must be an int"),
    ("TypiClust", dict(typiclust_max_clusters=10 ** 6),
     "typiclust_max_clusters must be <= 100000, got 1000000: k-means holds"),
    ("TypiClust", dict(typiclust_knn=2.0), "typiclust_knn must be an int >= 1"),
    ("TypiClust", dict(typiclust_knn=10 ** 5), "typiclust_knn must be <= 10000"),
    ("TypiClust", dict(typiclust_iterations=-1), r"typiclust_iterations must be an int in \[0, "),
    ("TypiClust", dict(typiclust_iterations=False), "typiclust_iterations must be an int"),
    ("ProbCover", dict(probcover_delta=0.0), r"probcover_delta must be a number in \(0, 2\]"),
    ("ProbCover", dict(probcover_delta=2.5), r"probcover_delta must be a number in \(0, 2\]"),
    ("ProbCover", dict(probcover_delta=True), "probcover_delta must be a number"),
    ("ProbCover", dict(probcover_delta=float("inf")), "probcover_delta must be a number"),
    ("ClusterMargin", dict(cluster_margin_m=0), r"cluster_margin_m must be an int in \[1, "),
    ("ClusterMargin", dict(cluster_margin_m=True), "cluster_margin_m must be an int"),
    ("ClusterMargin", dict(cluster_margin_m=2.0), "cluster_margin_m must be an int"),
])
def test_bad_options_are_one_value_error_line(name, options, message):
  with pytest.raises(ValueError, match=message) as error:
    samplers.get_sampler(name).resolve_options(options)
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match=message):
    pick(name, random_pool(), 3, **options)


def test_option_bounds_themselves_pass():
  samplers.get_sampler("PowerEntropy").resolve_options({"power_beta": 0})
  samplers.get_sampler("TypiClust").resolve_options(dict(
      typiclust_max_clusters=10 ** 5, typiclust_knn=10 ** 4, typiclust_iterations=0))
  samplers.get_sampler("ProbCover").resolve_options({"probcover_delta": 2})
  samplers.get_sampler("ClusterMargin").resolve_options({"cluster_margin_m": 1})


# ------------------------------------------------------------------------------ PowerEntropy


def _draws(scores, mask, budget, beta, num_keys):
  keys = jax.random.split(jax.random.key(42), num_keys)
  draw = jax.vmap(lambda k: power.power_sample(k, scores, mask, budget, beta))
  return np.asarray(draw(keys))


def test_power_sample_draws_proportional_to_score_power():
  # Budget 1: node i with probability s_i^beta / sum_j s_j^beta (labelled nodes never).
  scores = np.array([0.1, 0.9, 0.2, 0.4, 3.0, 0.8, 1.0, 1.5], np.float32)
  mask = np.array([False, True, False, False, True, False, False, False])
  beta, num_keys = 2.0, 6000
  picks = _draws(scores, mask, 1, beta, num_keys)[:, 0]
  assert not mask[picks].any()
  unlabelled = np.flatnonzero(~mask)
  observed = np.array([(picks == i).sum() for i in unlabelled])
  weights = scores[unlabelled].astype(np.float64) ** beta
  expected = num_keys * weights / weights.sum()
  assert stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected)
  # The same counts are far from uniform (and from proportional to the scores themselves).
  uniform = np.full(len(unlabelled), num_keys / len(unlabelled))
  assert stats.chisquare(observed, uniform).pvalue < 1e-12
  linear = num_keys * scores[unlabelled] / scores[unlabelled].sum()
  assert stats.chisquare(observed, linear).pvalue < 1e-12


def test_power_sample_is_successive_sampling_without_replacement():
  # Budget 2 (Plackett-Luce): P(i then j) = w_i / W * w_j / (W - w_i).
  scores = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
  mask = np.zeros(4, bool)
  num_keys = 6000
  picks = _draws(scores, mask, 2, 1.0, num_keys)
  assert (picks[:, 0] != picks[:, 1]).all()
  pairs = list(itertools.permutations(range(4), 2))
  w = scores.astype(np.float64)
  expected = np.array([w[i] / w.sum() * w[j] / (w.sum() - w[i]) for i, j in pairs]) * num_keys
  observed = np.array([((picks[:, 0] == i) & (picks[:, 1] == j)).sum() for i, j in pairs])
  assert stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_power_sample_zero_scores_come_last_and_beta_zero_is_uniform():
  scores = np.array([0.0, 0.3, 0.0, 0.7, 0.0, 0.2], np.float32)
  mask = np.array([False, False, False, False, True, False])
  picks = _draws(scores, mask, 5, 1.0, 200)
  assert set(picks[:, :3].ravel().tolist()) == {1, 3, 5}  # positive scores first
  assert set(picks[:, 3:].ravel().tolist()) == {0, 2}  # then the zeros, in random order
  assert {tuple(row) for row in picks[:, 3:].tolist()} == {(0, 2), (2, 0)}
  # beta = 0: weight 1 for every unlabelled node, zero scores included (no NaN from 0 * -inf).
  first = _draws(scores, mask, 1, 0.0, 5000)[:, 0]
  observed = np.array([(first == i).sum() for i in (0, 1, 2, 3, 5)])
  assert stats.chisquare(observed).pvalue > 1e-3, observed


def test_power_entropy_is_power_sample_on_entropies():
  pool = random_pool(n=30, n_labelled=8)
  entropies = uncertainty.entropy_scores(jnp.asarray(pool.probabilities))
  for beta in (1.0, 3.0):
    np.testing.assert_array_equal(
        pick("PowerEntropy", pool, 6, power_beta=beta),
        power.power_sample(jax.random.key(0), entropies, pool.labelled_mask, 6, beta))
  np.testing.assert_array_equal(
      samplers.power_entropy(jax.random.key(0), pool.probabilities, pool.labelled_mask, 6),
      pick("PowerEntropy", pool, 6))
  assert not np.array_equal(pick("PowerEntropy", pool, 6, seed=0),
                            pick("PowerEntropy", pool, 6, seed=1))
  # A confident (one-hot) row has entropy 0: drawn only after every uncertain node.
  probabilities = np.array(pool.probabilities)
  probabilities[:3] = np.eye(3, dtype=np.float32)[0]
  confident = pool._replace(probabilities=probabilities,
                            labelled_mask=np.arange(30) >= 25)
  picks = pick("PowerEntropy", confident, 25)
  assert set(picks[-3:].tolist()) == {0, 1, 2}


# ------------------------------------------------------------------------------ k-means


def test_k_means_matches_numpy_lloyd_from_the_same_seeds():
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.normal(c, 0.5, size=(30, 3)) for c in (0.0, 3.0, 6.0)])
  x = x.astype(np.float32)
  for iterations in (0, 3, 50):
    result = kmeans.k_means(jax.random.key(0), x, 4, iterations=iterations)
    seeds = np.asarray(result.seeds)
    assert len(set(seeds.tolist())) == 4
    centroids = x[seeds].astype(np.float64)
    labels = pairwise_to(x, centroids).argmin(1)
    done, changed = 0, True
    while done < iterations and changed:
      new = np.array([x[labels == c].mean(0) if (labels == c).any() else centroids[c]
                      for c in range(4)])
      new_labels = pairwise_to(x, new).argmin(1)
      centroids, changed, labels = new, (new_labels != labels).any(), new_labels
      done += 1
    np.testing.assert_array_equal(result.assignments, labels)
    np.testing.assert_allclose(result.centroids, centroids, rtol=1e-5, atol=1e-5)
    assert int(result.iterations) == done and bool(result.converged) == (not changed)
    assert iterations != 50 or not changed  # converged well before 50
    inertia = ((x - centroids[labels]) ** 2).sum()
    np.testing.assert_allclose(float(result.inertia), inertia, rtol=1e-4)


def pairwise_to(x, centroids):
  return ((np.asarray(x, np.float64)[:, None, :] - centroids[None]) ** 2).sum(-1)


def test_k_means_seeds_are_distinct_even_for_duplicate_rows():
  x = np.repeat(np.eye(3, dtype=np.float32), 5, axis=0)  # 3 distinct rows, 15 nodes
  result = kmeans.k_means(jax.random.key(0), x, 6, iterations=5)
  assert len(set(np.asarray(result.seeds).tolist())) == 6
  # The 3 distinct points are the first 3 seeds (D^2 > 0 beats every duplicate).
  assert {int(i) // 5 for i in np.asarray(result.seeds)[:3]} == {0, 1, 2}
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 15\]"):
    kmeans.k_means(jax.random.key(0), x, 16)


# ------------------------------------------------------------------------------ TypiClust


def typiclust_reference(x, assignments, labelled, budget, knn):
  """TypiClust from the paper: least-labelled (then largest) cluster, most typical node."""
  dist = pairwise(x)
  n = len(x)
  k = assignments.max() + 1
  sizes = np.bincount(assignments, minlength=k)
  counts = np.bincount(assignments[labelled], minlength=k)
  mean = np.zeros(n)
  for i in range(n):
    same = np.flatnonzero((assignments == assignments[i]) & (np.arange(n) != i))
    kk = min(knn, len(same))
    if kk:
      mean[i] = np.sort(dist[i, same])[:kk].mean()
  available = ~labelled.copy()
  picks = []
  for _ in range(budget):
    clusters = [c for c in range(k) if (available & (assignments == c)).any()]
    c = min(clusters, key=lambda c: (counts[c], -sizes[c], c))
    members = np.flatnonzero(available & (assignments == c))
    p = members[np.argmin(mean[members])]  # typicality 1 / mean: the smallest mean
    picks.append(p)
    available[p] = False
    counts[c] += 1
  return np.array(picks)


def test_typiclust_hand_made_order_and_typicality():
  # Three 1-D clusters; node 4 (x = 100) is labelled. With K = 2:
  # cluster 0 {0, 1, 1.5, 5}: mean distance to the 2 nearest 1.25, 0.75, 1.0, 3.75;
  # cluster 1 {100, 101, 103}: 2, 1.5, 2.5; cluster 2 {200, 204}: K = 1, both 4 (a tie).
  x = np.array([0.0, 1.0, 1.5, 5.0, 100.0, 101.0, 103.0, 200.0, 204.0], np.float32)[:, None]
  assignments = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
  labelled = np.zeros(9, bool)
  labelled[4] = True
  # Order: cluster 0 (0 labelled, largest), cluster 2 (0 labelled), then all have 1: cluster 0
  # again (largest), then cluster 1 (size 3) before cluster 2 (size 2).
  expected = [1, 7, 2, 5]
  picks = typiclust.typiclust_select(x, assignments, labelled, budget=4, k=3, knn=2, block=4)
  np.testing.assert_array_equal(picks, expected)
  np.testing.assert_array_equal(typiclust_reference(x, assignments, labelled, 4, 2), expected)
  # The whole sampler: k = L + budget = 3 k-means clusters find the same three groups.
  scaled = x.copy()  # far apart: k-means cannot miss the groups
  scaled[4:7] += 1e4
  scaled[7:] += 2e4
  np.testing.assert_array_equal(
      typiclust.typiclust(jax.random.key(0), scaled, labelled, 2, typiclust_knn=2), [1, 7])


@pytest.mark.parametrize("knn, block", [(3, 8), (20, 64)])
def test_typiclust_select_matches_the_reference(knn, block):
  rng = np.random.default_rng(knn)
  n, k = 60, 7
  x = rng.normal(size=(n, 3)).astype(np.float32)
  # Clusters of uneven sizes (one singleton), some labelled nodes.
  assignments = np.concatenate([np.full(s, c) for c, s in enumerate([20, 12, 9, 8, 6, 4, 1])])
  assignments = rng.permutation(assignments)
  labelled = np.zeros(n, bool)
  labelled[rng.choice(n, 15, replace=False)] = True
  picks = typiclust.typiclust_select(x, assignments, labelled, budget=45, k=k, knn=knn,
                                     block=block)
  np.testing.assert_array_equal(picks, typiclust_reference(x, assignments, labelled, 45, knn))


def test_typiclust_uses_min_of_labelled_plus_budget_and_max_clusters(monkeypatch):
  pool = random_pool(n=50, n_labelled=6)
  seen = []

  class Seen(Exception):
    pass

  def spy(key, features, k, **kwargs):
    del key, features, kwargs
    seen.append(k)
    raise Seen

  with monkeypatch.context() as patch:
    patch.setattr(kmeans, "k_means", spy)
    for options in ({}, dict(typiclust_max_clusters=3)):
      with pytest.raises(Seen):
        pick("TypiClust", pool, 4, **options)
  assert seen == [10, 3]
  # One cluster: the picks are the unlabelled nodes by typicality over the whole pool.
  picks = pick("TypiClust", pool, 5, typiclust_max_clusters=1, typiclust_knn=4)
  reference = typiclust_reference(pool.features, np.zeros(50, int), pool.labelled_mask, 5, 4)
  np.testing.assert_array_equal(picks, reference)


# ------------------------------------------------------------------------------ ProbCover


def probcover_reference(x, labelled, budget, delta):
  """ProbCover's greedy from the paper; returns (degrees, greedy picks before any fallback)."""
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  edges = pairwise(unit) < delta
  np.fill_diagonal(edges, True)
  covered = edges[labelled].any(axis=0)
  available = ~labelled.copy()
  picks = []
  for _ in range(budget):
    counts = np.where(available, edges[:, ~covered].sum(axis=1), -1)
    if counts.max() <= 0:
      break
    p = int(np.argmax(counts))
    picks.append(p)
    covered |= edges[p]
    available[p] = False
  return edges.sum(axis=1), np.array(picks, int)


def test_probcover_hand_made_coverage_and_greedy_order():
  # Unit vectors at these angles (rows scaled by arbitrary norms); delta = the chord of 25
  # degrees, so balls join points at most 20 degrees apart.
  angles = np.radians([0, 10, 20, 30, 90, 100, 180, 270, 275])
  scales = np.array([1.0, 2.0, 0.5, 3.0, 1.0, 1.5, 0.7, 1.0, 2.5])[:, None]
  x = (np.stack([np.cos(angles), np.sin(angles)], 1) * scales).astype(np.float32)
  delta = 2 * np.sin(np.radians(12.5))
  graph = probcover.probcover_graph(x, delta)
  np.testing.assert_array_equal(graph.degrees, [3, 4, 4, 3, 2, 2, 1, 2, 2])
  labelled = np.zeros(9, bool)
  labelled[7] = True  # covers 270 and 275
  # 10 degrees covers 4 (ties with 20: lowest index), then 90 (2 new), then 180 (1 new).
  picks = probcover.probcover(jax.random.key(0), x, labelled, 3, probcover_delta=delta)
  np.testing.assert_array_equal(picks, [1, 4, 6])
  degrees, reference = probcover_reference(x, labelled, 3, delta)
  np.testing.assert_array_equal(reference, [1, 4, 6])
  np.testing.assert_array_equal(degrees, graph.degrees)
  # Everything is covered after 3 picks: the rest are random unlabelled nodes, per key.
  tails = set()
  for seed in range(8):
    picks = np.asarray(probcover.probcover(jax.random.key(seed), x, labelled, 8,
                                           probcover_delta=delta))
    np.testing.assert_array_equal(picks[:3], [1, 4, 6])
    assert set(picks[3:].tolist()) == {0, 2, 3, 5, 8}
    tails.add(tuple(picks[3:].tolist()))
  assert len(tails) > 1


@pytest.mark.parametrize("delta, block", [(0.5, 16), (0.9, 7), (1.3, 512)])
def test_probcover_matches_the_reference(delta, block):
  rng = np.random.default_rng(int(delta * 10))
  n = 70
  x = rng.normal(size=(n, 4)).astype(np.float32)
  labelled = np.zeros(n, bool)
  labelled[rng.choice(n, 12, replace=False)] = True
  degrees, reference = probcover_reference(x, labelled, 40, delta)
  graph = coverage.ball_edges(probcover.unit_rows(x), delta, block=block)
  np.testing.assert_array_equal(graph.degrees, degrees)
  picks = np.asarray(coverage.greedy_max_coverage(jax.random.key(0), graph, labelled, 40))
  np.testing.assert_array_equal(picks[:len(reference)], reference)
  assert len(set(picks.tolist())) == 40 and not labelled[picks].any()
  # The registered sampler (tiles of 512 rows: one here) builds the same graph.
  np.testing.assert_array_equal(
      picks, pick("ProbCover", samplers.Pool(labelled, features=x), 40, probcover_delta=delta))


def test_probcover_refuses_a_graph_past_the_edge_cap_and_keeps_zero_rows():
  x = np.ones((20, 3), np.float32)
  with pytest.raises(ValueError, match="more than 100 edges .* lower it"):
    coverage.ball_edges(x, 0.5, block=8, max_edges=100)
  x[3] = 0.0  # an all-zero row stays 0 (no NaN): 1 away from every unit row
  graph = probcover.probcover_graph(x, 0.5)
  assert graph.degrees[3] == 1 and (np.delete(graph.degrees, 3) == 19).all()


# ------------------------------------------------------------------------------ ClusterMargin


def round_robin_reference(labels, u, budget):
  """Clusters smallest first (ties: lowest label); each round one member, in order of u."""
  clusters = sorted(set(labels.tolist()), key=lambda c: ((labels == c).sum(), c))
  queues = {c: list(np.flatnonzero(labels == c)[np.argsort(u[labels == c], kind="stable")])
            for c in clusters}
  order = []
  while len(order) < budget:
    for c in clusters:
      if queues[c] and len(order) < budget:
        order.append(queues[c].pop(0))
  return np.array(order)


def test_round_robin_order():
  labels = np.array([0, 1, 0, 2, 2, 0])  # sizes 3, 1, 2
  positions = np.asarray(cluster_margin.round_robin(jax.random.key(0), labels, 6))
  np.testing.assert_array_equal(labels[positions], [1, 2, 0, 2, 0, 0])
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 9, size=50)
  labels = np.unique(labels, return_inverse=True)[1]
  for seed, budget in [(0, 50), (1, 17)]:
    key = jax.random.key(seed)
    u = np.asarray(jax.random.uniform(key, (50,)))
    np.testing.assert_array_equal(cluster_margin.round_robin(key, labels, budget),
                                  round_robin_reference(labels, u, budget))


def test_cluster_margin_hand_made():
  # 12 nodes; the 6 smallest margins (budget 3 x m 2) are nodes 0-5, in three far-apart groups
  # of 1, 2 and 3 candidates; nodes 6-11 (larger margins) sit next to them but are never taken.
  centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
  group = np.array([0, 1, 1, 2, 2, 2, 0, 1, 2, 0, 1, 2])
  rng = np.random.default_rng(0)
  x = (centres[group] + rng.normal(scale=0.1, size=(12, 2))).astype(np.float32)
  # Margins top - (0.9 - top): 0, 0.02, ..., 0.1 for nodes 0-5; 0.9 and 0.7 for the others.
  top = np.array([0.45, 0.46, 0.47, 0.48, 0.49, 0.50, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8])
  probabilities = np.stack([top, 0.9 - top, np.full(12, 0.1)], 1).astype(np.float32)
  labelled = np.zeros(12, bool)
  labelled[[9, 10]] = True
  margins = np.asarray(uncertainty.margin_scores(probabilities))
  np.testing.assert_array_equal(np.argsort(margins, kind="stable")[:6], range(6))
  labels = cluster_margin.cluster_candidates(x[:6], 3)
  reference = hierarchy.fcluster(hierarchy.linkage(x[:6].astype(np.float64), "average"), 3,
                                 "maxclust")
  assert len(set(labels.tolist())) == 3 and len(set(reference.tolist())) == 3
  firsts = set()
  for seed in range(6):
    picks = np.asarray(cluster_margin.cluster_margin(
        jax.random.key(seed), x, probabilities, labelled, 5, cluster_margin_m=1))
    # budget 5 x m 1 = 5 candidates: nodes 0-4, groups of 1, 2 and 2.
    assert set(picks.tolist()) == set(range(5))
    picks = np.asarray(cluster_margin.cluster_margin(
        jax.random.key(seed), x, probabilities, labelled, 3, cluster_margin_m=2))
    # Round 1 over clusters of sizes 1, 2, 3: one member of each, smallest first.
    assert picks[0] == 0 and picks[1] in (1, 2) and picks[2] in (3, 4, 5)
    firsts.add(tuple(picks.tolist()))
  assert len(firsts) > 1  # the member taken is random (per key)


def test_cluster_margin_candidates_cap(monkeypatch):
  pool = random_pool()
  monkeypatch.setattr(cluster_margin, "MAX_CANDIDATES", 20)
  with pytest.raises(ValueError, match="would cluster 30 candidates .*lower cluster_margin_m"):
    pick("ClusterMargin", pool, 3)
  assert len(pick("ClusterMargin", pool, 3, cluster_margin_m=5)) == 3
