"""Tests of the probability-based baselines: Entropy, Margin, LeastConfidence and BADGE."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn import samplers
from jax_seqgcn.samplers import badge
from jax_seqgcn.samplers import uncertainty
from tests.conftest import has_square_array
from tests.conftest import shapes_in_jaxpr

# Chi-square quantile for 4 degrees of freedom at 1 - 1e-6 (scipy.stats.chi2.ppf(1 - 1e-6, 4)):
# a correct sampler fails the test once in a million seeds.
CHI2_4DOF_CRITICAL = 33.38


def _softmax(logits):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _probabilities_with_zeros():
  """Softmax rows of fixed logits plus hand-made rows with exact zeros and ties."""
  logits = np.array([[2.0, 1.0, 0.1, -1.0], [0.0, 0.0, 0.0, 0.0], [5.0, 4.9, -2.0, 0.3],
                     [-1.0, 3.0, 3.0, 0.0], [10.0, -10.0, 0.0, 1.0]])
  hand = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.7, 0.2, 0.1],
                   [0.0, 0.0, 0.0, 1.0], [0.6, 0.0, 0.4, 0.0]])
  return np.concatenate([_softmax(logits), hand]).astype(np.float32)


def _numpy_scores(p):
  p = p.astype(np.float64)
  logs = np.log(np.where(p > 0, p, 1.0))
  top = np.sort(p, axis=1)[:, ::-1]
  return {"Entropy": -np.sum(p * logs, axis=1), "Margin": top[:, 0] - top[:, 1],
          "LeastConfidence": top[:, 0]}


def test_scores_match_numpy_including_exact_zeros():
  p = _probabilities_with_zeros()
  expected = _numpy_scores(p)
  got = {"Entropy": samplers.entropy_scores(p), "Margin": samplers.margin_scores(p),
         "LeastConfidence": samplers.confidence_scores(p)}
  got = {name: np.asarray(scores) for name, scores in got.items()}
  for name, scores in got.items():
    assert np.isfinite(scores).all(), name
    np.testing.assert_allclose(scores, expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
  # Hand values: one-hot has entropy 0 and margin 1; a 50/50 row has entropy log 2, margin 0.
  np.testing.assert_allclose(got["Entropy"][[5, 6, 8]], [0.0, np.log(2.0), 0.0], atol=1e-7)
  np.testing.assert_allclose(got["Margin"][[5, 6]], [1.0, 0.0], atol=1e-7)


def _classification_problem(n=60, n_labelled=15, num_classes=5, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  p = _softmax(rng.normal(size=(n, num_classes)) * 2.0).astype(np.float32)
  mask = np.zeros(n, bool)
  mask[rng.choice(n, n_labelled, replace=False)] = True
  if n >= 12:
    p[7] = p[3]  # an exact tie: the lower index must come first
    p[11] = np.eye(num_classes)[2]  # exact zeros
    mask[[3, 7, 11]] = False
  features = np.abs(rng.normal(size=(n, dim))).astype(np.float32)
  return features, p, mask


@pytest.mark.parametrize("name, plain, sign", [
    ("Entropy", samplers.entropy, -1.0),  # sort key: ascending = picked first
    ("Margin", samplers.margin, 1.0),
    ("LeastConfidence", samplers.least_confidence, 1.0),
])
def test_picks_are_the_top_unlabelled_by_score(name, plain, sign):
  _, p, mask = _classification_problem()
  key = sign * _numpy_scores(p)[name]
  unlabelled = np.flatnonzero(~mask)
  order = unlabelled[np.argsort(key[unlabelled], kind="stable")]
  budget = 20
  picks = np.asarray(samplers.get_sampler(name)(jax.random.key(0), samplers.Pool(
      mask, probabilities=p), budget))
  assert picks.dtype == np.int32
  np.testing.assert_array_equal(picks, order[:budget])
  np.testing.assert_array_equal(plain(jax.random.key(1), p, mask, budget), picks)
  # The whole unlabelled set, in order: every node once, ties lowest index first.
  np.testing.assert_array_equal(plain(jax.random.key(0), p, mask, len(unlabelled)), order)


def test_uncertainty_samplers_trace_once_per_shape():
  before = uncertainty._select._cache_size()  # pylint: disable=protected-access
  for seed in range(3):
    _, p, mask = _classification_problem(seed=seed, n_labelled=10 + seed)
    for plain in (samplers.entropy, samplers.margin, samplers.least_confidence):
      plain(jax.random.key(seed), p, mask, 8)
  assert uncertainty._select._cache_size() - before <= 3  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["Entropy", "Margin", "LeastConfidence", "BADGE"])
def test_regression_input_fails_clearly(name):
  features, p, mask = _classification_problem(n=20, n_labelled=5)
  sampler = samplers.get_sampler(name)
  with pytest.raises(ValueError, match="needs pool.probabilities, which is missing"):
    sampler(jax.random.key(0), samplers.Pool(mask, features=features), 3)
  # A single output column (a regression head) is not a class distribution, even if all ones.
  with pytest.raises(ValueError, match="C >= 2 classes"):
    sampler(jax.random.key(0), samplers.Pool(mask, features=features,
                                             probabilities=np.ones((20, 1), np.float32)), 3)
  # Regression outputs (e.g. joint coordinates) are not softmax rows.
  with pytest.raises(ValueError, match="softmax outputs, not logits"):
    sampler(jax.random.key(0), samplers.Pool(mask, features=features,
                                             probabilities=np.full((20, 6), 3.0)), 3)
  plain = {"Entropy": samplers.entropy, "Margin": samplers.margin,
           "LeastConfidence": samplers.least_confidence,
           "BADGE": lambda k, p, m, b: badge.badge(k, features, p, m, b)}[name]
  with pytest.raises(ValueError, match="regression learners have none"):
    plain(jax.random.key(0), None, mask, 3)


def test_registry_entries():
  for name in ("Entropy", "Margin", "LeastConfidence"):
    assert samplers.get_sampler(name).needs == {"probabilities"}
    assert not samplers.get_sampler(name).options
  assert samplers.get_sampler("BADGE").needs == {"features", "probabilities"}
  assert not samplers.get_sampler("BADGE").options


# --- BADGE -----------------------------------------------------------------------------------


def _gradient_embeddings(features, p):
  """The authors' layout in NumPy: block c of row j is h_j * (1[c = argmax p_j] - p_jc)."""
  features, p = features.astype(np.float64), p.astype(np.float64)
  n, num_classes = p.shape
  dim = features.shape[1]
  out = np.zeros((n, num_classes * dim))
  for j in range(n):
    for c in range(num_classes):
      out[j, dim * c:dim * (c + 1)] = features[j] * (float(c == np.argmax(p[j])) - p[j, c])
  return out


