"""CIFAR-100, ResNet-18: initial = budget = 2,000 (protocol §1), CIFAR-10 normalisation (protocol §2)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "cifar100"
  config.al.initial = 2000
  config.al.budget = 2000
  return config
