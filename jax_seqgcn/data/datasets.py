"""Data sources for active learning: whole datasets as in-memory NumPy arrays.

Every loader returns a `Dataset`: uint8 images in NHWC layout plus targets, int32 class
labels for classification or float32 vectors for regression (e.g. ICVL hand poses).
Pools in active learning are small enough (CIFAR, SVHN, Fashion-MNIST) to hold in host
memory, and the samplers index the unlabelled pool directly, so there is no input
pipeline here: normalisation and augmentation belong to the training code.

Sources:
  * `load_tfds`: tensorflow-datasets ("cifar10", "cifar100", "svhn_cropped",
    "fashion_mnist"), strictly offline: a dataset must be prepared beforehand.
  * `load_fashion_mnist_idx` (in `data.idx`, re-exported here): the original gzip IDX files,
    e.g. from the Debian package `dataset-fashion-mnist`; needs neither TensorFlow nor the
    network.
  * `load_npz`: own data in an `.npz` file, classification or regression.
  * `load_dataset`: the dispatcher used by the experiment loop.

TensorFlow is imported lazily inside `load_tfds` only: it is slow to import and the
IDX / npz sources do not need it.
"""

import os
import zipfile
import zlib
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
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # first local file header; empty archive
_MAX_LABEL = np.iinfo(np.int32).max


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not available locally; the message says how to get it."""


class Dataset(NamedTuple):
  """A whole dataset in host memory.

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


# --------------------------------------------------------------------------- npz


def _read_npz(path):
  """Reads every array of an `.npz` file into memory.

  Raises:
    FileNotFoundError: no such file.
    ValueError: "PATH is not a valid .npz: REASON" for an empty (0 bytes) file, text, a
      renamed .npy, a truncated or corrupt zip archive, members that are not arrays (or hold
      pickled Python objects), or an archive without arrays.
  """
  def invalid(reason):
    return ValueError(f"{path} is not a valid .npz: {reason}")

  with open(path, "rb") as f:
    head = f.read(len(_NPY_MAGIC))
  if not head:
    raise invalid("the file is empty (0 bytes)")
  if head.startswith(_NPY_MAGIC):
    raise invalid("it is a single .npy array (np.save); save the arrays by name with "
                  "np.savez(path, images=..., targets=...)")
  if not head.startswith(_ZIP_MAGICS):
    kind = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "binary"
    raise invalid(f"it starts with {head!r} ({kind}), not with a zip header; write it with "
                  "np.savez(path, images=..., targets=...)")
  arrays = {}
  try:
    with np.load(path, allow_pickle=False) as npz:
      for key in npz.files:
        try:
          arrays[key] = npz[key]
        except ValueError as e:  # pickled objects, or a member that is not a valid .npy
          raise invalid(f"member {key!r}: {e}") from e
        if not isinstance(arrays[key], np.ndarray):
          raise invalid(f"member {key!r} is not a .npy array")
  except (zipfile.BadZipFile, EOFError, zlib.error) as e:
    raise invalid(f"truncated or corrupt zip archive ({type(e).__name__}: {e})") from e
  if not arrays:
    raise invalid("it holds no arrays; need 'images' and 'targets' (optionally "
                  "'test_images', 'test_targets')")
  return arrays


def _check_images(images, key, path):
  if images.dtype != np.uint8:
    raise ValueError(
        f"{path}: {key!r} must be uint8, got {images.dtype}; convert before saving, e.g. "
        "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for floats in [0, 1]")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"{path}: {key!r} must be [N, H, W] or [N, H, W, C], "
                     f"got shape {images.shape}")
  return images


def _check_targets(targets, key, path, num_images):
  """Returns int32 [N] labels or float32 [N, K] regression targets."""
  if len(targets) != num_images:
    raise ValueError(f"{path}: {num_images} images but {len(targets)} {key!r}")
  if np.issubdtype(targets.dtype, np.integer):
    if targets.ndim != 1:
      raise ValueError(f"{path}: integer (class label) {key!r} must be [N], "
                       f"got shape {targets.shape}")
    if targets.size and targets.min() < 0:
      raise ValueError(f"{path}: negative class label {targets.min()} in {key!r}; class labels "
                       "must be 0..C-1")
    if targets.size and targets.max() > _MAX_LABEL:
      # Casting to int32 would wrap such a label silently.
      raise ValueError(f"{path}: class label {targets.max()} in {key!r} does not fit in int32; "
                       "class labels must be 0..C-1")
    return targets.astype(np.int32)
  if np.issubdtype(targets.dtype, np.floating):
    targets = targets.reshape(len(targets), -1).astype(np.float32)
    if not np.all(np.isfinite(targets)):
      raise ValueError(f"{path}: non-finite values in {key!r}")
    return targets
  raise ValueError(f"{path}: {key!r} must be integer (classification) or float "
                   f"(regression), got {targets.dtype}")


def _first_missing(present, limit=5):
  """The first `limit` non-negative integers absent from the sorted unique `present`."""
  missing, expected = [], 0
  for value in present.tolist():
    missing.extend(range(expected, min(value, expected + limit - len(missing))))
    if len(missing) >= limit:
      break
    expected = value + 1
  return missing


