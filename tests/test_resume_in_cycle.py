"""Resume inside a cycle (issue 20): epoch checkpoints, SIGKILL, SIGTERM, a corrupt checkpoint.

A continued fit equals the uninterrupted one bit for bit; a run killed (SIGKILL) or preempted
(SIGTERM) in the middle of a cycle resumes at its last saved epoch and gives the uninterrupted
run's results; a corrupt epoch checkpoint restarts the cycle with a one-line warning.
"""

import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from jax_seqgcn import training as train
from jax_seqgcn.experiment import loop
from jax_seqgcn.experiment import preemption
from jax_seqgcn.experiment import results
from jax_seqgcn.experiment import workdir as workdir_lib
from tests.conftest import TinyBN
from tests.conftest import labelled_sets
from tests.conftest import main_args
from tests.conftest import python_command
from tests.conftest import python_env
from tests.conftest import tiny_config

EPOCHS, EVERY = 20, 2
# CoreSet's picks depend on the learner's embeddings: equal labelled sets mean equal learners.
SETTINGS = dict(sampler__name="CoreSet", al__cycles=2, train__epochs=EPOCHS,
                train__checkpoint_every=EVERY)


def _data(n, shape=(8, 8, 3), classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
          rng.integers(0, classes, n).astype(np.int32))


@pytest.mark.parametrize("loss_prediction", [None, train.LossPrediction(hidden=8)])
def test_continued_fit_equals_uninterrupted_fit(loss_prediction):
  images, labels = _data(50)
  kwargs = dict(epochs=5, batch_size=16, preprocessing="cifar10", milestones=(3,),
                learning_rate=0.1, loss_prediction=loss_prediction)
  saved = {}

  def keep(epoch, state):
    if epoch == 2:
      saved["leaves"] = [np.array(x) for x in jax.tree.leaves(state)]

  whole = train.fit(jax.random.key(3), TinyBN(), images, labels, on_epoch_end=keep, **kwargs)
  continued = train.fit(jax.random.key(3), TinyBN(), images, labels,
                        initial_state=saved["leaves"], start_epoch=2, **kwargs)
  assert int(continued.step) == int(whole.step)
  for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(continued)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit on CPU
  with pytest.raises(ValueError, match="initial_state has"):
    train.fit(jax.random.key(3), TinyBN(), images, labels, initial_state=saved["leaves"][1:],
              start_epoch=2, **kwargs)


def _same_results(a, b):
  x, y = results.read_jsonl(a / "results.jsonl"), results.read_jsonl(b / "results.jsonl")
  assert [(r.trial, r.cycle, r.n_labelled, r.metric) for r in x] == \
         [(r.trial, r.cycle, r.n_labelled, r.metric) for r in y]
  assert len(x) == SETTINGS["al__cycles"]
  for s, t in zip(labelled_sets(a), labelled_sets(b), strict=True):
    np.testing.assert_array_equal(s, t)
  # The epoch checkpoint is deleted once its cycle is saved.
  assert not (a / workdir_lib.EPOCH_DIR).exists()


