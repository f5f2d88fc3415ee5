"""CPU-scale Fashion-MNIST run on the real IDX files: protocol §9, comparable with the reference.

Pool = 60,000 training images, test = 10,000; initial 500, budget 500, subset 5,000, 6 cycles;
small CNN; SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 64, 15 epochs, lr x0.1 at epoch
12; GCN sampler at its defaults; VAAL scaled down (below); 3 trials. One sampler's full run takes minutes on 2 cores.
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
  # VAAL scaled to CPU: the reference's VAE (128-256-512-1024 channels, 100 epochs of
  # (n_labelled + subset) / 128 iterations) needs ~30 h per query on 2 cores. Here: 1/16 of the
  # channels, batches of 64 (the reference's CPU-scale batch) and 2 epochs (~170-230 iterations
  # per query), a few minutes per trial.
  config.sampler.vaal_width = 0.0625
  config.sampler.vaal_batch_size = 64
  config.sampler.vaal_epochs = 2
  return config
