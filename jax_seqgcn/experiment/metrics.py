"""Metrics of an experiment run: TensorBoard event files and `metrics.jsonl` in the workdir.

Writer. Event files are written with `tensorboardX` (a pure-Python writer of TensorBoard's event
format, needing only numpy and protobuf), not with `clu.metric_writers` as the flax examples do:
clu's TensorBoard writer goes through TensorFlow's `tf.summary`, and TensorFlow is only in the
optional extras (`[tfds]`, `[test]`), often missing on the GPU hosts the runs go to. Reading the
files needs TensorBoard only (`tensorboard --logdir runs/`, one run per workdir); `read_events`
reads them back without it.

What is written (main process only; other processes get a disabled writer that writes nothing):

* per epoch of the learner's training: `train/loss`, `train/accuracy` (classification),
  `train/learning_rate`, `train/images_per_s` (labelled examples / the epoch's wall time; the
  first epoch includes compilation) and, with Learning Loss, `train/ranking_loss` (the LossNet's
  loss);
* per sampler stage that reports (`training.progress.report`: the GCN's loss per step, VAAL's
  losses per iteration, ...): `sampler/<stage>/<name>`;
* per cycle: `test/accuracy` (classification) or `test/mean_joint_error` (regression), and
  `time/train_s`, `time/embed_s`, `time/sample_s`.

Tag scheme. Every tag starts with the trial, `trial{t}/` (0-based, as `results.jsonl`):

* epoch and sampler points: `trial{t}/cycle{c}/train/<name>` with step = epoch (1-based), and
  `trial{t}/cycle{c}/sampler/<stage>/<name>` with step = the stage's step (0-based);
* cycle points: `trial{t}/test/<metric>` and `trial{t}/time/<name>` with step = the number of
  labelled examples the cycle trained on (the learning curve).

`metrics.jsonl` has the same points, one JSON object per line: `{"kind": "epoch", "trial",
"cycle", "epoch", "train/loss", ...}` per epoch, `{"kind": "sampler", "trial", "cycle", "stage",
"first_step", "<name>": [values]}` per report, and `{"kind": "cycle", "trial", "cycle",
"n_labelled", "test/accuracy", "time/train_s", ...}` per cycle.

Resume. Points belong to a (trial, cycle); a cycle's event points go to event files of its
own (`events.out.tfevents.<time>.<host>.trial{t}_cycle{c}`, a new one per process start, closed
when the cycle ends, before its checkpoint). A writer opened to resume after global cycle
`completed` (trial * cycles + cycle, the last checkpointed one) deletes the points of the
cycles after the next one; `start_cycle` then keeps, of the next (interrupted) cycle, only the
epochs its epoch checkpoint holds (`experiment.preemption`; none without one), rewriting its
event file. So each (trial, cycle, epoch) point is in the files once: the completed cycles' are
never written again, and the interrupted cycle's are written by the run that completes it.
"""

import json
import logging
import pathlib
import re
import struct
import time
from typing import Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

JSONL = "metrics.jsonl"
_EVENT_GLOB = "events.out.tfevents.*"
_CYCLE_SUFFIX = re.compile(r"\.trial(\d+)_cycle(\d+)$")


def epoch_tag(trial: int, cycle: int, name: str) -> str:
  """`trial{t}/cycle{c}/train/{name}` (step: the epoch, from 1)."""
  return f"trial{trial}/cycle{cycle}/train/{name}"


def sampler_tag(trial: int, cycle: int, stage: str, name: str) -> str:
  """`trial{t}/cycle{c}/sampler/{stage}/{name}` (step: the stage's step, from 0)."""
  return f"trial{trial}/cycle{cycle}/sampler/{stage}/{name}"


def cycle_tag(trial: int, name: str) -> str:
  """`trial{t}/{name}`, name e.g. `test/accuracy` or `time/train_s` (step: labelled count)."""
  return f"trial{trial}/{name}"