def test_corrupt_epoch_checkpoint_restarts_the_cycle(tmp_path, npz_path, monkeypatch, capfd):
  config = tiny_config(npz_path, **SETTINGS)
  loop.run(config, tmp_path / "clean")
  calls = {"n": 0}

  def sigterm_at_cycle_2_epoch_8():  # asked after each epoch, and once between the cycles
    calls["n"] += 1
    return calls["n"] == EPOCHS + 1 + 8

  before = signal.getsignal(signal.SIGTERM)
  with monkeypatch.context() as patch:
    patch.setattr(preemption, "stop_requested", sigterm_at_cycle_2_epoch_8)
    with pytest.raises(loop.Preempted, match="saved trial 1 cycle 2 at epoch 8/20"):
      loop.run(config, tmp_path / "broken")
  assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored
  files = [f for f in (tmp_path / "broken" / workdir_lib.EPOCH_DIR).rglob("*") if f.is_file()]
  assert files
  for f in files:  # garble every file: truncated, then junk
    data = f.read_bytes()
    f.write_bytes(b"\x00garbage" + data[:len(data) // 3][::-1])
  capfd.readouterr()
  loop.run(config, tmp_path / "broken")
  out, err = capfd.readouterr()
  warnings = [line for line in err.splitlines() if "epoch checkpoint" in line]
  assert len(warnings) == 1 and warnings[0].startswith("warning: epoch checkpoint")
  assert "trial 1 cycle 2 restarts at epoch 0" in warnings[0]
  assert "Traceback" not in err and "resuming trial" not in out
  _same_results(tmp_path / "broken", tmp_path / "clean")


def _main(workdir, npz):
  flags = [f"--config.data.{k}={v}" for k, v in dict(name="npz", source="npz", path=npz).items()]
  flags += ["--config.al.trials=1"]
  flags += [f"--config.{k.replace('__', '.')}={v}" for k, v in SETTINGS.items()]
  return python_command(*main_args(workdir, *flags))


ENV = dict(PYTHONUNBUFFERED="1", JAX_SEQGCN_HUGEPAGES="0")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, npz_path):
  workdir = tmp_path_factory.mktemp("clean")
  out = subprocess.run(_main(workdir, npz_path), capture_output=True, text=True, timeout=300,
                       env=python_env(**ENV))
  assert out.returncode == 0, out.stdout + out.stderr
  return workdir


def _committed_epochs(workdir):
  """The epoch checkpoints orbax has finished writing (its temporary folders are not numbers)."""
  folder = workdir / workdir_lib.EPOCH_DIR
  return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []


def _stop_at(workdir, npz, sig, line, *, committed=False):
  """Starts a run, sends `sig` once its output shows `line` (and, when `committed`, once an
  epoch checkpoint is complete on disk: saves are asynchronous); returns (returncode, output)."""
  proc = subprocess.Popen(_main(workdir, npz), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=python_env(**ENV))
  seen = []
  deadline = time.time() + 300
  for text in proc.stdout:
    seen.append(text)
    if line in text:
      while committed and not _committed_epochs(workdir):
        assert time.time() < deadline, "no epoch checkpoint was committed"
        time.sleep(0.01)
      proc.send_signal(sig)
      break
    assert time.time() < deadline, "run did not reach the signal point"
  seen += proc.stdout.readlines()
  proc.wait(timeout=120)
  return proc.returncode, "".join(seen)


def _resume(workdir, npz):
  out = subprocess.run(_main(workdir, npz), capture_output=True, text=True, timeout=300,
                       env=python_env(**ENV))
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout


@pytest.mark.slow
def test_resume_after_sigkill_inside_a_cycle(tmp_path, npz_path, clean_run):
  # Epoch checkpoints every 2 epochs, written in the background: killed after "epoch 8/20" is
  # printed and a checkpoint is complete, the run resumes at an even epoch of cycle 1 after 0.
  code, output = _stop_at(tmp_path, npz_path, signal.SIGKILL, "cycle 1/2 epoch 8/20",
                          committed=True)
  assert code == -signal.SIGKILL, output
  resumed = _resume(tmp_path, npz_path)
  match = re.search(r"resuming trial 1 cycle 1 at epoch (\d+)/20", resumed)
  assert match and 2 <= int(match.group(1)) < 20 and int(match.group(1)) % EVERY == 0, resumed
  _same_results(tmp_path, clean_run)


@pytest.mark.slow
def test_sigterm_saves_at_the_next_epoch_and_exits_cleanly(tmp_path, npz_path, clean_run):
  code, output = _stop_at(tmp_path, npz_path, signal.SIGTERM, "cycle 2/2 epoch 8/20")
  assert code == 0, output
  match = re.search(r"SIGTERM: saved trial 1 cycle 2 at epoch (\d+)/20; rerun the same "
                    r"command to resume", output)
  assert match and "Traceback" not in output, output
  resumed = _resume(tmp_path, npz_path)
  assert f"resuming trial 1 cycle 2 at epoch {match.group(1)}/20" in resumed, resumed
  _same_results(tmp_path, clean_run)


def test_checkpoint_every_is_checked_and_may_change_on_resume(tmp_path, npz_path):
  with pytest.raises(loop.ConfigError, match="train.checkpoint_every must be an int >= 0"):
    loop.run(tiny_config(npz_path, train__checkpoint_every=-1), tmp_path / "bad")
  config = tiny_config(npz_path, sampler__name="Random", al__cycles=1, train__checkpoint_every=0)
  first = loop.run(config, tmp_path / "w")
  # An old workdir (no field) and another interval both resume the same run.
  assert workdir_lib.config_differences({"train": {}}, {"train": {"checkpoint_every": 5}}) == []
  config.train.checkpoint_every = 3
  assert loop.run(config, tmp_path / "w") == first

