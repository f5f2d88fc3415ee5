"""t-SNE views of what a sampler picked: the paper's Figures 5-6, from saved selections.

A run with `config.al.save_embeddings=True` keeps, for every selection, the learner embeddings of
the unlabelled subset and the labelled set, and the picks (`jax_seqgcn.experiment.embeddings`). This module
maps each saved selection to 2-D with scikit-learn's t-SNE (an optional extra:
`pip install "jax-seqgcn[tsne]"`) and draws one panel per cycle, one row per workdir: unlabelled
points light grey, labelled points blue, the picked points red on top.

Cycles are numbered as in `results.jsonl`, `summary.md` and the `labelled/` and `embeddings/`
files: 0-based, cycle c being the selection made after training on `initial + c * budget`
labels (the progress output's "cycle c+1/n"). The last cycle selects nothing, so it has no view.

Command line (`jax-seqgcn tsne`, or experiments/tsne.py before the CLI is installed):

  jax-seqgcn tsne WORKDIR --cycles 1,4 --out FIG.png [--compare OTHER_WORKDIR] [--trial T]
      [--seed S] [--max_points N]
"""

import argparse
import json
import os
import pathlib
import sys
import zipfile
from typing import List, Optional, Sequence

import numpy as np

from jax_seqgcn.experiment import embeddings as embeddings_lib

DESCRIPTION = ("Draw t-SNE views of the labelled, unlabelled and picked points of saved "
               "selections (runs with config.al.save_embeddings=True), one panel per cycle.")
INSTALL_HINT = 'pip install "jax-seqgcn[tsne]"'
COLOURS = {"unlabelled": "#c8c8c8", "labelled": "tab:blue", "picked": "tab:red"}


class TsneError(ValueError):
  """A request that cannot be drawn (missing workdir, selection or package); one-line message."""


def load_selection(workdir, trial: int, cycle: int) -> embeddings_lib.Selection:
  """The selection saved for (`trial`, `cycle`), 0-based, in `workdir`.

  Raises:
    TsneError: no such workdir, no embeddings saved there, or not for this trial or cycle (the
      message lists the ones present), or an unreadable file.
  """
  workdir = pathlib.Path(workdir).expanduser()
  if not workdir.is_dir():
    raise TsneError(f"no such workdir: {workdir}")
  saved = embeddings_lib.saved(workdir)
  if not saved:
    raise TsneError(f"{workdir} has no saved embeddings ({embeddings_lib.DIRECTORY}/"
                    "trial*_cycle*.npz); rerun with config.al.save_embeddings=True")
  if trial not in saved:
    raise TsneError(f"{workdir} has no embeddings for trial {trial}; trials saved: "
                    f"{', '.join(map(str, saved))}")
  if cycle not in saved[trial]:
    raise TsneError(f"{workdir} has no embeddings for trial {trial} cycle {cycle}; cycles "
                    f"saved: {', '.join(map(str, saved[trial]))} (numbered as in results.jsonl; "
                    "the last cycle selects nothing)")
  path = embeddings_lib.path(workdir, trial, cycle)
  try:
    return embeddings_lib.load(path)
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
    raise TsneError(f"{path} cannot be read ({err})") from err


def sampler_name(workdir) -> str:
  """The sampler named in `workdir/config.json`, or the directory's name without one."""
  workdir = pathlib.Path(workdir).expanduser()
  try:
    return json.loads((workdir / "config.json").read_text())["sampler"]["name"]
  except (OSError, ValueError, KeyError, TypeError):
    return workdir.name


def subsample(selection: embeddings_lib.Selection, max_points: Optional[int],
              seed: int) -> np.ndarray:
  """Sorted positions [K] of the nodes to show: every pick, and a uniform sample of the others.

  Args:
    selection: a saved selection of M nodes.
    max_points: K at most (None or 0: all M nodes); must exceed the number of picks.
    seed: NumPy seed of the sample.
  """
  m = len(selection.ids)
  if not max_points or max_points >= m:
    return np.arange(m)
  picked = np.zeros(m, bool)
  picked[selection.picked] = True
  if max_points <= picked.sum():
    raise TsneError(f"--max_points {max_points} must be larger than the {picked.sum()} picks")
  others = np.flatnonzero(~picked)
  kept = np.random.default_rng(seed).choice(others, max_points - picked.sum(), replace=False)
  return np.sort(np.concatenate([np.flatnonzero(picked), kept]))


