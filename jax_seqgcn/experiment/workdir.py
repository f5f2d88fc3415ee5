"""An experiment's directory: one run at a time, one config, checkpoints that cannot be mixed.

* `lock(workdir)`: an exclusive, non-blocking `flock` on the workdir directory itself (an inode
  a user does not delete by accident), held for the whole run and released by the kernel
  however the process ends (even SIGKILL). `.lock` only says who holds it (pid, host, start
  time): a second run on the same workdir fails at once and names the holder, even when `.lock`
  was deleted (then it says so).
* The resolved config is stored in `config.json` *and* inside every checkpoint, and a run
  resumes only when both match its own config. `al.trials` may grow (a finished run is extended
  by more trials); every other field must be equal.
* `CheckpointStore`: orbax checkpoints (the last two kept); a newest checkpoint that cannot be
  read is set aside with a warning and the previous one is used. An entry of `checkpoints/` that
  orbax would take for a step but that is not a checkpoint (a stray folder or file `99`) is
  refused, never moved; other stray entries are ignored with one warning.
* `EpochStore` (`EPOCH_DIR`): the latest epoch checkpoint of the running cycle (orbax, one
  kept), deleted once that cycle's checkpoint is written (`experiment.preemption`).
* A full disk (`disk_full`) becomes `DiskFullError`, one line; `quiet_orbax` keeps orbax's log
  records and its background threads' echoes of handled errors off stderr.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import sys
import threading
import time
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple

import jax
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
                "train.checkpoint_every": 0, "learner.mc_dropout": 0.0}
# Names orbax's standard step format reads as steps; what we set aside; orbax's unfinished saves.
_STEP_NAME = re.compile(r"0|[1-9]\d*")
_CORRUPT_PREFIX = "corrupt-"
_ORBAX_TMP = ".orbax-checkpoint-tmp"
# How a full disk (or quota) reads in OSError and in tensorstore's errors (ValueError text).
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'",
                   "os_error_code='122'")


class WorkdirError(RuntimeError):
  """A workdir that this run must not use (in use by another run, or holding another run)."""


class DiskFullError(WorkdirError, OSError):
  """The disk (or quota) filled up while the run wrote to its workdir; rerunning resumes."""


@contextlib.contextmanager
def lock(workdir: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` (created if missing) for the duration of the block.

  Raises:
    WorkdirError: another process holds the lock; the message names it.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  info = workdir / LOCK_FILE
  try:
    fd, on_info = _flock(workdir, os.O_RDONLY), False
  except BlockingIOError:
    fd = None
  except OSError:
    # A filesystem without flock on directories (NFS emulates flock with write locks): the
    # information file is the lock there, as before.
    try:
      fd, on_info = _flock(info, os.O_RDWR | os.O_CREAT), True
    except BlockingIOError:
      fd = None
  if fd is None:
    raise WorkdirError(f"{workdir} is in use by another run ({_holder(info)}); wait for it to "
                       "end or use another --workdir")
  try:
    _write_holder(info, fd if on_info else None)
    yield
  finally:
    os.close(fd)  # releases the lock


def _flock(path: pathlib.Path, flags: int) -> int:
  """An fd of `path` holding an exclusive flock; BlockingIOError when another holds it."""
  fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BaseException:
    os.close(fd)
    raise
  return fd


def _write_holder(info: pathlib.Path, fd: Optional[int]) -> None:
  """Writes who holds the lock: atomically (a reader sees the old or the new text), or into
  `fd` when the file itself is the lock (its inode must stay)."""
  text = (f"pid {os.getpid()} on {socket.gethostname()} since "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
  if fd is not None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    return
  tmp = info.with_name(f"{info.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, info)


def _holder(info: pathlib.Path, tries: int = 20) -> str:
  """Who holds the lock, per `info`. The holder writes it just after taking the lock, so a
  missing or empty file or a dead pid of this host is read again for up to `tries` x 50 ms."""
  text, missing = "", True
  for attempt in range(tries):
    try:
      text, missing = info.read_text().strip(), False
    except OSError:
      text, missing = "", True
    if text and _alive(text):
      return text
    if attempt < tries - 1:
      time.sleep(0.05)
  if missing:
    return f"its pid is unknown: {info.name}, which names it, was deleted"
  if not text:
    return f"its pid is unknown: {info.name} is empty"
  return f"its pid is unknown: {info.name} names {text}, which has ended"


def _alive(holder: str) -> bool:
  """False only for a pid of this host that does not run (a previous holder's leftover)."""
  match = re.match(r"pid (\d+) on (\S+)", holder)
  if not match or match[2] != socket.gethostname():
    return True
  try:
    os.kill(int(match[1]), 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True  # e.g. another user's process
  return True


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


def disk_full(err: Optional[BaseException]) -> bool:
  """Whether `err`, or an exception it was raised from or during, is a full disk or quota:
  OSError ENOSPC/EDQUOT, or tensorstore's text for them (orbax raises ValueError)."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(text in str(err) for text in _DISK_FULL_TEXT):
      return True
    err = err.__cause__ or err.__context__
  return False


def disk_full_error(what: str) -> DiskFullError:
  """The one-line error of a full disk met while doing `what` (e.g. "saving checkpoint X")."""
  err = DiskFullError(f"no space left on device while {what}; free space and rerun the same "
                      "command to resume")
  err.errno = errno.ENOSPC
  return err


@contextlib.contextmanager
def _disk_full_as(what: str) -> Iterator[None]:
  try:
    yield
  except Exception as err:  # pylint: disable=broad-except
    if disk_full(err) and not isinstance(err, DiskFullError):
      raise disk_full_error(what) from None
    raise


class _NoOrbaxRecords(logging.Filter):
  """Drops the records of orbax's modules (absl logging is one logger for every library), and
  asyncio's "Task exception was never retrieved" for the reads of a failed orbax restore (the
  run uses no asyncio of its own)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio":
      return "exception was never retrieved" not in str(record.msg)
    return f"{os.sep}orbax{os.sep}" not in record.pathname


def _echo_of_handled_error(exc: Optional[BaseException]) -> bool:
  # A full disk is reported by the run itself in one line. "Event loop is closed": tensorstore
  # completing the reads of a failed orbax restore after orbax closed its asyncio loop (the
  # unreadable checkpoint is handled, with a warning).
  return disk_full(exc) or (isinstance(exc, RuntimeError)
                            and str(exc) == "Event loop is closed")


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """While inside: no orbax log records (its errors come with tracebacks; the run reports the
  outcome itself), and background threads' and unraisable echoes of errors the run handles or
  reports (`_echo_of_handled_error`) are dropped. Other errors go to the previous hooks."""
  loggers = (logging.getLogger("absl"), logging.getLogger("asyncio"))
  records = _NoOrbaxRecords()
  unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook

  def on_unraisable(info):
    if not _echo_of_handled_error(info.exc_value):
      unraisable_hook(info)

  def on_thread_error(args):
    if not _echo_of_handled_error(args.exc_value):
      thread_hook(args)

  for logger in loggers:
    logger.addFilter(records)
  sys.unraisablehook, threading.excepthook = on_unraisable, on_thread_error
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(records)
    sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook


def _first_line(err: BaseException) -> str:
  return (str(err).splitlines() or [""])[0][:200]


def _check_entries(directory: pathlib.Path) -> None:
  """Refuses what orbax would take for a step but is no checkpoint; warns about other strays.

  A checkpoint folder holds orbax's `_CHECKPOINT_METADATA` or its `default` item. Anything else
  named like a step (a stray folder or file `99`) would be read (and fail, or hide the real
  newest step), skip later saves or be deleted by orbax's clean-up, so it is refused, never
  moved. Other names are ignored (one warning) except ours (`corrupt-<step>`) and orbax's
  unfinished saves (`<step>.orbax-checkpoint-tmp-*`, removed when the store opens).
  """
  if not directory.exists():
    return
  if not directory.is_dir():
    raise WorkdirError(f"{directory} is a file, not the checkpoints folder; move it away and "
                       "rerun")
  foreign, stray = [], []
  for entry in sorted(directory.iterdir(), key=lambda p: p.name):
    if _STEP_NAME.fullmatch(entry.name):
      if not (entry.is_dir() and ((entry / "_CHECKPOINT_METADATA").exists()
                                  or (entry / "default").is_dir())):
        foreign.append(entry.name)
    elif not (entry.name.startswith(_CORRUPT_PREFIX) or _ORBAX_TMP in entry.name):
      stray.append(entry.name)
  if foreign:
    more = f" (also {', '.join(foreign[1:])})" if foreign[1:] else ""
    raise WorkdirError(f"{directory / foreign[0]} is named like a checkpoint but is not one (no "
                       f"orbax metadata){more}; move it out of {directory} and rerun")
  if stray and jax.process_index() == 0:
    warnings.warn(f"ignoring {', '.join(stray)} in {directory}: not checkpoints", RuntimeWarning)


class CheckpointStore:
  """Orbax checkpoints of a run, with fallback past an unreadable newest step.

  Raises (on construction): `WorkdirError` for an entry of `directory` named like a step that is
  not a checkpoint (see `_check_entries`).
  """

  def __init__(self, directory: pathlib.Path):
    self.directory = directory.absolute()
    _check_entries(self.directory)
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a save cut short (a kill, a full disk) leaves a temporary folder.
    return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True, cleanup_tmp_directories=True))

  def save(self, step: int, tree: Dict[str, Any]) -> None:
    """Saves `tree` as `step` and waits until it is on disk.

    Raises:
      DiskFullError: the disk filled up; the previous checkpoints are intact.
    """
    with _disk_full_as(f"saving checkpoint {self.directory / str(step)}"):
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
        target = self.directory / f"{_CORRUPT_PREFIX}{step}"
        warnings.warn(f"checkpoint {self.directory / str(step)} cannot be read "
                      f"({type(err).__name__}: {_first_line(err)}); moved to {target}, using "
                      "the previous checkpoint", RuntimeWarning)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(self.directory / str(step)), str(target))
        # A fresh manager: a failed restore may leave state behind (orbax fixes its item
        # layout from the first folder it reads), which would fail the good checkpoints too.
        self.manager.close()
        self.manager = self._open()
    return -1, None

  def close(self) -> None:
    self.manager.close()


class EpochStore:
  """The latest epoch checkpoint of the running cycle: one orbax step (the epoch), one kept.

  Orbax writes a step to a temporary directory and renames it when complete, so a kill leaves
  either the previous checkpoint or the new one. The tree is the caller's (NumPy arrays). A
  full disk raises `DiskFullError` (from the save, or from the next call for a background one).
  """

  def __init__(self, directory: pathlib.Path):
    self.directory = directory.absolute()
    self._manager = None

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, cleanup_tmp_directories=True))
    return self._manager

  def _saving(self):
    return _disk_full_as(f"saving the epoch checkpoint in {self.directory}")

  def save(self, epoch: int, tree: Dict[str, Any], *, wait: bool = False) -> None:
    """Saves `tree` (NumPy arrays the caller no longer changes) as step `epoch`, the previous
    step deleted once it is complete. Asynchronous unless `wait`: orbax writes in a
    background thread (training goes on) and the next save, restore or clear waits for it."""
    with self._saving():
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
      manager, self._manager = self._manager, None
      with self._saving():
        try:
          manager.wait_until_finished()
        finally:
          manager.close()