def _count_classes(labels, what, path):
  """C for non-negative `labels` that take every value 0..C-1; else a ValueError."""
  present = np.unique(labels)
  num_classes = int(present[-1]) + 1
  if len(present) != num_classes:
    raise ValueError(
        f"{path}: class labels must be 0..C-1 with every class present in the training split; "
        f"{what} have {len(present)} distinct values up to {num_classes - 1}, so "
        f"{num_classes - len(present)} of the classes 0..{num_classes - 1} have no "
        f"example (e.g. {_first_missing(present)}). Relabel the classes as "
        f"0..{len(present) - 1}.")
  return num_classes


def _num_classes(train_labels, test_labels, path, *, file_split):
  """C for labels 0..C-1 with every class in the training split; else a ValueError."""
  if file_split:
    num_classes = _count_classes(train_labels, "the training labels ('targets')", path)
    if test_labels.max() >= num_classes:
      raise ValueError(f"{path}: test label {test_labels.max()} has no training example (the "
                       f"training labels are 0..{num_classes - 1})")
    return num_classes
  num_classes = _count_classes(np.concatenate([train_labels, test_labels]),
                               "the labels in 'targets'", path)
  only_test = np.setdiff1d(np.arange(num_classes), train_labels)
  if only_test.size:  # a rare class had all its examples drawn into the test split
    raise ValueError(f"{path}: the random test split took every example of class(es) "
                     f"{only_test[:5].tolist()}, so the training split lacks them; change the "
                     "seed or test_fraction, or give the split in the file ('test_images', "
                     "'test_targets')")
  return num_classes


def _split_indices(num_examples, test_fraction, seed):
  """Deterministic random split; each part keeps the file's order."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  num_test = int(round(num_examples * test_fraction))
  if not 0 < num_test < num_examples:
    raise ValueError(f"cannot split {num_examples} examples with test_fraction="
                     f"{test_fraction}: a split would be empty")
  order = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(order[num_test:]), np.sort(order[:num_test])


def load_npz(path, *, test_fraction=0.2, seed=0, name=None):
  """Loads own data from an `.npz` file.

  Keys: `images` (uint8 [N, H, W] or [N, H, W, C]; [N, H, W] gets C=1) and `targets`,
  optionally `test_images` and `test_targets` (both or neither) as the test split.
  Without them a deterministic random `test_fraction` of the examples becomes the test
  set. Integer targets mean classification: labels 0..C-1 with every class present in
  the training split (num_classes = C; test labels must be < C); float targets mean
  regression (num_classes = 0), flattened to [N, K]
  (e.g. ICVL joints [N, 16, 3] -> [N, 48]). Images are not converted: non-uint8 images
  are an error, so that scaling is the caller's explicit choice.

  Args:
    path: the `.npz` file.
    test_fraction: fraction of examples held out when the file has no test split.
    seed: seed of that split.
    name: dataset name; default the file name without extension.
  Returns:
    `Dataset` with uint8 [N, H, W, C] images and int32 [N] / float32 [N, K] targets.
  Raises:
    ValueError: not a valid .npz file ("PATH is not a valid .npz: REASON"), missing keys,
      an empty split, length or shape mismatch, wrong dtypes, class labels that are not
      0..C-1 with every class in the training split, bad split.
    FileNotFoundError: no such file.
  """
  arrays = _read_npz(path)
  missing = [key for key in ("images", "targets") if key not in arrays]
  if missing:
    raise ValueError(f"{path}: missing key(s) {missing}; found {sorted(arrays)}; need "
                     "'images' and 'targets' (optionally 'test_images', 'test_targets')")
  has_test = ("test_images" in arrays, "test_targets" in arrays)
  if any(has_test) and not all(has_test):
    raise ValueError(f"{path}: 'test_images' and 'test_targets' must come together")

  images = _check_images(arrays["images"], "images", path)
  if not len(images):
    raise ValueError(f"{path}: 'images' holds no examples (the training split is empty)")
  targets = _check_targets(arrays["targets"], "targets", path, len(images))
  if all(has_test):
    train_images, train_targets = images, targets
    test_images = _check_images(arrays["test_images"], "test_images", path)
    if not len(test_images):
      raise ValueError(f"{path}: the test split is empty ('test_images' holds no examples); "
                       "drop 'test_images' and 'test_targets' to split off test_fraction")
    test_targets = _check_targets(arrays["test_targets"], "test_targets", path,
                                  len(test_images))
    if test_images.shape[1:] != train_images.shape[1:]:
      raise ValueError(f"{path}: test images {test_images.shape[1:]} vs train images "
                       f"{train_images.shape[1:]}")
    if (test_targets.dtype != train_targets.dtype
        or test_targets.shape[1:] != train_targets.shape[1:]):
      raise ValueError(f"{path}: test targets {test_targets.dtype}{test_targets.shape[1:]}"
                       f" vs train targets {train_targets.dtype}{train_targets.shape[1:]}")
  else:
    train_idx, test_idx = _split_indices(len(images), test_fraction, seed)
    train_images, train_targets = images[train_idx], targets[train_idx]
    test_images, test_targets = images[test_idx], targets[test_idx]

  if train_targets.dtype == np.int32:
    num_classes = _num_classes(train_targets, test_targets, path, file_split=all(has_test))
  else:
    num_classes = 0
  if name is None:
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
  return Dataset(train_images, train_targets, test_images, test_targets, num_classes, name)


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
