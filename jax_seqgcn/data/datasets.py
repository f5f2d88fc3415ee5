"""Data sources for active learning: whole datasets as NumPy arrays (in memory, or mapped).

Every loader returns a `Dataset`: uint8 images in NHWC layout plus targets, int32 class
labels for classification or float32 vectors for regression (e.g. ICVL hand poses).
The tfds and IDX pools (CIFAR, SVHN, Fashion-MNIST) are small enough to hold in host memory;
an npz file's images are memory-mapped and read in batches by the passes that need them. The
samplers index the unlabelled pool directly, so there is no input pipeline here:
normalisation and augmentation belong to the training code.

Sources:
  * `load_tfds`: tensorflow-datasets ("cifar10", "cifar100", "svhn_cropped",
    "fashion_mnist"), strictly offline: a dataset must be prepared beforehand.
  * `load_fashion_mnist_idx` (in `data.idx`, re-exported here): the original gzip IDX files,
    e.g. from the Debian package `dataset-fashion-mnist`; needs neither TensorFlow nor the
    network.
  * `load_npz` (in `data.npz`, re-exported here): own data in an `.npz` file, classification
    or regression; its image arrays are memory-mapped, not read (`data.stream.RowView`s).
  * `load_dataset`: the dispatcher used by the experiment loop.

TensorFlow is imported lazily inside `load_tfds` only: it is slow to import and the
IDX / npz sources do not need it.
"""

import os
from typing import NamedTuple

import numpy as np

TFDS_DATASETS = ("cifar10", "cifar100", "svhn_cropped", "fashion_mnist")
DATASETS = TFDS_DATASETS + ("npz",)
SOURCES = ("auto", "tfds", "idx", "npz")
FASHION_MNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"

# Original archives, for preparing a tfds dataset offline through `manual_dir`.
_ORIGINAL_ARCHIVES = {
    "cifar10": "cifar-10-binary.tar.gz",
    "cifar100": "cifar-100-binary.tar.gz",
    "svhn_cropped": "train_32x32.mat, test_32x32.mat and extra_32x32.mat",
    "fashion_mnist": "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
}
# Examples per batch when `load_tfds` reads a split (read at call time, so tests may lower it to
# cover several batches). `batch_size=-1` would be simpler, but under `tfds.testing.mock_data` it
# aborts the whole process (std::length_error).
TFDS_READ_BATCH = 4096


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not available locally; the message says how to get it."""


class Dataset(NamedTuple):
  """A whole dataset in host memory (an npz file's images: memory-mapped `data.stream.RowView`s,
  which give NumPy arrays of the rows asked for).

  Attributes:
    train_images: [num_train, height, width, channels] uint8.
    train_targets: [num_train] int32 labels in [0, num_classes) for classification;
      [num_train, target_dim] float32 for regression.
    test_images: [num_test, height, width, channels] uint8.
    test_targets: [num_test] int32 or [num_test, target_dim] float32, as train_targets.
    num_classes: number of classes; 0 for regression.
    name: dataset name, for logs and result files.
  """
  train_images: np.ndarray
  train_targets: np.ndarray
  test_images: np.ndarray
  test_targets: np.ndarray
  num_classes: int
  name: str


def describe(dataset):
  """One line summary of a `Dataset` for logs, e.g.

  "cifar10: 50000 train / 10000 test images 32x32x3 uint8, 10 classes".
  """
  _, height, width, channels = dataset.train_images.shape
  if dataset.num_classes:
    kind = f"{dataset.num_classes} classes"
  else:
    target_dim = dataset.train_targets.shape[1] if dataset.train_targets.ndim > 1 else 1
    kind = f"regression, {target_dim}-d targets"
  return (f"{dataset.name}: {len(dataset.train_images)} train / {len(dataset.test_images)}"
          f" test images {height}x{width}x{channels} {dataset.train_images.dtype}, {kind}")


# --------------------------------------------------------------------------- tfds


def _hide_gpus_from_tensorflow(tf):
  # TF grabs all GPU memory when it first touches a device, starving JAX.
  try:
    tf.config.experimental.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # Devices already initialised by an earlier TF user; nothing we can change.


def _tfds_missing_message(name, data_dir):
  archive = _ORIGINAL_ARCHIVES[name]
  lines = [
      f"tensorflow-datasets dataset {name!r} is not prepared in {data_dir!r}, and this "
      "library never downloads (download=False). Prepare it once:",
      "  * with internet: python -c \"import tensorflow_datasets as tfds; "
      f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"",
      f"  * offline, from the original file(s) {archive} placed in DIR: "
      f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare("
      "download_config=tfds.download.DownloadConfig(manual_dir=DIR)) "
      "(checksums must match the official files).",
  ]
  if name == "fashion_mnist":
    lines.append(
        "  * or skip tfds: `apt-get install -y dataset-fashion-mnist` and use "
        f"load_fashion_mnist_idx() / load_dataset('fashion_mnist', source='idx') "
        f"(reads {FASHION_MNIST_IDX_DIR}; that package's re-compressed .gz files fail "
        "tfds' checksums, so they cannot serve as manual_dir).")
  return "\n".join(lines)


def _read_tfds_split(builder, split, tfds):
  """Reads a whole split as ([n, h, w, c] uint8, [n] int32) by explicit batches."""
  ds = builder.as_dataset(split=split, as_supervised=True, batch_size=TFDS_READ_BATCH,
                          shuffle_files=False)
  images, labels = [], []
  for image_batch, label_batch in tfds.as_numpy(ds):
    images.append(image_batch)
    labels.append(label_batch)
  if not images:
    raise ValueError(f"split {split!r} of {builder.name} is empty")
  return (np.ascontiguousarray(np.concatenate(images), dtype=np.uint8),
          np.concatenate(labels).astype(np.int32))


def _import_tensorflow(name):
  """Imports (tensorflow, tensorflow_datasets), or says how to install them."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    missing = e.name or "tensorflow"
    lines = [f"dataset {name!r} is read with tensorflow-datasets, which needs {missing} "
             f"(not installed: {e}). Install it with: pip install -e \".[tfds]\" "
             "(from the repository; or pip install tensorflow-cpu)."]
    if name == "fashion_mnist":
      lines.append("  * or without TensorFlow: `apt-get install -y dataset-fashion-mnist` and "
                   "source 'idx' / 'auto', which reads the IDX files in "
                   f"{FASHION_MNIST_IDX_DIR}.")
    lines.append("  * own data needs no TensorFlow: dataset 'npz' with path=<file.npz>.")
    raise ModuleNotFoundError("\n".join(lines), name=e.name) from e
  return tf, tfds


