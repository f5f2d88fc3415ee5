"""End-to-end regression (the hand-pose setting) on learnable npz data: drawn landmarks."""

import numpy as np
import pytest

from configs import hand_pose
from jax_seqgcn.experiment import loop


def landmark_images(n, size=32, joints=2, seed=0):
  """Images with `joints` bright Gaussian dots; targets [n, joints*3] = (x, y, brightness).

  Joint j lies in the j-th vertical band of the image, so the joints are distinguishable.
  """
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0.15, 0.85, (n, joints, 2))
  xy[..., 0] = (np.arange(joints) + rng.uniform(0.2, 0.8, (n, joints))) / joints
  brightness = rng.uniform(0.5, 1.0, (n, joints))
  grid = (np.arange(size) + 0.5) / size
  images = np.zeros((n, size, size))
  for j in range(joints):
    dx = (grid[None, None, :] - xy[:, j, 0, None, None]) ** 2
    dy = (grid[None, :, None] - xy[:, j, 1, None, None]) ** 2
    images += brightness[:, j, None, None] * np.exp(-(dx + dy) / (2 * 0.06 ** 2))
  images = np.clip(images * 255, 0, 255).astype(np.uint8)[..., None]
  targets = np.concatenate([xy, brightness[..., None]], axis=-1).reshape(n, joints * 3)
  return images, targets.astype(np.float32)


@pytest.fixture(scope="module")
def landmarks_npz(tmp_path_factory):
  images, targets = landmark_images(700)
  path = tmp_path_factory.mktemp("pose") / "landmarks.npz"
  np.savez(path, images=images[:500], targets=targets[:500], test_images=images[500:],
           test_targets=targets[500:])
  return str(path), targets[500:], targets[:500]


@pytest.mark.parametrize("sampler", ["CoreGCN"])
def test_regression_learns_landmarks_end_to_end(tmp_path, landmarks_npz, sampler):
  path, test_targets, train_targets = landmarks_npz
  config = hand_pose.get_config()
  config.data.path = path
  config.sampler.name = sampler
  config.sampler.steps = 20
  config.train.epochs = 30
  config.train.batch_size = 32
  config.train.learning_rate = 3e-3
  config.train.eval_batch_size = 100
  config.al.trials, config.al.cycles = 1, 2
  config.al.initial, config.al.budget, config.al.subset = 200, 100, 200
  records = loop.run(config, tmp_path)
  assert [r.n_labelled for r in records] == [200, 300]
  # Baseline: always predicting the training mean.
  diff = (test_targets - train_targets.mean(axis=0)).reshape(len(test_targets), -1, 3)
  baseline = float(np.mean(np.sqrt(np.sum(diff ** 2, axis=-1))))
  errors = [r.metric for r in records]
  print(f"{sampler}: mean joint error {errors} vs mean-prediction baseline {baseline:.4f}")
  assert all(e < 0.5 * baseline for e in errors), (errors, baseline)
  assert "mean joint error" in (tmp_path / "summary.md").read_text()


def test_regression_refuses_probability_samplers_and_uses_its_own_optimiser(tmp_path,
                                                                           landmarks_npz):
  from jax_seqgcn import samplers  # pylint: disable=g-import-not-at-top
  config = hand_pose.get_config()
  config.data.path = landmarks_npz[0]
  needing = [n for n, s in samplers.SAMPLERS.items() if "probabilities" in s.needs]
  for name in needing:
    config.sampler.name = name
    with pytest.raises(loop.ConfigError, match="needs class probabilities"):
      loop.run(config, tmp_path / name)
  fit = loop.fit_kwargs(hand_pose.get_config())
  assert hand_pose.get_config().learner.task == "regression" and fit["learning_rate"] == 1e-3
  assert fit["weight_decay"] == 0.0 and fit["milestones"] == ()
