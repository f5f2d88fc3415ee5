"""Image folders too large for memory: a header scan, batches decoded ahead, arrays on disk.

`jax-seqgcn select --images` needs every image of the pool once, for the learner's eval pass,
and keeps only what the sampler reads of it (embeddings, probabilities: kilobytes per image
less than the pixels). So it never holds the folder:

* `scan_images(directory, ids)`: every file's header (format, size, mode; no pixel data) gives
  the folder's image shape [H, W, C] and refuses a non-image file or mixed sizes up front, with
  `folder.read_images`'s words. C = 3 if any image reads as RGB, as `read_images` converts.
* `decode_images(directory, ids, shape)`: some images as `read_images` would give them in that
  folder (grayscale repeated into RGB where C = 3).
* `prefetch(load, num, batch_size)`: the batches [start, start + batch_size) of `num` items,
  `load(start, stop)` running in a small thread pool (`DECODE_WORKERS`) at most
  `PREFETCH_BATCHES` batches ahead of the consumer, so at most PREFETCH_BATCHES + 1 batches are
  decoded at any time, and stopping the workers when the consumer stops or fails.
* `ArrayStore(parent)`: where a streamed pass writes its [N, ...] results: plain arrays, or
  memory-mapped `.npy` files (`numpy.lib.format.open_memmap`) in a hidden temporary folder
  under `parent` for an array over `MEMMAP_BYTES`; the folder is removed when the store closes,
  on error too.
* `RowView(array, index)`: rows of an [N, ...] array (a memory-mapped `.npz` member,
  `data.npz`) read only when asked for, a split of the pool without a copy; each gather gives
  the mapped pages back (`release_pages`).

Why threads and PIL rather than tf.data: decoding is Pillow's C code, which releases the GIL, so
a few threads decode in parallel; the images are checked and converted exactly as
`folder.read_images` does (same errors, same pixels, so the same picks), and the workers stop
with the consumer. tf.data would decode with TensorFlow's own PNG/JPEG decoders (other
conversions, other error words) and load TensorFlow, which `select` does not import otherwise
(+565 MiB of peak RSS measured: docs/streamed_pools.md).
"""

import collections
import concurrent.futures
import contextlib
import mmap
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from jax_seqgcn.data import folder
from jax_seqgcn.data.folder import InputError

# An `ArrayStore` array larger than this many bytes is a memory-mapped .npy file.
MEMMAP_BYTES = 256 * 2 ** 20
# Threads decoding batches, and how many batches they may decode ahead of the consumer.
DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))
PREFETCH_BATCHES = 2


def check_image_size(image_size) -> None:
  """InputError unless `image_size` is None or a positive int (not a bool)."""
  if image_size is not None and (isinstance(image_size, bool) or
                                 not isinstance(image_size, int) or image_size < 1):
    raise InputError(f"image_size must be a positive int, got {image_size!r}")


