"""Results of active learning runs: records, mean ± std per cycle, markdown tables and curves.

A run's `results.jsonl` holds one `Record` per trial x cycle. `summarize` groups them by cycle;
`markdown_table` and `plot_curves` compare one or more runs (e.g. one workdir per sampler).
`aubc`, `aubc_by_trial` and `summarize_aubc` give the one-number summary of a learning curve that
active learning benchmarks compare (the area under the budget curve, as DeepAL+ reports it).
`trial_sets`, `equal_file` and `is_int_vector` serve the loop's repair of a workdir's labelled
sets from a checkpoint.
"""

import json
import os
import pathlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np

# Column order of a record; the loop keeps results as a float64 [num_records, 7] array.
FIELDS = ("trial", "cycle", "n_labelled", "metric", "train_s", "embed_s", "sample_s")


class Record(NamedTuple):
  """One trial x cycle: test metric after training on `n_labelled` labels, and seconds spent."""
  trial: int
  cycle: int
  n_labelled: int
  metric: float
  train_s: float
  embed_s: float
  sample_s: float


class CycleSummary(NamedTuple):
  """Mean and sample std (ddof=1; NaN for a single trial) over the trials of one cycle."""
  cycle: int
  n_labelled: int
  mean: float
  std: float
  trials: int
  seconds: float  # mean wall time of the cycle: train + embed + sample


def records_from_array(array: np.ndarray) -> List[Record]:
  """[num_records, 7] float array (checkpoint layout) -> records."""
  return [Record(int(r[0]), int(r[1]), int(r[2]), *map(float, r[3:])) for r in array]


def records_to_array(records: Sequence[Record]) -> np.ndarray:
  """Records -> [num_records, 7] float64 array (checkpoint layout)."""
  return np.asarray([tuple(r) for r in records], np.float64).reshape(-1, len(FIELDS))


def _atomic_write(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_jsonl(path, records: Sequence[Record]) -> None:
  """Writes records as JSON lines, atomically (a crash never leaves half a file)."""
  _atomic_write(pathlib.Path(path), "".join(json.dumps(r._asdict()) + "\n" for r in records))


def read_jsonl(path) -> List[Record]:
  """Reads a `results.jsonl`."""
  lines = pathlib.Path(path).read_text().splitlines()
  return [Record(**json.loads(line)) for line in lines if line.strip()]


def summarize(records: Sequence[Record]) -> List[CycleSummary]:
  """Mean ± sample std (ddof=1) of the metric per cycle over trials, in cycle order."""
  by_cycle: Dict[int, List[Record]] = {}
  for r in records:
    by_cycle.setdefault(r.cycle, []).append(r)
  out = []
  for cycle in sorted(by_cycle):
    rs = by_cycle[cycle]
    metrics = np.asarray([r.metric for r in rs])
    out.append(CycleSummary(cycle, int(np.round(np.mean([r.n_labelled for r in rs]))),
                            float(metrics.mean()),
                            float(metrics.std(ddof=1)) if len(rs) > 1 else float("nan"), len(rs),
                            float(np.mean([r.train_s + r.embed_s + r.sample_s for r in rs]))))
  return out


class AubcSummary(NamedTuple):
  """Mean and sample std (ddof=1; NaN for a single trial, as `CycleSummary`) of per-trial AUBCs."""
  mean: float
  std: float
  trials: int


def _area_over_range(n_labelled: Sequence[float], metric: Sequence[float]) -> float:
  """Trapezoid area under metric(n_labelled) / (last - first count); the mean if the range is 0."""
  x = np.asarray(n_labelled, np.float64)
  y = np.asarray(metric, np.float64)
  width = x[-1] - x[0]
  if width == 0:
    return float(y.mean())
  return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / width)


def aubc(records: Sequence[Record]) -> float:
  """Area under the budget curve of one trial: its metric against the labelled count.

  The trapezoid area under the test metric as a function of `n_labelled`, divided by the
  labelled range (last count - first count), so a curve flat at 0.8 scores 0.8: AUBC is the
  curve's mean level over the budget range, in the metric's units. For classification (accuracy
  in [0, 1]) higher is better; for regression (the metric is the mean joint error) it is the mean
  error over the budget range, and lower is better. A single-cycle trial (range 0, e.g. the upper
  bound) scores its only metric value.

  Args:
    records: the records of one trial, in any order (sorted here by cycle).
  Returns:
    The AUBC, a float in the metric's units.
  Raises:
    ValueError: no records, records of several trials, or a cycle twice.
  """
  records = sorted(records, key=lambda r: r.cycle)
  if not records:
    raise ValueError("aubc needs at least one record")
  trials = sorted({r.trial for r in records})
  if len(trials) > 1:
    raise ValueError(f"aubc takes the records of one trial; got trials {trials} "
                     "(use aubc_by_trial)")
  cycles = [r.cycle for r in records]
  if len(set(cycles)) != len(cycles):
    raise ValueError(f"trial {trials[0]} has a cycle twice: cycles {cycles}")
  return _area_over_range([r.n_labelled for r in records], [r.metric for r in records])


