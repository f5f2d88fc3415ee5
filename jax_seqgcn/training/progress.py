"""Console progress for training: one line per few epochs with the time per epoch and the ETA."""

import sys
import time
from typing import Callable

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
  start = {"time": time.perf_counter(), "first_done": None}

  def show(epoch: int, num_epochs: int, metrics: dict) -> None:
    now = time.perf_counter()
    if epoch == 1:
      start["first_done"] = now
    if epoch % every and epoch != num_epochs:
      return
    if epoch > 1 and start["first_done"] is not None:
      per_epoch = (now - start["first_done"]) / (epoch - 1)
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
