"""Resume inside a cycle: epoch checkpoints and SIGTERM (the preemption notice).

Every `config.train.checkpoint_every` epochs (and after a cycle's last epoch) the loop saves the
learner's whole train state (parameters, optimiser state, BatchNorm statistics, the LossNet's
parameters if any, the step count) with the trial, cycle and epoch in `<workdir>/checkpoints_epoch/`
(`workdir.EpochStore`: orbax, atomic, only the latest kept). Shuffling and augmentation are
functions of the cycle's key, the epoch and the step count, so `training.fit` continued from
that state equals the uninterrupted fit bit for bit. Once the cycle's own checkpoint is written
the epoch checkpoint is deleted.

A rerun of the same command continues the cycle at the saved epoch and says so
(`resuming trial 1 cycle 2 at epoch 7/12`, 1-based trial and cycle like the loop's other
lines). An epoch checkpoint that cannot be read (or whose arrays fail their checksum) is
deleted with a one-line warning and the cycle restarts at epoch 0: same results, more time.

SIGTERM (installed by `loop.run` only, the previous handler restored after it): the run saves
at the next epoch boundary, prints `SIGTERM: saved trial 1 cycle 2 at epoch 5/15; rerun the
same command to resume` and raises `Preempted` (experiments/main.py then exits with code 0). A
SIGTERM outside training stops the run after the current cycle's checkpoint. With several
processes, process 0's flag is broadcast at every epoch end, so all stop at the same epoch.
"""

import contextlib
import signal
import sys
import threading
import zlib
from typing import Callable

import jax
import numpy as np

from jax_seqgcn.experiment import workdir as workdir_lib
from jax_seqgcn.training import parallel

_SIGTERM = {"received": False}


class Preempted(Exception):
  """SIGTERM stopped the run at an epoch (or cycle) boundary after saving; rerun to resume."""


@contextlib.contextmanager
def sigterm_saves():
  """While inside, SIGTERM asks the run to save and stop at the next epoch boundary.

  Outside the main thread (where Python cannot install handlers) this does nothing.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.getsignal(signal.SIGTERM)

  def handler(signum, frame):  # pylint: disable=unused-argument
    _SIGTERM["received"] = True

  _SIGTERM["received"] = False
  signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    _SIGTERM["received"] = False


def stop_requested() -> bool:
  """Whether SIGTERM was received (process 0's answer in every process)."""
  flag = _SIGTERM["received"]
  if jax.process_count() > 1:
    flag = bool(parallel.broadcast_from_main(np.int32(flag)))
  return flag


def _checksum(arrays) -> int:
  crc = 0
  for array in arrays:
    crc = zlib.crc32(np.ascontiguousarray(array).tobytes(), crc)
  return crc


def _say(message: str, stream=None) -> None:
  if parallel.is_main_process():
    print(message, file=stream or sys.stdout, flush=True)


class EpochCheckpoints:
  """A run's epoch checkpoints (see the module docstring)."""

  def __init__(self, workdir, every: int, epochs: int):
    self.store = workdir_lib.EpochStore(workdir / workdir_lib.EPOCH_DIR)
    self.every, self.epochs = int(every), int(epochs)

  def fit_kwargs(self, trial: int, cycle: int, labelled) -> dict:
    """`training.fit`'s `on_epoch_end` (save; stop on SIGTERM) and, when a checkpoint of this
    (trial, cycle) exists, its `initial_state` and `start_epoch`."""
    where = f"trial {trial + 1} cycle {cycle + 1}"
    labelled_crc = np.int64(_checksum([np.asarray(labelled, np.int64)]))
    kwargs = dict(on_epoch_end=self._saver(trial, cycle, labelled_crc, where))
    restored = self._restore(trial, cycle, labelled_crc, where)
    if restored is not None:
      epoch, leaves = restored
      _say(f"resuming {where} at epoch {epoch}/{self.epochs}")
      kwargs.update(initial_state=leaves, start_epoch=epoch)
    return kwargs

  def _saver(self, trial, cycle, labelled_crc, where) -> Callable:
    def on_epoch_end(epoch: int, state) -> None:
      stop = stop_requested()
      periodic = self.every > 0 and (epoch % self.every == 0 or epoch == self.epochs)
      if stop or periodic:
        # Copies: the next epoch donates the state's buffers while orbax writes in background.
        leaves = [np.array(x, copy=True) for x in parallel.to_host(jax.tree.leaves(state))]
        self.store.save(epoch, wait=stop, tree={
            "trial": np.int64(trial), "cycle": np.int64(cycle), "epoch": np.int64(epoch),
            "epochs": np.int64(self.epochs), "labelled_crc": labelled_crc,
            "state_crc": np.int64(_checksum(leaves)),
            "state": {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}})
      if stop:
        message = (f"SIGTERM: saved {where} at epoch {epoch}/{self.epochs}; rerun the same "
                   "command to resume")
        _say(message)
        raise Preempted(message)
    return on_epoch_end

  def _restore(self, trial, cycle, labelled_crc, where):
    """(epoch, leaves) of a usable checkpoint of this cycle (process 0's), or None."""
    epoch, leaves, problem = -1, None, None
    try:
      tree = self.store.restore()
      if tree is not None:
        leaves = [np.asarray(tree["state"][k]) for k in sorted(tree["state"])]
        if int(tree["state_crc"]) != _checksum(leaves):
          raise ValueError("its arrays fail their checksum")
        mine = (int(tree["trial"]), int(tree["cycle"]), int(tree["epochs"]),
                int(tree["labelled_crc"]))
        if mine == (trial, cycle, self.epochs, int(labelled_crc)):
          epoch = int(tree["epoch"])
    except Exception as err:  # pylint: disable=broad-except
      # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors, KeyError).
      problem = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    if jax.process_count() > 1:
      epoch = int(parallel.broadcast_from_main(np.int64(epoch)))
    if problem is not None and parallel.is_main_process():
      _say(f"warning: epoch checkpoint {self.store.directory} cannot be read ({problem}); "
           f"{where} restarts at epoch 0", stream=sys.stderr)
    if epoch < 0:  # none, unreadable, or a finished cycle's left behind by a kill
      self.clear()
      return None
    if jax.process_count() > 1:
      leaves = parallel.broadcast_from_main(leaves)
    return epoch, leaves

  def clear(self) -> None:
    """Deletes the epoch checkpoint (after its cycle's checkpoint is written)."""
    self.store.clear(delete_files=parallel.is_main_process())
    parallel.sync_processes("preemption: epoch checkpoint cleared")

  def check_between_cycles(self, trial: int, cycle: int, last: bool) -> None:
    """Raises `Preempted` when SIGTERM came outside training (the cycle's checkpoint is saved)."""
    if not last and stop_requested():
      message = (f"SIGTERM: saved trial {trial + 1} cycle {cycle + 1} (complete); rerun the "
                 "same command to resume")
      _say(message)
      raise Preempted(message)

  def close(self) -> None:
    self.store.close()


def every(config) -> int:
  """`config.train.checkpoint_every`, 0 (no epoch checkpoints) for configs without it."""
  return int(config.train.get("checkpoint_every",
                              workdir_lib.ADDED_FIELDS["train.checkpoint_every"]))


def make(config, workdir) -> EpochCheckpoints:
  """The `EpochCheckpoints` of a run of `config` in `workdir`."""
  return EpochCheckpoints(workdir, every(config), config.train.epochs)

