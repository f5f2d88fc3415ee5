"""`python -m jax_seqgcn ...`: the `jax-seqgcn` command line (see `jax_seqgcn.apps.cli`)."""

import sys

from jax_seqgcn.apps import cli

if __name__ == "__main__":
  sys.exit(cli.main())
