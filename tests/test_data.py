"""Tests for jax_seqgcn.data.datasets: tfds (mocked, offline), Fashion-MNIST IDX files, npz."""

import gzip
import io
import os
import re
import sys
import time

import numpy as np
import pytest

from jax_seqgcn import data
from jax_seqgcn.data import datasets
from tests.conftest import run_python

IDX_DIR = datasets.FASHION_MNIST_IDX_DIR
HAVE_IDX = os.path.isfile(os.path.join(IDX_DIR, "train-labels-idx1-ubyte.gz"))
needs_idx = pytest.mark.skipif(not HAVE_IDX, reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def tfds():
  pytest.importorskip("tensorflow")
  return pytest.importorskip("tensorflow_datasets")


# --------------------------------------------------------------------------- tfds


@pytest.mark.parametrize("name, shape, num_classes", [
    ("cifar10", (32, 32, 3), 10),
    ("cifar100", (32, 32, 3), 100),
    ("svhn_cropped", (32, 32, 3), 10),
    ("fashion_mnist", (28, 28, 1), 10),
])
def test_load_tfds_mock(tfds, tmp_path, name, shape, num_classes):
  # More examples than one read batch would be slow; 2 batches are covered below.
  with tfds.testing.mock_data(num_examples=9):
    ds = data.load_tfds(name, data_dir=str(tmp_path))
  assert ds.name == name and ds.num_classes == num_classes
  for images, targets in ((ds.train_images, ds.train_targets),
                          (ds.test_images, ds.test_targets)):
    assert images.shape == (9,) + shape and images.dtype == np.uint8
    assert targets.shape == (9,) and targets.dtype == np.int32
    assert targets.min() >= 0 and targets.max() < num_classes
  assert name in data.describe(ds)


def test_load_tfds_mock_several_batches(tfds, tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, "TFDS_READ_BATCH", 4)
  with tfds.testing.mock_data(num_examples=10):
    ds = data.load_tfds("cifar10", data_dir=str(tmp_path))
  assert ds.train_images.shape == (10, 32, 32, 3)
  assert ds.test_targets.shape == (10,)


def test_load_dataset_tfds_source_mock(tfds, tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    ds = data.load_dataset("fashion_mnist", source="tfds", data_dir=str(tmp_path))
  assert ds.train_images.shape == (3, 28, 28, 1)


def test_load_tfds_missing_fails_fast_and_clearly(tfds, tmp_path):
  start = time.monotonic()
  with pytest.raises(data.DatasetNotFoundError) as excinfo:
    data.load_tfds("cifar10", data_dir=str(tmp_path))
  assert time.monotonic() - start < 20
  message = str(excinfo.value)
  assert isinstance(excinfo.value, FileNotFoundError)
  assert "download_and_prepare()" in message and "manual_dir" in message
  assert "cifar-10-binary.tar.gz" in message and str(tmp_path) in message


def test_fashion_mnist_missing_everywhere_mentions_idx_package(tfds, tmp_path):
  start = time.monotonic()
  with pytest.raises(data.DatasetNotFoundError, match="dataset-fashion-mnist"):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "tfds"),
                      path=str(tmp_path / "no_idx"))
  assert time.monotonic() - start < 20


@pytest.mark.parametrize("missing", ["tensorflow", "tensorflow_datasets"])
@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped"])
def test_tfds_without_tensorflow_says_how_to_install(monkeypatch, missing, name):
  monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
  with pytest.raises(ModuleNotFoundError, match=re.escape('pip install -e ".[tfds]"')) as excinfo:
    data.load_dataset(name)
  assert f"dataset {name!r}" in str(excinfo.value) and missing in str(excinfo.value)
  assert excinfo.value.name == missing


