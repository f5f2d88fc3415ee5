"""The `jax-seqgcn` command line (also `python -m jax_seqgcn`).

  jax-seqgcn select --features FEATURES --labels LABELS --budget K --sampler NAME --out PICKS.csv
  jax-seqgcn select --images DIR --labels LABELS --budget K --sampler NAME --out PICKS.csv
      [--learner small_cnn|resnet18|vgg11] [--epochs E] [--image_size S] [--workdir W]
  jax-seqgcn tsne WORKDIR --cycles 1,4 --out FIG.png [--compare OTHER_WORKDIR]

Subcommands are rows of `COMMANDS`: name -> (one-line help, `add_arguments(parser)`,
`run(args) -> exit code`). Bad input is one line on stderr, `jax-seqgcn CMD: error: ...`, and
exit code 2; a run that fails after the checks (e.g. a diverged learner, a full disk) exits 1.
Run as a program, SIGTERM stops it like Ctrl-C (exit code 143): its temporary files and locks
are removed on the way out, and nothing half-written is left as an output.
"""

import argparse
import ast
import os
import signal
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from jax_seqgcn.apps import tsne  # matplotlib and scikit-learn are imported only when drawing

PROG = "jax-seqgcn"
USAGE_ERROR, RUN_ERROR = 2, 1


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage error is one line (`PROG CMD: error: ...`) and exit code 2."""

  def error(self, message):
    self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
  """`message` on one line: its lines joined with "; " (a list's "- " markers dropped)."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  lines = [line[2:] if line.startswith("- ") else line for line in lines]
  if len(lines) > 1 and lines[0].endswith(":"):
    return f"{lines[0]} " + "; ".join(lines[1:])
  return "; ".join(lines)


def _stop_on_sigterm(signum, frame):  # pylint: disable=unused-argument
  print(f"{PROG}: stopped by signal {signum}; cleaning up", file=sys.stderr, flush=True)
  raise SystemExit(128 + signum)


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
  return value


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
  if not value > 0 or value == float("inf"):
    raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
  return value


def parse_option(text: str) -> Tuple[str, Any]:
  """`name=value` -> (name, value): a Python literal (3, 0.5, True, None) or else the string.

  `true` / `false` are accepted for booleans.
  """
  name, sep, value = text.partition("=")
  if not sep or not name.strip():
    raise argparse.ArgumentTypeError(f"must be NAME=VALUE, got {text!r}")
  value = value.strip()
  lowered = {"true": True, "false": False, "none": None}
  if value.lower() in lowered:
    return name.strip(), lowered[value.lower()]
  try:
    return name.strip(), ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return name.strip(), value


def _add_select_arguments(parser: argparse.ArgumentParser) -> None:
  from jax_seqgcn import samplers  # pylint: disable=g-import-not-at-top
  from jax_seqgcn.apps import own_data  # pylint: disable=g-import-not-at-top
  source = parser.add_argument_group("input (one of --features / --images)")
  given = source.add_mutually_exclusive_group(required=True)
  given.add_argument("--features", metavar="FEATURES",
                     help=".npy [N, D] array (or .npz with a 'features' array): one row per "
                          "example; the LABELS ids are row indices 0..N-1")
  given.add_argument("--images", metavar="DIR",
                     help="folder of PNG/JPEG images (any depth, grayscale or RGB); the LABELS "
                          "ids are paths relative to DIR; trains the learner on the labelled "
                          "images first, then reads the others in batches (never all in "
                          "memory) to embed them")
  parser.add_argument("--labels", required=True, metavar="LABELS",
                      help="CSV with header 'id,label', one row per labelled example; labels "
                           "are any strings (class names, classes in sorted order)")
  parser.add_argument("--budget", required=True, type=_positive_int, metavar="K",
                      help="number of examples to pick (distinct, not yet labelled)")
  names = ", ".join(f"{s.name} ({'needs a learner' if s.needs - {'features'} else 'features'})"
                    for s in samplers.SAMPLERS.values())
  parser.add_argument("--sampler", required=True, metavar="NAME",
                      help=f"sampler: {names}")
  parser.add_argument("--out", required=True, metavar="PICKS.csv",
                      help="output CSV: 'rank,id' plus 'score' where the sampler ranks by one "
                           "(Entropy, Margin, LeastConfidence, LearningLoss, UncertainGCN, "
                           "UncertainDiscriminator)")
  parser.add_argument("--option", action="append", default=[], type=parse_option,
                      metavar="NAME=VALUE",
                      help="sampler option over its default, repeatable (e.g. steps=100, "
                           "s_margin=0.2); checked by the sampler, bounds included (e.g. steps "
                           "<= 10**6, hidden <= 65536; see docs/own_data.md)")
  parser.add_argument("--seed", type=int, default=0,
                      help="PRNG seed, an integer in [0, 2**32 - 1] (default 0)")
  parser.add_argument("--force", action="store_true",
                      help="replace an existing PICKS.csv (and a workdir holding only what "
                           "select wrote there); without it they are refused")
  learner = parser.add_argument_group("with --images")
  # Defaults are filled in by _run_select, so that these flags given with --features are errors.
  defaults = own_data.IMAGE_DEFAULTS
  learner.add_argument("--learner", choices=("small_cnn", "resnet18", "vgg11"),
                       help=f"learner network (default {defaults['learner']})")
  learner.add_argument("--epochs", type=_positive_int,
                       help=f"training epochs (default {defaults['epochs']})")
  learner.add_argument("--batch_size", type=_positive_int,
                       help=f"training batch size (default {defaults['batch_size']}); "
                            "lowered to the number of labelled images where it is larger")
  learner.add_argument("--learning_rate", type=_positive_float,
                       help="SGD learning rate, x0.1 at 80%% of the epochs (default "
                            f"{defaults['learning_rate']})")
  learner.add_argument("--image_size", type=_positive_int, metavar="S",
                       help="resize every image to SxS (needed when the sizes differ)")
  learner.add_argument("--workdir", metavar="W",
                       help="where the trained learner, class names, resolved config and picks "
                            "are kept (default: PICKS.workdir next to PICKS.csv)")


def _run_select(args: argparse.Namespace) -> int:
  from jax_seqgcn.apps import own_data  # pylint: disable=g-import-not-at-top
  options: Dict[str, Any] = {}
  for name, value in args.option:
    if name in options:
      raise own_data.InputError(f"--option {name} is given twice")
    options[name] = value
  common = dict(options=options, seed=args.seed, force=args.force)
  image_only = {name: getattr(args, name) for name in own_data.IMAGE_DEFAULTS}
  image_only.update(image_size=args.image_size, workdir=args.workdir)
  if args.features is not None:
    given = [f"--{name}" for name, value in image_only.items() if value is not None]
    if given:
      raise own_data.InputError(f"{', '.join(given)} only apply with --images")
    own_data.select_features_file(args.features, args.labels, args.budget, args.sampler,
                                  args.out, **common)
  else:
    settings = {name: own_data.IMAGE_DEFAULTS[name] if value is None else value
                for name, value in image_only.items() if name in own_data.IMAGE_DEFAULTS}
    own_data.select_image_folder(args.images, args.labels, args.budget, args.sampler, args.out,
                                 image_size=args.image_size, workdir=args.workdir, **settings,
                                 **common)
  return 0


# name -> (one-line help, add_arguments(parser), run(args) -> exit code)
COMMANDS: Dict[str, Tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "select": ("pick the next examples to label from own data (features or an image folder)",
               _add_select_arguments, _run_select),
    "tsne": ("t-SNE figure of saved selections (runs with config.al.save_embeddings=True)",
             tsne.add_arguments, tsne.run),
}


def build_parser() -> argparse.ArgumentParser:
  """The parser of every subcommand in `COMMANDS`."""
  parser = _Parser(prog=PROG, description="Pool-based deep active learning with sequential "
                                          "GCN samplers (UncertainGCN, CoreGCN) in JAX.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  sub.required = True
  for name, (help_, add_arguments, _) in COMMANDS.items():
    add_arguments(sub.add_parser(name, help=help_, description=help_))
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  """Runs `jax-seqgcn` with `argv` (None: sys.argv[1:]); returns the exit code.

  Bad input (`folder.InputError`, `loop.ConfigError`) and runs that fail after the checks
  (`loop.RunError`, OSError) print one line to stderr, no traceback. Run as a program
  (`argv` None), it first restarts itself with huge pages where that helps
  (`host_memory.reexec_with_hugepages`).
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
    return exit_.code
  if argv is None:  # run as a program (not called from Python): see host_memory
    from jax_seqgcn.runtime import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.reexec_with_hugepages()
    # SIGTERM unwinds like Ctrl-C, so `finally` blocks remove temporary folders and locks.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
  from jax_seqgcn.data import folder  # pylint: disable=g-import-not-at-top
  from jax_seqgcn.experiment import loop  # pylint: disable=g-import-not-at-top
  prefix = f"{PROG} {args.command}: error:"
  try:
    return COMMANDS[args.command][2](args)
  except (folder.InputError, loop.ConfigError) as err:
    print(f"{prefix} {one_line(err)}", file=sys.stderr)
    return USAGE_ERROR
  except (loop.RunError, OSError, FloatingPointError) as err:  # the last: a sampler diverged
    print(f"{prefix} {one_line(err)}", file=sys.stderr)
    return RUN_ERROR


if __name__ == "__main__":
  sys.exit(main())
