"""What the sampler saw at each selection, saved for later inspection (`config.al.save_embeddings`).

One compressed npz per trial and selection cycle, `workdir/embeddings/trial{t}_cycle{c}.npz`,
where `c` is the 0-based cycle of `results.jsonl` and `labelled/trial{t}_cycle{c}.npy`: the
selection made after training on that cycle's labelled set (the last cycle selects nothing, so it
has no file). With M = subset + labelled nodes, in the node order the sampler saw (the unlabelled
subset first, then the labelled set):

  ids         [M] int64     dataset (training split) index of each node
  embeddings  [M, D] float16  the learner's embedding of each node (eval mode)
  labelled    [M] bool      the node was labelled in this cycle
  picked      [budget] int64  the picks as positions into `ids`, in the sampler's order
                            (their dataset indices are `ids[picked]`)

So `labelled/trial{t}_cycle{c+1}.npy` equals `ids[labelled]` followed by `ids[picked]`.
The files are written atomically and byte-for-byte deterministically (fixed zip timestamps), so a
resumed run leaves the same files as an uninterrupted one. `selection_problem` says why a saved
file is unusable (missing, damaged or stale), for the loop's repair of a resumed workdir.

`stream_pool` computes the sampler's pool of images that do not fit in memory together
(`jax-seqgcn select --images`): `cycle.embed_pool`'s fields from batches of images, keeping only
the [N, ...] fields the sampler needs (see docs/streamed_pools.md).
"""

import contextlib
import os
import pathlib
import re
import time
import zipfile
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import jax
import numpy as np

from jax_seqgcn import samplers
from jax_seqgcn.data import stream as stream_lib
from jax_seqgcn.experiment import cycle
from jax_seqgcn.training import augment
from jax_seqgcn.training import inference

DIRECTORY = "embeddings"
_NAME = re.compile(r"trial(\d+)_cycle(\d+)\.npz")
# Zip entries get this timestamp instead of "now", so equal arrays give equal files.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class Selection(NamedTuple):
  """One saved selection (see the module docstring for the fields)."""
  ids: np.ndarray
  embeddings: np.ndarray
  labelled: np.ndarray
  picked: np.ndarray


def path(workdir, trial: int, cycle: int) -> pathlib.Path:
  """`workdir/embeddings/trial{trial}_cycle{cycle}.npz` (0-based trial and cycle)."""
  return pathlib.Path(workdir) / DIRECTORY / f"trial{trial}_cycle{cycle}.npz"


def save(file, ids, embeddings, labelled_mask, picked) -> None:
  """Writes one selection atomically, compressed, with deterministic bytes.

  Args:
    file: destination path (its directory is created).
    ids: [M] int dataset indices of the nodes.
    embeddings: [M, D] float learner embeddings (stored as float16).
    labelled_mask: [M] bool.
    picked: [budget] int positions into `ids`.
  """
  ids, embeddings = np.asarray(ids, np.int64), np.asarray(embeddings)
  labelled_mask, picked = np.asarray(labelled_mask, bool), np.asarray(picked, np.int64)
  m = len(ids)
  if embeddings.ndim != 2 or len(embeddings) != m or labelled_mask.shape != (m,):
    raise ValueError(f"ids {ids.shape}, embeddings {embeddings.shape} and labelled "
                     f"{labelled_mask.shape} must describe the same [M] nodes")
  if picked.ndim != 1 or np.any((picked < 0) | (picked >= m)) or labelled_mask[picked].any():
    raise ValueError("picked must be positions of unlabelled nodes")
  arrays = {"ids": ids, "embeddings": embeddings.astype(np.float16),
            "labelled": labelled_mask, "picked": picked}
  file = pathlib.Path(file)
  file.parent.mkdir(parents=True, exist_ok=True)
  tmp = file.with_name(file.name + ".tmp")
  with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    for name, array in arrays.items():
      info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_TIME)
      info.compress_type = zipfile.ZIP_DEFLATED
      with archive.open(info, "w", force_zip64=True) as handle:
        np.lib.format.write_array(handle, array, allow_pickle=False)
  os.replace(tmp, file)


def load(file) -> Selection:
  """Reads one file written by `save`."""
  with np.load(file, allow_pickle=False) as npz:
    return Selection(*(npz[name] for name in Selection._fields))


def saved(workdir) -> Dict[int, List[int]]:
  """{trial: sorted cycles} of the selections saved in `workdir` (empty when none)."""
  out: Dict[int, List[int]] = {}
  directory = pathlib.Path(workdir) / DIRECTORY
  if directory.is_dir():
    for entry in directory.iterdir():
      match = _NAME.fullmatch(entry.name)
      if match:
        out.setdefault(int(match[1]), []).append(int(match[2]))
  return {trial: sorted(cycles) for trial, cycles in sorted(out.items())}


