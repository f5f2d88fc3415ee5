"""Own data on disk: a labels CSV and a folder of image files, read and checked before any work.

* `read_labels(path)`: a CSV with the header `id,label` (further columns are ignored); one row
  per labelled example. Labels are any non-empty strings (class names) without line breaks: a
  row that runs over several lines (a quoted field with a line break, usually an unclosed quote
  that would swallow the rows after it) is refused, naming its first line.
* `row_indices(labels, num_rows)`: the ids as row indices of a features array.
* `list_images(directory)` / `read_images(directory, ids)`: every PNG or JPEG file under
  `directory` (any depth), ids being paths relative to it with "/" separators, sorted. Hidden
  files and folders (names starting with ".") are skipped; any other file must be a readable
  PNG or JPEG image, so a stray or broken file is an error rather than silently left out. A
  file that is not a regular file (a named pipe, a device, a socket, a broken link) is refused
  too, checked with `os.stat` and never opened (reading a named pipe would wait forever).
  Grayscale images give one channel; if any image is RGB (or has a palette), every image is
  converted to RGB (grayscale repeated, alpha dropped). Sizes must agree unless `image_size`
  resizes every image to image_size x image_size (bilinear, aspect ratio not kept).
  `image_header` (size and channels, no pixels) and `open_image` (one image) let a folder too
  large for memory be read in batches instead (`data.stream`).
* `image_indices(labels, ids)`: the ids as indices into the image list.
* `classes(labels)`: class names in sorted order and [L] int32 class indices.
* `load_features(path)`: a `.npy` [N, D] array (or `.npz` with `features`), finite.

Every input file is opened with `open_regular`: anything but a regular file (or a link to one)
is refused before a byte is read. Every problem is an `InputError` naming the file and, for the
CSV, the line.
"""

import contextlib
import csv
import difflib
import os
import pathlib
import posixpath
import re
import stat
import zipfile
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

