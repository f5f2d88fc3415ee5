"""Outputs of `jax-seqgcn select` that nothing can corrupt, mix or race (`apps.own_data`).

* One writer per output: each output (PICKS.csv, the workdir) is locked for the whole run
  (`output_lock`: `fcntl.flock` on a hidden `.NAME.lock` next to it, removed afterwards); a
  second select on a locked output stops at once with one line. Taking the lock is also the
  check that the output's folder can be written, before any input is read.
* Leftovers of a select that was killed (`.NAME.tmp-PID`, `.NAME.old-PID` next to the output,
  PID no longer running) are removed under the lock (`remove_leftovers`).
* A workdir lists everything select wrote into it (`MANIFEST`); `--force` replaces a workdir
  only if everything in it is listed (`check_outputs`): never a folder holding anything else.
* Files appear whole: written to a hidden temporary name, then renamed (`write_atomically`,
  `replace_folder`).
* `load_learner(workdir)` reads a finished workdir back (the learner and `select.json`).
"""

import contextlib
import json
import os
import pathlib
import re
import shutil
import sys
from typing import Any, Dict, List, Optional, Tuple

from jax_seqgcn import models
from jax_seqgcn.data.folder import InputError
from jax_seqgcn.experiment import workdir as workdir_lib

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # not POSIX: outputs are not locked
  fcntl = None

WORKDIR_SUFFIX = ".workdir"
# What select writes into a workdir last: every file and folder it wrote there ("x/": folder).
MANIFEST = "select-manifest.json"
_MANIFEST_OWNER = "jax-seqgcn select"


def check_outputs(out, workdir, labels_path, force: bool, images_dir=None):
  """(out, workdir) as absolute paths; InputError for an output that must not be replaced.

  `force` replaces an existing `out`, and an existing workdir only if everything in it is
  listed in its `MANIFEST` (what select wrote there) and it holds none of the inputs: never a
  folder holding anything else.
  """
  out = pathlib.Path(os.path.abspath(out))
  if out == pathlib.Path(os.path.abspath(labels_path)):
    raise InputError(f"{out}: the output would overwrite the labels file; choose another --out")
  if out.is_dir():
    raise InputError(f"{out}: is a folder; --out must be a file name such as picks.csv")
  if out.exists() and not force:
    raise InputError(f"{out} exists; pass --force to replace it, or choose another --out")
  if workdir is None:
    return out, None
  workdir = pathlib.Path(os.path.abspath(workdir))
  for kind, path in (("--out", out), ("--labels", labels_path), ("--images", images_dir)):
    path = None if path is None else pathlib.Path(os.path.abspath(path))
    if path is not None and (path == workdir or workdir in path.parents):
      raise InputError(f"{workdir}: the workdir would hold {kind} {path}; choose another "
                       "--workdir")
  if workdir.exists() and not workdir.is_dir():
    raise InputError(f"{workdir}: exists and is not a folder; choose another --workdir")
  if workdir.exists() and any(workdir.iterdir()):
    if not force:
      raise InputError(f"{workdir} exists; pass --force to replace it, or choose another "
                       "--workdir")
    listed = read_manifest(workdir)
    if listed is None:
      raise InputError(f"{workdir} exists and is not a workdir of jax-seqgcn select (no "
                       f"readable {MANIFEST} listing what select wrote there); not replacing it, "
                       "even with --force")
    foreign = unlisted_entry(workdir, listed)
    if foreign is not None:
      raise InputError(f"{workdir} holds {foreign}, which jax-seqgcn select did not write (not "
                       f"in its {MANIFEST}); not replacing the workdir, even with --force: move "
                       "it out, or choose another --workdir")
  return out, workdir


def workdir_entries(folder: pathlib.Path) -> List[str]:
  """Relative paths of everything under `folder` ("x/" for a folder; links as files)."""
  entries = []
  for here, subfolders, files in os.walk(folder):
    relative = pathlib.Path(here).relative_to(folder)
    for name in subfolders:
      link = os.path.islink(os.path.join(here, name))
      entries.append((relative / name).as_posix() + ("" if link else "/"))
    entries += [(relative / name).as_posix() for name in files]
  return entries


def write_manifest(folder: pathlib.Path) -> None:
  """Writes `MANIFEST` into `folder`: every file and folder in it, and itself."""
  entries = sorted(workdir_entries(folder) + [MANIFEST])
  (folder / MANIFEST).write_text(json.dumps(dict(written_by=_MANIFEST_OWNER, entries=entries),
                                            indent=1) + "\n")


def read_manifest(folder: pathlib.Path) -> Optional[set]:
  """The entries `folder`'s `MANIFEST` lists, or None (missing, unreadable, not ours)."""
  path = folder / MANIFEST
  try:
    if path.is_symlink() or not path.is_file():
      return None
    record = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError):
    return None
  if not isinstance(record, dict) or record.get("written_by") != _MANIFEST_OWNER:
    return None
  entries = record.get("entries")
  if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
    return None
  return set(entries)


def unlisted_entry(folder: pathlib.Path, listed: set) -> Optional[str]:
  """The first thing under `folder` that `listed` does not name (links never are), or None."""
  for entry in sorted(workdir_entries(folder)):
    path = folder / entry.rstrip("/")
    if entry not in listed or path.is_symlink():
      return entry
  return None


def pid_running(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError, ValueError):
    return pid > 0  # another user's process (an overflowing pid is no process)
  return True


