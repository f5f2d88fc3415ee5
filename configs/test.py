"""A tiny config for tests and smoke runs: real Fashion-MNIST, seconds per cycle on a CPU."""

from configs import fashion_mnist_cpu


def get_config():
  config = fashion_mnist_cpu.get_config()
  config.data.max_test = 512
  config.train.epochs = 2
  config.train.batch_size = 32
  config.train.milestones = (1,)
  config.train.eval_batch_size = 128
  config.al.trials = 2
  config.al.cycles = 3
  config.al.initial = 40
  config.al.budget = 20
  config.al.subset = 100
  config.sampler.steps = 20
  config.sampler.hidden = 32
  config.sampler.vaal_epochs = 1
  config.sampler.vaal_batch_size = 16
  config.sampler.vaal_width = 0.125
  config.sampler.vaal_latent_dim = 8
  return config