def test_fashion_mnist_without_tensorflow_mentions_idx(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  with pytest.raises(ModuleNotFoundError, match="dataset-fashion-mnist") as excinfo:
    data.load_dataset("fashion_mnist", path=str(tmp_path / "no_idx"))
  assert 'pip install -e ".[tfds]"' in str(excinfo.value)


def test_load_tfds_unknown_name():
  with pytest.raises(ValueError, match="cifar10"):
    data.load_tfds("mnist")


def test_import_does_not_import_tensorflow():
  code = "import sys, jax_seqgcn.data.datasets; assert 'tensorflow' not in sys.modules"
  out = run_python("-c", code, timeout=60)
  assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------- IDX


@pytest.fixture(scope="module")
def fashion_mnist():
  if not HAVE_IDX:
    pytest.skip("apt-get install dataset-fashion-mnist")
  return data.load_fashion_mnist_idx()


@needs_idx
def test_fashion_mnist_idx_real_files(fashion_mnist):
  ds = fashion_mnist
  assert ds.train_images.shape == (60000, 28, 28, 1)
  assert ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.train_images.dtype == ds.test_images.dtype == np.uint8
  assert ds.train_targets.dtype == np.int32 and ds.train_targets.shape == (60000,)
  assert ds.test_targets.shape == (10000,)
  assert ds.num_classes == 10 and ds.name == "fashion_mnist"
  np.testing.assert_array_equal(np.bincount(ds.train_targets, minlength=10), [6000] * 10)
  assert ds.test_targets.min() == 0 and ds.test_targets.max() == 9
  assert ds.train_targets[0] == 9  # Ankle boot, as in the Fashion-MNIST README.
  assert ds.train_images.max() == 255 and ds.train_images.min() == 0
  assert data.describe(ds) == (
      "fashion_mnist: 60000 train / 10000 test images 28x28x1 uint8, 10 classes")


@needs_idx
def test_fashion_mnist_idx_matches_raw_bytes(fashion_mnist):
  # Independent decoding: the IDX body starts after a 16-byte header, row major.
  with gzip.open(os.path.join(IDX_DIR, "t10k-images-idx3-ubyte.gz")) as f:
    head = f.read(16 + 2 * 784)
  assert head[:4] == b"\x00\x00\x08\x03"
  second = np.frombuffer(head[16 + 784:], np.uint8).reshape(28, 28)
  np.testing.assert_array_equal(fashion_mnist.test_images[1, :, :, 0], second)


@needs_idx
def test_load_dataset_auto_fashion_mnist_uses_idx(fashion_mnist):
  ds = data.load_dataset("fashion_mnist")
  np.testing.assert_array_equal(ds.test_targets, fashion_mnist.test_targets)


def test_fashion_mnist_idx_missing_dir(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as excinfo:
    data.load_fashion_mnist_idx(str(tmp_path / "nowhere"))
  assert "apt-get install -y dataset-fashion-mnist" in str(excinfo.value)
  with pytest.raises(data.DatasetNotFoundError):
    data.load_dataset("fashion_mnist", source="idx", path=str(tmp_path))


def _write_idx(path, magic, array, dims=None):
  dims = array.shape if dims is None else dims
  header = np.array([magic, *dims], dtype=">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _write_fake_fashion_mnist(directory, num_train=5, num_test=3):
  rng = np.random.default_rng(0)
  arrays = {}
  for prefix, count in (("train", num_train), ("t10k", num_test)):
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", 0x803, images)
    _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", 0x801, labels)
    arrays[prefix] = images, labels
  return arrays


def test_fashion_mnist_idx_synthetic_round_trip(tmp_path):
  arrays = _write_fake_fashion_mnist(tmp_path)
  ds = data.load_fashion_mnist_idx(str(tmp_path))
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train"][0])
  np.testing.assert_array_equal(ds.test_targets, arrays["t10k"][1])
  assert ds.train_images.shape == (5, 28, 28, 1)


@pytest.mark.parametrize("corruption, match", [
    ("magic", "magic"),
    ("truncated", "bytes"),
    ("count", "3 images but 4 labels"),
    ("label", "out of range"),
])
def test_fashion_mnist_idx_invalid(tmp_path, corruption, match):
  _write_fake_fashion_mnist(tmp_path)
  labels_path = tmp_path / "t10k-labels-idx1-ubyte.gz"
  if corruption == "magic":
    _write_idx(labels_path, 0x803, np.zeros(3, np.uint8))
  elif corruption == "truncated":
    _write_idx(labels_path, 0x801, np.zeros(2, np.uint8), dims=(3,))
  elif corruption == "count":
    _write_idx(labels_path, 0x801, np.zeros(4, np.uint8))
  else:
    _write_idx(labels_path, 0x801, np.array([1, 2, 10], np.uint8))
  with pytest.raises(ValueError, match=match):
    data.load_fashion_mnist_idx(str(tmp_path))


# --------------------------------------------------------------------------- npz


def _images(n, shape=(8, 8, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


def test_npz_classification_with_split(tmp_path):
  images = _images(50)
  labels = np.arange(50) % 4
  path = tmp_path / "mine.npz"
  np.savez(path, images=images, targets=labels)
  ds = data.load_npz(path, test_fraction=0.2, seed=3)
  assert ds.name == "mine" and ds.num_classes == 4
  assert ds.train_images.shape == (40, 8, 8, 3) and ds.test_images.shape == (10, 8, 8, 3)
  assert ds.train_targets.dtype == np.int32
  # The split partitions the examples: every (image, label) pair appears exactly once.
  all_images = np.concatenate([ds.train_images, ds.test_images])
  all_labels = np.concatenate([ds.train_targets, ds.test_targets])
  keys = sorted(map(bytes, all_images.reshape(50, -1)))
  assert keys == sorted(map(bytes, images.reshape(50, -1)))
  lookup = {bytes(im.tobytes()): lab for im, lab in zip(images, labels)}
  assert all(lookup[im.tobytes()] == lab for im, lab in zip(all_images, all_labels))
  # Deterministic in the seed, different across seeds.
  again = data.load_npz(path, test_fraction=0.2, seed=3)
  np.testing.assert_array_equal(again.test_images, ds.test_images)
  other = data.load_npz(path, test_fraction=0.2, seed=4)
  assert not np.array_equal(other.test_images, ds.test_images)


def test_npz_regression_with_explicit_test(tmp_path):
  # ICVL-like: single channel depth crops and 16 joints x 3 coordinates.
  rng = np.random.default_rng(1)
  arrays = dict(images=_images(12, (16, 16)), targets=rng.normal(size=(12, 16, 3)),
                test_images=_images(5, (16, 16), seed=2),
                test_targets=rng.normal(size=(5, 16, 3)))
  path = tmp_path / "icvl.npz"
  np.savez(path, **arrays)
  ds = data.load_dataset("npz", path=str(path))
  assert ds.num_classes == 0 and ds.name == "icvl"
  assert ds.train_images.shape == (12, 16, 16, 1) and ds.test_images.shape == (5, 16, 16, 1)
  assert ds.train_targets.shape == (12, 48) and ds.train_targets.dtype == np.float32
  np.testing.assert_allclose(ds.test_targets, arrays["test_targets"].reshape(5, 48),
                             rtol=1e-6)
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays["test_images"])
  assert "regression, 48-d targets" in data.describe(ds)


def test_npz_regression_split_and_classification_explicit(tmp_path):
  path = tmp_path / "reg.npz"
  np.savez(path, images=_images(10), targets=np.linspace(0, 1, 10))
  ds = data.load_npz(path, test_fraction=0.3)
  assert ds.train_targets.shape == (7, 1) and ds.test_targets.shape == (3, 1)
  assert ds.num_classes == 0
  path = tmp_path / "cls.npz"
  np.savez(path, images=_images(8), targets=np.array([0, 1, 2, 3, 4, 5, 6, 1]),
           test_images=_images(2), test_targets=np.array([0, 6]))
  ds = data.load_npz(path)
  assert ds.num_classes == 7  # labels 0..6, every class in the training split
  assert ds.train_images.shape == (8, 8, 8, 3) and ds.test_targets.tolist() == [0, 6]


@pytest.mark.parametrize("arrays, match", [
    (dict(images=_images(4)), "missing key"),
    (dict(targets=np.zeros(4, int)), "missing key"),
    (dict(images=_images(4), targets=np.zeros(3, int)), "4 images but 3"),
    (dict(images=_images(4).astype(np.float32), targets=np.zeros(4, int)), "uint8"),
    (dict(images=_images(4)[:, :, 0, 0], targets=np.zeros(4, int)), "N, H, W"),
    (dict(images=_images(4), targets=np.zeros((4, 2), int)), "must be \\[N\\]"),
    (dict(images=_images(4), targets=np.array([0, -1, 1, 2])), "negative"),
    (dict(images=_images(4), targets=np.array([0.0, np.nan, 1, 2])), "non-finite"),
    (dict(images=_images(4), targets=np.array(["a", "b", "c", "d"])), "integer"),
    (dict(images=_images(4), targets=np.zeros(4, int), test_images=_images(2)),
     "together"),
    (dict(images=_images(4), targets=np.zeros(4, int), test_images=_images(2, (4, 4, 3)),
          test_targets=np.zeros(2, int)), "test images"),
    (dict(images=_images(4), targets=np.zeros(4, int), test_images=_images(2),
          test_targets=np.zeros(2)), "test targets"),
    (dict(images=_images(2), targets=np.zeros(2, int)), "empty"),
    (dict(images=_images(0), targets=np.zeros(0, int)), "the training split is empty"),
    (dict(images=_images(4), targets=np.zeros(4, int), test_images=_images(0),
          test_targets=np.zeros(0, int)), "the test split is empty"),
    # int64 labels >= 2**31 used to wrap silently to negative int32 labels.
    (dict(images=_images(4), targets=np.array([0, 1, 2 ** 31, 1], np.int64)),
     "label 2147483648 .* does not fit in int32"),
    (dict(images=_images(4), targets=np.array([0, 1, 2 ** 32 + 1, 1], np.uint64)),
     "does not fit in int32"),
    # A label of 10**6 used to make a million classes.
    (dict(images=_images(10), targets=np.array([0, 1] * 4 + [10 ** 6, 1])),
     r"every class present .* 999998 of the classes 0..1000000 have no example "
     r"\(e.g. \[2, 3, 4, 5, 6\]\)"),
    (dict(images=_images(10), targets=np.array([0, 2] * 5)), r"classes 0..2 have no .*\[1\]"),
    (dict(images=_images(6), targets=np.array([0, 1, 2] * 2), test_images=_images(2),
          test_targets=np.array([0, 6])), "test label 6 has no training example"),
])
def test_npz_invalid(tmp_path, arrays, match):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=match):
    data.load_npz(path, test_fraction=0.2)


def test_npz_random_split_that_empties_a_class(tmp_path):
  path = tmp_path / "rare.npz"
  np.savez(path, images=_images(10), targets=np.array([0, 1] * 4 + [0, 2]))  # one example of 2
  assert data.load_npz(path, test_fraction=0.3, seed=0).num_classes == 3
  with pytest.raises(ValueError, match=r"random test split took every example of class\(es\) "
                                       r"\[2\].*change the seed"):
    data.load_npz(path, test_fraction=0.3, seed=3)


def _zip_of(path, **arrays):
  np.savez(path, **arrays)
  return path.read_bytes()


def _npy_bytes():
  buffer = io.BytesIO()
  np.save(buffer, _images(4))
  return buffer.getvalue()


def _flip_byte(raw, index):
  raw = bytearray(raw)
  raw[index] ^= 0xFF
  return bytes(raw)


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "the file is empty \\(0 bytes\\)"),
    (lambda p: np.savez(p), "it holds no arrays"),
    (lambda p: p.write_text("images,targets\n1,2\n"), "it starts with b'images' \\(text\\)"),
    (lambda p: p.write_bytes(b"\x00\x01\x02\xff" * 4),
     "it starts with .* \\(binary\\), not with a zip header"),
    (lambda p: p.write_bytes(_npy_bytes()), "it is a single .npy array"),  # a renamed .npy
    (lambda p: p.write_bytes(_zip_of(p, images=_images(10), targets=np.zeros(10, int))[:900]),
     "truncated or corrupt zip archive"),
    (lambda p: p.write_bytes(_zip_of(p, images=_images(10), targets=np.zeros(10, int))[:-10]),
     "truncated or corrupt zip archive"),
    (lambda p: p.write_bytes(_flip_byte(_zip_of(p, images=_images(10),
                                                targets=np.zeros(10, int)), 300)),
     "truncated or corrupt zip archive .*CRC"),
    (lambda p: np.savez(p, images=np.array([None, 1], object), targets=np.zeros(2, int)),
     "member 'images': Object arrays"),
])
def test_npz_not_a_valid_npz(tmp_path, make, reason):
  path = tmp_path / "bad.npz"
  make(path)
  with pytest.raises(ValueError, match=f"^{re.escape(str(path))} is not a valid .npz: {reason}"):
    data.load_npz(path)
  with pytest.raises(ValueError, match="is not a valid .npz"):
    data.load_dataset("npz", path=str(path))


def test_npz_missing_file_stays_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError):
    data.load_npz(tmp_path / "nowhere.npz")


def test_npz_bad_test_fraction(tmp_path):
  path = tmp_path / "ok.npz"
  np.savez(path, images=_images(10), targets=np.zeros(10, int))
  with pytest.raises(ValueError, match="test_fraction"):
    data.load_npz(path, test_fraction=1.0)


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="mnist"), "cifar10, cifar100, svhn_cropped, fashion_mnist, npz"),
    (dict(name="cifar10", source="web"), "auto, tfds, idx, npz"),
    (dict(name="cifar10", source="idx"), "only for 'fashion_mnist'"),
    (dict(name="cifar10", source="npz"), "only for dataset 'npz'"),
    (dict(name="npz"), "path"),
    (dict(name="npz", source="tfds", path="x.npz"), "source"),
])
def test_load_dataset_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.load_dataset(**kwargs)
  assert data.DATASETS == ("cifar10", "cifar100", "svhn_cropped", "fashion_mnist", "npz")
