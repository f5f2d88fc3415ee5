"""Tests of jax_seqgcn.selection.kcenter against the reference indices and a plain NumPy version."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn.selection import kcenter
from tests.conftest import has_square_array


def numpy_k_center(features, is_centre, budget):
  """Plain float64 greedy k-center with exact differences (the oracle)."""
  x = np.asarray(features, np.float64)
  min_dist = np.full(len(x), np.inf)
  for c in np.flatnonzero(is_centre):
    min_dist = np.minimum(min_dist, np.sqrt(((x - x[c]) ** 2).sum(1)))
  min_dist[np.asarray(is_centre, bool)] = -1.0
  picks = []
  for _ in range(budget):
    pick = int(np.argmax(min_dist))
    picks.append(pick)
    min_dist = np.minimum(min_dist, np.sqrt(((x - x[pick]) ** 2).sum(1)))
    min_dist[pick] = -1.0
  return np.asarray(picks)


@pytest.mark.parametrize("features, expected", [
    ("features_l2", "kcenter_idx"),
    ("features", "kcenter_raw_idx"),
    ("gcn_embedding", "coregcn_idx"),
])
def test_matches_reference_exactly(ref, features, expected):
  picks = kcenter.k_center_greedy(getattr(ref, features), ref.labelled_mask, 200)
  np.testing.assert_array_equal(picks, getattr(ref, expected))


@pytest.mark.parametrize("n, d, n_centres, budget", [(300, 16, 0, 5), (300, 16, 7, 40),
                                                     (700, 8, 600, 50), (257, 3, 256, 1)])
def test_matches_numpy(n, d, n_centres, budget):
  rng = np.random.default_rng(n + d)
  x = rng.normal(size=(n, d)).astype(np.float32)
  is_centre = np.zeros(n, bool)
  is_centre[rng.choice(n, n_centres, replace=False)] = True
  np.testing.assert_array_equal(kcenter.k_center_greedy(x, is_centre, budget),
                                numpy_k_center(x, is_centre, budget))


def test_sweep_blocks_with_padding_match_numpy(monkeypatch):
  # 301 rows in sweep blocks of 16: 19 blocks, the last padded; ties on duplicated rows too.
  monkeypatch.setattr(kcenter, "SWEEP_BLOCK", 16)
  rng = np.random.default_rng(11)
  x = rng.normal(size=(301, 5)).astype(np.float32)
  x[200:210] = x[3]
  is_centre = np.zeros(301, bool)
  is_centre[rng.choice(301, 20, replace=False)] = True
  np.testing.assert_array_equal(kcenter.k_center_greedy(x, is_centre, 281),
                                numpy_k_center(x, is_centre, 281))


def test_initial_min_distances_across_blocks():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 6)).astype(np.float32)
  is_centre = rng.random(500) < 0.8  # ~400 centres: two blocks of 256
  expected = np.sqrt(((x[:, None] - x[is_centre][None]) ** 2).sum(-1)).min(1)
  np.testing.assert_allclose(kcenter.initial_min_distances(jnp.asarray(x), is_centre),
                             expected, rtol=1e-6)
  got = kcenter.initial_min_distances(jnp.asarray(x), np.zeros(500, bool))
  assert np.isinf(np.asarray(got)).all()


def test_first_index_on_ties_and_distinct_with_duplicates():
  x = np.zeros((10, 3), np.float32)  # every node is at distance 0 from the centre
  is_centre = np.zeros(10, bool)
  is_centre[0] = True
  picks = np.asarray(kcenter.k_center_greedy(x, is_centre, 9))
  np.testing.assert_array_equal(picks, np.arange(1, 10))


def test_cold_start_uses_the_key():
  x = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
  none = np.zeros(50, bool)
  assert int(kcenter.k_center_greedy(x, none, 3)[0]) == 0
  firsts = {int(kcenter.k_center_greedy(x, none, 3, key=jax.random.key(s))[0]) for s in range(8)}
  assert len(firsts) > 1
  a = kcenter.k_center_greedy(x, none, 5, key=jax.random.key(3))
  b = kcenter.k_center_greedy(x, none, 5, key=jax.random.key(3))
  np.testing.assert_array_equal(a, b)


def test_never_forms_an_n_by_n_array():
  n = 40
  jaxpr = jax.make_jaxpr(lambda x, c, f: kcenter._greedy(x, c, f, budget=3))(  # pylint: disable=protected-access
      jnp.ones((n, 5)), jnp.arange(n) > 30, jnp.int32(-1))
  assert not has_square_array(jaxpr, n)


def test_one_compile_for_any_centre_count():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 4)).astype(np.float32)
  before = kcenter._greedy_jit._cache_size()  # pylint: disable=protected-access
  for n_centres in (1, 10, 40):
    kcenter.k_center_greedy(x, np.arange(64) < n_centres, 5)
  assert kcenter._greedy_jit._cache_size() - before <= 1  # pylint: disable=protected-access


@pytest.mark.parametrize("features, mask, budget, message", [
    (np.full((5, 2), np.nan), np.zeros(5, bool), 1, "NaN"),
    (np.ones((5, 2)), np.zeros(4, bool), 1, "shape"),
    (np.ones((5, 2)), np.ones(5, bool), 1, "empty"),
    (np.ones((5, 2)), np.array([1, 1, 0, 0, 0], bool), 4, "larger than"),
    (np.ones((5, 2)), np.zeros(5, bool), 0, "positive"),
])
def test_bad_input(features, mask, budget, message):
  with pytest.raises(ValueError, match=message):
    kcenter.k_center_greedy(features, mask, budget)
