"""Fashion-MNIST, ResNet-18 with a 1-channel stem, the paper's protocol (protocol §1-§2).

Reads the offline IDX files when present (apt-get install dataset-fashion-mnist), else tfds.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "fashion_mnist"
  return config
