"""CPU-scale Fashion-MNIST run on the real IDX files: protocol §9, comparable with the reference.

Pool = 60,000 training images, test = 10,000; initial 500, budget 500, subset 5,000, 6 cycles;
small CNN; SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 64, 15 epochs, lr x0.1 at epoch
12; GCN sampler at its defaults; 3 trials. One sampler's full run takes minutes on 2 cores.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "fashion_mnist"
  config.learner.name = "small_cnn"
  config.train.epochs = 15
  config.train.batch_size = 64
  config.train.learning_rate = 0.05
  config.train.milestones = (12,)
  config.al.trials = 3
  config.al.cycles = 6
  config.al.initial = 500
  config.al.budget = 500
  config.al.subset = 5000
  return config
