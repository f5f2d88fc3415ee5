"""The persistent XLA compilation cache: a repeated or resumed run does not recompile.

A cycle of the active learning loop compiles its training epoch once per bucket of labelled-set
sizes (`training.padded_capacity`), plus the evaluation and embedding passes and the sampler (on
our 2-core CPU a small-CNN training epoch compiles in ~1.5-3 s: with a warm cache the first
cycle of the Fashion-MNIST CPU-scale trial trains in 3.6-4.5 s instead of 7.2 s). JAX's
persistent cache stores each compiled program on disk under a key of the program, the
compiler options and the backend, so the next trial, a resumed run or another experiment with
the same shapes loads it instead of compiling (only a different program or JAX version misses).

experiments/main.py enables it by default in `DEFAULT_DIR` (`--compilation_cache=` to choose
another directory, `--compilation_cache=none` to turn it off); `JAX_COMPILATION_CACHE_DIR`,
if set, wins. As JAX's documentation warns, a cache directory is trusted code: do not share it
with users you do not trust.
"""

import os
import pathlib
from typing import Optional

import jax

DEFAULT_DIR = "~/.cache/jax-seqgcn/xla"
# Programs that compile faster than this are not worth a disk round trip (JAX's default: 1 s).
MIN_COMPILE_SECONDS = 0.3


def enable(path: Optional[str] = DEFAULT_DIR, *,
           min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Optional[str]:
  """Turns on the persistent compilation cache (call before the first compilation).

  Args:
    path: cache directory (created if missing; `~` expanded); None or "none" turns the cache
      off unless the `JAX_COMPILATION_CACHE_DIR` environment variable sets one.
    min_compile_seconds: programs compiling faster than this are not stored.
  Returns:
    The directory in use, or None when the cache is off.
  Raises:
    OSError: the directory cannot be created.
  """
  from_env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if from_env:
    path = from_env
  elif path is None or str(path).lower() == "none":
    return None
  directory = pathlib.Path(path).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  return str(directory)
