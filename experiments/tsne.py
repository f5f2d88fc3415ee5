"""t-SNE views of a run's saved selections (the paper's Figures 5-6); same as `jax-seqgcn tsne`.

  python experiments/tsne.py WORKDIR --cycles 1,4 --out fig.png [--compare OTHER_WORKDIR]
      [--trial T] [--seed S] [--max_points N]

WORKDIR is a run made with --config.al.save_embeddings=True. Cycles are 0-based, as in
results.jsonl and summary.md. Needs scikit-learn: pip install "jax-seqgcn[tsne]".
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the package

from jax_seqgcn.apps import tsne  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> int:
  parser = argparse.ArgumentParser(description=tsne.DESCRIPTION)
  tsne.add_arguments(parser)
  return tsne.run(parser.parse_args())


if __name__ == "__main__":
  sys.exit(main())
