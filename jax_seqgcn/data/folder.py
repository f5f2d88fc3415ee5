"""Own data on disk: a labels CSV and a folder of image files, read and checked before any work.

* `read_labels(path)`: a CSV with the header `id,label` (further columns are ignored); one row
  per labelled example. Labels are any non-empty strings (class names).
* `row_indices(labels, num_rows)`: the ids as row indices of a features array.
* `list_images(directory)` / `read_images(directory, ids)`: every PNG or JPEG file under
  `directory` (any depth), ids being paths relative to it with "/" separators, sorted. Hidden
  files and folders (names starting with ".") are skipped; any other file must be a readable
  PNG or JPEG image, so a stray or broken file is an error rather than silently left out.
  Grayscale images give one channel; if any image is RGB (or has a palette), every image is
  converted to RGB (grayscale repeated, alpha dropped). Sizes must agree unless `image_size`
  resizes every image to image_size x image_size (bilinear, aspect ratio not kept).
* `image_indices(labels, ids)`: the ids as indices into the image list.
* `classes(labels)`: class names in sorted order and [L] int32 class indices.
* `load_features(path)`: a `.npy` [N, D] array (or `.npz` with `features`), finite.

Every problem is an `InputError` naming the file and, for the CSV, the line.
"""

import csv
import difflib
import os
import pathlib
import posixpath
import re
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