def split_nodes(selection: Selection) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Boolean masks [M] of the unlabelled-not-picked, labelled and picked nodes."""
  picked = np.zeros(len(selection.ids), bool)
  picked[selection.picked] = True
  return ~selection.labelled & ~picked, selection.labelled.copy(), picked


def stream_fields(setup: cycle.CycleSetup) -> Tuple[List[str], bool]:
  """(the eval pass's fields a streamed pass keeps, whether it keeps preprocessed images).

  `cycle.FORWARD_FIELDS` the sampler needs, with `features` also for `mc_probabilities`;
  none and False for a sampler that needs neither (Random): its pool costs no pass.
  """
  needs = setup.sampler.needs
  keep = [k for k in cycle.FORWARD_FIELDS
          if k in needs or (k == "features" and "mc_probabilities" in needs)]
  return keep, "images" in needs


def _batch_rows(setup: cycle.CycleSetup, state, images, keep: List[str]) -> Dict[str, np.ndarray]:
  """One batch's rows of the kept fields; "logits" [b, C] in place of the probabilities.

  The eval pass of `training.forward_pool`, without its softmax: that is taken over all N
  logits at once (`stream_pool`), because XLA's softmax of [b, C] and of [N, C] can differ in
  the last bit of a row.
  """
  with_losses = state.loss_net_params is not None
  if "predicted_losses" in keep and not with_losses:
    raise ValueError(f"sampler {setup.sampler.name} needs predicted losses: a learner trained "
                     "with a LossNet (its `training_kwargs`)")
  if "probabilities" in keep and setup.task != "classification":
    raise ValueError(f"sampler {setup.sampler.name} needs class probabilities: a "
                     "classification learner")
  # forward_pool's own pass, before its softmax.
  logits, embedding, *losses = inference.forward_outputs(
      state, setup.model, images, None, batch_size=setup.eval_batch_size,
      preprocessing=setup.preprocessing, mesh=setup.mesh, with_losses=with_losses,
      compute_dtype=setup.compute_dtype)
  rows = {"features": embedding, "logits": logits,
          "predicted_losses": losses[0].astype(np.float32) if losses else None}
  return {name: rows[name] for name in ("features", "logits", "predicted_losses")
          if (name == "logits" and "probabilities" in keep) or name in keep}


def stream_pool(setup: cycle.CycleSetup, state, batches: Iterable[Tuple[int, np.ndarray]],
                labelled_mask, *, allocate: Optional[Callable[..., np.ndarray]] = None,
                key: Optional[jax.Array] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> samplers.Pool:
  """`cycle.embed_pool` of N images given in batches: never more than a batch on the device.

  Each batch goes through the learner's eval pass by itself; as long as every batch but the
  last holds a multiple of `setup.eval_batch_size` images, the pass's device batches (the last
  one's padding too) are exactly those of `cycle.embed_pool` on all N images in that order,
  and the softmax is taken over all N logits at once as there, so the fields are equal, bit for
  bit. Only the fields the sampler needs are written, row by row, into arrays from `allocate`
  (e.g. a `data.stream.ArrayStore`'s, memory-mapped when large): [N, D] features, [N, C]
  logits then probabilities, [N] predicted losses, [N, H, W, C] float32 preprocessed images.

  Args:
    setup: the cycle's setup (its sampler decides the fields, `stream_fields`).
    state: the trained learner.
    batches: (start, [b, H, W, C] raw images of nodes start..start+b-1) in node order, covering
      the N nodes once (e.g. `data.stream.prefetch`); not iterated at all when the sampler
      needs no field.
    labelled_mask: [N] bool, True for the labelled nodes.
    allocate: `allocate(name, shape, dtype)` -> a writable array; None: `np.empty`.
    key: as `cycle.embed_pool` (the MC-dropout passes of BALD, from all N embeddings at once).
    progress: optional `progress(done, N)` after every batch.
  Returns:
    The `samplers.Pool`, its fields as `cycle.embed_pool` gives them.
  Raises:
    ValueError: batches that do not cover the N nodes in order in multiples of the eval
      batch; as `cycle.embed_pool`, a sampler needing MC-dropout predictions without dropout.
  """
  labelled_mask = np.asarray(labelled_mask, bool)
  num_nodes = len(labelled_mask)
  keep, with_images = stream_fields(setup)
  if "mc_probabilities" in setup.sampler.needs:
    cycle.mc_dropout_rate(setup, key)  # before the pass, not after it
  if not keep and not with_images:
    return samplers.Pool(labelled_mask)
  allocate = allocate or (lambda name, shape, dtype: np.empty(shape, dtype))
  fields: Dict[str, np.ndarray] = {}
  done = 0
  for start, images in batches:
    if start != done or (done and done % setup.eval_batch_size):
      raise ValueError(f"a batch starts at node {start} after {done} nodes; batches must "
                       f"cover the nodes in order, all but the last a multiple of "
                       f"{setup.eval_batch_size} images")
    rows = _batch_rows(setup, state, images, keep) if keep else {}
    if with_images:
      rows["images"] = augment.preprocess_all(images, np.arange(len(images)),
                                              setup.preprocessing)
    for name, values in rows.items():
      if name not in fields:
        fields[name] = allocate(name, (num_nodes,) + values.shape[1:], values.dtype)
      fields[name][start:start + len(images)] = values
    done = start + len(images)
    del images, rows  # the batch is not held while the next one is decoded
    if progress is not None:
      progress(done, num_nodes)
  if done != num_nodes:
    raise ValueError(f"the batches held {done} images for {num_nodes} nodes")
  if "logits" in fields:  # as training.forward_pool, over all N rows
    logits = fields.pop("logits")
    fields["probabilities"] = allocate("probabilities", logits.shape, np.float32)
    fields["probabilities"][:] = jax.nn.softmax(np.asarray(logits, np.float32), axis=-1)
    del logits
  if "mc_probabilities" in setup.sampler.needs:
    fields["mc_probabilities"] = cycle.mc_probabilities(setup, state, fields["features"], key)
  return samplers.Pool(labelled_mask, **{k: v for k, v in fields.items()
                                          if k in setup.sampler.needs})


def folder_pool(setup: cycle.CycleSetup, state, directory, node_ids: List[str],
                shape: Tuple[int, int, int], labelled_mask, *, image_size: Optional[int] = None,
                allocate: Optional[Callable[..., np.ndarray]] = None,
                stream=None) -> samplers.Pool:
  """`stream_pool` of the images `node_ids` of a folder, decoded ahead of the pass in batches
  of `setup.eval_batch_size` by `data.stream.prefetch`'s threads.

  Args:
    setup, state: as `stream_pool`.
    directory: the image folder.
    node_ids: [N] relative paths of the nodes, in node order.
    shape: (H, W, C) of `data.stream.scan_images` on the folder.
    labelled_mask: [N] bool.
    image_size: as given to `scan_images`.
    allocate: as `stream_pool`.
    stream: where the pass says what it keeps and its progress (every ~10%, with the rate);
      None: silent.
  Raises:
    InputError: an image that cannot be decoded (found only here when its header is good).
  """
  keep, with_images = stream_fields(setup)
  total = len(node_ids)
  if stream is not None and (keep or with_images):
    print(f"embedding {total} images (keeping {', '.join(keep + ['images'] * with_images)})",
          file=stream, flush=True)
  every, start = max(1, total // 10), time.perf_counter()

  def progress(done, _):
    if stream is not None and (done % every < setup.eval_batch_size or done == total):
      seconds = time.perf_counter() - start
      print(f"embedding: {done}/{total} images, {seconds:.0f} s ({done / max(seconds, 1e-9):.0f}"
            " images/s)", file=stream, flush=True)

  def load(first, stop):
    return stream_lib.decode_images(directory, node_ids[first:stop], shape,
                                    image_size=image_size)

  batches = stream_lib.prefetch(load, total, setup.eval_batch_size)
  with contextlib.closing(batches):
    return stream_pool(setup, state, batches, labelled_mask, allocate=allocate,
                       progress=progress)


def selection_problem(path: pathlib.Path, before, after) -> Optional[str]:
  """Why a saved selection is unusable: "missing", "damaged" (unreadable or inconsistent
  arrays) or "stale" (its labelled set or picks are not the checkpoint's: `before`, the
  cycle's labelled set, and `after`, the next one; None where unknown); None when it is good."""
  if not path.exists():
    return "missing"
  try:
    saved = load(path)  # reads every array: a truncated zip fails here
    m = len(saved.ids)
    good = (saved.ids.ndim == 1 and saved.embeddings.shape[:1] == (m,)
            and saved.embeddings.ndim == 2 and saved.labelled.shape == (m,)
            and saved.labelled.dtype == bool and saved.picked.ndim == 1
            and bool(np.all((saved.picked >= 0) & (saved.picked < m))))
  except Exception:  # pylint: disable=broad-except  (zip, npy and key errors)
    return "damaged"
  if not good:
    return "damaged"
  labelled = saved.ids[saved.labelled]
  if before is not None and not np.array_equal(labelled, before):
    return "stale"
  if after is not None and not np.array_equal(
      np.concatenate([labelled, saved.ids[saved.picked]]), after):
    return "stale"
  return None
