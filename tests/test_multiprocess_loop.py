"""The active learning loop in 2 processes (jax.distributed on localhost, gloo) and on the whole pool.

Multi-process: `experiments/main.py` runs as 2 processes joined by `jax.distributed` (one CPU
device each) and as 1 process, on the synthetic npz set (conftest's `npz_path`) with CoreSet
(its picks are k-center on the learner's embeddings, so any difference in training or feature
extraction between the two runs shows up in the labelled sets). Every subprocess has a timeout,
so a hang in the collectives fails the test instead of blocking it.
"""

import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

from jax_seqgcn.experiment import cycle
from jax_seqgcn.experiment import loop
from jax_seqgcn.experiment import results
from tests.conftest import free_port
from tests.conftest import labelled_sets
from tests.conftest import main_args
from tests.conftest import python_command
from tests.conftest import python_env
from tests.conftest import tiny_config
from tests.conftest import wait_all

TIMEOUT = 300  # seconds per subprocess
SAMPLER = "CoreSet"


def _command(workdir, npz, *extra):
  return python_command(*main_args(
      workdir, "--config.data.name=npz", "--config.data.source=npz", f"--config.data.path={npz}",
      "--config.al.trials=1", "--config.train.epochs=1", f"--config.sampler.name={SAMPLER}",
      *extra))


def _start(command, cwd=None):
  env = python_env(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _start_two(workdir, npz, cwd_of_second):
  """Processes 0 and 1 of one run; process 1 runs in its own cwd (to catch stray writes)."""
  address = f"127.0.0.1:{free_port()}"
  return [_start(_command(workdir, npz, f"--coordinator={address}", "--num_processes=2",
                          f"--process_id={i}"), cwd=cwd_of_second if i else None)
          for i in range(2)]


def _wait(procs):
  """Outputs of all processes; kills the rest and fails on a timeout or a non-zero exit."""
  return wait_all(procs, TIMEOUT)


def _outcome(workdir):
  """What must not depend on the process count: (cycle, labelled count, test metric) rows."""
  return [(r.trial, r.cycle, r.n_labelled, r.metric)
          for r in results.read_jsonl(pathlib.Path(workdir) / "results.jsonl")]


def _layout(workdir):
  """Relative paths under `workdir`, with orbax's content-hashed data file names and the time
  and host in TensorBoard event file names blanked."""
  paths = set()
  for path in pathlib.Path(workdir).rglob("*"):
    rel = path.relative_to(workdir)
    name = re.sub(r"^events\.out\.tfevents\.\d+\..*(\.trial\d+_cycle\d+)$",
                  r"events.out.tfevents.<time>.<host>\1", str(rel))
    paths.add(str(rel.parent / "<hash>") if rel.parent.name == "d" else name)
  return paths


@pytest.fixture(scope="module")
def runs(tmp_path_factory, npz_path):
  """One 2-process run and one 1-process run of the same config, launched together."""
  tmp = tmp_path_factory.mktemp("multiprocess_loop")
  (tmp / "cwd1").mkdir()
  two = _start_two(tmp / "two", npz_path, tmp / "cwd1")
  one = _start(_command(tmp / "one", npz_path))
  outputs = _wait(two + [one])
  return dict(tmp=tmp, npz=npz_path, two=tmp / "two", one=tmp / "one", outputs=outputs)


@pytest.mark.slow
def test_two_processes_equal_one_process(runs):  # pylint: disable=redefined-outer-name
  config = tiny_config(runs["npz"], sampler__name=SAMPLER)
  expected_sizes = [config.al.initial + c * config.al.budget for c in range(config.al.cycles)]
  assert [n for _, _, n, _ in _outcome(runs["one"])] == expected_sizes
  # Exactly equal, metric included: 1 vs 2 devices changes only the order of float reductions
  # (BatchNorm statistics, the cross-device all-reduce), which flips no test prediction and no
  # k-center pick on this set. Were one test example to flip elsewhere, the metric would differ
  # by 1 / len(test set).
  assert _outcome(runs["two"]) == _outcome(runs["one"])
  one, two = labelled_sets(runs["one"]), labelled_sets(runs["two"])
  assert len(one) == len(two) == config.al.cycles
  for x, y in zip(one, two):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)
  assert (runs["two"] / "config.json").read_text() == (runs["one"] / "config.json").read_text()


