"""Mixed precision: bfloat16 activations with float32 parameters, statistics and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn import models
from jax_seqgcn import training as train
from jax_seqgcn.experiment import loop
from jax_seqgcn.training import precision
from tests.conftest import tiny_config

# A tiny BatchNorm ResNet (every layer type of the real learners) on an easy task: bright vs dark.
MODEL = models.ResNet(num_classes=2, stage_sizes=(1, 1, 1, 1), stage_features=(8, 8, 16, 16))


def _data(n=256, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n).astype(np.int32)
  images = rng.integers(0, 128, (n, 16, 16, 3)) + 128 * labels[:, None, None, None]
  return images.astype(np.uint8), labels


def _global_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def test_cast_floating_leaves_integers_alone():
  tree = {"w": jnp.ones(3), "i": jnp.arange(3), "b": jnp.ones(2, jnp.bfloat16)}
  cast = precision.cast_floating(tree, jnp.bfloat16)
  assert cast["w"].dtype == jnp.bfloat16 and cast["i"].dtype == tree["i"].dtype
  assert precision.to_float32(cast)["b"].dtype == jnp.float32
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    precision.check_compute_dtype("float16")


def test_bfloat16_steps_stay_close_to_float32_and_keep_float32_state():
  images, labels = _data(128)
  kwargs = dict(epochs=1, batch_size=64, learning_rate=0.01, milestones=(),
                preprocessing="cifar10")
  init = train.init_train_state(jax.random.key(0), MODEL, images.shape[1:])
  states = {dtype: train.fit(jax.random.key(0), MODEL, images, labels, compute_dtype=dtype,
                             **kwargs) for dtype in precision.COMPUTE_DTYPES}
  low = states["bfloat16"]
  for leaf in jax.tree.leaves((low.params, low.opt_state, low.batch_stats)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  # The two steps' parameter updates agree to bfloat16 accuracy (8-bit mantissa: ~0.4% per
  # operation; measured ~15% of the update's norm after two steps through 10 layers)...
  update = {k: jax.tree.map(jnp.subtract, s.params, init.params) for k, s in states.items()}
  difference = jax.tree.map(jnp.subtract, update["bfloat16"], update["float32"])
  assert _global_norm(difference) < 0.3 * _global_norm(update["float32"])
  # ... and so do the outputs of the same network evaluated in either dtype.
  logits = {dtype: train.predict(states["float32"], MODEL, images, preprocessing="cifar10",
                                 compute_dtype=dtype) for dtype in precision.COMPUTE_DTYPES}
  assert logits["bfloat16"].dtype == np.float32
  np.testing.assert_allclose(logits["bfloat16"], logits["float32"], atol=0.05 * np.abs(
      logits["float32"]).max())
  embeddings = train.forward_pool(states["float32"], MODEL, images, preprocessing="cifar10",
                                  compute_dtype="bfloat16")["embedding"]
  assert embeddings.dtype == np.float32


def test_bfloat16_training_learns():
  images, labels = _data(256)
  losses = []
  state = train.fit(jax.random.key(1), MODEL, images, labels, epochs=3, batch_size=64,
                    learning_rate=0.05, milestones=(), preprocessing="cifar10",
                    compute_dtype="bfloat16", progress=lambda e, n, m: losses.append(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  test_images, test_labels = _data(128, seed=1)
  assert train.evaluate(state, MODEL, test_images, test_labels, preprocessing="cifar10",
                        compute_dtype="bfloat16") > 0.9


def test_small_cnn_bfloat16_convolutions_run_in_bfloat16():
  # The learner's convolutions and matrix products see bfloat16 inputs and weights.
  model = models.SmallCNN(num_classes=2)
  x = jnp.zeros((2, 8, 8, 1), jnp.bfloat16)
  params = train.init_train_state(jax.random.key(0), model, (8, 8, 1)).params
  logits, embedding, stages = model.apply(
      {"params": precision.cast_floating(params, jnp.bfloat16)}, x)
  assert logits.dtype == embedding.dtype == stages[0].dtype == jnp.bfloat16


def test_loop_passes_compute_dtype_to_training_and_evaluation(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 400)
  images = rng.integers(0, 256, (400, 28, 28, 1)).astype(np.uint8)
  path = tmp_path / "tiny.npz"
  np.savez(path, images=images[:300], targets=labels[:300], test_images=images[300:],
           test_targets=labels[300:])
  seen = []
  for name in ("fit", "evaluate", "forward_pool"):
    def spy(*args, _original=getattr(train, name), _name=name, **kwargs):
      seen.append((_name, kwargs.get("compute_dtype")))
      return _original(*args, **kwargs)
    monkeypatch.setattr(train, name, spy)
  config = tiny_config(str(path), sampler__name="CoreSet", train__compute_dtype="bfloat16",
                       al__cycles=2)
  records = loop.run(config, tmp_path / "run")
  assert len(records) == 2 and all(np.isfinite(r.metric) for r in records)
  assert sorted(set(seen)) == [("evaluate", "bfloat16"), ("fit", "bfloat16"),
                               ("forward_pool", "bfloat16")]