class MetricsWriter:
  """Writes a run's metrics to `workdir` (see the module docstring for the files and tags).

  Args:
    workdir: the run's directory.
    enabled: False writes nothing and creates no file (every process but the main one).
    cycles: cycles per trial (to order (trial, cycle) pairs as the loop's global steps).
    completed: the last global cycle (trial * cycles + cycle) already checkpointed, -1 for none:
      the points of later cycles are removed (see "Resume").
  """

  def __init__(self, workdir, *, enabled: bool = True, cycles: int = 1, completed: int = -1):
    self.workdir = pathlib.Path(workdir)
    self.enabled, self.cycles = bool(enabled), int(cycles)
    self._writer = None  # tensorboardX SummaryWriter of the current cycle
    self._cycle: Optional[Tuple[int, int]] = None
    self._jsonl = None
    if not self.enabled:
      return
    # A missing writer fails here, before any training.
    import tensorboardX  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    # A diverged sampler's NaN losses are recorded on purpose; tensorboardX would log a warning
    # for every one of them.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    self.workdir.mkdir(parents=True, exist_ok=True)
    # The cycle after `completed` may be continued from an epoch checkpoint: which of its epoch
    # points to keep is decided by `start_cycle`; later cycles' points go now.
    self._pending = int(completed) + 1
    self._drop(lambda g, point: g <= self._pending,
               lambda g, event: g <= self._pending)
    self._jsonl = open(self.workdir / JSONL, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def _global(self, trial: int, cycle: int) -> int:
    return trial * self.cycles + cycle

  def _drop(self, keep_line, keep_event, only: Optional[int] = None) -> None:
    """Keeps the jsonl lines and events (of the cycle `only`, or of all) that `keep_*(global
    cycle, point or event)` accept; an event file is rewritten when some of its events go."""
    for path in sorted(self.workdir.glob(_EVENT_GLOB)):
      match = _CYCLE_SUFFIX.search(path.name)
      if not match:
        continue
      g = self._global(int(match[1]), int(match[2]))
      if only is not None and g != only:
        continue
      events = list(_read_records(path))
      kept = [event for event in events if keep_event(g, event)]
      if len(kept) < len(events):
        path.unlink()
        if any(event.summary.value for event in kept):
          # ".kept" sorts before the cycle's next file, even one opened in the same second.
          _write_events(self.workdir, ".kept" + path.name[path.name.rindex(".trial"):], kept)
    path = self.workdir / JSONL
    if not path.exists():
      return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        point = json.loads(line)
        g = self._global(point["trial"], point["cycle"])
      except (ValueError, KeyError, TypeError):
        continue  # a line cut short by a crash
      if (only is not None and g != only) or keep_line(g, point):
        kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)

  def start_cycle(self, trial: int, cycle: int, start_epoch: int = 0) -> None:
    """Call before training (trial, cycle). For the cycle a resumed run continues, keeps its
    points of epochs 1..`start_epoch` (the epochs its epoch checkpoint holds) and drops the
    rest (later epochs, sampler and cycle points of the interrupted run)."""
    if not self.enabled or self._global(trial, cycle) != self._pending:
      return
    self.end_cycle()
    prefix = epoch_tag(trial, cycle, "")
    self._jsonl.close()
    self._drop(lambda g, point: point["kind"] == "epoch" and point["epoch"] <= start_epoch,
               lambda g, event: event.step <= start_epoch and all(
                   v.tag.startswith(prefix) for v in event.summary.value),
               only=self._pending)
    self._jsonl = open(self.workdir / JSONL, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self._pending = -1

  def _events(self, trial: int, cycle: int):
    if self._cycle != (trial, cycle):
      self.end_cycle()
      import tensorboardX  # pylint: disable=import-outside-toplevel
      self._writer = tensorboardX.SummaryWriter(
          str(self.workdir), flush_secs=30, filename_suffix=_suffix(trial, cycle))
      self._cycle = (trial, cycle)
    return self._writer

  def _line(self, point: dict) -> None:  # pylint: disable=missing-function-docstring
    self._jsonl.write(json.dumps(point) + "\n")
    self._jsonl.flush()

  def write_epoch(self, trial: int, cycle: int, epoch: int, metrics: Mapping[str, float]) -> None:
    """One epoch's scalars (`train/<name>`, step `epoch`)."""
    if not self.enabled:
      return
    writer = self._events(trial, cycle)
    values = {k: float(v) for k, v in sorted(metrics.items())}
    for name, value in values.items():
      writer.add_scalar(epoch_tag(trial, cycle, name), value, int(epoch))
    self._line({"kind": "epoch", "trial": trial, "cycle": cycle, "epoch": int(epoch),
                **{f"train/{k}": v for k, v in values.items()}})

  def write_sampler(self, trial: int, cycle: int, stage: str, metrics: Mapping[str, np.ndarray],
                    first_step: int = 0) -> None:
    """A sampler stage's per-step values (`sampler/<stage>/<name>`, steps from `first_step`)."""
    if not self.enabled:
      return
    writer = self._events(trial, cycle)
    values = {k: np.asarray(v, np.float64).reshape(-1) for k, v in sorted(metrics.items())}
    for name, array in values.items():
      tag = sampler_tag(trial, cycle, stage, name)
      for i, value in enumerate(array):
        writer.add_scalar(tag, float(value), int(first_step) + i)
    self._line({"kind": "sampler", "trial": trial, "cycle": cycle, "stage": stage,
                "first_step": int(first_step), **{k: v.tolist() for k, v in values.items()}})

  def write_cycle(self, trial: int, cycle: int, n_labelled: int,
                  metrics: Mapping[str, float]) -> None:
    """A cycle's scalars (e.g. `test/accuracy`, `time/train_s`), step `n_labelled`; then closes
    the cycle's event file (call it before the cycle's checkpoint)."""
    if not self.enabled:
      return
    writer = self._events(trial, cycle)
    values = {k: float(v) for k, v in sorted(metrics.items())}
    for name, value in values.items():
      writer.add_scalar(cycle_tag(trial, name), value, int(n_labelled))
    self._line({"kind": "cycle", "trial": trial, "cycle": cycle, "n_labelled": int(n_labelled),
                **values})
    self.end_cycle()

  def end_cycle(self) -> None:
    """Flushes and closes the current cycle's event file (if any)."""
    if self._writer is not None:
      writer, self._writer, self._cycle = self._writer, None, None
      try:
        writer.close()
      except OSError:
        _abandon(writer)
        raise

  def close(self) -> None:
    self.end_cycle()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _abandon(writer) -> None:
  """Marks a tensorboardX writer whose close failed (e.g. a full disk) as closed, so that its
  exit hook does not try again and print a second traceback after the run's one-line error."""
  # pylint: disable=protected-access
  for file_writer in (getattr(writer, "all_writers", None) or {}).values():
    event_writer = getattr(file_writer, "event_writer", None)
    if not hasattr(event_writer, "_closed"):
      continue
    event_writer._closed = True
    # Its writer thread would else die at exit on the queue that Python closes under it.
    worker = getattr(event_writer, "_worker", None)
    if worker is not None:
      try:
        worker.stop()
      except Exception:  # pylint: disable=broad-except  (it may be dead already)
        pass


def images_per_second(num_examples: int):
  """`rate(epoch) -> float`: `num_examples` over the wall time since the previous call (the
  first call: since this function was called)."""
  last = {"time": time.perf_counter()}

  def rate() -> float:
    now = time.perf_counter()
    seconds, last["time"] = now - last["time"], now
    return num_examples / max(seconds, 1e-9)

  return rate


def read_jsonl(workdir) -> list:
  """The points of `workdir/metrics.jsonl` (dicts), in the order written."""
  path = pathlib.Path(workdir) / JSONL
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def read_events(workdir) -> Iterator[Tuple[str, int, float]]:
  """(tag, step, value) of every scalar in the event files of `workdir`, file by file in name
  order; needs neither TensorBoard nor TensorFlow (the TFRecord framing is read without its
  CRCs)."""
  for path in sorted(pathlib.Path(workdir).glob(_EVENT_GLOB)):
    for event in _read_records(path):
      for value in event.summary.value:
        yield value.tag, int(event.step), float(value.simple_value)


def _suffix(trial: int, cycle: int) -> str:
  return f".trial{trial}_cycle{cycle}"


def _read_records(path: pathlib.Path):
  """The `Event` protos of one event file (TFRecord framing; CRCs not checked; a record cut
  short by a crash ends the file)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  data = path.read_bytes()
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    record = data[offset + 12:offset + 12 + length]
    offset += 12 + length + 4
    if len(record) < length or offset > len(data):
      return
    try:
      yield event_pb2.Event.FromString(record)
    except Exception:  # pylint: disable=broad-except  (a corrupt record ends the file)
      return


def _write_events(workdir: pathlib.Path, suffix: str, events) -> None:
  """A new event file in `workdir` holding `events` (their steps and wall times kept)."""
  import tensorboardX  # pylint: disable=import-outside-toplevel
  writer = tensorboardX.FileWriter(str(workdir), filename_suffix=suffix)
  for event in events:
    if event.summary.value:
      writer.add_event(event, step=event.step, walltime=event.wall_time)
  writer.close()


def scalars(workdir) -> Dict[str, Dict[int, list]]:
  """`read_events` grouped: tag -> step -> [values] (more than one value: a duplicate point)."""
  out: Dict[str, Dict[int, list]] = {}
  for tag, step, value in read_events(workdir):
    out.setdefault(tag, {}).setdefault(step, []).append(value)
  return out
