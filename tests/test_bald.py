"""BALD and PowerBALD (MC dropout): the score, the MC passes, the learner's dropout, the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_seqgcn
from jax_seqgcn import samplers
from jax_seqgcn import training


def _entropy(p):
  with np.errstate(divide="ignore", invalid="ignore"):
    return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


def test_bald_scores_match_the_definition_on_hand_made_predictions():
  # Node 0: every pass certain of one class, passes disagree -> I = log 2.
  # Node 1: every pass uniform -> H[mean] = mean H -> I = 0.
  # Node 2: passes agree on a confident prediction -> I = 0.
  # Node 3: mixed.
  mc = np.array([
      [[1.0, 0.0], [0.5, 0.5], [0.9, 0.1], [0.7, 0.3]],
      [[0.0, 1.0], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]],
  ])
  expected = _entropy(mc.mean(axis=0)) - _entropy(mc).mean(axis=0)
  np.testing.assert_allclose(expected[:3], [np.log(2.0), 0.0, 0.0], atol=1e-12)
  scores = np.asarray(samplers.bald.bald_scores(jnp.asarray(mc, jnp.float32)))
  np.testing.assert_allclose(scores, expected, atol=1e-6)
  picks = samplers.get_sampler("BALD")(jax.random.key(0), samplers.Pool(
      np.array([False, False, False, False]), mc_probabilities=mc), 2)
  assert np.asarray(picks).tolist() == [0, 3]


def test_mc_dropout_probabilities_are_softmax_of_the_dropped_embedding():
  rng = np.random.default_rng(0)
  embedding = rng.normal(size=(7, 5)).astype(np.float32)
  head = {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
          "bias": rng.normal(size=(3,)).astype(np.float32)}
  key, rate, samples = jax.random.key(4), 0.4, 6
  mc = np.asarray(training.mc_dropout_probabilities(key, head, embedding, rate, samples))
  assert mc.shape == (samples, 7, 3)
  np.testing.assert_allclose(mc.sum(-1), 1.0, rtol=1e-6)
  for t in range(samples):
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, t), 1 - rate, (7, 5)))
    logits = np.where(keep, embedding / (1 - rate), 0.0) @ head["kernel"] + head["bias"]
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(mc[t], expected / expected.sum(-1, keepdims=True), rtol=1e-5)
  assert not np.allclose(mc[0], mc[1])  # the passes differ
  with pytest.raises(ValueError, match=r"rate must be in \(0, 1\)"):
    training.mc_dropout_probabilities(key, head, embedding, 0.0, samples)
  with pytest.raises(ValueError, match="samples must be an int >= 1"):
    training.mc_dropout_probabilities(key, head, embedding, rate, True)


def test_learner_dropout_is_active_in_training_only():
  model = jax_seqgcn.get_learner("small_cnn", num_classes=4, channels=1, dropout_rate=0.5,
                                 conv_features=(4, 8), hidden=16)
  plain = jax_seqgcn.get_learner("small_cnn", num_classes=4, channels=1,
                                 conv_features=(4, 8), hidden=16)
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 28, 28, 1)), jnp.float32)
  variables = plain.init(jax.random.key(0), x, train=False)
  # No new parameters: the same variables serve both, and eval mode is the same function.
  assert jax.tree.structure(model.init(jax.random.key(0), x, train=False)) == \
      jax.tree.structure(variables)
  np.testing.assert_array_equal(model.apply(variables, x, train=False)[0],
                                plain.apply(variables, x, train=False)[0])
  run = lambda k: model.apply(variables, x, train=True, mutable=["batch_stats"],
                              rngs={"dropout": jax.random.key(k)})[0]
  (a, emb_a, _), (b, emb_b, _) = run(1), run(2)
  np.testing.assert_array_equal(emb_a, emb_b)  # the embedding is taken before the dropout
  assert not np.allclose(a, b)


def test_bald_samplers_refuse_a_pool_without_mc_predictions_and_bad_options():
  mask = np.arange(6) < 2
  probabilities = np.full((6, 3), 1 / 3)
  for name in ("BALD", "PowerBALD"):
    with pytest.raises(ValueError, match="needs pool.mc_probabilities"):
      samplers.get_sampler(name)(jax.random.key(0), samplers.Pool(
          mask, probabilities=probabilities), 2)
    with pytest.raises(ValueError, match="bald_samples must be an int in"):
      samplers.get_sampler(name)(jax.random.key(0), samplers.Pool(
          mask, mc_probabilities=probabilities[None]), 2, bald_samples=0)
  with pytest.raises(ValueError, match="mc_probabilities must have rank 3"):
    samplers.get_sampler("BALD")(jax.random.key(0), samplers.Pool(
        mask, mc_probabilities=probabilities), 2)


def test_power_bald_draws_by_key_and_prefers_informative_nodes():
  rng = np.random.default_rng(3)
  mc = rng.dirichlet(np.ones(4), size=(10, 50)).astype(np.float32)
  mc[:, :5] = np.array([0.97, 0.01, 0.01, 0.01], np.float32)  # 5 nodes all passes agree on
  pool = samplers.Pool(np.zeros(50, bool), mc_probabilities=mc)
  sampler = samplers.get_sampler("PowerBALD")
  a, b = sampler(jax.random.key(0), pool, 10), sampler(jax.random.key(0), pool, 10)
  np.testing.assert_array_equal(a, b)
  draws = [set(np.asarray(sampler(jax.random.key(s), pool, 10)).tolist()) for s in range(20)]
  assert len({frozenset(d) for d in draws}) > 1  # stochastic across keys
  assert all(len(d) == 10 for d in draws)
  # Zero-information nodes are drawn only when nothing else is left.
  assert not any(d & set(range(5)) for d in draws)


def test_the_experiment_config_asks_for_mc_dropout(tmp_path, npz_path):
  from jax_seqgcn.experiment import loop  # pylint: disable=import-outside-toplevel
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  for sampler in ("BALD", "PowerBALD"):
    with pytest.raises(loop.ConfigError, match="needs MC-dropout predictions: set "
                                               r"learner.mc_dropout > 0"):
      loop.run(tiny_config(npz_path, sampler__name=sampler, learner__mc_dropout=0.0),
               tmp_path / sampler)
  for bad in (1.0, -0.1, True):
    with pytest.raises(loop.ConfigError, match=r"learner.mc_dropout must be a number in \[0, 1\)"):
      loop.run(tiny_config(npz_path, sampler__name="BALD", learner__mc_dropout=bad),
               tmp_path / "bad")
  assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())