def aubc_by_trial(records: Sequence[Record]) -> Dict[int, float]:
  """{trial: AUBC of that trial's curve} (see `aubc`), in trial order (each over its own range)."""
  by_trial: Dict[int, List[Record]] = {}
  for r in records:
    by_trial.setdefault(r.trial, []).append(r)
  return {trial: aubc(by_trial[trial]) for trial in sorted(by_trial)}


def summarize_aubc(records: Sequence[Record]) -> AubcSummary:
  """Mean ± sample std (ddof=1) of the per-trial AUBCs; std is NaN for a single trial.

  Only complete trials count: those with every cycle that any trial of `records` has (a run still
  in progress has a last trial that has not reached the end of the budget; its AUBC would cover
  a shorter range). Unpacks as `(mean, std, trials)`, `trials` being the complete trials counted.
  """
  by_trial: Dict[int, set] = {}
  for r in records:
    by_trial.setdefault(r.trial, set()).add(r.cycle)
  if not by_trial:
    raise ValueError("summarize_aubc needs at least one record")
  cycles = set().union(*by_trial.values())
  complete = {t for t, c in by_trial.items() if c == cycles}
  values = np.asarray([a for t, a in aubc_by_trial(
      [r for r in records if r.trial in complete]).items()])
  return AubcSummary(float(values.mean()),
                     float(values.std(ddof=1)) if len(values) > 1 else float("nan"), len(values))


def aubc_of_mean_curve(summaries: Sequence[CycleSummary]) -> float:
  """AUBC (see `aubc`) of the per-cycle mean curve of a run known only by its `CycleSummary`s.

  AUBC is linear in the metric, so when every trial has the same labelled counts this equals the
  mean of the per-trial AUBCs; their std over trials cannot be recovered from the summaries.
  """
  summaries = sorted(summaries, key=lambda s: s.cycle)
  if not summaries:
    raise ValueError("aubc_of_mean_curve needs at least one cycle")
  return _area_over_range([s.n_labelled for s in summaries], [s.mean for s in summaries])


def _is_summaries(run) -> bool:
  return bool(run) and isinstance(run[0], CycleSummary)


def _summaries(run) -> List[CycleSummary]:
  """A run given as records (summarised here) or already as `CycleSummary`s (e.g. a saved table)."""
  run = list(run)
  if _is_summaries(run):
    return run
  return summarize(run)


def read_summaries(path) -> Dict[str, List[CycleSummary]]:
  """{label: [CycleSummary]} from a JSON file `{"runs": {label: [{cycle, n_labelled, mean, std,
  trials, seconds}, ...]}}` (runs whose raw records are not at hand)."""
  runs = json.loads(pathlib.Path(path).read_text())["runs"]
  return {label: [CycleSummary(**row) for row in rows] for label, rows in runs.items()}


def _cell(s: Optional[CycleSummary], scale: float) -> str:
  if s is None:
    return ""
  if np.isnan(s.std):
    return f"{s.mean * scale:.2f}"
  return f"{s.mean * scale:.2f} ± {s.std * scale:.2f}"


def _aubc_note(from_means: Sequence[str], *, all_means: bool) -> str:
  """The table's footnote on its AUBC row."""
  how = ("divided by the labelled range, i.e. the curve's mean level over the budget (higher is "
         "better for accuracy, lower for an error)")
  means = ("it equals the mean of the per-trial AUBCs when the trials share their labelled "
           "counts; the std over trials is not recoverable from the means.")
  if all_means:
    return ("AUBC of the mean curve (last row): area under the curve of the per-cycle mean metric "
            f"against the labelled count (trapezoids), {how}. The runs are known only by their "
            f"per-cycle means: {means}")
  note = ("AUBC (last row): area under each trial's curve of the metric against the labelled "
          f"count (trapezoids), {how}; mean ± sample std over trials.")
  if from_means:
    note += (f"\n† AUBC of the mean curve ({', '.join(from_means)}: known only by per-cycle "
             f"means); {means}")
  return note


