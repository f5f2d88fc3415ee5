"""Tests of the sampler registry, the selection rules, and what every sampler guarantees."""

import jax
import numpy as np
import pytest

from jax_seqgcn import samplers
from jax_seqgcn import selection
from jax_seqgcn.selection import gcn_fused
from jax_seqgcn.selection import gcn_training
from tests.conftest import FAST_SAMPLER_OPTIONS

FAST_GCN = dict(steps=10, hidden=16)
# Small settings for every sampler's options (each sampler gets those it declares).
FAST_OPTIONS = dict(FAST_GCN, **FAST_SAMPLER_OPTIONS)


def fast_options(name):
  return {k: v for k, v in FAST_OPTIONS.items() if k in samplers.get_sampler(name).options}


def full_pool(features, mask, seed=0, num_classes=4, image_shape=(28, 28, 1)):
  """A Pool with every field, consistent with `features` (for samplers that need more)."""
  rng = np.random.default_rng(seed)
  n = features.shape[0]
  logits = rng.normal(size=(n, num_classes))
  probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  mc_logits = logits[None] + rng.normal(size=(5, n, num_classes))  # 5 MC-dropout passes
  mc_probabilities = np.exp(mc_logits) / np.exp(mc_logits).sum(axis=-1, keepdims=True)
  return samplers.Pool(mask, features=features,
                       images=rng.uniform(size=(n,) + image_shape).astype(np.float32),
                       predicted_losses=rng.normal(size=n).astype(np.float32),
                       probabilities=probabilities.astype(np.float32),
                       mc_probabilities=mc_probabilities.astype(np.float32))


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
  pool = full_pool(x, mask)
  picks = np.asarray(sampler(jax.random.key(0), pool, 25, **fast_options(name)))
  assert picks.shape == (25,) and picks.dtype == np.int32
  assert len(set(picks.tolist())) == 25
  assert not mask[picks].any()
  again = sampler(jax.random.key(0), pool, 25, **fast_options(name))
  np.testing.assert_array_equal(picks, again)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_each_sampler_declares_what_it_reads(name):
  sampler = samplers.get_sampler(name)
  x, mask = _problem()
  pool = full_pool(x, mask)
  for field in sampler.needs:
    with pytest.raises(ValueError, match=f"needs pool.{field}"):
      sampler(jax.random.key(0), pool._replace(**{field: None}), 5, **fast_options(name))
  # Fields it does not declare are not needed.
  missing = {f: None for f in samplers.POOL_FIELDS if f not in sampler.needs}
  picks = sampler(jax.random.key(0), pool._replace(**missing), 5, **fast_options(name))
  assert len(set(np.asarray(picks).tolist())) == 5


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
  x, mask = _problem()
  result = selection.train_gcn(jax.random.key(0), x, mask, **FAST_GCN)
  np.testing.assert_array_equal(
      samplers.core_gcn(jax.random.key(0), x, mask, 10, **FAST_GCN),
      selection.k_center_greedy(result.embedding, mask, 10))
  np.testing.assert_array_equal(
      samplers.uncertain_gcn(jax.random.key(0), x, mask, 10, **FAST_GCN),
      samplers.uncertain_gcn_select(result.scores, mask, 10))


@pytest.mark.parametrize("name, case, message", [
    (name, case, message) for name in samplers.SAMPLERS
    for case, message in [("nan", "NaN"), ("budget", "larger than"), ("empty", "empty"),
                          ("mask", "shape")]
    if case != "nan" or "features" in samplers.SAMPLERS[name].needs])
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
  sampler = samplers.get_sampler(name)
  with pytest.raises(ValueError, match=message):
    sampler(jax.random.key(0), full_pool(x, mask), budget, **fast_options(name))


def test_gcn_samplers_reject_degenerate_features_and_unknown_options():
  x, mask = _problem(n=20, n_labelled=5)
  x[4] = 0.0
  with pytest.raises(ValueError, match="column sum"):
    samplers.uncertain_gcn(jax.random.key(0), x, mask, 3, **FAST_GCN)
  x, mask = _problem(n=20, n_labelled=5)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['hiden'\] for sampler 'CoreGCN'"):
    samplers.core_gcn(jax.random.key(0), x, mask, 3, hiden=3)
  with pytest.raises(ValueError, match="valid names: Random, CoreSet, UncertainGCN, CoreGCN"):
    samplers.get_sampler("Uncertain")
  with pytest.raises(TypeError, match="takes a samplers.Pool"):
    samplers.get_sampler("CoreGCN")(jax.random.key(0), x, 3)


@pytest.mark.parametrize("options, message", [
    (dict(adjacency="eye"), "adjacency must be one of"),
    (dict(num_layers=4), "num_layers must be 1, 2 or 3"),
    (dict(hidden=0), "hidden must be an int >= 1"),
    (dict(dropout_rate=1.0), "dropout_rate must be in"),
    (dict(steps=-1), "steps must be an int >= 0"),
    (dict(learning_rate=float("nan")), "learning_rate must be a finite number > 0"),
    (dict(s_margin=2.0), "s_margin must be a number in"),
])
def test_gcn_options_checked_before_training(options, message):
  x, mask = _problem(n=20, n_labelled=5)
  with pytest.raises(ValueError, match=message):
    samplers.get_sampler("UncertainGCN").resolve_options(options)
  with pytest.raises(ValueError, match=message):
    samplers.uncertain_gcn(jax.random.key(0), x, mask, 3, **options)


@pytest.mark.parametrize("case", ["budget", "all_labelled", "nan"])
def test_uncertain_gcn_select_rejects_what_would_return_labelled_nodes(case):
  scores = np.linspace(0.0, 1.0, 10).astype(np.float32)
  mask = np.arange(10) >= 4
  budget = 3
  if case == "budget":
    budget = 5
  elif case == "all_labelled":
    mask[:] = True
  else:
    scores[2] = np.nan
  with pytest.raises(ValueError, match={"budget": "larger than", "all_labelled": "empty",
                                        "nan": "GCN diverged"}[case]):
    samplers.uncertain_gcn_select(scores, mask, budget)


def test_diverged_gcn_is_named(monkeypatch):
  x, mask = _problem(n=20, n_labelled=5)
  for module, name in ((gcn_training, "train_evaluate_jit"), (gcn_fused, "evaluate_jit")):

    def diverged(*args, real=getattr(module, name), **kwargs):
      scores, embedding = real(*args, **kwargs)
      return scores * np.nan, embedding

    monkeypatch.setattr(module, name, diverged)
  for adjacency in ("dense", "factored"):
    with pytest.raises(FloatingPointError, match="GCN diverged"):
      samplers.core_gcn(jax.random.key(0), x, mask, 3, **dict(FAST_GCN, adjacency=adjacency))


@pytest.mark.parametrize("adjacency", ["identity", "ones"])
def test_graph_ablations_pick_distinct_unlabelled(adjacency):
  x, mask = _problem()
  for name in ("UncertainGCN", "CoreGCN"):
    picks = np.asarray(samplers.get_sampler(name)(
        jax.random.key(0), samplers.Pool(mask, features=x), 20, adjacency=adjacency, **FAST_GCN))
    assert len(set(picks.tolist())) == 20 and not mask[picks].any()
