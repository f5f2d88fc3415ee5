"""Own data in an `.npz` file (`load_npz`), its image arrays memory-mapped rather than read.

`np.savez` stores every array as an uncompressed (ZIP_STORED) zip member `KEY.npy`: the array's
bytes lie in the file as they are. So `load_npz` opens the image members (`images`,
`test_images`) as read-only `np.memmap`s at their data offset (`_map_member`: the zip local
header, then the .npy header read with `numpy.lib.format`), after checking what `np.load` would
have: the member is stored, not encrypted, a .npy array of as many bytes as its header says,
without Python objects, and its CRC-32 (read blockwise from the file, never held); a
Fortran-order image array is refused (its rows are not contiguous; re-save it C-ordered). The
targets and any other member are small and read into memory as before (`np.load`).

Compressed files (`np.savez_compressed`, ZIP_DEFLATED) cannot be mapped: their images are read
into memory as before, with one warning line on stderr, naming the fix (re-save with
`np.savez`), when they exceed `COMPRESSED_WARN_BYTES`.

A memory-mapped image array reaches the `Dataset` as a `data.stream.RowView`; without a test
split in the file, the train and test splits are `RowView`s of the same map with the split's
row numbers, not copies. The eval passes, the test pass and the training read their rows from
it batch by batch (docs/streamed_pools.md). `load_npz(..., memmap=False)` reads everything
into memory as the loader always did.
"""

import os
import struct
import sys
import tokenize
import zipfile
import zlib

import numpy as np

from jax_seqgcn.data.datasets import Dataset
from jax_seqgcn.data.stream import RowView

IMAGE_KEYS = ("images", "test_images")
# Compressed image members over this many bytes (uncompressed) in all get a warning line.
COMPRESSED_WARN_BYTES = 256 * 2 ** 20
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # first local file header; empty archive
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes
_CRC_CHUNK = 16 * 2 ** 20
_MAX_LABEL = np.iinfo(np.int32).max


# What numpy raises for a .npy header it cannot read (it parses the header's text).
_HEADER_ERRORS = (ValueError, SyntaxError, tokenize.TokenError)


def _one_line(error):
  """`error`'s message on one line; a header that does not parse says so."""
  text = " ".join(str(error.args[0] if error.args else error).split())
  return text if isinstance(error, ValueError) else f"unreadable .npy header ({text})"


def _crc32(f, start, size):
  """CRC-32 of `size` bytes from `start` of `f`, read in chunks; (crc, bytes missing)."""
  f.seek(start)
  buffer = memoryview(bytearray(min(_CRC_CHUNK, max(size, 1))))
  crc, remaining = 0, size
  while remaining:
    count = f.readinto(buffer[:min(len(buffer), remaining)])
    if not count:
      break
    crc = zlib.crc32(buffer[:count], crc)
    remaining -= count
  return crc, remaining


def _map_member(path, info, key, invalid):
  """The stored .npy member `info` as a read-only `np.memmap` (np.empty when it has no bytes)."""
  if info.flag_bits & 0x1:
    raise invalid(f"member {key!r} is encrypted")
  file_size = os.path.getsize(path)
  with open(path, "rb", buffering=0) as f:
    f.seek(info.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    if len(raw) < _LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
      raise invalid(f"truncated or corrupt zip archive (member {key!r}: no local file header "
                    f"at byte {info.header_offset})")
    name_len, extra_len = _LOCAL_HEADER.unpack(raw)[-2:]
    name = f.read(name_len).decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
    if name != info.filename:
      raise invalid(f"truncated or corrupt zip archive (member {key!r}: its local header names "
                    f"{name!r})")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if info.compress_size != info.file_size or start + info.file_size > file_size:
      raise invalid(f"truncated or corrupt zip archive (member {key!r}: {info.file_size} bytes "
                    f"at byte {start} of a {file_size}-byte file)")
    f.seek(start)
    if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
      raise invalid(f"member {key!r} is not a .npy array")
    f.seek(start)
    try:
      version = np.lib.format.read_magic(f)
      read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                     (2, 0): np.lib.format.read_array_header_2_0}.get(version)
      if read_header is None:
        return None  # .npy 3.0 (utf-8 field names): read it as np.load does
      shape, fortran_order, dtype = read_header(f)
    except _HEADER_ERRORS as e:
      raise invalid(f"member {key!r}: {_one_line(e)}") from e
    header_len = f.tell() - start
    if dtype.hasobject:
      raise invalid(f"member {key!r}: Object arrays cannot be loaded when allow_pickle=False")
    if fortran_order:
      raise ValueError(f"{path}: member {key!r} is stored in Fortran order, which cannot be "
                       "memory-mapped row by row; re-save it C-ordered: np.savez(path, "
                       f"{key}=np.ascontiguousarray({key}), ...)")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if header_len + nbytes != info.file_size:
      raise invalid(f"member {key!r} is truncated or corrupt: its .npy header says "
                    f"{shape} {dtype} ({nbytes} bytes) but it holds "
                    f"{info.file_size - header_len} bytes of data")
    crc, missing = _crc32(f, start, info.file_size)
    if missing or crc != info.CRC:
      raise invalid(f"truncated or corrupt zip archive (BadZipFile: Bad CRC-32 for file "
                    f"{info.filename!r})")
  if not nbytes:
    return np.empty(shape, dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=start + header_len, shape=shape)