def markdown_table(runs: Dict[str, Union[Sequence[Record], Sequence[CycleSummary]]], *,
                   metric_name: str = "accuracy %", scale: float = 100.0,
                   with_time: bool = True) -> str:
  """One markdown table: a row per cycle, a column (mean ± std) per run, and an AUBC row.

  The last row (when the table has more than one cycle) holds each run's AUBC (`aubc`: the area
  under the metric against the labelled count over the labelled range, i.e. the curve's mean level
  over the budget), in the same units and scale as the cells above it: mean ± sample std (ddof=1)
  of the per-trial AUBCs for runs given as records, as `summarize_aubc` (complete trials only;
  "(k of n trials)" when some trial has not reached the last cycle). A run given only as
  `CycleSummary`s shows the AUBC of its mean curve (`aubc_of_mean_curve`), with no std; the row is
  then labelled "AUBC of the mean curve" (every run) or its cells are marked † (some runs). Its
  "labelled" cell is the table's labelled range; its time cells are empty.

  Args:
    runs: {label: records or CycleSummary list}, e.g. {"CoreGCN": read_jsonl(...)}.
    metric_name: shown in the header.
    scale: multiplies the metric (100 turns accuracy into %; use 1 for joint errors).
    with_time: add each run's mean seconds per cycle.
  Returns:
    Markdown text.
  """
  runs = {label: list(rs) for label, rs in runs.items()}
  summaries = {label: {s.cycle: s for s in _summaries(rs)} for label, rs in runs.items()}
  cycles = sorted({c for s in summaries.values() for c in s})
  header = ["cycle", "labelled"] + [f"{label} ({metric_name})" for label in runs]
  if with_time:
    header += [f"{label} s/cycle" for label in runs]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for c in cycles:
    any_s = next(s[c] for s in summaries.values() if c in s)
    row = [str(c), str(any_s.n_labelled)]
    row += [_cell(s.get(c), scale) for s in summaries.values()]
    if with_time:
      row += [f"{s[c].seconds:.1f}" if c in s else "" for s in summaries.values()]
    lines.append("| " + " | ".join(row) + " |")
  from_means = [label for label, rs in runs.items() if _is_summaries(rs)]
  with_aubc = len(cycles) > 1
  if with_aubc:
    counts = [s.n_labelled for summ in summaries.values() for s in summ.values()]
    mark = " †" if from_means and len(from_means) < len(runs) else ""
    row = ["AUBC of the mean curve" if len(from_means) == len(runs) else "AUBC",
           f"{min(counts)}-{max(counts)}"]
    for label, rs in runs.items():
      if not rs:
        row.append("")
      elif label in from_means:
        row.append(f"{aubc_of_mean_curve(rs) * scale:.2f}{mark}")
      else:
        mean, std, complete = summarize_aubc(rs)
        started = len({r.trial for r in rs})
        row.append(_cell(CycleSummary(-1, 0, mean, std, 0, 0.0), scale)
                   + (f" ({complete} of {started} trials)" if complete < started else ""))
    if with_time:
      row += [""] * len(runs)
    lines.append("| " + " | ".join(row) + " |")
  trials = {label: max((s.trials for s in summ.values()), default=0)
            for label, summ in summaries.items()}
  lines.append("")
  lines.append("Mean ± sample standard deviation (ddof=1) over trials; number of trials: "
               + ", ".join(f"{k}: {v}" for k, v in trials.items()) + ".")
  if with_aubc:
    lines.append(_aubc_note(from_means, all_means=len(from_means) == len(runs)))
  return "\n".join(lines) + "\n"


def plot_curves(runs: Dict[str, Sequence[Record]], path, *, ylabel: str = "test accuracy (%)",
                scale: float = 100.0, title: Optional[str] = None) -> None:
  """Saves a PNG: mean learning curve per run with a ± std band, labelled count on x.

  Draws on a bare Agg figure (no pyplot), so the process's matplotlib backend is left alone.
  """
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(6.4, 4.4))
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for label, records in runs.items():
    summ = _summaries(records)
    x = np.asarray([s.n_labelled for s in summ])
    mean = np.asarray([s.mean for s in summ]) * scale
    std = np.asarray([s.std for s in summ]) * scale
    ax.plot(x, mean, marker="o", label=label)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2)
  ax.set_xlabel("labelled examples")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  tmp = pathlib.Path(str(path) + ".tmp.png")
  fig.savefig(tmp, dpi=120)
  os.replace(tmp, path)


def trial_sets(records, trial: int, labelled: np.ndarray, past) -> Dict[int, np.ndarray]:
  """{trial: latest labelled set} from a checkpoint: `labelled` for the checkpoint's `trial`,
  and `past` (the earlier trials' final sets one after the other, each as long as its last
  cycle's labelled count) split; without `past` (an older checkpoint) only `trial` is known."""
  sets = {trial: labelled}
  sizes = {}
  for r in records:
    if r.trial < trial:
      sizes[r.trial] = max(sizes.get(r.trial, 0), r.n_labelled)
  past = None if past is None else np.asarray(past, np.int64)
  if past is not None and len(past) == sum(sizes.values()):
    start = 0
    for t in sorted(sizes):
      sets[t] = past[start:start + sizes[t]]
      start += sizes[t]
  return sets


def equal_file(path: pathlib.Path, expected: np.ndarray) -> bool:
  """Whether the .npy at `path` holds exactly `expected` (same dtype too)."""
  try:
    saved = np.load(path, allow_pickle=False)
  except Exception:  # pylint: disable=broad-except  (missing, truncated, not an npy)
    return False
  return saved.dtype == expected.dtype and np.array_equal(saved, expected)


def is_int_vector(path: pathlib.Path, size: int) -> bool:
  """Whether the .npy at `path` is a readable [size] integer vector."""
  try:
    saved = np.load(path, allow_pickle=False)
  except Exception:  # pylint: disable=broad-except
    return False
  return saved.shape == (size,) and np.issubdtype(saved.dtype, np.integer)
