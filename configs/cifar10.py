"""CIFAR-10, ResNet-18, the paper's protocol (protocol §1): 1,000 + 9 x 1,000 labels, 5 trials."""

from configs import default


def get_config():
  return default.get_config()