def _read_npz(path, memmap=True):
  """Every array of an `.npz` file: the stored image members memory-mapped (with `memmap`),
  the others read into memory.

  Raises:
    FileNotFoundError: no such file.
    ValueError: "PATH is not a valid .npz: REASON" for an empty (0 bytes) file, text, a
      renamed .npy, a truncated or corrupt zip archive, members that are not arrays (or hold
      pickled Python objects), or an archive without arrays; "PATH: member 'images' is stored
      in Fortran order ..." for a mapped image member in Fortran order.
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
  arrays, compressed = {}, []
  try:
    with np.load(path, allow_pickle=False) as npz:
      names = set(npz.zip.namelist())
      for key in npz.files:
        info = npz.zip.getinfo(key + ".npy" if key + ".npy" in names else key)
        if key in IMAGE_KEYS and memmap and info.compress_type == zipfile.ZIP_STORED:
          arrays[key] = _map_member(path, info, key, invalid)
          if arrays[key] is not None:
            continue
        try:
          arrays[key] = npz[key]
        except _HEADER_ERRORS as e:  # pickled objects, or a member that is not a valid .npy
          raise invalid(f"member {key!r}: {_one_line(e)}") from e
        if not isinstance(arrays[key], np.ndarray):
          raise invalid(f"member {key!r} is not a .npy array")
        if key in IMAGE_KEYS and info.compress_type != zipfile.ZIP_STORED:
          compressed.append(key)
  except (zipfile.BadZipFile, EOFError, zlib.error) as e:
    raise invalid(f"truncated or corrupt zip archive ({type(e).__name__}: {e})") from e
  if not arrays:
    raise invalid("it holds no arrays; need 'images' and 'targets' (optionally "
                  "'test_images', 'test_targets')")
  nbytes = sum(arrays[key].nbytes for key in compressed)
  if memmap and compressed and nbytes > COMPRESSED_WARN_BYTES:
    print(f"warning: {path}: {' and '.join(map(repr, compressed))} compressed "
          f"(np.savez_compressed), so read into memory ({nbytes / 2 ** 20:,.0f} MiB); re-save "
          "the file with np.savez(path, images=..., targets=...) to memory-map them instead",
          file=sys.stderr, flush=True)
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


def _rows(images, index=None):
  """`images[index]` (all rows when None): a `RowView` of a memory map, else a copy as before."""
  if isinstance(images, np.memmap):
    return RowView(images, index)
  return images if index is None else images[index]


def load_npz(path, *, test_fraction=0.2, seed=0, name=None, memmap=True):
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
    memmap: memory-map the image arrays of an uncompressed file (the module docstring); False
      reads everything into memory.
  Returns:
    `Dataset` with uint8 [N, H, W, C] images (`data.stream.RowView`s of the memory map, or
    arrays) and int32 [N] / float32 [N, K] targets.
  Raises:
    ValueError: not a valid .npz file ("PATH is not a valid .npz: REASON"), missing keys,
      an empty split, length or shape mismatch, wrong dtypes, class labels that are not
      0..C-1 with every class in the training split, bad split, a Fortran-order image array
      to memory-map.
    FileNotFoundError: no such file.
  """
  arrays = _read_npz(path, memmap=memmap)
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
    train_images, train_targets = _rows(images), targets
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
    test_images = _rows(test_images)
  else:
    train_idx, test_idx = _split_indices(len(images), test_fraction, seed)
    train_images, train_targets = _rows(images, train_idx), targets[train_idx]
    test_images, test_targets = _rows(images, test_idx), targets[test_idx]

  if train_targets.dtype == np.int32:
    num_classes = _num_classes(train_targets, test_targets, path, file_split=all(has_test))
  else:
    num_classes = 0
  if name is None:
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
  return Dataset(train_images, train_targets, test_images, test_targets, num_classes, name)