def test_factored_distances_equal_materialised_ones():
  features, p, _ = _classification_problem(n=9, n_labelled=2, num_classes=4,
                                                dim=5, seed=3)
  p[2] = p[5]  # equal residuals, different features
  g = _gradient_embeddings(features, p)
  factors = badge.gradient_factors(features, p)
  np.testing.assert_allclose(factors.sq_norms, np.sum(g**2, axis=1), rtol=1e-5)
  np.testing.assert_allclose(np.einsum("nc,nd->ncd", factors.residual, factors.features)
                             .reshape(9, -1), g, rtol=1e-5, atol=1e-6)
  for centre in range(9):
    exact = np.sum((g - g[centre])**2, axis=1)
    got = np.asarray(badge.sq_distances_to(factors, centre))
    assert (got >= 0).all()
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5 * exact.max())


def test_badge_never_forms_the_embeddings_or_an_n_by_n_array():
  n, num_classes, dim = 40, 3, 7
  jaxpr = jax.make_jaxpr(lambda k, x, p, m: badge.kmeans_pp_seeding(k, x, p, m, budget=4))(
      jax.random.key(0), jnp.ones((n, dim)), jnp.full((n, num_classes), 1 / 3), jnp.arange(n) > 30)
  assert not any(num_classes * dim in shape for shape in shapes_in_jaxpr(jaxpr))
  assert not has_square_array(jaxpr, n)


def _tiny_badge_case():
  """6 unlabelled nodes (0, 1, 3, 4, 6, 7) and 2 labelled, one with the largest norm overall.

  Row scales spread the distances to the first centre (D^2 probabilities 0.08 to 0.51), so D^2,
  D and uniform sampling are far apart.
  """
  rng = np.random.default_rng(3)
  features = np.abs(rng.normal(size=(8, 3))).astype(np.float32)
  features *= np.array([1.0, 3.0, 1.0, 0.4, 2.0, 1.0, 0.7, 1.5], np.float32)[:, None]
  p = _softmax(2.0 * rng.normal(size=(8, 3))).astype(np.float32)
  mask = np.zeros(8, bool)
  mask[[2, 5]] = True
  features[5] *= 10.0  # the largest norm is labelled: BADGE must not start there
  return features, p, mask