def load_tfds(name, *, data_dir=None):
  """Loads a prepared tensorflow-datasets dataset into memory, never downloading.

  Works under `tfds.testing.mock_data` (random data, for tests).

  Args:
    name: one of `TFDS_DATASETS`.
    data_dir: tfds data directory; None for tfds' default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).
  Returns:
    `Dataset` with uint8 [N, H, W, C] images (32x32x3 for CIFAR / SVHN, 28x28x1 for
    Fashion-MNIST) and int32 [N] labels; the tfds "train" and "test" splits.
  Raises:
    ValueError: unknown name.
    ModuleNotFoundError: TensorFlow or tensorflow-datasets is not installed; the message says
      `pip install -e ".[tfds]"`.
    DatasetNotFoundError: the dataset is not prepared in `data_dir`.
  """
  if name not in TFDS_DATASETS:
    raise ValueError(f"unknown tfds dataset {name!r}; valid: {', '.join(TFDS_DATASETS)}")
  tf, tfds = _import_tensorflow(name)
  _hide_gpus_from_tensorflow(tf)

  builder = tfds.builder(name, data_dir=data_dir)
  try:
    train_images, train_labels = _read_tfds_split(builder, "train", tfds)
    test_images, test_labels = _read_tfds_split(builder, "test", tfds)
  except AssertionError as e:
    # tfds signals "not prepared" with a bare AssertionError ("could not find data").
    # We cannot check `builder.is_prepared()` up front: it is False under mock_data.
    if builder.is_prepared():
      raise
    # builder.data_dir is <root>/<name>/<version>.
    root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
    raise DatasetNotFoundError(_tfds_missing_message(name, root)) from e
  num_classes = int(builder.info.features["label"].num_classes)
  return Dataset(train_images, train_labels, test_images, test_labels, num_classes, name)


# --------------------------------------------------------------------------- dispatch


def load_dataset(name, *, source="auto", data_dir=None, path=None, test_fraction=0.2,
                 seed=0):
  """Loads a dataset by name; the entry point of the experiment loop.

  Args:
    name: one of `DATASETS`: "cifar10", "cifar100", "svhn_cropped", "fashion_mnist",
      "npz".
    source: one of `SOURCES`. "auto": "fashion_mnist" reads the IDX files if present
      (in `path`, else `FASHION_MNIST_IDX_DIR`) and falls back to tfds; the other image
      datasets use tfds; "npz" reads `path`. "tfds" / "idx" force a source ("idx" only
      for "fashion_mnist"); "npz" only for name "npz".
    data_dir: tfds data directory (None: tfds' default).
    path: the `.npz` file for "npz"; the IDX directory for fashion_mnist (optional).
    test_fraction: npz only, see `load_npz`.
    seed: npz only, see `load_npz`.
  Returns:
    `Dataset` (uint8 [N, H, W, C] images; int32 [N] or float32 [N, K] targets).
  Raises:
    ValueError: unknown name or source, or a source that does not fit the name.
    DatasetNotFoundError: the data is not available locally.
  """
  # pylint: disable-next=g-import-not-at-top (data.idx imports this module)
  from jax_seqgcn.data.idx import load_fashion_mnist_idx
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")

  if name == "npz":
    if source not in ("auto", "npz"):
      raise ValueError(f"dataset 'npz' needs source 'auto' or 'npz', got {source!r}")
    if path is None:
      raise ValueError("dataset 'npz' needs path=<file.npz>")
    return load_npz(path, test_fraction=test_fraction, seed=seed)
  if source == "npz":
    raise ValueError(f"source 'npz' is only for dataset 'npz', not {name!r}")
  if source == "idx" and name != "fashion_mnist":
    raise ValueError(f"source 'idx' is only for 'fashion_mnist', not {name!r}")

  if name == "fashion_mnist" and source in ("auto", "idx"):
    directory = FASHION_MNIST_IDX_DIR if path is None else os.fspath(path)
    if source == "idx":
      return load_fashion_mnist_idx(directory)
    try:
      return load_fashion_mnist_idx(directory)
    except DatasetNotFoundError:
      pass  # No IDX files: try tfds below.
  return load_tfds(name, data_dir=data_dir)


# pylint: disable-next=g-import-not-at-top,wrong-import-position (data.npz imports `Dataset`)
from jax_seqgcn.data.npz import load_npz  # noqa: E402  pylint: disable=unused-import
