"""Tests of Learning Loss: LossNet, the ranking loss, joint training in `fit`, the sampler.

The jitted epochs are compiled once for the whole file: every fit here uses the small CNN on
[512, 14, 14, 1] images in batches of 64 (one plain and one joint compile; the epoch count,
weight, margin and detach epoch are not part of the compile).
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jax_seqgcn import data
from jax_seqgcn import models
from jax_seqgcn import samplers
from jax_seqgcn import training as train
from jax_seqgcn.models import lossnet
from jax_seqgcn.samplers import learning_loss
from jax_seqgcn.training import loss_prediction

MODEL = models.SmallCNN()
FIT = dict(batch_size=64, learning_rate=0.05, milestones=(20,))


def _spearman(a, b):
  """Spearman rank correlation (ties, rare among float losses, broken by position)."""
  ranks = lambda v: np.argsort(np.argsort(v)).astype(np.float64)
  return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def _half_resolution(images):
  """[N, 28, 28, 1] uint8 -> [N, 14, 14, 1] uint8 (2x2 means): 4x cheaper convolutions."""
  return images.reshape(-1, 14, 2, 14, 2, 1).mean(axis=(2, 4)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def synthetic():
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (512, 14, 14, 1), dtype=np.uint8),
          rng.integers(0, 10, 512).astype(np.int32))


# ----------------------------------------------------------------------------- ranking loss


def reference_loss_pred_loss(predicted, target, margin=1.0):
  """NumPy transcription of the reference's LossPredLoss (reduction 'mean')."""
  predicted, target = np.asarray(predicted, np.float64), np.asarray(target, np.float64)
  assert len(predicted) % 2 == 0, "the batch size is not even."
  half = len(predicted) // 2
  diff = (predicted - predicted[::-1])[:half]
  target_diff = (target - target[::-1])[:half]
  one = 2 * np.sign(np.clip(target_diff, 0, None)) - 1
  return np.sum(np.clip(margin - one * diff, 0, None)) / half


def test_ranking_loss_matches_reference_on_full_batches():
  rng = np.random.default_rng(1)
  predicted = rng.normal(size=16).astype(np.float32)
  losses = rng.exponential(size=16).astype(np.float32)
  losses[3] = losses[12]  # a tie: the reference's sign is -1
  for margin in (1.0, 0.3, 0.0):
    got = loss_prediction.ranking_loss(jnp.asarray(predicted), jnp.asarray(losses),
                                       margin=margin)
    np.testing.assert_allclose(got, reference_loss_pred_loss(predicted, losses, margin),
                               rtol=1e-6)
  # The scale matters: predictions within the margin of each other all pay a hinge.
  assert reference_loss_pred_loss(predicted, losses) > 0.1


