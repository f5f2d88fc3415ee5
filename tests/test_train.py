"""Tests for jax_seqgcn.training.fit and jax_seqgcn.training.augment against NumPy / hand-made cases."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jax_seqgcn import models
from jax_seqgcn import training as train
from jax_seqgcn.training import augment
from tests.conftest import TinyBN


class Linear(nn.Module):
  """Softmax regression on the flattened pixels; the embedding is the flat input."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, *, train):
    del train
    flat = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(flat), flat, (x, x, x, x)


class FirstPixels(nn.Module):
  """Outputs the first `num_outputs` scaled pixels: evaluation cases can be made by hand."""
  num_outputs: int = 3

  @nn.compact
  def __call__(self, x, *, train):
    del train
    offset = self.param("offset", nn.initializers.zeros, ())
    flat = x.reshape(x.shape[0], -1)
    return flat[:, :self.num_outputs] + offset, flat, (x, x, x, x)


def _data(n, shape=(8, 8, 3), classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
          rng.integers(0, classes, n).astype(np.int32))


# ----------------------------------------------------------------------------- augment


def _numpy_crop_and_flip(images, offsets, flips, pad):
  _, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(images)
  for i, ((row, col), flip) in enumerate(zip(offsets, flips)):
    crop = padded[i, row:row + height, col:col + width]
    out[i] = crop[:, ::-1] if flip else crop
  return out


def test_crop_and_flip_matches_numpy():
  images, _ = _data(64)
  offsets, flips = augment.crop_flip_params(jax.random.key(3), 64, pad=4)
  offsets, flips = np.asarray(offsets), np.asarray(flips)
  assert offsets.min() == 0 and offsets.max() == 8  # torchvision range [0, 2 * pad]
  assert 0 < flips.sum() < 64
  got = np.asarray(jax.jit(augment.crop_and_flip)(images, offsets, flips))
  np.testing.assert_array_equal(got, _numpy_crop_and_flip(images, offsets, flips, 4))


def test_preprocess_cifar_is_crop_flip_then_normalise():
  images, _ = _data(16)
  key = jax.random.key(7)
  spec = train.preprocessing_for("cifar10")
  got = np.asarray(jax.jit(lambda k, x: augment.apply_spec(k, x, spec, train=True))(key, images))
  offsets, flips = map(np.asarray, augment.crop_flip_params(key, 16, pad=4))
  cropped = _numpy_crop_and_flip(images, offsets, flips, 4)
  expected = (cropped / 255.0 - np.array(augment.CIFAR10_MEAN)) / np.array(augment.CIFAR10_STD)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # Eval mode: no augmentation, same normalisation.
  got_eval = np.asarray(augment.apply_spec(None, images, spec, train=False))
  np.testing.assert_allclose(
      got_eval, (images / 255.0 - np.array(augment.CIFAR10_MEAN)) / np.array(augment.CIFAR10_STD),
      rtol=1e-5, atol=1e-5)


def test_preprocessing_table():
  assert train.preprocessing_for("cifar100") == train.preprocessing_for("cifar10")
  for name in ("svhn_cropped", "fashion_mnist", "npz"):
    spec = train.preprocessing_for(name)
    assert not spec.augment and spec.mean is None
  images = np.arange(2 * 2 * 2, dtype=np.uint8).reshape(2, 2, 2, 1)
  out = train.preprocess(None, images, augment=False)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, images / 255.0, rtol=1e-6)
  floats = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 2, 2, 1)
  np.testing.assert_allclose(train.preprocess(None, floats, augment=False), floats)
  with pytest.raises(ValueError, match="Unknown dataset"):
    train.preprocessing_for("imagenet")


# ----------------------------------------------------------------------------- optimiser