HEADER = ("id", "label")
# Pillow's names of the formats we read; MPO is the JPEG variant many cameras write.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")
_GRAY_MODES = ("1", "L", "LA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
_ROW_INDEX = re.compile(r"[0-9]+")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


class InputError(ValueError):
  """Bad input files (named in the message, with the line where it applies); nothing is done."""


def file_kind(mode: int) -> str:
  """What an `os.stat` mode is, in words ("a regular file", "a named pipe", ...)."""
  for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                     (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
    if test(mode):
      return kind
  return "not a regular file"


def _not_regular(path, mode: int, hint: str) -> InputError:
  return InputError(f"{os.fspath(path)}: {file_kind(mode)}, not a regular file (never opened: "
                    f"reading a named pipe or a device can wait forever); {hint}")


def check_regular(path, hint: str) -> None:
  """InputError (ending with `hint`) unless `path` is a regular file or a link to one.

  Looks with `os.stat`, never opens.
  """
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    kind = "a broken symbolic link" if os.path.islink(path) else "gone (removed meanwhile?)"
    raise InputError(f"{os.fspath(path)}: {kind}; {hint}") from None
  if not stat.S_ISREG(mode):
    raise _not_regular(path, mode, hint)


def open_regular(path, mode: str = "rb", *, what: str = "input file", **kwargs):
  """`open(path, mode, **kwargs)` for reading, refusing anything but a regular file.

  The file is opened non-blocking (so a named pipe cannot hang the open) and checked with
  `fstat` before a byte is read; `what` names it in the error ("labels CSV").

  Raises:
    InputError: `path` is a named pipe, device, socket or folder.
    OSError: as `open` (FileNotFoundError for a missing file).
  """
  def opener(name, flags):
    fd = os.open(name, flags | getattr(os, "O_NONBLOCK", 0))
    try:
      file_mode = os.fstat(fd).st_mode
    except BaseException:
      os.close(fd)
      raise
    if not stat.S_ISREG(file_mode):
      os.close(fd)
      raise _not_regular(path, file_mode, f"the {what} must be a regular file")
    return fd

  return open(path, mode, opener=opener, **kwargs)  # pylint: disable=unspecified-encoding


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
    InputError: missing file or not a regular file, undecodable text, a header that does not
      start with `id,label`, a row with fewer than two fields or an empty id or label, a row
      over several lines (a field with a line break: usually an unclosed quote, which would
      swallow the rows after it into one field), naming the line.
  """
  path = os.fspath(path)
  try:
    with open_regular(path, "r", what="labels CSV", newline="", encoding="utf-8-sig") as f:
      rows = _csv_rows(path, f)
  except FileNotFoundError:
    raise InputError(f"{path}: no such labels file") from None
  except InputError:
    raise
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


def _csv_rows(path: str, f) -> List[Tuple[int, List[str]]]:
  """(line, fields) per CSV row; InputError for a row the csv module merged over lines."""
  reader = csv.reader(f)
  rows, previous = [], 0
  for row in reader:
    first = previous + 1
    if reader.line_num > first or any("\n" in field or "\r" in field for field in row):
      raise InputError(f"{path} line {first}: a quoted field runs over lines {first}-"
                       f"{reader.line_num} (an unclosed quote?); ids and labels cannot hold line "
                       "breaks: close the quote or remove it")
    rows.append((reader.line_num, row))
    previous = reader.line_num
  return rows


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
    InputError: `directory` is not a folder, holds no files, or holds something that is not a
      regular file (a named pipe, a device, a socket, a broken link: never opened).
  """
  root = pathlib.Path(directory)
  if not root.is_dir():
    raise InputError(f"{directory}: no such image folder")
  excluded = [pathlib.Path(os.path.abspath(e)) for e in exclude if e is not None]
  found = []
  for folder, subfolders, files in os.walk(root):
    here = pathlib.Path(os.path.abspath(folder))
    subfolders[:] = [d for d in subfolders if not _skipped(here / d, excluded)]
    for name in files:
      if _skipped(here / name, excluded):
        continue
      path = pathlib.Path(folder) / name
      check_regular(path, "every file in the image folder must be a PNG or JPEG image "
                          "(hidden files aside): move it out")
      found.append(path.relative_to(root).as_posix())
  if not found:
    raise InputError(f"{directory}: no image files found (PNG or JPEG, any folder depth)")
  return sorted(found)


@contextlib.contextmanager
def _pil_image(path: str):
  """The PIL image of `path`, opened lazily (header read); InputError for anything else."""
  from PIL import Image  # pylint: disable=g-import-not-at-top (only this module needs Pillow)
  try:
    with open_regular(path, "rb", what="PNG or JPEG image") as f, Image.open(f) as image:
      if image.format not in IMAGE_FORMATS:
        raise InputError(f"{path}: a {image.format} image; only PNG and JPEG files are read "
                         "(convert it, or move it out of the folder)")
      yield image
  except InputError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
    raise InputError(f"{path}: not a readable PNG or JPEG image ({err}); every file in the "
                     "image folder must be one (hidden files aside): move others out") from None


def _channels(mode: str) -> int:
  """1 for the PIL modes read as grayscale, 3 for the others (read as RGB)."""
  return 1 if mode in _GRAY_MODES or mode in _SIXTEEN_BIT_MODES else 3


def open_image(path: str, image_size: Optional[int]) -> Tuple[np.ndarray, Tuple[int, int]]:
  """(image as an [H, W] or [H, W, 3] uint8 array, (width, height) as stored).

  Resized to image_size x image_size unless None; InputError if it is not a PNG/JPEG image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with _pil_image(path) as image:  # its errors (the pixel data's too) become InputError
    image.load()
    size = image.size
    if image.mode in _SIXTEEN_BIT_MODES:  # 16-bit grayscale PNG: keep the high byte
      image = Image.fromarray((np.asarray(image, np.uint32) >> 8).clip(0, 255)
                              .astype(np.uint8))
    image = image.convert("L" if image.mode in _GRAY_MODES else "RGB")
    if image_size is not None:
      image = image.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
    return np.asarray(image, np.uint8), size


def image_header(path) -> Tuple[Tuple[int, int], int]:
  """((width, height) as stored, channels it is read with: 1 or 3), from the header alone.

  Reads the file's first bytes only (no pixel data), so broken pixel data is found when the
  image is decoded (`open_image`), not here.

  Raises:
    InputError: not a regular file, or not a PNG/JPEG image.
  """
  with _pil_image(os.fspath(path)) as image:
    return image.size, _channels(image.mode)


def check_same_size(path, size: Tuple[int, int], first) -> Tuple[str, Tuple[int, int]]:
  """`first` (path, (width, height)) of a folder read without `image_size`, or `(path, size)`
  when `first` is None; InputError naming both files when `size` differs from it."""
  if first is None:
    return os.fspath(path), size
  if size != first[1]:
    raise InputError(f"{os.fspath(path)} is {size[0]}x{size[1]} (width x height) but {first[0]} "
                     f"is {first[1][0]}x{first[1][1]}: the images differ in size; resize them "
                     "all with --image_size S")
  return first


def read_images(directory, ids: Sequence[str], *, image_size: Optional[int] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
  """Decodes the images `ids` (paths relative to `directory`) into one array.

  Holds every image in memory: for a folder that may not fit, `data.stream` reads the headers
  (`scan_images`) and decodes batches (`decode_images`) instead.

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
    array, size = open_image(path, image_size)
    if image_size is None:
      first = check_same_size(path, size, first)
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
    InputError: a missing or unreadable file, not a regular file, not a .npy/.npz file (by its
      first bytes), an object array, no `features` array, a rank other than 2, a non-numeric
      dtype, fewer than 2 rows, or NaN/inf (naming the first bad rows).
  """
  path = os.fspath(path)
  try:
    with open_regular(path, "rb", what="features file") as f:
      head = f.read(16)  # the magic, and enough to show what the file is instead
      f.seek(0)
      if not head.startswith(_NPY_MAGIC) and not head.startswith(_ZIP_MAGIC):
        found = "an empty file" if not head else f"it starts with {head!r}"
        raise InputError(f"{path}: not a NumPy .npy or .npz file ({found}); save the features "
                         "with np.save(path, array) or np.savez(path, features=array)")
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
  except ValueError as err:
    if "pickle" in str(err):  # numpy's words for an object array
      raise InputError(f"{path}: an array of Python objects (dtype object, stored pickled), "
                       "which is never loaded; save a numeric [N, D] array") from None
    raise InputError(f"{path}: not a readable .npy/.npz array ({err})") from None
  except (OSError, EOFError, zipfile.BadZipFile) as err:
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
