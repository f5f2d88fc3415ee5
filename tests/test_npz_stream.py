"""The npz source memory-maps its images (data.npz) and the loop reads them batch by batch."""

import io
import re
import zipfile

import numpy as np
import pytest

from jax_seqgcn.data import datasets
from jax_seqgcn.data import npz as npz_lib
from jax_seqgcn.data import stream
from jax_seqgcn.experiment import loop
from tests.conftest import labelled_sets
from tests.conftest import tiny_config


def _images(n, shape=(8, 8, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


def _mapped(images):
  return isinstance(images, stream.RowView) and isinstance(images.array, np.memmap)


# ---------------------------------------------------------------------- (a) memory-mapped


@pytest.mark.parametrize("file_split", [False, True])
def test_savez_images_are_memory_mapped_and_equal(tmp_path, file_split):
  images, labels = _images(60, (6, 5)), np.arange(60) % 3
  arrays = dict(images=images, targets=labels)
  if file_split:
    arrays.update(test_images=_images(7, (6, 5), seed=1), test_targets=np.arange(7) % 3)
  path = tmp_path / "own.npz"
  np.savez(path, **arrays)
  mapped = datasets.load_npz(path, test_fraction=0.25, seed=5)
  in_memory = datasets.load_npz(path, test_fraction=0.25, seed=5, memmap=False)
  assert _mapped(mapped.train_images) and _mapped(mapped.test_images)
  assert isinstance(in_memory.train_images, np.ndarray)
  assert not isinstance(in_memory.train_images, np.memmap)
  for field in ("train_images", "test_images"):
    view, array = getattr(mapped, field), getattr(in_memory, field)
    assert view.shape == array.shape and view.dtype == array.dtype and len(view) == len(array)
    np.testing.assert_array_equal(np.asarray(view), array)
    rows = np.array([3, 0, -1, 2, 2])
    gathered = view[rows]
    assert type(gathered) is np.ndarray  # a copy of those rows, not a view of the map
    np.testing.assert_array_equal(gathered, array[rows])
    np.testing.assert_array_equal(view[1:5][np.array([0, 3])], array[1:5][[0, 3]])
    np.testing.assert_array_equal(view[2], array[2])
  for field in ("train_targets", "test_targets"):
    np.testing.assert_array_equal(getattr(mapped, field), getattr(in_memory, field))
  assert mapped.num_classes == in_memory.num_classes == 3
  assert datasets.describe(mapped) == datasets.describe(in_memory)
  stream.release_pages(mapped.train_images.array)  # pages dropped: still readable
  np.testing.assert_array_equal(np.asarray(mapped.train_images), in_memory.train_images)


def _random_split_npz(path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 400)
  means = rng.integers(0, 256, (10, 16, 16, 1))
  images = np.clip(means[labels] + rng.normal(0, 40, (400, 16, 16, 1)), 0, 255)
  np.savez(path, images=images.astype(np.uint8), targets=labels)
  return str(path)


def test_loop_on_mapped_npz_equals_in_memory_and_never_reads_the_pool(tmp_path, monkeypatch):
  path = _random_split_npz(tmp_path / "pool.npz")  # no test split: the loader splits 320 / 80
  config = tiny_config(path, sampler__name="Entropy", al__cycles=2)
  config.train.eval_batch_size = 64
  gathered = []
  take = stream.RowView.__getitem__

  def recording(self, key):
    out = take(self, key)
    if isinstance(out, np.ndarray):  # rows read (a slice is another view)
      gathered.append(len(out))
    return out

  def whole(*args, **kwargs):
    raise AssertionError("the whole pool was read into memory")

  with monkeypatch.context() as patch:
    patch.setattr(stream.RowView, "__getitem__", recording)
    patch.setattr(stream.RowView, "__array__", whole)
    mapped = loop.run(config, tmp_path / "mapped")
  # Batches of the eval passes and the labelled rows of the training, nothing larger.
  assert gathered and max(gathered) <= max(64, config.al.initial + config.al.budget)
  monkeypatch.setattr(loop.data_lib, "load_dataset",
                      lambda *args, **kwargs: npz_lib.load_npz(path, memmap=False))
  in_memory = loop.run(config, tmp_path / "memory")
  assert [(r.n_labelled, r.metric) for r in mapped] == \
         [(r.n_labelled, r.metric) for r in in_memory]
  for x, y in zip(labelled_sets(tmp_path / "mapped"), labelled_sets(tmp_path / "memory"),
                  strict=True):
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------- (b) compressed


def test_compressed_npz_is_read_into_memory_with_one_warning_line(tmp_path, capsys,
                                                                   monkeypatch):
  images, labels = _images(40), np.arange(40) % 4
  path = tmp_path / "small.npz"
  np.savez_compressed(path, images=images, targets=labels)
  plain = tmp_path / "plain.npz"
  np.savez(plain, images=images, targets=labels)
  compressed = datasets.load_npz(path, seed=2)
  assert isinstance(compressed.train_images, np.ndarray)
  assert capsys.readouterr().err == ""  # under COMPRESSED_WARN_BYTES: no warning
  expected = datasets.load_npz(plain, seed=2)
  for field in ("train_images", "test_images", "train_targets", "test_targets"):
    np.testing.assert_array_equal(getattr(compressed, field), np.asarray(getattr(expected, field)))

  monkeypatch.setattr(npz_lib, "COMPRESSED_WARN_BYTES", 0)
  datasets.load_npz(path)
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"warning: {path}: 'images' compressed")
  assert "re-save the file with np.savez(" in lines[0]
  datasets.load_npz(path, memmap=False)  # asked for memory: nothing to warn about
  assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------- (c) hostile members


def _savez_bytes(save=np.savez, **arrays):
  buffer = io.BytesIO()
  save(buffer, **arrays)
  return buffer.getvalue()


def _with_header_offset(raw, member, offset):
  """`raw` with the central directory's local-header offset of `member` set to `offset`."""
  raw = bytearray(raw)
  at = raw.find(b"PK\x01\x02")  # central directory entries: the name at +46, offset at +42
  while at >= 0 and raw[at + 46:at + 46 + len(member)] != member.encode():
    at = raw.find(b"PK\x01\x02", at + 4)
  assert at >= 0, member
  raw[at + 42:at + 46] = offset.to_bytes(4, "little")
  return bytes(raw)


def _npy_header(shape, dtype=np.uint8):
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, dict(descr=np.lib.format.dtype_to_descr(np.dtype(dtype)), fortran_order=False,
                   shape=shape))
  return buffer.getvalue()