def test_optimizer_matches_torch_sgd_coupled_decay():
  lr, momentum, decay = 0.1, 0.9, 5e-4
  tx = train.make_optimizer(task="classification", learning_rate=lr, momentum=momentum,
                            weight_decay=decay)
  assert tx is train.make_optimizer(task="classification", learning_rate=lr, momentum=momentum,
                                    weight_decay=decay)  # cached: no recompiles per cycle
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
  opt_state = tx.init(params)
  p_np, buf = params["w"].astype(np.float64), None
  for step in range(5):
    step_lr = lr if step < 3 else lr * 0.1
    opt_state.hyperparams["learning_rate"] = jnp.float32(step_lr)
    grad = rng.normal(size=(3, 4)).astype(np.float32)
    updates, opt_state = tx.update({"w": grad}, opt_state, params)
    params = {"w": params["w"] + updates["w"]}
    # torch.optim.SGD: d_p = g + wd * p; buf = momentum * buf + d_p (buf = d_p at first);
    # p -= lr * buf.
    d_p = grad + decay * p_np
    buf = d_p if buf is None else momentum * buf + d_p
    p_np = p_np - step_lr * buf
    np.testing.assert_allclose(params["w"], p_np, rtol=1e-5, atol=1e-6)


def test_learning_rate_schedule_drops_at_milestone_epochs():
  lrs = [train.learning_rate_at_epoch(e, learning_rate=0.1, milestones=(160,), gamma=0.1)
         for e in (0, 159, 160, 199)]
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01])
  lrs = [train.learning_rate_at_epoch(e, learning_rate=1.0, milestones=(2, 4), gamma=0.5)
         for e in range(6)]
  np.testing.assert_allclose(lrs, [1, 1, 0.5, 0.5, 0.25, 0.25])


def test_regression_loss_is_eq2():
  rng = np.random.default_rng(1)
  outputs, targets = rng.normal(size=(2, 5, 48)).astype(np.float32)
  loss = train.per_example_loss(outputs, targets, task="regression")
  expected = np.mean(np.sum((outputs - targets).reshape(5, 16, 3)**2, axis=-1), axis=-1)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


# ----------------------------------------------------------------------------- epochs


def test_epoch_order_uses_every_example_once():
  n, batch, capacity = 100, 32, train.padded_capacity(100, 32)
  assert capacity == 128
  indices, weights = map(np.asarray, train.epoch_order(jax.random.key(0), n, capacity))
  used = 4 * batch  # ceil(100 / 32) steps
  real = indices[:used][weights[:used] == 1]
  np.testing.assert_array_equal(np.sort(real), np.arange(n))
  fillers = indices[n:used]
  assert np.all(weights[n:used] == 0) and np.all(fillers < n)
  # Fillers are real images not already in the last batch, so BatchNorm sees no garbage.
  assert not set(fillers) & set(indices[96:n])
  other, _ = train.epoch_order(jax.random.key(1), n, capacity)
  assert not np.array_equal(np.asarray(other)[:n], indices[:n])


def test_padded_capacity_buckets():
  assert [train.padded_capacity(n, 128) for n in (1, 128, 129, 1000, 1100, 5000)] == [
      128, 128, 256, 1024, 2048, 8192]


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def test_fit_equals_numpy_sgd_with_padding_and_schedule():
  """100 examples, batch 32: 4 steps per epoch, the last with 4 real examples; lr drops at 2."""
  n, batch, epochs = 100, 32, 3
  images, labels = _data(n, shape=(4, 4, 1), classes=3, seed=2)
  key = jax.random.key(5)
  kwargs = dict(task="classification", learning_rate=0.5, momentum=0.9, weight_decay=5e-4)
  state = train.fit(key, Linear(), images, labels, epochs=epochs, batch_size=batch,
                    milestones=(2,), gamma=0.1, preprocessing="fashion_mnist", **kwargs)
  init = train.init_train_state(key, Linear(), (4, 4, 1), **kwargs)
  kernel = np.asarray(init.params["Dense_0"]["kernel"], np.float64)
  bias = np.asarray(init.params["Dense_0"]["bias"], np.float64)
  x = images.reshape(n, -1) / 255.0
  buffers = None
  train_key = jax.random.fold_in(key, 1)  # fit's training key (white-box)
  for epoch in range(epochs):
    lr = 0.5 * (0.1 if epoch >= 2 else 1.0)
    shuffle = jax.random.fold_in(jax.random.fold_in(train_key, 0), epoch)
    order, weights = map(np.asarray, train.epoch_order(shuffle, n, 128))
    for step in range(4):
      idx, w = order[step * batch:(step + 1) * batch], weights[step * batch:(step + 1) * batch]
      probs = _softmax(x[idx] @ kernel + bias)
      delta = (probs - np.eye(3)[labels[idx]]) * w[:, None] / w.sum()
      grads = [x[idx].T @ delta + 5e-4 * kernel, delta.sum(0) + 5e-4 * bias]
      buffers = grads if buffers is None else [0.9 * b + g for b, g in zip(buffers, grads)]
      kernel, bias = kernel - lr * buffers[0], bias - lr * buffers[1]
  np.testing.assert_allclose(state.params["Dense_0"]["kernel"], kernel, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.params["Dense_0"]["bias"], bias, rtol=1e-4, atol=1e-5)
  assert int(state.step) == epochs * 4