@pytest.mark.parametrize("num_real", [16, 11, 10, 3, 2])
def test_ranking_loss_pairs_only_real_examples(num_real):
  """Fillers (weight 0) at the end as in `fit`, or scattered: only the real ones are paired,
  as the reference's smaller batch; an odd count leaves its middle example out."""
  rng = np.random.default_rng(num_real)
  predicted = rng.normal(size=16).astype(np.float32)
  losses = rng.exponential(size=16).astype(np.float32)
  for real in (np.arange(16) < num_real, np.isin(np.arange(16), rng.permutation(16)[:num_real])):
    idx = np.flatnonzero(real)
    if idx.size % 2:
      idx = np.delete(idx, idx.size // 2)
    expected = reference_loss_pred_loss(predicted[idx], losses[idx])
    got = loss_prediction.ranking_loss(jnp.asarray(predicted), jnp.asarray(losses),
                                       jnp.asarray(real, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_ranking_loss_edge_cases_and_no_gradient_to_true_losses():
  predicted, losses = jnp.array([0.5, 2.0, 0.0]), jnp.array([1.0, 3.0, 0.2])
  assert float(loss_prediction.ranking_loss(predicted, losses, jnp.array([1.0, 0, 0]))) == 0.0
  grad_losses = jax.grad(lambda l: loss_prediction.ranking_loss(predicted, l))(losses)
  np.testing.assert_array_equal(grad_losses, 0.0)
  grad_predicted = jax.grad(lambda p: loss_prediction.ranking_loss(p, losses))(predicted)
  assert np.abs(np.asarray(grad_predicted)).sum() > 0


# ----------------------------------------------------------------------------- LossNet


def test_lossnet_shapes_params_and_torch_init():
  for channels, sizes, count in [((64, 128, 256, 512), (32, 16, 8, 4), 123_905),
                                 ((32, 32, 64, 64), (28, 14, 14, 7), 25_601)]:
    features = [jax.ShapeDtypeStruct((3, s, s, c), jnp.float32) for c, s in zip(channels, sizes)]
    params = jax.eval_shape(lossnet.LossNet().init, jax.random.key(0), features)["params"]
    assert sum(p.size for p in jax.tree.leaves(params)) == count
    assert jax.eval_shape(lossnet.LossNet().apply, {"params": params}, features).shape == (3,)
  features = [jnp.ones((3, 7, 7, 64)), jnp.ones((3, 64))]  # maps or pooled vectors
  params = jax.jit(lossnet.LossNet().init)(jax.random.key(0), features)["params"]
  bound = 1 / np.sqrt(64)  # torch nn.Linear: U(+-1/sqrt(fan_in)), bias too
  for leaf in (params["stage0"]["kernel"], params["stage1"]["bias"]):
    assert bound >= np.abs(leaf).max() > 0.9 * bound


# ----------------------------------------------------------------------------- joint training


def test_ranking_term_shapes_learner_gradients_until_detached(synthetic):
  images, targets = synthetic
  x = images[:32].astype(np.float32) / 255.0
  state = train.init_train_state(jax.random.key(0), MODEL, x.shape[1:], learning_rate=0.05,
                                 loss_prediction=train.LossPrediction())
  weights = jnp.ones(32)

  @jax.jit
  def ranking_grads(params, detached):
    def ranking_only(params):
      outputs, _, stages = MODEL.apply({"params": params}, x, train=True)
      losses = train.per_example_loss(outputs, targets[:32], task="classification")
      return loss_prediction.ranking_term(state.loss_net, state.loss_net_params, stages, losses,
                                          weights, margin=1.0, detached=detached)[0]
    return jax.grad(ranking_only)(params)

  norms = lambda g: {k: float(sum(jnp.abs(v).sum() for v in jax.tree.leaves(g[k]))) for k in g}
  attached = norms(ranking_grads(state.params, False))
  detached = norms(ranking_grads(state.params, True))
  assert attached["conv1"] > 0 and attached["conv2"] > 0
  # The true losses are not differentiated: layers after the last stage get nothing.
  assert attached["fc1"] == 0 and attached["head"] == 0
  assert all(v == 0 for v in detached.values()), detached


def test_plain_fit_is_unchanged(synthetic):
  """Fingerprint of a plain fit computed with train.py before the loss-prediction option
  (bitwise equal then); the plain state carries no LossNet."""
  images, targets = synthetic
  state = train.fit(jax.random.key(3), MODEL, images, targets, epochs=2, **FIT)
  assert state.loss_net is None and state.loss_net_params is None
  assert (jax.tree.structure(state.opt_state)
          == jax.tree.structure(state.tx.init(state.params)))
  for name, expected in PLAIN_FINGERPRINT.items():
    # Training moved these values by 2.6e-5 to 2.4e-3 from their initialisation.
    np.testing.assert_allclose(np.asarray(state.params[name]["kernel"]).ravel()[:3], expected,
                               rtol=1e-5, atol=1e-7)
  assert "predicted_losses" not in train.forward_pool(state, MODEL, images, np.arange(5))


# First 3 kernel values after `test_plain_fit_is_unchanged`'s fit, from the pre-option train.py.
PLAIN_FINGERPRINT = {
    "conv1": [-0.063402317, 0.28265285, 0.12639597],
    "conv2": [-0.018060679, 0.027121244, -0.040609021],
    "fc1": [-0.03919296, -0.01223659, -0.041097809],
    "head": [-0.020263886, 0.073762186, -0.047651988],
}


def test_detach_epoch_switches_learner_coupling_without_recompile(synthetic):
  images, targets = synthetic
  plain = train.fit(jax.random.key(3), MODEL, images, targets, epochs=2, **FIT)
  joint = lambda **kw: train.fit(jax.random.key(3), MODEL, images, targets, epochs=2,
                                 loss_prediction=train.LossPrediction(**kw), **FIT)
  always_detached = joint(detach_epoch=0)
  traces = train.TRACE_COUNTS["epoch"]
  never_detached = joint(detach_epoch=2)
  detached_midway = joint(detach_epoch=1)
  joint(detach_epoch=1, weight=0.5, margin=0.5)
  assert train.TRACE_COUNTS["epoch"] == traces  # settings and the switch are traced
  leaves = lambda s: [np.asarray(v) for v in jax.tree.leaves(s.params)]
  max_diff = lambda s, t: max(np.abs(a - b).max() for a, b in zip(leaves(s), leaves(t)))
  # Detached from the start, the LossNet never touches the learner.
  for a, b in zip(leaves(always_detached), leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # Attached for 2 epochs, or for the first one only: the ranking term moved the learner.
  assert max_diff(never_detached, plain) > 1e-4
  assert max_diff(detached_midway, plain) > 1e-4
  assert max_diff(detached_midway, never_detached) > 1e-5
  # The learner starts from a plain fit's initialisation, and the LossNet trains.
  init = lambda **kw: train.init_train_state(jax.random.key(3), MODEL, images.shape[1:],
                                             learning_rate=FIT["learning_rate"], **kw)
  fresh, plain_init = init(loss_prediction=train.LossPrediction()), init()
  for a, b in zip(leaves(fresh), leaves(plain_init)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(always_detached.loss_net_params["head"]["kernel"],
                         fresh.loss_net_params["head"]["kernel"])


def test_predicted_losses_rank_true_losses_after_joint_training():
  """Fashion-MNIST, 512 labelled images at 14x14, 25 epochs: on 1,000 held-out images the
  predicted losses rank-correlate with the true cross-entropy (Spearman 0.60-0.65 over seeds
  0-3; a LossNet that is not trained (weight 0) scores between -0.15 and 0.09)."""
  try:
    dataset = data.load_fashion_mnist_idx()
  except data.DatasetNotFoundError as err:
    pytest.skip(str(err))
  images, targets = _half_resolution(dataset.train_images[:512]), dataset.train_targets[:512]
  held_out = _half_resolution(dataset.test_images[:1000])
  held_out_targets = dataset.test_targets[:1000]
  rhos = {}
  for weight in (1.0, 0.0):
    state = train.fit(jax.random.key(0), MODEL, images, targets, epochs=25,
                      loss_prediction=train.LossPrediction(weight=weight), **FIT)
    forward_count = train.TRACE_COUNTS["forward"]
    pool = train.forward_pool(state, MODEL, held_out)
    true_losses = -np.log(np.maximum(
        pool["probabilities"][np.arange(1000), held_out_targets], 1e-30))
    rhos[weight] = _spearman(pool["predicted_losses"], true_losses)
  assert train.TRACE_COUNTS["forward"] == forward_count  # one forward function for both
  assert train.evaluate(state, MODEL, held_out, held_out_targets) > 0.6
  assert rhos[1.0] > 0.45 and abs(rhos[0.0]) < 0.3, rhos


def test_forward_pool_predicted_losses_from_the_same_pass(synthetic):
  images, targets = synthetic
  state = train.fit(jax.random.key(1), MODEL, images, targets, epochs=1,
                    loss_prediction=train.LossPrediction(), **FIT)
  indices = np.array([5, 0, 511, 5, 7])
  before = train.TRACE_COUNTS["forward"]
  pool = train.forward_pool(state, MODEL, images, indices, batch_size=4)
  assert train.TRACE_COUNTS["forward"] - before <= 1  # one function for all three outputs
  x = images[indices].astype(np.float32) / 255.0
  outputs, embedding, stages = MODEL.apply({"params": state.params}, x, train=False)
  expected = state.loss_net.apply({"params": state.loss_net_params}, stages)
  assert pool["predicted_losses"].dtype == np.float32
  np.testing.assert_allclose(pool["predicted_losses"], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(pool["embedding"], embedding, rtol=1e-4, atol=1e-5)
  # The other readers ignore the LossNet.
  np.testing.assert_allclose(train.predict(state, MODEL, images, indices), outputs,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(train.extract_embeddings(state, MODEL, images, indices),
                             embedding, rtol=1e-4, atol=1e-5)
  assert 0 <= train.evaluate(state, MODEL, images, targets) <= 1


# ----------------------------------------------------------------------------- sampler


def test_picks_are_the_largest_predicted_losses():
  rng = np.random.default_rng(0)
  predicted = rng.normal(size=60).astype(np.float32)
  mask = np.zeros(60, bool)
  mask[np.argsort(-predicted)[:10]] = True  # the 10 largest are labelled already
  picks = np.asarray(learning_loss.learning_loss(jax.random.key(0), predicted, mask, 7))
  unlabelled = np.flatnonzero(~mask)
  np.testing.assert_array_equal(picks, unlabelled[np.argsort(-predicted[unlabelled])[:7]])
  assert len(set(picks.tolist())) == 7 and not mask[picks].any()
  sampler = samplers.get_sampler("LearningLoss")
  assert sampler.needs == frozenset({"predicted_losses"})
  np.testing.assert_array_equal(
      sampler(jax.random.key(5), samplers.Pool(mask, predicted_losses=predicted), 7,
              lossnet_weight=2.0), picks)


def test_loss_prediction_from_options():
  assert learning_loss.loss_prediction_from_options({}, 200) == train.LossPrediction(
      1.0, 1.0, 120, 128)
  assert learning_loss.loss_prediction_from_options({"lossnet_weight": 0.5, "steps": 3},
                                                    15).detach_epoch == 9
  assert learning_loss.loss_prediction_from_options({"lossnet_detach_fraction": 1.0},
                                                    15).detach_epoch == 15


@pytest.mark.parametrize("options", [{"lossnet_weight": -1.0}, {"lossnet_margin": float("nan")},
                                     {"lossnet_detach_fraction": 1.5},
                                     {"lossnet_weight": "1"}, {"lossnet_margin": True}])
def test_bad_options_raise(options):
  mask = np.array([True, False, False])
  pool = samplers.Pool(mask, predicted_losses=np.zeros(3, np.float32))
  with pytest.raises(ValueError):
    samplers.get_sampler("LearningLoss")(jax.random.key(0), pool, 1, **options)
  with pytest.raises(ValueError):
    learning_loss.loss_prediction_from_options(options, 10)


@pytest.mark.parametrize("settings", [dict(weight=-0.1), dict(margin=float("inf")),
                                      dict(detach_epoch=-1), dict(detach_epoch=2.5),
                                      dict(hidden=0)])
def test_fit_rejects_bad_loss_prediction(synthetic, settings):
  images, targets = synthetic
  with pytest.raises(ValueError):
    train.fit(jax.random.key(0), MODEL, images[:8], targets[:8], epochs=1,
              loss_prediction=train.LossPrediction(**settings), **FIT)
  with pytest.raises(ValueError, match="LossPrediction"):
    train.fit(jax.random.key(0), MODEL, images[:8], targets[:8], epochs=1,
              loss_prediction={"weight": 1.0}, **FIT)