def embed_2d(features, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
  """2-D t-SNE (scikit-learn, PCA initialisation) of [M, D] features -> [M, 2] float32.

  Deterministic for a given `seed` whatever the number of cores (same library versions): it runs
  on one thread, because scikit-learn's Barnes-Hut gradient sums in another order with more
  threads (coordinates then differ by up to ~1 unit) and its OpenMP threads are many times slower
  on a busy machine. The perplexity is capped at (M - 1) / 3 for tiny sets.
  """
  try:
    from sklearn import manifold  # pylint: disable=g-import-not-at-top
    import threadpoolctl  # pylint: disable=g-import-not-at-top  (a scikit-learn dependency)
  except ImportError as err:
    raise TsneError(f"t-SNE needs scikit-learn, which is not installed: {INSTALL_HINT}") from err
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or len(features) < 4:
    raise TsneError(f"t-SNE needs at least 4 points of [M, D] features, got {features.shape}")
  tsne = manifold.TSNE(n_components=2, perplexity=min(perplexity, (len(features) - 1) / 3),
                       init="pca", learning_rate="auto", random_state=seed)
  # The limit reaches the libraries loaded so far, which the imports above have done.
  with threadpoolctl.threadpool_limits(limits=1):
    return tsne.fit_transform(features).astype(np.float32)


def _panel(ax, selection, kept, points, title: str) -> None:
  unlabelled, labelled, picked = (mask[kept] for mask in embeddings_lib.split_nodes(selection))
  ax.scatter(*points[unlabelled].T, s=2, c=COLOURS["unlabelled"], linewidths=0, rasterized=True)
  ax.scatter(*points[labelled].T, s=3, c=COLOURS["labelled"], linewidths=0, rasterized=True)
  ax.scatter(*points[picked].T, s=5, c=COLOURS["picked"], linewidths=0, rasterized=True)
  ax.set_title(title, fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])


def figure(workdirs: Sequence, cycles: Sequence[int], *, trial: int = 0, seed: int = 0,
           max_points: Optional[int] = None):
  """A `matplotlib.figure.Figure` with one row per workdir and one t-SNE panel per cycle.

  Args:
    workdirs: run directories with saved embeddings (rows, top to bottom).
    cycles: 0-based cycles (columns), as in results.jsonl.
    trial: 0-based trial.
    seed: seeds the t-SNE and the subsample.
    max_points: show (and embed) at most this many nodes per panel: every pick and a uniform
      sample of the labelled and unlabelled nodes (None: all).
  Raises:
    TsneError: a missing workdir, selection or scikit-learn (checked before any t-SNE runs).
  """
  from matplotlib import figure as figure_lib  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  if not workdirs or not cycles:
    raise TsneError("need at least one workdir and one cycle")
  selections = [[load_selection(w, trial, c) for c in cycles] for w in workdirs]
  fig = figure_lib.Figure(figsize=(3.3 * len(cycles), 3.3 * len(workdirs) + 0.5))
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(len(workdirs), len(cycles), squeeze=False)
  for row, workdir in enumerate(workdirs):
    name = sampler_name(workdir)
    for col, (cycle, selection) in enumerate(zip(cycles, selections[row])):
      kept = subsample(selection, max_points, seed)
      points = embed_2d(selection.embeddings[kept], seed=seed)
      n_labelled, m = int(selection.labelled.sum()), len(selection.ids)
      title = (f"{name}, cycle {cycle}: {n_labelled:,} labelled\n"
               f"+{len(selection.picked):,} picked from {m - n_labelled:,}")
      if len(kept) < m:
        title += f" ({len(kept):,} of {m:,} shown)"
      _panel(axes[row, col], selection, kept, points, title)
  handles = [axes[0, 0].scatter([], [], s=20, c=colour, label=label)
             for label, colour in COLOURS.items()]
  fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
  fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
  return fig


def _check_out(path) -> pathlib.Path:
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).expanduser()
  formats = backend_agg.FigureCanvasAgg.get_supported_filetypes()
  if path.suffix[1:].lower() not in formats:
    raise TsneError(f"--out {path}: the suffix must name an image format "
                    f"({', '.join('.' + f for f in sorted(formats))})")
  return path


def save_figure(fig, path) -> None:
  """Saves `fig` atomically (format from the suffix, e.g. .png, .pdf, .svg)."""
  path = _check_out(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, path)


def _cycles(text: str) -> List[int]:
  try:
    cycles = [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    cycles = []
  if not cycles or min(cycles) < 0:
    raise TsneError(f"--cycles must be comma-separated cycle numbers >= 0 (as in results.jsonl), "
                    f"got {text!r}")
  return cycles


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `tsne` command's arguments to `parser`."""
  parser.add_argument("workdir", help="run directory (config.al.save_embeddings=True)")
  parser.add_argument("--cycles", required=True,
                      help="comma-separated cycles, 0-based as in results.jsonl and summary.md "
                           "(cycle c = the selection after training on initial + c * budget "
                           "labels), e.g. 1,4")
  parser.add_argument("--out", required=True, help="figure file (.png, .pdf, .svg)")
  parser.add_argument("--compare", action="append", default=[], metavar="OTHER_WORKDIR",
                      help="another run drawn as a further row (repeatable)")
  parser.add_argument("--trial", type=int, default=0, help="0-based trial (default 0)")
  parser.add_argument("--seed", type=int, default=0, help="t-SNE and subsample seed (default 0)")
  parser.add_argument("--max_points", type=int, default=0,
                      help="at most this many points per panel: every pick and a uniform sample "
                           "of the others (default 0: all)")


def run(args: argparse.Namespace) -> int:
  """Runs the `tsne` command; returns the exit status (2 with a one-line error on stderr)."""
  try:
    if args.trial < 0 or args.max_points < 0:
      raise TsneError("--trial and --max_points must be >= 0")
    _check_out(args.out)
    fig = figure([args.workdir, *args.compare], _cycles(args.cycles), trial=args.trial,
                 seed=args.seed, max_points=args.max_points or None)
    save_figure(fig, args.out)
  except (TsneError, OSError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}")
  return 0
