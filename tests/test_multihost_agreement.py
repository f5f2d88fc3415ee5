"""One set of picks for the whole run, even when a process's sampler decides otherwise.

Two processes on localhost (jax.distributed, gloo) run `experiments/main.py`; process 1's
sampler draws with another key, as a host whose selection diverged would (non-deterministic GPU
reductions, per-host autotuning, another "auto" adjacency). The run must give exactly the
results of an unperturbed 1-process run: process 0's picks are broadcast to every process.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from jax_seqgcn.experiment import results
from tests.conftest import ROOT
from tests.conftest import free_port
from tests.conftest import labelled_sets
from tests.conftest import wait_all
TIMEOUT = 300

# Runs experiments/main.py with process 1's sampler key perturbed.
PERTURBED_MAIN = """
import runpy, sys
import jax
from jax_seqgcn import samplers

real_call = samplers.Sampler.__call__

def perturbed(self, key, pool, budget, **options):
  if jax.process_index() == 1:
    key = jax.random.fold_in(key, 12345)
  return real_call(self, key, pool, budget, **options)

samplers.Sampler.__call__ = perturbed
main = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(main, run_name="__main__")
"""


def _command(workdir, npz, *extra, perturb=None):
  script = [str(perturb)] if perturb else []
  return [sys.executable, *script, str(ROOT / "experiments" / "main.py"),
          f"--config={ROOT / 'configs' / 'test.py'}", f"--workdir={workdir}",
          "--config.data.name=npz", "--config.data.source=npz", f"--config.data.path={npz}",
          "--config.al.trials=1", "--config.train.epochs=1", "--config.sampler.name=Random",
          *extra]


def _start(command):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_SEQGCN_HUGEPAGES="0",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_diverging_process_does_not_change_the_run(tmp_path, npz_path):
  perturb = tmp_path / "perturbed_main.py"
  perturb.write_text(PERTURBED_MAIN)
  address = f"127.0.0.1:{free_port()}"
  two = [_start(_command(tmp_path / "two", npz_path, f"--coordinator={address}",
                         "--num_processes=2", f"--process_id={i}", perturb=perturb))
         for i in range(2)]
  one = _start(_command(tmp_path / "one", npz_path))
  wait_all(two + [one], TIMEOUT, "hang in collectives?")
  # The perturbation is real: process 1 alone picks otherwise (`test_the_perturbation_...`).
  outcome = [(r.cycle, r.n_labelled, r.metric)
             for r in results.read_jsonl(tmp_path / "two" / "results.jsonl")]
  expected = [(r.cycle, r.n_labelled, r.metric)
              for r in results.read_jsonl(tmp_path / "one" / "results.jsonl")]
  assert outcome == expected and len(outcome) == 3
  for x, y in zip(labelled_sets(tmp_path / "two"), labelled_sets(tmp_path / "one"), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def test_the_perturbation_changes_the_picks():
  # What process 1 would pick on its own differs from process 0's picks (so the test above
  # would fail without the broadcast).
  import jax  # pylint: disable=import-outside-toplevel
  import jax_seqgcn  # pylint: disable=import-outside-toplevel
  pool = jax_seqgcn.Pool(np.arange(140) >= 100)
  sampler = jax_seqgcn.get_sampler("Random")
  key = jax.random.key(3)
  assert not np.array_equal(sampler(key, pool, 20),
                            sampler(jax.random.fold_in(key, 12345), pool, 20))


def test_broadcast_keeps_dtypes_in_one_process():
  from jax_seqgcn.training import parallel  # pylint: disable=import-outside-toplevel
  tree = {"a": np.arange(5, dtype=np.int64), "b": np.float32(2.5)}
  out = parallel.broadcast_from_main(tree)
  assert out["a"].dtype == np.int64 and out["b"].dtype == np.float32
  np.testing.assert_array_equal(out["a"], tree["a"])
