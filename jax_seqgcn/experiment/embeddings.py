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
resumed run leaves the same files as an uninterrupted one.
"""

import os
import pathlib
import re
import zipfile
from typing import Dict, List, NamedTuple, Tuple

import numpy as np

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
