"""Overlays several runs (one workdir per sampler) in one figure and one markdown table.

  python experiments/plot.py runs/random runs/coregcn ... --out docs/curve.png [--table docs/x.md]

Each run is labelled by its sampler name (from its config.json) unless --labels is given.
The table has a row per cycle and a column per run (mean ± sample std over trials), and a last
row with each run's AUBC, the area under its budget curve (`results.aubc`: the metric's mean level
over the labelled range; mean ± sample std of the per-trial AUBCs; for runs added with --summaries
the AUBC of their mean curve, with no std). The AUBCs are also printed one per line after the
table, best first.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jax_seqgcn.experiment import results  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--labels", help="comma-separated labels, one per workdir")
  parser.add_argument("--out", default="curve.png", help="PNG to write")
  parser.add_argument("--table", help="also write the markdown table to this file")
  parser.add_argument("--title")
  parser.add_argument("--no-time", action="store_true",
                      help="leave out the seconds-per-cycle columns (e.g. runs on a shared machine)")
  parser.add_argument("--summaries", action="append", default=[],
                      help="FILE.json[:NAME,NAME]: add runs known only as per-cycle summaries "
                           "(results.read_summaries), shown before the workdirs")
  args = parser.parse_args()
  labels = args.labels.split(",") if args.labels else []
  runs, task = {}, "classification"
  for spec in args.summaries:
    path, _, names = spec.partition(":")
    known = results.read_summaries(path)
    for name in (names.split(",") if names else known):
      if name not in known:
        sys.exit(f"error: {path} has no run {name!r}; it has {', '.join(known)}")
      runs[name] = known[name]
  for i, workdir in enumerate(args.workdirs):
    workdir = pathlib.Path(workdir)
    if not (workdir / "results.jsonl").exists():
      sys.exit(f"error: {workdir} has no results.jsonl")
    config = json.loads((workdir / "config.json").read_text())
    task = config["learner"]["task"]
    label = labels[i] if i < len(labels) else config["sampler"]["name"]
    runs[label] = results.read_jsonl(workdir / "results.jsonl")
  scale = 100.0 if task == "classification" else 1.0
  metric = "accuracy %" if task == "classification" else "mean joint error"
  table = results.markdown_table(runs, metric_name=metric, scale=scale,
                                 with_time=not args.no_time)
  results.plot_curves(runs, args.out, scale=scale, title=args.title,
                      ylabel="test accuracy (%)" if scale == 100.0 else metric)
  if args.table:
    pathlib.Path(args.table).write_text(table)
  print(table)
  print(aubc_ranking(runs, scale=scale, lower_is_better=task != "classification"))


def aubc_ranking(runs, *, scale: float, lower_is_better: bool) -> str:
  """One line per run, best AUBC first (± std where per-trial records are at hand)."""
  rows = []
  for label, run in runs.items():
    run = list(run)
    if run and isinstance(run[0], results.CycleSummary):
      value = results.aubc_of_mean_curve(run)
      rows.append((value, f"{label}: {value * scale:.2f} (AUBC of the mean curve)"))
    elif run:
      mean, std, trials = results.summarize_aubc(run)
      spread = "" if trials < 2 else f" ± {std * scale:.2f}"
      rows.append((mean, f"{label}: {mean * scale:.2f}{spread} ({trials} trials)"))
  rows.sort(key=lambda r: r[0], reverse=not lower_is_better)
  return "AUBC, best first:\n" + "\n".join(line for _, line in rows)


if __name__ == "__main__":
  main()
