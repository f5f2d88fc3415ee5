"""Regression (the paper's 3D hand pose setting): DeepPrior on your own depth crops in an npz.

  python experiments/main.py --config=configs/hand_pose.py --config.data.path=icvl.npz \
      --workdir=runs/hand_pose

The npz holds `images` [N, 128, 128, 1] (normalised depth crops; uint8 or float) and `targets`
[N, J*3] joint coordinates (ICVL: J = 16, in mm), with optional `test_images` / `test_targets`
(see jax_seqgcn.data.datasets.load_npz). Training follows the paper's regressor: Adam, learning rate 1e-3,
no weight decay, batch 128, loss = mean over joints of the squared Euclidean error. The test metric
is the mean joint error (Euclidean, in the targets' units), lower is better. Samplers that need
class probabilities (Entropy, Margin, LeastConfidence, BADGE) are refused for regression.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "npz"
  config.data.source = "npz"
  config.learner.name = "deepprior"
  config.learner.task = "regression"
  config.train.epochs = 200
  config.train.batch_size = 128
  config.train.learning_rate = 1e-3  # Adam (the regression optimiser)
  config.train.momentum = 0.0  # unused by Adam
  config.train.weight_decay = 0.0
  config.train.milestones = ()
  config.sampler.name = "CoreGCN"  # the paper's best sampler on hand pose
  return config