@pytest.mark.slow
def test_only_process_zero_writes(runs):  # pylint: disable=redefined-outer-name
  first, second, _ = runs["outputs"]
  assert first.count("| labelled") == 3 and "| labelled" not in second
  assert "epoch 1/1" not in second
  assert not any((runs["tmp"] / "cwd1").iterdir())  # process 1 wrote nothing relative
  # The same files as the 1-process run (no second copy of anything), checkpoint data included:
  # orbax's multi-host save writes NumPy leaves from the primary process only.
  assert _layout(runs["two"]) == _layout(runs["one"])
  assert not list(runs["two"].rglob("*process_1*"))
  lines = (runs["two"] / "results.jsonl").read_text().splitlines()
  assert len(lines) == len(set(lines)) == 3


@pytest.mark.slow
def test_one_process_finds_the_two_process_run_finished(runs):  # pylint: disable=redefined-outer-name
  before = results.read_jsonl(runs["two"] / "results.jsonl")
  (output,) = _wait([_start(_command(runs["two"], runs["npz"]))])
  assert "resuming" in output and "after trial 1 cycle 3" in output
  assert "| labelled" not in output  # nothing trained again
  assert results.read_jsonl(runs["two"] / "results.jsonl") == before


@pytest.mark.slow
def test_two_processes_resume_a_one_process_checkpoint(runs):  # pylint: disable=redefined-outer-name
  # Drop the last cycle of the 1-process run: both processes must restore the same labelled set
  # from the remaining checkpoint and finish it as the uninterrupted run did.
  workdir = runs["tmp"] / "resumed"
  shutil.copytree(runs["one"], workdir)
  shutil.rmtree(workdir / "checkpoints" / "2")
  (workdir / "labelled" / "trial0_cycle2.npy").unlink()
  (runs["tmp"] / "cwd1_resume").mkdir()
  first, second = _wait(_start_two(workdir, runs["npz"], runs["tmp"] / "cwd1_resume"))
  assert "resuming" in first and first.count("| labelled") == 1 and "| labelled" not in second
  assert _outcome(workdir) == _outcome(runs["one"])
  for x, y in zip(labelled_sets(workdir), labelled_sets(runs["one"]), strict=True):
    np.testing.assert_array_equal(x, y)
  assert _layout(workdir) == _layout(runs["one"])


@pytest.mark.parametrize("sampler, whole_pool", [
    ("Random", True), ("CoreSet", True), ("UncertainGCN", True), ("CoreGCN", True),
    ("Random", False)])
def test_whole_pool_offers_every_unlabelled_index(tmp_path, npz_path, monkeypatch, sampler,
                                                  whole_pool):
  embedded, sampled = [], []
  real_pool = cycle.embed_pool

  def pool_of(setup, state, images, nodes, labelled_mask, **kwargs):
    embedded.append(np.asarray(nodes))
    result = real_pool(setup, state, images, nodes, labelled_mask, **kwargs)
    sampled.append((np.shape(result.labelled_mask), np.asarray(result.labelled_mask)))
    return result

  monkeypatch.setattr(cycle, "embed_pool", pool_of)
  config = tiny_config(npz_path, sampler__name=sampler, al__cycles=2, al__whole_pool=whole_pool)
  loop.run(config, tmp_path)
  pool, (labelled, _) = 300, labelled_sets(tmp_path)
  (nodes,), ((shape, mask),) = embedded, sampled
  candidates = nodes[~mask]
  num_candidates = pool - config.al.initial if whole_pool else config.al.subset
  assert shape[0] == len(nodes) == num_candidates + config.al.initial
  np.testing.assert_array_equal(np.sort(nodes[mask]), np.sort(labelled))
  assert len(np.unique(candidates)) == num_candidates
  assert not np.isin(candidates, labelled).any()
  if whole_pool:
    np.testing.assert_array_equal(np.sort(nodes), np.arange(pool))