def test_first_pick_is_the_largest_norm_unlabelled_node():
  features, p, mask = _tiny_badge_case()
  norms = np.linalg.norm(_gradient_embeddings(features, p), axis=1)
  assert np.argmax(norms) == 5 and mask[5]
  expected = np.flatnonzero(~mask)[np.argmax(norms[~mask])]
  for seed in range(5):
    assert badge.badge(jax.random.key(seed), features, p, mask, 1)[0] == expected
    assert badge.badge(jax.random.key(seed), features, p, mask, 4)[0] == expected


def test_second_pick_is_d_squared_distributed():
  features, p, mask = _tiny_badge_case()
  g = _gradient_embeddings(features, p)
  first = np.flatnonzero(~mask)[np.argmax(np.linalg.norm(g[~mask], axis=1))]
  candidates = np.flatnonzero(~mask & (np.arange(8) != first))
  distance = np.linalg.norm(g[candidates] - g[first], axis=1)
  exact = distance**2 / np.sum(distance**2)
  num_keys = 20_000
  keys = jax.random.split(jax.random.key(0), num_keys)
  picks = np.asarray(jax.jit(jax.vmap(lambda k: badge.kmeans_pp_seeding(
      k, features, p, mask, budget=2)))(keys))
  assert (picks[:, 0] == first).all()
  counts = np.array([np.sum(picks[:, 1] == c) for c in candidates])
  assert counts.sum() == num_keys  # never labelled, never the first pick again

  def chi2(probabilities):
    expected = num_keys * probabilities
    return np.sum((counts - expected)**2 / expected)

  assert chi2(exact) < CHI2_4DOF_CRITICAL, (counts, num_keys * exact)
  # The test has power: the wrong distributions fail it by far.
  uniform = np.full(len(candidates), 1 / len(candidates))
  assert chi2(uniform) > 10 * CHI2_4DOF_CRITICAL
  assert chi2(distance / distance.sum()) > 10 * CHI2_4DOF_CRITICAL


@pytest.mark.parametrize("uniform, expected", [(0.0, 2), (0.25, 4), (1.0, 4)])
def test_draw_never_returns_a_zero_weight_index(monkeypatch, uniform, expected):
  # u = 1 stands for u * total rounding up to the total.
  monkeypatch.setattr(jax.random, "uniform", lambda key, dtype: jnp.asarray(uniform, dtype))
  weights = jnp.array([0.0, 0.0, 1.0, 0.0, 3.0, 0.0])
  assert badge.draw_proportional(jax.random.key(0), weights) == expected


def test_badge_picks_distinct_unlabelled_nodes_even_with_duplicates():
  features, p, mask = _classification_problem(n=50, n_labelled=10, seed=2)
  features[20:30] = features[19]  # exact duplicates: D^2 = 0 (up to rounding) once one is picked
  p[20:30] = p[19]
  p[40:50] = np.eye(5)[0]  # one-hot rows: zero gradient embeddings, all at the same point
  mask[19] = False
  mask[20:50] = False
  unlabelled = int((~mask).sum())
  for budget in (10, unlabelled):  # all of them: the uniform fallback must still finish
    picks = np.asarray(badge.badge(jax.random.key(budget), features, p, mask, budget))
    assert picks.shape == (budget,) and picks.dtype == np.int32
    assert len(set(picks.tolist())) == budget
    assert not mask[picks].any()


def test_badge_deterministic_per_key_and_registry_agrees():
  features, p, mask = _classification_problem(n=80, n_labelled=20, seed=4)
  pool = samplers.Pool(mask, features=features, probabilities=p)
  picks = badge.badge(jax.random.key(7), features, p, mask, 12)
  np.testing.assert_array_equal(picks, badge.badge(jax.random.key(7), features, p, mask, 12))
  np.testing.assert_array_equal(
      picks, samplers.get_sampler("BADGE")(jax.random.key(7), pool, 12))
  assert not np.array_equal(picks, badge.badge(jax.random.key(8), features, p, mask, 12))


def test_badge_traces_once_per_shape(monkeypatch):
  counted = jax.jit(chex.assert_max_traces(badge.kmeans_pp_seeding, n=1),
                    static_argnames="budget")
  monkeypatch.setattr(badge, "kmeans_pp_seeding_jit", counted)
  for seed in range(3):
    features, p, mask = _classification_problem(n=30, n_labelled=5 + seed, seed=seed)
    badge.badge(jax.random.key(seed), features, p, mask, 6)
