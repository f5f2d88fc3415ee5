"""Fashion-MNIST from its original gzip IDX files: no TensorFlow, no network.

`load_fashion_mnist_idx` reads the four `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`
files (e.g. from the Debian package `dataset-fashion-mnist`) into a `datasets.Dataset`;
`datasets.load_dataset` uses it for `source="idx"` (and first for "auto").
"""

import gzip
import os

import numpy as np

from jax_seqgcn.data.datasets import FASHION_MNIST_IDX_DIR
from jax_seqgcn.data.datasets import Dataset
from jax_seqgcn.data.datasets import DatasetNotFoundError

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def _read_idx(path, magic, sample_shape):
  """Reads a gzip IDX file of unsigned bytes as [n, *sample_shape] uint8."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = len(sample_shape) + 1
  header_size = 4 * (1 + ndim)
  if len(raw) < header_size:
    raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
  header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
  if int(header[0]) != magic:
    raise ValueError(f"{path}: bad IDX magic number {int(header[0]):#010x}, "
                     f"expected {magic:#010x}")
  count, dims = int(header[1]), tuple(int(d) for d in header[2:])
  if dims != tuple(sample_shape):
    raise ValueError(f"{path}: sample shape {dims}, expected {tuple(sample_shape)}")
  expected = header_size + count * int(np.prod(sample_shape, dtype=np.int64))
  if len(raw) != expected:
    raise ValueError(f"{path}: {len(raw)} bytes, expected {expected} for {count} items")
  return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(
      (count,) + tuple(sample_shape)).copy()


def load_fashion_mnist_idx(directory=FASHION_MNIST_IDX_DIR):
  """Loads Fashion-MNIST from the original gzip IDX files; no TensorFlow, no network.

  Expects `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` in `directory` (installed by
  `apt-get install -y dataset-fashion-mnist`, or downloaded from the Fashion-MNIST site).

  Args:
    directory: folder holding the four files.
  Returns:
    `Dataset` named "fashion_mnist": train_images [60000, 28, 28, 1] uint8, train_targets
    [60000] int32 in [0, 10), test_images [10000, 28, 28, 1], test_targets [10000].
  Raises:
    DatasetNotFoundError: a file is missing.
    ValueError: a file is not a valid IDX file of the expected shape.
  """
  files = {f"{split}_{kind}": os.path.join(directory, f"{prefix}-{kind}-ubyte.gz")
           for split, prefix in (("train", "train"), ("test", "t10k"))
           for kind in ("images-idx3", "labels-idx1")}
  missing = sorted(path for path in files.values() if not os.path.isfile(path))
  if missing:
    raise DatasetNotFoundError(
        f"Fashion-MNIST IDX files missing: {', '.join(missing)}. Install them with "
        "`apt-get install -y dataset-fashion-mnist` (to "
        f"{FASHION_MNIST_IDX_DIR}), or pass the directory holding "
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz.")
  splits = {}
  for split in ("train", "test"):
    images = _read_idx(files[f"{split}_images-idx3"], _IDX_IMAGES_MAGIC, (28, 28))
    labels = _read_idx(files[f"{split}_labels-idx1"], _IDX_LABELS_MAGIC, ())
    if len(images) != len(labels):
      raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but "
                       f"{len(labels)} labels in {directory}")
    if labels.max(initial=0) >= 10:
      raise ValueError(f"Fashion-MNIST {split}: label {labels.max()} out of range [0, 10)")
    splits[split] = (images[..., None], labels.astype(np.int32))
  return Dataset(*splits["train"], *splits["test"], num_classes=10, name="fashion_mnist")