def scan_images(directory, ids: Sequence[str], *, image_size: Optional[int] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> Tuple[int, int, int]:
  """The shape every image of the folder is read with, from the files' headers alone.

  Args:
    directory: the image folder.
    ids: [N] relative paths (e.g. `folder.list_images`), N >= 1.
    image_size: None (all images must have one size) or S: each is resized to S x S.
    progress: optional `progress(done, total)` called every ~10% and at the end.
  Returns:
    (H, W, C): C = 1 if every image reads as grayscale, else 3.
  Raises:
    InputError: a file that is not a PNG/JPEG image (by its header), or two sizes without
      `image_size` (naming both files). Broken pixel data behind a good header is found only
      when the image is decoded (`decode_images`).
  """
  check_image_size(image_size)
  first, channels = None, 1
  every = max(1, len(ids) // 10)
  for count, id_ in enumerate(ids, 1):
    path = os.path.join(directory, id_)
    size, image_channels = folder.image_header(path)
    channels = max(channels, image_channels)
    if image_size is None:
      first = folder.check_same_size(path, size, first)
    if progress is not None and (count % every == 0 or count == len(ids)):
      progress(count, len(ids))
  if image_size is not None:
    return image_size, image_size, channels
  width, height = first[1]
  return height, width, channels


def decode_images(directory, ids: Sequence[str], shape: Tuple[int, int, int], *,
                  image_size: Optional[int] = None) -> np.ndarray:
  """The images `ids` of a folder whose images read as `shape` (`scan_images`).

  Args:
    directory: the image folder.
    ids: [n] relative paths.
    shape: (H, W, C) of `scan_images(directory, all ids, image_size=image_size)`.
    image_size: as given to `scan_images`.
  Returns:
    [n, H, W, C] uint8, equal to those rows of `folder.read_images(directory, all ids,
    image_size=image_size)`.
  Raises:
    InputError: a file that is not a readable PNG/JPEG image, or one that no longer has the
      scanned size or channels (changed since the scan).
  """
  out = np.empty((len(ids),) + tuple(shape), np.uint8)
  for row, id_ in enumerate(ids):
    path = os.path.join(directory, id_)
    array, _ = folder.open_image(path, image_size)
    array = array[..., None] if array.ndim == 2 else array
    if array.shape[-1] == 1 and shape[-1] == 3:
      array = np.repeat(array, 3, axis=-1)
    if array.shape != tuple(shape):
      raise InputError(f"{path}: reads as {'x'.join(map(str, array.shape))}, not "
                       f"{'x'.join(map(str, shape))} as when the folder was scanned; did it "
                       "change meanwhile?")
    out[row] = array
  return out


def prefetch(load: Callable[[int, int], np.ndarray], num: int, batch_size: int, *,
             workers: Optional[int] = None,
             ahead: Optional[int] = None) -> Iterator[Tuple[int, np.ndarray]]:
  """(start, load(start, stop)) for the batches [start, stop) of `num` items, in order.

  Each `load` runs in a thread pool of `workers` (default `DECODE_WORKERS`) threads, at most
  `ahead` (default `PREFETCH_BATCHES`) batches beyond the one the consumer holds. Nothing runs
  until the first batch is asked for. An error in `load` is raised by the iteration, as is;
  when the consumer stops (an error, `close()`), batches not started are cancelled and the
  ones running are waited for, so no thread outlives the iteration.

  Args:
    load: `load(start, stop)` -> the batch of items [start, stop) (e.g. `decode_images`).
    num: number of items.
    batch_size: items per batch (the last may have fewer).
    workers: threads.
    ahead: batches started beyond the one being consumed, >= 1.
  """
  workers = DECODE_WORKERS if workers is None else workers
  ahead = PREFETCH_BATCHES if ahead is None else ahead
  if batch_size < 1 or workers < 1 or ahead < 1:
    raise ValueError(f"batch_size {batch_size}, workers {workers} and ahead {ahead} must be "
                     ">= 1")
  starts = iter(range(0, num, batch_size))
  executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode")
  pending = collections.deque()

  def submit():
    start = next(starts, None)
    if start is not None:
      pending.append((start, executor.submit(load, start, min(start + batch_size, num))))

  try:
    for _ in range(ahead):
      submit()
    while pending:
      start, future = pending.popleft()
      batch = future.result()
      submit()
      yield start, batch
      del batch  # not held while the next one is waited for
  finally:
    executor.shutdown(wait=True, cancel_futures=True)


class ArrayStore(contextlib.AbstractContextManager):
  """The [N, ...] arrays of a streamed pass: in memory, or memory-mapped files when large.

  An array over `memmap_bytes` is a `.npy` file opened with `numpy.lib.format.open_memmap`, in
  a hidden folder `parent/.pool-arrays-*` created on the first such array; closing the store
  (leaving its `with` block, on error too) removes the folder. The arrays must not be used
  after that.

  Args:
    parent: the folder to put the temporary folder in (created if missing).
    memmap_bytes: the size above which an array goes to a file; None: `MEMMAP_BYTES` as it is
      when the store is made (0: every array).
  """

  def __init__(self, parent, memmap_bytes: Optional[int] = None):
    self.parent = pathlib.Path(parent)
    self.memmap_bytes = MEMMAP_BYTES if memmap_bytes is None else int(memmap_bytes)
    self.folder: Optional[pathlib.Path] = None
    self.files: Dict[str, pathlib.Path] = {}

  def allocate(self, name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
    """A new uninitialised array `name` ([N, ...] `dtype`): an `np.ndarray` or `np.memmap`."""
    if name in self.files:
      raise ValueError(f"array {name!r} is already allocated")
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes <= self.memmap_bytes:
      return np.empty(shape, dtype)
    if self.folder is None:
      self.parent.mkdir(parents=True, exist_ok=True)
      self.folder = pathlib.Path(tempfile.mkdtemp(prefix=".pool-arrays-", dir=self.parent))
    path = self.folder / f"{name}.npy"
    self.files[name] = path
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))

  def close(self) -> None:
    """Removes the temporary folder and its files (if any)."""
    if self.folder is not None:
      shutil.rmtree(self.folder, ignore_errors=True)
      self.folder = None

  def __exit__(self, *exc_info) -> None:
    self.close()


def release_pages(array) -> None:
  """Drops the pages of `array`'s memory map (an `np.memmap` or a view of one) from this
  process's resident memory: `madvise(MADV_DONTNEED)` on a read-only shared file mapping, whose
  pages are clean and are read again from the page cache when touched. A no-op for any other
  array, or where the platform has no such advice."""
  mapping = getattr(array, "_mmap", None)
  advice = getattr(mmap, "MADV_DONTNEED", None)
  if mapping is not None and advice is not None:
    try:
      mapping.madvise(advice)
    except (OSError, ValueError):  # closed, or not supported here: the pages just stay
      pass


class RowView:
  """Rows of an [N, ...] array read only when asked for: a memory-mapped pool, or a split of one,
  without copying it.

  `view[ints]` (or `view[bool mask]`) gathers those rows into a new NumPy array, equal to
  `np.asarray(view)[ints]`, reading only them, then gives the mapped pages back
  (`release_pages`), so the process holds the gathered rows and not the file pages read for
  them; `view[a:b]` is another `RowView`, `view[i]` one row. The eval passes
  (`training.inference`: the class attribute `lazy_rows`) and `augment.preprocess_all` read
  their batches this way, and the training gathers its labelled rows. `np.asarray(view)` (and
  any other key, e.g. `view[..., 0]`) reads every row: a full copy, for tests and small pools.

  Attributes:
    array: the [N, ...] array (an `np.memmap`).
    index: None (every row of `array`) or [M] int64 row numbers into `array`.
  """
  lazy_rows = True

  def __init__(self, array: np.ndarray, index=None):
    self.array = array
    self.index = None if index is None else np.asarray(index, np.int64).reshape(-1)

  def __len__(self) -> int:
    return len(self.array) if self.index is None else len(self.index)

  @property
  def shape(self) -> Tuple[int, ...]:
    return (len(self),) + tuple(self.array.shape[1:])

  @property
  def dtype(self) -> np.dtype:
    return self.array.dtype

  @property
  def ndim(self) -> int:
    return self.array.ndim

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

  def __getitem__(self, key):
    if isinstance(key, slice):
      return (RowView(self.array[key]) if self.index is None
              else RowView(self.array, self.index[key]))
    if isinstance(key, tuple) or key is Ellipsis:
      return np.asarray(self)[key]
    rows = np.asarray(key)
    if not (np.issubdtype(rows.dtype, np.integer) or rows.dtype == bool):
      raise IndexError(f"RowView rows must be ints, a bool mask or a slice, got {rows.dtype}")
    rows = rows if self.index is None else self.index[rows]
    out = np.array(self.array[rows])  # a plain in-memory copy of those rows alone
    release_pages(self.array)
    return out

  def __array__(self, dtype=None, copy=None):  # pylint: disable=unused-argument
    out = self[np.arange(len(self))]
    return out if dtype is None else out.astype(dtype, copy=False)

  def __repr__(self) -> str:
    return (f"RowView({'x'.join(map(str, self.shape))} {self.dtype}, of "
            f"{type(self.array).__name__} {'x'.join(map(str, self.array.shape))})")
