"""The persistent compilation cache: programs land on disk and a second process loads them."""

from tests.conftest import python_env
from tests.conftest import run_python

PROGRAM = """
import sys, jax, jax.numpy as jnp
from jax_seqgcn.runtime import compilation_cache
print(compilation_cache.enable(sys.argv[1], min_compile_seconds=0.0))
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)
f(jnp.ones((64, 64))).block_until_ready()
"""


def _run(*args, env=None):
  env = python_env(**{"JAX_COMPILATION_CACHE_DIR": None, **(env or {})})
  return run_python("-c", PROGRAM, *args, env=env, check=True, timeout=300).stdout.strip()


def test_programs_are_cached_and_reused(tmp_path):
  cache = tmp_path / "cache"
  assert _run(str(cache)) == str(cache)
  entries = sorted(p.name for p in cache.iterdir())
  assert entries, "nothing was written to the cache"
  _run(str(cache))  # a second process finds the same programs: no new entries
  assert sorted(p.name for p in cache.iterdir()) == entries


def test_none_turns_the_cache_off_and_the_environment_wins(tmp_path):
  assert _run("none") == "None"
  env_dir = tmp_path / "from_env"
  assert _run(str(tmp_path / "ignored"),
              env={"JAX_COMPILATION_CACHE_DIR": str(env_dir)}) == str(env_dir)
  assert not (tmp_path / "ignored").exists()
