"""Results of active learning runs: records, mean ± std per cycle, markdown tables and curves.

A run's `results.jsonl` holds one `Record` per trial x cycle. `summarize` groups them by cycle;
`markdown_table` and `plot_curves` compare one or more runs (e.g. one workdir per sampler).
"""

import json
import os
import pathlib
from typing import Dict, List, NamedTuple, Optional, Sequence

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


def _summaries(run) -> List[CycleSummary]:
  """A run given as records (summarised here) or already as `CycleSummary`s (e.g. a saved table)."""
  run = list(run)
  if run and isinstance(run[0], CycleSummary):
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


def markdown_table(runs: Dict[str, Sequence[Record]], *, metric_name: str = "accuracy %",
                   scale: float = 100.0, with_time: bool = True) -> str:
  """One markdown table: a row per cycle, a column (mean ± std) per run.

  Args:
    runs: {label: records or CycleSummary list}, e.g. {"CoreGCN": read_jsonl(...)}.
    metric_name: shown in the header.
    scale: multiplies the metric (100 turns accuracy into %; use 1 for joint errors).
    with_time: add each run's mean seconds per cycle.
  Returns:
    Markdown text.
  """
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
  trials = {label: max((s.trials for s in summ.values()), default=0)
            for label, summ in summaries.items()}
  lines.append("")
  lines.append("Mean ± sample standard deviation (ddof=1) over trials; number of trials: "
               + ", ".join(f"{k}: {v}" for k, v in trials.items()) + ".")
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
