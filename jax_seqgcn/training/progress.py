"""Console progress for training: one line per few epochs with the time per epoch and the ETA.

Also the hook through which long stages outside `fit` (a sampler's own training: the GCN,
VAAL, k-medoids at large N) report their per-step values: the stage calls
`report(stage, {name: [steps] values}, first_step=..., total_steps=...)` (once at the end, or
once per chunk for live progress); whoever runs it and wants them wraps the call in
`with reporting(callback):` (`experiment.loop` writes them to the run's metrics and prints a
progress line). With no `reporting` active, `report` does nothing.
"""

import contextlib
import sys
import time
from typing import Callable, List, Mapping, Optional

_REPORTERS: List[Callable] = []


@contextlib.contextmanager
def reporting(callback: Callable):
  """Within the block, `report(...)` calls `callback(stage, metrics, first_step, total_steps)`
  (metrics: name -> 1-D NumPy array, one value per step). Nested blocks: the innermost."""
  _REPORTERS.append(callback)
  try:
    yield callback
  finally:
    _REPORTERS.remove(callback)


def report(stage: str, metrics: Mapping, *, first_step: int = 0,
           total_steps: Optional[int] = None) -> None:
  """Reports per-step values of a long stage (e.g. `report("gcn", {"loss": result.losses})`).

  Args:
    stage: short name of the stage ("gcn", "vaal", "kmedoids").
    metrics: name -> [k] values (host or device arrays) of steps first_step..first_step+k-1.
    first_step: the step of the first values (a stage reporting chunk by chunk advances it).
    total_steps: the stage's total number of steps, if known (for progress lines).
  """
  if not _REPORTERS:
    return
  import numpy as np  # pylint: disable=import-outside-toplevel
  values = {name: np.asarray(value, np.float64).reshape(-1) for name, value in metrics.items()}
  _REPORTERS[-1](stage, values, int(first_step), total_steps)


def text_progress(*, every: int = 1, stream=None, prefix: str = "") -> Callable:
  """A `progress` callback printing one line per `every` epochs with time per epoch and ETA.

  Create it right before `fit` (the clock starts here). The first epoch includes
  compilation, so the rate is measured from its end once possible.

  Args:
    every: print after every `every`-th epoch (and after the last).
    stream: file to print to; None = sys.stderr.
    prefix: text put before each line (e.g. "cycle 3 ").
  Returns:
    `progress(epoch, num_epochs, metrics)` callable.
  """
  start = {"time": time.perf_counter(), "first_done": None, "first_epoch": None}

  def show(epoch: int, num_epochs: int, metrics: dict) -> None:
    now = time.perf_counter()
    if start["first_done"] is None:  # epoch 1, or a resumed fit's first epoch
      start["first_done"], start["first_epoch"] = now, epoch
    if epoch % every and epoch != num_epochs:
      return
    if epoch > start["first_epoch"]:
      per_epoch = (now - start["first_done"]) / (epoch - start["first_epoch"])
    else:
      per_epoch = now - start["time"]
    eta = per_epoch * (num_epochs - epoch)
    values = " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    print(f"{prefix}epoch {epoch}/{num_epochs} {values} | {per_epoch:.2f} s/epoch, "
          f"ETA {_format_seconds(eta)}", file=stream or sys.stderr, flush=True)

  return show


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