def test_growing_within_bucket_does_not_retrace():
  images, labels = _data(300)
  kwargs = dict(epochs=1, batch_size=32, preprocessing="cifar10")
  train.fit(jax.random.key(0), TinyBN(), images[:70], labels[:70], **kwargs)
  before = train.TRACE_COUNTS["epoch"]
  for n in (80, 100, 128):  # same capacity (128) as 70; a fresh (equal) model each cycle
    state = train.fit(jax.random.key(n), TinyBN(), images[:n], labels[:n], **kwargs)
  assert train.TRACE_COUNTS["epoch"] == before
  train.fit(jax.random.key(0), TinyBN(), images[:200], labels[:200], **kwargs)
  assert train.TRACE_COUNTS["epoch"] == before + 1  # next bucket (256)
  assert int(state.step) == 4
  assert jax.tree.leaves(state.batch_stats)


def test_fit_progress_and_metrics():
  images, labels = _data(40)
  out = io.StringIO()
  seen = []
  show = train.text_progress(stream=out, prefix="cycle 0 ")

  def progress(epoch, num_epochs, metrics):
    seen.append((epoch, num_epochs, metrics))
    show(epoch, num_epochs, metrics)

  train.fit(jax.random.key(0), TinyBN(), images, labels, epochs=2, batch_size=16,
            preprocessing="cifar10", progress=progress, milestones=(1,), learning_rate=0.1)
  assert [s[:2] for s in seen] == [(1, 2), (2, 2)]
  assert np.isfinite(seen[0][2]["loss"]) and 0 <= seen[0][2]["accuracy"] <= 1
  np.testing.assert_allclose([s[2]["learning_rate"] for s in seen], [0.1, 0.01], rtol=1e-6)
  assert "cycle 0 epoch 2/2" in out.getvalue() and "ETA" in out.getvalue()


def test_fit_regression_runs():
  images, _ = _data(20, shape=(8, 8, 1))
  targets = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
  state = train.fit(jax.random.key(0), TinyBN(num_classes=6), images, targets,
                    task="regression", epochs=2, batch_size=8)
  assert int(state.step) == 6


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_hand_made_classification():
  # Outputs are the first three pixels / 255; the label is right for 7 of 10 images.
  images = np.zeros((10, 2, 2, 3), np.uint8)
  predicted = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
  images[np.arange(10), 0, 0, predicted] = 255
  labels = predicted.copy()
  labels[[1, 4, 8]] = (labels[[1, 4, 8]] + 1) % 3
  state = train.init_train_state(jax.random.key(0), FirstPixels(), (2, 2, 3))
  accuracy = train.evaluate(state, FirstPixels(), images, labels, batch_size=4)
  assert accuracy == pytest.approx(0.7, abs=1e-12)


def test_evaluate_regression_mean_joint_error():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(9, 2, 3, 1)).astype(np.float32)  # float: not rescaled
  targets = rng.normal(size=(9, 6)).astype(np.float32)
  model = FirstPixels(num_outputs=6)
  state = train.init_train_state(jax.random.key(0), model, (2, 3, 1), task="regression")
  error = train.evaluate(state, model, images, targets, task="regression", batch_size=4)
  diff = (images.reshape(9, 6) - targets).reshape(9, 2, 3)
  assert error == pytest.approx(np.mean(np.linalg.norm(diff, axis=-1)), rel=1e-5)