HEADER = ("id", "label")
# Pillow's names of the formats we read; MPO is the JPEG variant many cameras write.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")
_GRAY_MODES = ("1", "L", "LA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
_ROW_INDEX = re.compile(r"[0-9]+")


class InputError(ValueError):
  """Bad input files (named in the message, with the line where it applies); nothing is done."""


class Labels(NamedTuple):
  """The rows of a labels CSV, in file order.

  Attributes:
    path: the CSV file.
    ids: [L] id strings as written (stripped of surrounding spaces).
    labels: [L] label strings.
    lines: [L] line number of each row (1 = the header).
  """
  path: str
  ids: List[str]
  labels: List[str]
  lines: List[int]


def read_labels(path) -> Labels:
  """Reads a labels CSV: header `id,label`, then one `id,label` row per labelled example.

  Blank lines are skipped. A header-only file means "nothing labelled yet".

  Raises:
    InputError: missing file, undecodable text, a header that does not start with `id,label`,
      a row with fewer than two fields or an empty id or label (naming the line).
  """
  path = os.fspath(path)
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      rows = [(reader.line_num, row) for reader in [csv.reader(f)] for row in reader]
  except FileNotFoundError:
    raise InputError(f"{path}: no such labels file") from None
  except (OSError, UnicodeDecodeError, csv.Error) as err:
    raise InputError(f"{path}: cannot read the labels CSV ({err})") from None
  rows = [(line, [field.strip() for field in row]) for line, row in rows if any(row)]
  if not rows or tuple(rows[0][1][:2]) != HEADER:
    found = repr(",".join(rows[0][1])) if rows else "an empty file"
    raise InputError(f"{path} line {rows[0][0] if rows else 1}: the header must be "
                     f"'id,label', found {found}")
  ids, labels, lines = [], [], []
  for line, row in rows[1:]:
    if len(row) < 2 or not row[0] or not row[1]:
      raise InputError(f"{path} line {line}: need a non-empty id and label, found "
                       f"{','.join(row)!r}")
    ids.append(row[0])
    labels.append(row[1])
    lines.append(line)
  return Labels(path, ids, labels, lines)


def _indices(labels: Labels, lookup: Callable[[str, int], int]) -> np.ndarray:
  """[L] int64 indices `lookup(id, line)`, refusing two rows with the same index."""
  first_line = {}
  indices = []
  for id_, line in zip(labels.ids, labels.lines):
    index = lookup(id_, line)
    if index in first_line:
      raise InputError(f"{labels.path} line {line}: id {id_!r} is labelled twice (first on line "
                       f"{first_line[index]})")
    first_line[index] = line
    indices.append(index)
  return np.asarray(indices, np.int64)


def row_indices(labels: Labels, num_rows: int, *, what: str = "FEATURES") -> np.ndarray:
  """The ids of `labels` as row indices into an array of `num_rows` rows.

  Returns:
    [L] int64 indices in [0, num_rows), in file order.
  Raises:
    InputError: an id that is not a non-negative integer, out of range, or repeated.
  """
  def lookup(id_, line):
    if not _ROW_INDEX.fullmatch(id_):
      raise InputError(f"{labels.path} line {line}: id {id_!r} is not a row index (an integer "
                       f"in [0, {num_rows}))")
    if int(id_) >= num_rows:
      raise InputError(f"{labels.path} line {line}: id {id_} is out of range: {what} has "
                       f"{num_rows} rows (0..{num_rows - 1})")
    return int(id_)

  return _indices(labels, lookup)


def _skipped(path: pathlib.Path, excluded: Sequence[pathlib.Path]) -> bool:
  return path.name.startswith(".") or any(path == e or e in path.parents for e in excluded)


def list_images(directory, *, exclude: Iterable = ()) -> List[str]:
  """Relative paths ("/"-separated, sorted) of every file under `directory` but hidden ones.

  Args:
    directory: the image folder.
    exclude: files or folders to leave out (e.g. the labels CSV or outputs kept inside it).
  Raises:
    InputError: `directory` is not a folder, or holds no files.
  """
  root = pathlib.Path(directory)
  if not root.is_dir():
    raise InputError(f"{directory}: no such image folder")
  excluded = [pathlib.Path(os.path.abspath(e)) for e in exclude if e is not None]
  found = []
  for folder, subfolders, files in os.walk(root):
    here = pathlib.Path(os.path.abspath(folder))
    subfolders[:] = [d for d in subfolders if not _skipped(here / d, excluded)]
    found += [(pathlib.Path(folder) / name).relative_to(root).as_posix()
              for name in files if not _skipped(here / name, excluded)]
  if not found:
    raise InputError(f"{directory}: no image files found (PNG or JPEG, any folder depth)")
  return sorted(found)


def _open(path: str, image_size: Optional[int]):
  """(image as an [H, W] or [H, W, 3] uint8 array, (width, height) as stored).

  Resized to image_size x image_size unless None; InputError if it is not a PNG/JPEG image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top (only this module needs Pillow)
  try:
    with Image.open(path) as image:
      if image.format not in IMAGE_FORMATS:
        raise InputError(f"{path}: a {image.format} image; only PNG and JPEG files are read "
                         "(convert it, or move it out of the folder)")
      image.load()
      size = image.size
      if image.mode in _SIXTEEN_BIT_MODES:  # 16-bit grayscale PNG: keep the high byte
        image = Image.fromarray((np.asarray(image, np.uint32) >> 8).clip(0, 255)
                                .astype(np.uint8))
      image = image.convert("L" if image.mode in _GRAY_MODES else "RGB")
      if image_size is not None:
        image = image.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
      return np.asarray(image, np.uint8), size
  except InputError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
    raise InputError(f"{path}: not a readable PNG or JPEG image ({err}); every file in the "
                     "image folder must be one (hidden files aside): move others out") from None


def read_images(directory, ids: Sequence[str], *, image_size: Optional[int] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
  """Decodes the images `ids` (paths relative to `directory`) into one array.

  Args:
    directory: the image folder.
    ids: [N] relative paths, e.g. from `list_images`.
    image_size: None (all images must have one size) or S: resize each to S x S.
    progress: optional `progress(done, total)` called every ~10% and at the end.
  Returns:
    [N, H, W, C] uint8, C = 1 if every image is grayscale, else 3.
  Raises:
    InputError: a file that is not a readable PNG/JPEG image, or two sizes without
      `image_size` (naming both files).
  """
  if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
    raise InputError(f"image_size must be a positive int, got {image_size!r}")
  arrays, first = [], None
  every = max(1, len(ids) // 10)
  for count, id_ in enumerate(ids, 1):
    path = os.path.join(directory, id_)
    array, size = _open(path, image_size)
    if image_size is None:
      if first is None:
        first = (path, size)
      elif size != first[1]:
        raise InputError(f"{path} is {size[0]}x{size[1]} (width x height) but {first[0]} is "
                         f"{first[1][0]}x{first[1][1]}: the images differ in size; resize them "
                         "all with --image_size S")
    arrays.append(array[..., None] if array.ndim == 2 else array)
    if progress is not None and (count % every == 0 or count == len(ids)):
      progress(count, len(ids))
  if any(a.shape[-1] == 3 for a in arrays):
    arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
  return np.stack(arrays)


def image_indices(labels: Labels, ids: Sequence[str], *, directory="DIR") -> np.ndarray:
  """The ids of `labels` (paths relative to the image folder) as indices into `ids`.

  "./a/b.png" and "a//b.png" mean "a/b.png".

  Returns:
    [L] int64 indices into `ids`, in file order.
  Raises:
    InputError: an id that is no image of the folder (with a close match if there is one), or
      an image labelled twice.
  """
  index = {id_: i for i, id_ in enumerate(ids)}

  def lookup(id_, line):
    normal = posixpath.normpath(id_)
    if normal not in index:
      close = difflib.get_close_matches(normal, ids, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise InputError(f"{labels.path} line {line}: id {id_!r} is not an image file in "
                       f"{directory} ({len(ids)} found){hint}")
    return index[normal]

  return _indices(labels, lookup)


def classes(labels: Labels) -> Tuple[List[str], np.ndarray]:
  """The class names in sorted order and each row's class index.

  Returns:
    (names [C], [L] int32 indices into names).
  Raises:
    InputError: fewer than two classes (a classifier cannot be trained).
  """
  names = sorted(set(labels.labels))
  if len(names) < 2:
    found = f"only the class {names[0]!r}" if names else "no labelled rows"
    raise InputError(f"{labels.path}: {found}; training a classifier needs labelled examples of "
                     "at least two classes")
  position = {name: i for i, name in enumerate(names)}
  return names, np.asarray([position[label] for label in labels.labels], np.int32)


def load_features(path) -> np.ndarray:
  """FEATURES: a `.npy` [N, D] array, or a `.npz` holding one as `features`.

  Returns:
    [N, D] float32.
  Raises:
    InputError: a missing or unreadable file, no `features` array, a rank other than 2, a
      non-numeric dtype, fewer than 2 rows, or NaN/inf (naming the first bad rows).
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      loaded = np.load(f, allow_pickle=False)
      if isinstance(loaded, np.lib.npyio.NpzFile):
        if "features" not in loaded.files:
          raise InputError(f"{path}: no 'features' array in the .npz (found "
                           f"{sorted(loaded.files)}); save it with np.savez(path, "
                           "features=...)")
        loaded = loaded["features"]
  except FileNotFoundError:
    raise InputError(f"{path}: no such features file") from None
  except InputError:
    raise
  except (OSError, ValueError, EOFError) as err:
    raise InputError(f"{path}: not a readable .npy/.npz array ({err})") from None
  if loaded.ndim != 2:
    raise InputError(f"{path}: features must be [N, D] (rank 2), got shape {loaded.shape}")
  if not (np.issubdtype(loaded.dtype, np.floating) or np.issubdtype(loaded.dtype, np.integer)):
    raise InputError(f"{path}: features must be numbers, got dtype {loaded.dtype}")
  if loaded.shape[0] < 2 or loaded.shape[1] < 1:
    raise InputError(f"{path}: need at least 2 rows and 1 column, got shape {loaded.shape}")
  features = loaded.astype(np.float32)
  bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
  if bad.size:
    raise InputError(f"{path}: NaN or inf in {bad.size} row(s), first at rows "
                     f"{bad[:5].tolist()}")
  return features
