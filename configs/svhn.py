"""SVHN (tfds svhn_cropped), ResNet-18, pixels scaled to [0, 1] without augmentation (protocol §2)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "svhn_cropped"
  return config