def test_extract_embeddings_equals_apply_and_compiles_once():
  images, labels = _data(64)
  spec = train.preprocessing_for("cifar10")
  state = train.fit(jax.random.key(0), TinyBN(), images, labels, epochs=1, batch_size=16,
                    preprocessing=spec)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  x = augment.apply_spec(None, images, spec, train=False)
  logits, embedding, _ = TinyBN().apply(variables, x, train=False)
  before = None
  for count in (3, 37, 64):
    indices = np.random.default_rng(count).permutation(64)[:count]
    got = train.extract_embeddings(state, TinyBN(), images, indices, batch_size=16,
                                   preprocessing=spec)
    assert got.shape == (count, 4)
    np.testing.assert_allclose(got, np.asarray(embedding)[indices], rtol=1e-5, atol=1e-6)
    before = train.TRACE_COUNTS["forward"] if before is None else before
  assert train.TRACE_COUNTS["forward"] == before
  np.testing.assert_allclose(
      train.predict(state, TinyBN(), images, batch_size=16, preprocessing=spec), logits,
      rtol=1e-5, atol=1e-5)
  assert train.extract_embeddings(state, TinyBN(), images, [], batch_size=16).shape == (0, 4)


def test_input_validation():
  images, labels = _data(10)
  fit = lambda x, y, **kw: train.fit(jax.random.key(0), TinyBN(), x, y, epochs=1,
                                     batch_size=kw.pop("batch_size", 8), **kw)
  with pytest.raises(ValueError, match="empty"):
    fit(images[:0], labels[:0])
  with pytest.raises(ValueError, match="different lengths"):
    fit(images, labels[:5])
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    fit(images[..., 0], labels)
  with pytest.raises(ValueError, match="integers"):
    fit(images, labels.astype(np.float32))
  with pytest.raises(ValueError, match="out of range"):
    fit(images, labels + 10)
  with pytest.raises(ValueError, match="batch_size"):
    fit(images, labels, batch_size=0)
  with pytest.raises(ValueError, match="task"):
    fit(images, labels, task="ranking")
  with pytest.raises(ValueError, match=r"\[N, J\*3\]"):
    fit(images, np.zeros((10, 4), np.float32), task="regression")


# ----------------------------------------------------------------------------- real learners


def test_small_cnn_learns():
  model = models.get_learner("small_cnn", num_classes=2, channels=1)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 64).astype(np.int32)
  images = rng.integers(0, 100, (64, 28, 28, 1)).astype(np.uint8)
  images[labels == 1, :14] += 150  # bright top half = class 1
  state = train.fit(jax.random.key(0), model, images, labels, epochs=8, batch_size=16,
                    learning_rate=0.05, milestones=(), preprocessing="fashion_mnist")
  assert train.evaluate(state, model, images, labels, batch_size=32) > 0.9
  assert train.extract_embeddings(state, model, images, [0, 5], batch_size=32).shape == (2, 128)


def test_resnet18_embeddings_match_apply():
  model = models.get_learner("resnet18", num_classes=10, channels=3)
  images, labels = _data(16)
  spec = train.preprocessing_for("cifar10")
  state = train.fit(jax.random.key(0), model, images, labels, epochs=1, batch_size=16,
                    preprocessing=spec)
  assert jax.tree.leaves(state.batch_stats)
  x = augment.apply_spec(None, images, spec, train=False)
  _, embedding, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                                train=False)
  got = train.extract_embeddings(state, model, images, np.arange(5), batch_size=16,
                                 preprocessing=spec)
  np.testing.assert_allclose(got, np.asarray(embedding)[:5], rtol=1e-4, atol=1e-5)


def test_init_state_equals_model_init_under_a_plain_jit():
  # `init_train_state` compiles its one-off program with XLA:CPU's cheaper options
  # (`state.CPU_INIT_OPTIONS`); the parameters and statistics must be those of `model.init`.
  model = models.ResNet(num_classes=3, stage_sizes=(1,), stage_features=(8,))
  key = jax.random.key(4)
  state = train.init_train_state(key, model, (12, 12, 3))
  expected = jax.jit(lambda k: model.init({"params": k}, jnp.zeros((1, 12, 12, 3)),
                                          train=False))(key)
  for got, want in zip(jax.tree.leaves((state.params, state.batch_stats)),
                       jax.tree.leaves((expected["params"], expected["batch_stats"])),
                       strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
