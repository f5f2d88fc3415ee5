"""Runs (or resumes) an active learning experiment.

  python experiments/main.py --config=configs/fashion_mnist_cpu.py --workdir=runs/fmnist \
      [--config.sampler.name=CoreGCN] [--config.al.trials=3 ...]

Multi-host: start one process per host with --coordinator=HOST:PORT --num_processes=P
--process_id=I (CPU hosts use gloo collectives); exactly one process writes results.

On Linux, for CPU runs only (never on GPU/TPU jobs), the process first restarts itself once with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (jax_seqgcn/runtime/host_memory.py: huge pages for
XLA:CPU's per-epoch buffers; the programs it starts do not inherit the setting);
JAX_SEQGCN_HUGEPAGES=0 turns that off.

Errors are one line (`error: ...`, exit code 1): a bad config or flag (an unknown --config
field too), data, workdir, permission and full-disk errors, a diverged learner or sampler.

SIGTERM (a preemption notice) saves the learner at the next epoch boundary, prints one line
saying where, and exits with code 0; rerunning the same command resumes there
(jax_seqgcn/experiment/preemption.py).
"""

import os
import pathlib
import re
import sys
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ and the package

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (resumed if it exists).")
flags.DEFINE_string("coordinator", None, "Multi-process: coordinator address HOST:PORT.")
flags.DEFINE_integer("num_processes", 1, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", 0, "Multi-process: this process's index.")
flags.DEFINE_string("compilation_cache", "~/.cache/jax-seqgcn/xla",  # compilation_cache.DEFAULT_DIR
                    "Persistent XLA compilation cache directory ('none' to turn it off), so "
                    "that repeated and resumed runs do not recompile.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's flag parsing, with an unknown `--config.<field>` reported in one line (ml_collections
  raises a chain of KeyError and AttributeError tracebacks for it)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as err:
    # The message quotes the missing key: name the flag that holds it.
    match = re.search(r"'([^'\"]+)'", str(err))
    key = match[1] if match else str(err)
    given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    named = [a for a in given if key in a[len("--config."):].split(".")] or given
    sys.exit(f"error: {', '.join(named) or 'a --config flag'}: the config has no field {key!r} "
             "(configs/default.py lists every field)")


def _one_line_warning(message, category, filename, lineno, line=None):
  del lineno, line
  if f"{os.sep}jax_seqgcn{os.sep}" in filename:  # ours are full sentences: one line each
    return f"warning: {message}\n"
  return f"{filename}: {category.__name__}: {message}\n"


def main(argv):
  del argv
  warnings.formatwarning = _one_line_warning
  from jax_seqgcn.runtime import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_hugepages()  # once, before any work: see its docstring
  # TensorFlow is only imported if tfds is used; keep its start-up logs quiet.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # pylint: disable=g-import-not-at-top
  from jax_seqgcn import data
  from jax_seqgcn.experiment import loop
  from jax_seqgcn.experiment import workdir
  from jax_seqgcn.runtime import compilation_cache
  from jax_seqgcn.training import parallel
  # pylint: enable=g-import-not-at-top
  if FLAGS.coordinator:
    parallel.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  expected = (loop.ConfigError, loop.RunError, workdir.WorkdirError, data.DatasetNotFoundError,
              OSError)
  try:
    compilation_cache.enable(FLAGS.compilation_cache)
    loop.run(FLAGS.config, FLAGS.workdir)
  except loop.Preempted:  # SIGTERM: saved at an epoch boundary (the line is printed); exit 0
    sys.exit(0)
  except expected as e:  # one line (with the path where there is one), no traceback
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