def _stored_zip(**members):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return buffer.getvalue()


_OK = dict(images=_images(10), targets=np.arange(10) % 2)
_TARGETS = _savez_bytes(targets=np.arange(10) % 2)


@pytest.mark.parametrize("make, reason", [
    (lambda: _with_header_offset(_savez_bytes(**_OK), "images.npy", 7),
     r"is not a valid .npz: truncated or corrupt zip archive \(member 'images': no local file "
     r"header at byte 7\)"),
    (lambda: _with_header_offset(_savez_bytes(**_OK), "images.npy", 10 ** 6),
     "is not a valid .npz: truncated or corrupt zip archive"),
    (lambda: _with_header_offset(_savez_bytes(np.savez_compressed, **_OK), "images.npy", 7),
     "is not a valid .npz: truncated or corrupt zip archive"),
    (lambda: _savez_bytes(images=np.asfortranarray(_images(10, (8, 8))),
                          targets=np.arange(10) % 2),
     r": member 'images' is stored in Fortran order, .*np.ascontiguousarray\(images\)"),
    (lambda: _savez_bytes(images=np.array([None, 1], object), targets=np.zeros(2, int)),
     "is not a valid .npz: member 'images': Object arrays cannot be loaded"),
    (lambda: _stored_zip(**{"images.npy": _npy_header((10, 8, 8, 3)) + bytes(8 * 192),
                            "targets.npy": _TARGETS}),
     r"is not a valid .npz: member 'images' is truncated or corrupt: its .npy header says "
     r"\(10, 8, 8, 3\) uint8 \(1920 bytes\) but it holds 1536 bytes"),
    (lambda: _stored_zip(**{"images.npy": b"\x93NUMPY\x01\x00\x04\x00{'x'", "targets.npy": b""}),
     r"is not a valid .npz: member 'images': unreadable .npy header \(EOF"),
    (lambda: _stored_zip(images=b"just some bytes", targets=b"1"),
     "is not a valid .npz: member 'images' is not a .npy array"),
])
def test_hostile_members_give_one_line(tmp_path, make, reason):
  path = tmp_path / "hostile.npz"
  path.write_bytes(make())
  with pytest.raises(ValueError) as raised:
    datasets.load_npz(path)
  message = str(raised.value)
  assert "\n" not in message and message.startswith(str(path)), message
  assert re.search(reason, message), message
  with pytest.raises(ValueError, match=re.escape(str(path))):
    datasets.load_dataset("npz", path=str(path))


def test_fortran_order_reads_into_memory_when_asked(tmp_path):
  path = tmp_path / "fortran.npz"
  images = _images(10, (8, 8))
  np.savez(path, images=np.asfortranarray(images), targets=np.arange(10) % 2)
  loaded = datasets.load_npz(path, memmap=False, test_fraction=0.2)
  assert loaded.train_images.shape == (8, 8, 8, 1)