def remove_leftovers(target: pathlib.Path, stream) -> None:
  """Removes `.NAME.tmp-PID` / `.NAME.old-PID` next to `target` whose PID is not running.

  They are what a select killed mid-run leaves (kill -9; SIGTERM without the cli's handler).
  Call only holding `output_lock(target)`. Nothing else is touched.
  """
  pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-([0-9]{{1,10}})")
  try:
    entries = list(os.scandir(target.parent))
  except OSError:
    return
  for entry in entries:
    match = pattern.fullmatch(entry.name)
    if match is None or pid_running(int(match.group(1))):
      continue
    if entry.is_dir(follow_symlinks=False):
      shutil.rmtree(entry.path, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.unlink(entry.path)
    print(f"removed {entry.path}, left by an interrupted select (pid "
          f"{match.group(1)})", file=stream or sys.stdout, flush=True)


def make_folder(folder: pathlib.Path, flag: str) -> List[pathlib.Path]:
  """Creates `folder` and missing parents; returns those it created (outermost first)."""
  missing = []
  existing = folder
  while not existing.exists():
    missing.append(existing)
    existing = existing.parent
  if not existing.is_dir():
    raise InputError(f"{existing}: not a folder, so {flag} cannot be written under it")
  created = []
  try:
    for path in reversed(missing):
      try:
        path.mkdir()
      except FileExistsError:
        continue
      created.append(path)
  except OSError as err:
    remove_folders(created)
    raise InputError(f"{path}: cannot create the folder of {flag} ({err.strerror})") from None
  return created


def remove_folders(created: List[pathlib.Path]) -> None:
  for path in reversed(created):
    try:
      path.rmdir()
    except OSError:
      break


def lock_holder(lock: pathlib.Path) -> str:
  try:
    pid = lock.read_text().strip()
  except OSError:
    return ""
  return f" (pid {pid})" if pid.isdigit() else ""


def acquire(lock: pathlib.Path, target: pathlib.Path, flag: str) -> Optional[int]:
  """An fd holding `fcntl.flock` on `lock` (None without fcntl); InputError if another holds it."""
  for _ in range(100):
    try:
      fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as err:
      raise InputError(f"{target.parent}: cannot write there ({err.strerror}); {flag} needs a "
                       "folder select can write to") from None
    if fcntl is None:
      return fd
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise InputError(f"{target}: another jax-seqgcn select{lock_holder(lock)} is writing this "
                       f"{flag} now (it holds {lock.name}); wait for it to finish, or choose "
                       f"another {flag}") from None
    except OSError:  # a file system without locks: go on unlocked
      return fd
    try:
      same = os.path.samestat(os.fstat(fd), os.stat(lock))
    except FileNotFoundError:
      same = False
    if same:  # else the holder removed it meanwhile: lock the new one
      os.ftruncate(fd, 0)
      os.write(fd, f"{os.getpid()}\n".encode())
      return fd
    os.close(fd)
  raise InputError(f"{target}: could not lock {lock}; is another jax-seqgcn select writing "
                   f"this {flag}?")


@contextlib.contextmanager
def output_lock(target, flag: str = "--out"):
  """Holds the output `target` (a file or the workdir) for one select; yields its lock path.

  `fcntl.flock` on `.NAME.lock` next to `target` (created, and removed on release), so that two
  selects never write one output: the second gets an `InputError` naming `target` at once.
  Creates `target`'s missing parent folders (removed again if the block raises); creating the
  lock is the check that select can write there. `flag` names the output in messages.

  Raises:
    InputError: another select holds `target`, or its folder cannot be written.
  """
  target = pathlib.Path(os.path.abspath(target))
  created = make_folder(target.parent, flag)
  lock = target.with_name(f".{target.name}.lock")
  finished = False
  fd = None
  try:
    if not os.access(target.parent, os.W_OK | os.X_OK):
      raise InputError(f"{target.parent}: cannot write there (permission denied); {flag} needs "
                       "a folder select can write to")
    fd = acquire(lock, target, flag)
    yield lock
    finished = True
  finally:
    if fd is not None:
      with contextlib.suppress(OSError):
        os.unlink(lock)  # still holding it: a waiting select then locks a new file
      os.close(fd)
    if not finished:
      remove_folders(created)


def default_workdir(out) -> pathlib.Path:
  """PICKS.csv -> PICKS.workdir (next to it)."""
  out = pathlib.Path(out)
  return out.with_name(out.stem + WORKDIR_SUFFIX)


def write_atomically(path: pathlib.Path, text: str) -> None:
  """Writes `text` to a hidden temporary file next to `path`, then renames it into place."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def replace_folder(new: pathlib.Path, target: pathlib.Path) -> None:
  """Renames `new` to `target`, replacing an existing `target` (moved aside, then deleted)."""
  old = target.with_name(f".{target.name}.old-{os.getpid()}")
  if target.exists():
    os.replace(target, old)
  os.replace(new, target)
  shutil.rmtree(old, ignore_errors=True)


def load_learner(workdir) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
  """Reads back what `own_data.select_image_folder` trained (also `own_data.load_learner`).

  Returns:
    (model, variables, record): the Flax learner, its variables {"params", "batch_stats"
    (BatchNorm learners)} for `model.apply(variables, x, train=False)` on images preprocessed
    as pixels / 255, and `select.json` (class names, image ids, labelled, picks, scores).
  """
  workdir = pathlib.Path(workdir)
  config = workdir_lib.read_config(workdir)
  if config is None:
    raise InputError(f"{workdir}: no {workdir_lib.CONFIG_FILE}; not a select workdir")
  record = json.loads((workdir / "select.json").read_text())
  store = workdir_lib.CheckpointStore(workdir / "checkpoints")
  try:
    _, tree = store.restore_latest()
  finally:
    store.close()
  model = models.get_learner(config["learner"]["name"], num_classes=len(record["classes"]),
                             channels=record["image_shape"][-1])
  variables = {k: v for k, v in tree["learner"].items() if k != "loss_net_params"}
  return model, variables, record
