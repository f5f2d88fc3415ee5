"""An experiment's directory: one run at a time, one config, checkpoints that cannot be mixed.

* `lock(workdir)`: an exclusive, non-blocking `flock` on `workdir/.lock`, held for the whole run
  and released by the kernel however the process ends (even SIGKILL). A second run on the same
  workdir fails at once and names the holder (pid, host, start time).
* The resolved config is stored in `config.json` *and* inside every checkpoint, and a run
  resumes only when both match its own config. `al.trials` may grow (a finished run is extended
  by more trials); every other field must be equal.
* `CheckpointStore`: orbax checkpoints (the last two kept); a newest checkpoint that cannot be
  read is set aside with a warning and the previous one is used.
* `EpochStore` (`EPOCH_DIR`): the latest epoch checkpoint of the running cycle (orbax, one
  kept), deleted once that cycle's checkpoint is written (`experiment.preemption`).
"""

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import shutil
import socket
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
EPOCH_DIR = "checkpoints_epoch"
# Config fields that may differ between a workdir and a run resuming it: more trials extend a
# run, and how often epoch checkpoints are saved changes no result.
EXTENSIBLE = ("al.trials", "train.checkpoint_every")
# Config fields added after workdirs were first written, with the value an older workdir (whose
# config lacks the field) ran with: such a workdir resumes under a config holding that value.
ADDED_FIELDS = {"train.compute_dtype": "float32", "al.save_embeddings": False,
                "train.checkpoint_every": 0}


class WorkdirError(RuntimeError):
  """A workdir that this run must not use (in use by another run, or holding another run)."""


@contextlib.contextmanager
def lock(workdir: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` (created if missing) for the duration of the block.

  Raises:
    WorkdirError: another process holds the lock; the message names it.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  handle = open(path, "a+")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "unknown process"
      raise WorkdirError(f"{workdir} is in use by another run ({holder}); wait for it to end "
                         "or use another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
    handle.flush()
    yield
  finally:
    handle.close()  # releases the lock


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_differences(saved: Dict[str, Any], resolved: Dict[str, Any]) -> list:
  """Dotted names of the fields that differ, except the extensible ones (a field missing from
  either config that `ADDED_FIELDS` lists counts as its default)."""
  saved_flat = {**ADDED_FIELDS, **flatten(saved)}
  resolved_flat = {**ADDED_FIELDS, **flatten(resolved)}
  return sorted(k for k in saved_flat.keys() | resolved_flat.keys()
                if k not in EXTENSIBLE and saved_flat.get(k) != resolved_flat.get(k))


def check_same_run(workdir: pathlib.Path, saved: Optional[Dict[str, Any]],
                   resolved: Dict[str, Any], source: str) -> None:
  """Raises `WorkdirError` when `saved` (read from `source`) is another run's config."""
  if saved is None:
    return
  diff = config_differences(saved, resolved)
  if diff:
    raise WorkdirError(
        f"{workdir} holds a run with a different config ({source} differs in: "
        f"{', '.join(diff)}). Use a new --workdir, or the same config to resume.")


def config_to_dict(config) -> Dict[str, Any]:
  """A config (`ml_collections.ConfigDict`) as the plain dict `config.json` and checkpoints hold."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def read_config(workdir: pathlib.Path) -> Optional[Dict[str, Any]]:
  """The `config.json` of `workdir`, or None."""
  path = workdir / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as err:
    raise WorkdirError(f"{path} cannot be read ({err}); move it away to resume from the "
                       "checkpoints, or use another --workdir") from err


def write_config(workdir: pathlib.Path, resolved: Dict[str, Any]) -> None:
  """Writes `config.json` atomically."""
  path = workdir / CONFIG_FILE
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(resolved, indent=1, sort_keys=True) + "\n")
  os.replace(tmp, path)


def encode_config(resolved: Dict[str, Any]) -> np.ndarray:
  """The config as a uint8 array, to store inside a checkpoint."""
  return np.frombuffer(json.dumps(resolved, sort_keys=True).encode(), np.uint8).copy()


def decode_config(array) -> Dict[str, Any]:
  """Inverse of `encode_config`."""
  return json.loads(np.asarray(array, np.uint8).tobytes().decode())


class CheckpointStore:
  """Orbax checkpoints of a run, with fallback past an unreadable newest step."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory.absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def save(self, step: int, tree: Dict[str, Any]) -> None:
    """Saves `tree` as `step` and waits until it is on disk."""
    self.manager.save(step, args=ocp.args.StandardSave(tree))
    self.manager.wait_until_finished()

  def restore_latest(self) -> Tuple[int, Optional[Dict[str, Any]]]:
    """(step, tree) of the newest readable checkpoint, or (-1, None) when there is none.

    A checkpoint that cannot be read is moved to `<dir>/corrupt-<step>` with a warning (so the
    step number can be written again) and the previous one is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return step, self.manager.restore(step, args=ocp.args.StandardRestore())
      except Exception as err:  # pylint: disable=broad-except
        # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors...).
        target = self.directory / f"corrupt-{step}"
        warnings.warn(f"checkpoint {self.directory / str(step)} cannot be read "
                      f"({type(err).__name__}: {err}); moved to {target}, using the previous "
                      "checkpoint", RuntimeWarning)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(self.directory / str(step)), str(target))
        self.manager.reload()
    return -1, None

  def close(self) -> None:
    self.manager.close()


class EpochStore:
  """The latest epoch checkpoint of the running cycle: one orbax step (the epoch), one kept.

  Orbax writes a step to a temporary directory and renames it when complete, so a kill leaves
  either the previous checkpoint or the new one. The tree is the caller's (NumPy arrays).
  """

  def __init__(self, directory: pathlib.Path):
    self.directory = directory.absolute()
    self._manager = None

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    return self._manager

  def save(self, epoch: int, tree: Dict[str, Any], *, wait: bool = False) -> None:
    """Saves `tree` (NumPy arrays the caller no longer changes) as step `epoch`, the previous
    step deleted once it is complete. Asynchronous unless `wait`: orbax writes in a
    background thread (training goes on) and the next save, restore or clear waits for it."""
    self.manager.save(epoch, args=ocp.args.StandardSave(tree))
    if wait:
      self.manager.wait_until_finished()

  def restore(self) -> Optional[Dict[str, Any]]:
    """The saved tree, or None when there is none; raises whatever orbax raises on a broken one."""
    if not self.directory.exists():
      return None
    self.manager.wait_until_finished()
    steps = self.manager.all_steps()
    if not steps:
      return None
    return self.manager.restore(max(steps), args=ocp.args.StandardRestore())

  def clear(self, *, delete_files: bool = True) -> None:
    """Forgets the checkpoint; deletes its directory when `delete_files` (the writing process)."""
    self.close()
    if delete_files:
      shutil.rmtree(self.directory, ignore_errors=True)

  def close(self) -> None:
    """Waits for a save in flight, then releases the manager."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None
