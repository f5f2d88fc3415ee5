"""Tests of the sampler registry, selection rules and shared properties."""

import jax
import numpy as np
import pytest

from jax_seqgcn import samplers

FAST_GCN = dict(steps=10, hidden=16)


def test_selection_rules_reproduce_reference(ref):
  uncertain = samplers.uncertain_gcn_select(ref.gcn_scores, ref.labelled_mask, 200)
  # The reference lists the same picks closest-last; ours are closest-first.
  np.testing.assert_array_equal(uncertain, ref.uncertaingcn_idx[::-1])
  np.testing.assert_array_equal(ref.uncertaingcn_argsort[-200:], ref.uncertaingcn_idx)
  core = samplers.core_gcn_select(ref.gcn_embedding, ref.labelled_mask, 200)
  np.testing.assert_array_equal(core, ref.coregcn_idx)


def _problem(n=120, n_labelled=30, d=12, seed=0):
  rng = np.random.default_rng(seed)
  x = np.abs(rng.normal(size=(n, d))).astype(np.float32)
  mask = np.zeros(n, bool)
  mask[rng.choice(n, n_labelled, replace=False)] = True
  return x, mask


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_budget_distinct_unlabelled_and_deterministic(name):
  x, mask = _problem()
  sampler = samplers.get_sampler(name)
  picks = np.asarray(sampler(jax.random.key(0), x, mask, 25, **FAST_GCN))
  assert picks.shape == (25,) and picks.dtype == np.int32
  assert len(set(picks.tolist())) == 25
  assert not mask[picks].any()
  again = sampler(jax.random.key(0), x, mask, 25, **FAST_GCN)
  np.testing.assert_array_equal(picks, again)


def test_random_is_uniform_without_replacement():
  x, mask = _problem(n=40, n_labelled=30)
  counts = np.zeros(40)
  for seed in range(300):
    picks = np.asarray(samplers.random(jax.random.key(seed), x, mask, 5))
    assert len(set(picks.tolist())) == 5
    counts[picks] += 1
  assert counts[mask].sum() == 0
  # 10 candidates, 5 picks: each is picked with probability 1/2 (150 of 300, sd ~8.7).
  assert np.all(np.abs(counts[~mask] - 150) < 45), counts[~mask]
  assert not np.array_equal(samplers.random(jax.random.key(1), x, mask, 5),
                            samplers.random(jax.random.key(2), x, mask, 5))


def test_uncertain_gcn_picks_closest_to_margin():
  scores = np.array([0.5, 0.11, 0.09, 0.3, 0.1, 0.05])
  mask = np.array([False, False, False, False, True, False])
  picks = samplers.uncertain_gcn_select(scores, mask, 3, s_margin=0.1)
  np.testing.assert_array_equal(picks, [1, 2, 5])


def test_core_gcn_equals_k_center_on_trained_embedding():
  from jax_seqgcn import graph, kcenter  # pylint: disable=g-import-not-at-top
  x, mask = _problem()
  result = graph.train_gcn(jax.random.key(0), x, mask, **FAST_GCN)
  np.testing.assert_array_equal(
      samplers.core_gcn(jax.random.key(0), x, mask, 10, **FAST_GCN),
      kcenter.k_center_greedy(result.embedding, mask, 10))
  np.testing.assert_array_equal(
      samplers.uncertain_gcn(jax.random.key(0), x, mask, 10, **FAST_GCN),
      samplers.uncertain_gcn_select(result.scores, mask, 10))


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
@pytest.mark.parametrize("case, message", [
    ("nan", "NaN"), ("budget", "larger than"), ("empty", "empty"), ("mask", "shape"),
])
def test_bad_input_raises(name, case, message):
  x, mask = _problem(n=20, n_labelled=5)
  budget = 3
  if case == "nan":
    x[2, 3] = np.nan
  elif case == "budget":
    budget = 16
  elif case == "empty":
    mask[:] = True
  elif case == "mask":
    mask = mask[:-2]
  with pytest.raises(ValueError, match=message):
    samplers.get_sampler(name)(jax.random.key(0), x, mask, budget, **FAST_GCN)


def test_gcn_samplers_reject_degenerate_features_and_unknown_options():
  x, mask = _problem(n=20, n_labelled=5)
  x[4] = 0.0
  with pytest.raises(ValueError, match="column sum"):
    samplers.uncertain_gcn(jax.random.key(0), x, mask, 3, **FAST_GCN)
  x, mask = _problem(n=20, n_labelled=5)
  with pytest.raises(ValueError, match="unknown GCN sampler option"):
    samplers.core_gcn(jax.random.key(0), x, mask, 3, hiden=3)
  with pytest.raises(ValueError, match="valid names: Random, CoreSet, UncertainGCN, CoreGCN"):
    samplers.get_sampler("Uncertain")
