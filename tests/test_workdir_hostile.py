"""A hostile user's workdir: stray entries, damaged side files, a deleted lock, a full disk,
broken checkpoints, and nonsensical flags each end in one clear line (or a repair), never in a
traceback or a destroyed run."""

import errno
import os
import pathlib
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from jax_seqgcn.experiment import cycle
from jax_seqgcn.experiment import embeddings as embeddings_lib
from jax_seqgcn.experiment import loop
from jax_seqgcn.experiment import metrics as metrics_lib
from jax_seqgcn.experiment import results
from jax_seqgcn.experiment import workdir as workdir_lib
from jax_seqgcn.data import datasets as data_lib
from tests.conftest import main_args
from tests.conftest import python_command
from tests.conftest import python_env
from tests.conftest import run_python
from tests.conftest import tiny_config

# What tensorstore (under orbax) raises when a checkpoint write meets a full disk.
TENSORSTORE_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing "labelled/0" in OCDBT database at local '
                      'file "/w/checkpoints/1.orbax-checkpoint-tmp/": Failed to write 4096 bytes '
                      "to file 9: No space left on device [os_error_code='28']")


def _config(npz, **overrides):
  """Random sampler, 2 trials x 2 cycles, saved selections: a run with every side file."""
  settings = dict(sampler__name="Random", al__cycles=2, al__trials=2, al__save_embeddings=True)
  return tiny_config(npz, **{**settings, **overrides})


def _main(workdir, npz, *flags):
  """experiments/main.py flags giving `_config(npz)` (then `flags`)."""
  return main_args(workdir, "--config.data.name=npz", "--config.data.source=npz",
                   f"--config.data.path={npz}", "--config.al.trials=2", "--config.train.epochs=1",
                   "--config.sampler.name=Random", "--config.al.cycles=2",
                   "--config.al.save_embeddings=True", *flags)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, npz_path):
  """(workdir, records) of a finished `_config` run; tests work on copies (`_copy`)."""
  workdir = tmp_path_factory.mktemp("finished") / "w"
  return workdir, loop.run(_config(npz_path), workdir)


def _copy(finished, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "w"
  shutil.copytree(finished[0], workdir)
  return workdir


def _no_training(monkeypatch):
  monkeypatch.setattr(cycle, "train_learner", lambda *a, **k: pytest.fail("trained again"))


def _outcomes(records):
  return [(r.trial, r.cycle, r.n_labelled, r.metric) for r in records]


def _listing(directory: pathlib.Path):
  return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ----------------------------------------------------------------------------- 1: stray entries


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.write_text("notes")],
                         ids=["folder", "file"])
def test_a_stray_step_entry_is_refused_and_the_checkpoints_stay(tmp_path, npz_path, finished,
                                                                make, monkeypatch):
  workdir = _copy(finished, tmp_path)
  checkpoints = workdir / "checkpoints"
  before = _listing(checkpoints)
  make(checkpoints / "99")
  _no_training(monkeypatch)
  with pytest.raises(workdir_lib.WorkdirError, match=r"checkpoints/99 is named like a checkpoint "
                     r"but is not one .*; move it out of .*checkpoints and rerun"):
    loop.run(_config(npz_path), workdir)
  assert _listing(checkpoints) == before + ["99"]  # nothing moved aside, nothing deleted
  # Moved away by the user, the run resumes with nothing to do.
  if (checkpoints / "99").is_dir():
    (checkpoints / "99").rmdir()
  else:
    (checkpoints / "99").unlink()
  assert _outcomes(loop.run(_config(npz_path), workdir)) == _outcomes(finished[1])


def test_other_stray_entries_are_ignored_with_one_warning(tmp_path, npz_path, finished,
                                                          monkeypatch):
  workdir = _copy(finished, tmp_path)
  (workdir / "checkpoints" / "notes.txt").write_text("my notes")
  (workdir / "checkpoints" / "old").mkdir()
  _no_training(monkeypatch)
  with pytest.warns(RuntimeWarning, match=r"ignoring notes.txt, old in .*checkpoints"):
    assert _outcomes(loop.run(_config(npz_path), workdir)) == _outcomes(finished[1])
  assert (workdir / "checkpoints" / "notes.txt").read_text() == "my notes"


# ----------------------------------------------------------------------------- 2: side files


def test_resume_rewrites_damaged_or_missing_labelled_sets(tmp_path, npz_path, finished,
                                                          monkeypatch, capsys):
  workdir = _copy(finished, tmp_path)
  labelled = workdir / "labelled"
  good = {p.name: p.read_bytes() for p in labelled.iterdir()}
  assert len(good) == 4
  with open(labelled / "trial0_cycle1.npy", "r+b") as handle:
    handle.truncate(20)
  (labelled / "trial1_cycle0.npy").unlink()
  _no_training(monkeypatch)
  loop.run(_config(npz_path), workdir)
  out = capsys.readouterr().out
  assert "rewrote 2 labelled set(s)" in out and "trial0_cycle1.npy, trial1_cycle0.npy" in out
  assert {p.name: p.read_bytes() for p in labelled.iterdir()} == good
  # The whole folder deleted: every trial's sets come back (the checkpoint holds them all).
  shutil.rmtree(labelled)
  loop.run(_config(npz_path), workdir)
  assert "rewrote 4 labelled set(s)" in capsys.readouterr().out
  assert {p.name: p.read_bytes() for p in labelled.iterdir()} == good
  # Intact files: nothing said.
  loop.run(_config(npz_path), workdir)
  assert "rewrote" not in capsys.readouterr().out


def test_resume_of_a_partial_run_repairs_the_labelled_sets(tmp_path, npz_path, finished,
                                                           monkeypatch):
  workdir = tmp_path / "killed"
  real_save = workdir_lib.CheckpointStore.save

  def save_then_die(self, step, tree):
    real_save(self, step, tree)
    if step == 1:  # trial 0 complete
      raise KeyboardInterrupt("killed")

  monkeypatch.setattr(workdir_lib.CheckpointStore, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    loop.run(_config(npz_path), workdir)
  monkeypatch.undo()
  for name in ("trial0_cycle0.npy", "trial0_cycle1.npy"):
    (workdir / "labelled" / name).write_bytes(b"\x93NUMPY garbage")
  assert _outcomes(loop.run(_config(npz_path), workdir)) == _outcomes(finished[1])
  for path in (finished[0] / "labelled").iterdir():
    assert (workdir / "labelled" / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_checkpoint_without_past_labelled_sets_resumes_and_names_what_it_cannot_restore(
    tmp_path, npz_path, finished, monkeypatch, capsys):
  # Checkpoints written before they held the earlier trials' labelled sets.
  real_save = workdir_lib.CheckpointStore.save
  monkeypatch.setattr(workdir_lib.CheckpointStore, "save", lambda self, step, tree: real_save(
      self, step, {k: v for k, v in tree.items() if k != "past_labelled"}))
  loop.run(_config(npz_path), tmp_path)
  monkeypatch.undo()
  for name in ("trial0_cycle1.npy", "trial1_cycle1.npy"):
    (tmp_path / "labelled" / name).unlink()
  # One more trial: trial 1's set is in the checkpoint, trial 0's is not.
  extended = loop.run(_config(npz_path, al__trials=3), tmp_path)
  captured = capsys.readouterr()
  assert "rewrote 1 labelled set(s)" in captured.out and "trial1_cycle1.npy" in captured.out
  assert ("warning: trial0_cycle1.npy in " in captured.err
          and "cannot restore them" in captured.err), captured.err
  assert _outcomes(extended)[:4] == _outcomes(finished[1])
  assert (tmp_path / "labelled" / "trial1_cycle1.npy").read_bytes() == \
      (finished[0] / "labelled" / "trial1_cycle1.npy").read_bytes()


def test_resume_removes_damaged_or_stale_selections_and_names_missing_ones(
    tmp_path, npz_path, finished, monkeypatch, capsys):
  workdir = _copy(finished, tmp_path)
  saved = workdir / embeddings_lib.DIRECTORY
  assert sorted(p.name for p in saved.iterdir()) == ["trial0_cycle0.npz", "trial1_cycle0.npz"]
  good = (saved / "trial0_cycle0.npz").read_bytes()
  (saved / "trial0_cycle0.npz").write_bytes(good[:len(good) // 2])
  _no_training(monkeypatch)
  loop.run(_config(npz_path), workdir)
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith("warning: saved selections"), err
  assert "cannot be recomputed without retraining: trial0_cycle0.npz (damaged, removed)" in err[0]
  assert not (saved / "trial0_cycle0.npz").exists()
  # Another cycle's file in its place (stale), and the other one missing: named, one line.
  shutil.copy(saved / "trial1_cycle0.npz", saved / "trial0_cycle0.npz")
  (saved / "trial1_cycle0.npz").unlink()
  loop.run(_config(npz_path), workdir)
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1, err
  assert "trial0_cycle0.npz (stale, removed), trial1_cycle0.npz (missing)" in err[0]
  assert not any(saved.iterdir())


# ----------------------------------------------------------------------------- 3: the lock


def test_the_lock_holds_when_the_lock_file_is_deleted(tmp_path, npz_path, monkeypatch):
  monkeypatch.setattr(data_lib, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
  with workdir_lib.lock(tmp_path):
    (tmp_path / workdir_lib.LOCK_FILE).unlink()
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"in use by another run \(its pid is unknown: .lock, which names "
                             r"it, was deleted\)"):
      loop.run(_config(npz_path), tmp_path)
    out = run_python(*_main(tmp_path, npz_path), timeout=300)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "in use by another run" in lines[0]
    assert not (tmp_path / "config.json").exists()


def test_a_lock_taken_a_moment_ago_names_its_holder(tmp_path, npz_path, monkeypatch):
  # The holder has the lock but has not written `.lock` yet (a tight race): the message waits
  # for it rather than saying "unknown process".
  monkeypatch.setattr(data_lib, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
  with workdir_lib.lock(tmp_path):
    info = tmp_path / workdir_lib.LOCK_FILE
    info.write_text("")
    writer = threading.Timer(0.3, info.write_text,
                             [f"pid {os.getpid()} on {socket.gethostname()} since now\n"])
    writer.start()
    try:
      with pytest.raises(workdir_lib.WorkdirError, match=f"in use by another run \\(pid "
                                                          f"{os.getpid()} on "):
        loop.run(_config(npz_path), tmp_path)
    finally:
      writer.join()


# ----------------------------------------------------------------------------- 4: a full disk


def _fail_saves(monkeypatch, folder: str, step: int, error: Exception):
  """Orbax saves into `folder` (checkpoints or checkpoints_epoch) fail at `step`."""
  manager = workdir_lib.ocp.CheckpointManager
  real = manager.save

  def save(self, at, *args, **kwargs):
    if pathlib.Path(str(self.directory)).name == folder and at == step:
      raise error
    return real(self, at, *args, **kwargs)

  monkeypatch.setattr(manager, "save", save)


@pytest.mark.parametrize("folder, step, error, where", [
    ("checkpoints", 1, ValueError(TENSORSTORE_ENOSPC), "saving checkpoint .*checkpoints/1"),
    ("checkpoints_epoch", 1, OSError(errno.ENOSPC, "No space left on device"),
     "saving the epoch checkpoint in .*checkpoints_epoch"),
])
def test_a_full_disk_is_one_error_and_the_rerun_resumes(tmp_path, npz_path, finished, folder,
                                                        step, error, where, monkeypatch):
  config = lambda: _config(npz_path, al__trials=1)
  _fail_saves(monkeypatch, folder, step, error)
  with pytest.raises(workdir_lib.DiskFullError) as raised:
    loop.run(config(), tmp_path)
  message = str(raised.value)
  assert "\n" not in message and isinstance(raised.value, OSError)
  assert re.fullmatch(f"no space left on device while {where}; free space and rerun the same "
                      "command to resume", message), message
  monkeypatch.undo()
  assert not list((tmp_path / "checkpoints").glob("corrupt-*"))
  resumed = loop.run(config(), tmp_path)
  assert _outcomes(resumed) == _outcomes(finished[1])[:2]


def test_a_full_disk_while_writing_the_outputs_is_one_error(tmp_path, npz_path, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(results, "plot_curves", full)
  with pytest.raises(workdir_lib.DiskFullError, match="^no space left on device while writing "
                     f"to {tmp_path}; free space and rerun the same command to resume$"):
    loop.run(_config(npz_path, al__trials=1, al__cycles=1), tmp_path)


def _unshare_works() -> bool:
  try:
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True,
                          timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


@pytest.mark.slow
def test_a_real_full_disk_prints_one_line_and_the_rerun_resumes(tmp_path, npz_path, finished):
  # A 60 KB tmpfs in a private mount namespace (no root needed where user namespaces are
  # allowed): the run fails in its first checkpoint saves; the workdir is copied out as it is.
  if not _unshare_works():
    pytest.skip("unshare -rm (a private tmpfs) is not available here")
  mount, kept = tmp_path / "mnt", tmp_path / "kept"
  mount.mkdir()
  command = " ".join(f"'{a}'" for a in python_command(*_main(mount / "w", npz_path,
                                                             "--config.al.trials=1")))
  script = (f"mount -t tmpfs -o size=60k tmpfs '{mount}' || exit 99; {command}; code=$?; "
            f"cp -r '{mount}/w' '{kept}'; exit $code")
  out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                       timeout=300, env=python_env())
  if out.returncode == 99:
    pytest.skip(f"no tmpfs: {out.stderr.strip()}")
  assert out.returncode not in (0, 99), out.stdout + out.stderr
  # Besides the progress lines (stderr), one line.
  lines = [line for line in out.stderr.splitlines()
           if line.strip() and not re.match(r"trial \d+/\d+ cycle \d+/\d+ ", line)]
  assert len(lines) == 1 and lines[0].startswith("error: no space left on device while"), \
      out.stderr[-3000:]
  rerun = run_python(*_main(kept, npz_path, "--config.al.trials=1"), timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert _outcomes(results.read_jsonl(kept / "results.jsonl")) == _outcomes(finished[1])[:2]


# ----------------------------------------------------------------------------- 5: orbax noise


@pytest.mark.slow
def test_a_truncated_checkpoint_is_recovered_without_tracebacks(tmp_path, npz_path, finished):
  workdir = _copy(finished, tmp_path)
  newest = workdir / "checkpoints" / "3"
  for path in (newest / "default").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      with open(path, "r+b") as handle:
        handle.truncate(10)
  out = run_python(*_main(workdir, npz_path), timeout=300)
  assert out.returncode == 0, out.stderr
  for noise in ("Traceback", "Event loop is closed", "never retrieved"):
    assert noise not in out.stderr, out.stderr[-3000:]
  warning = [line for line in out.stderr.splitlines() if "cannot be read" in line]
  assert len(warning) == 1 and warning[0].startswith(f"warning: checkpoint {newest} "), out.stderr
  assert "resuming" in out.stdout
  assert _outcomes(results.read_jsonl(workdir / "results.jsonl")) == _outcomes(finished[1])


# ----------------------------------------------------------------------------- 6-8: config


@pytest.mark.parametrize("value", [-1, -9999])
def test_nonsensical_data_limits_are_refused(tmp_path, npz_path, value, monkeypatch):
  monkeypatch.setattr(data_lib, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
  with pytest.raises(loop.ConfigError, match=r"data.max_test must be an int >= 0 \(0: the whole "
                                             f"split\\), got {value!r}"):
    loop.run(tiny_config(npz_path, data__max_test=value), tmp_path)
  assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("max_test, tested", [(0, 100), (30, 30), (10 ** 6, 100)])
def test_max_test_zero_means_the_whole_test_split(tmp_path, npz_path, max_test, tested):
  config = tiny_config(npz_path, data__max_test=max_test)
  dataset = data_lib.load_dataset("npz", source="npz", path=npz_path)
  run = loop._Run(config, tmp_path, dataset)  # pylint: disable=protected-access
  try:
    assert len(run.dataset.test_images) == len(run.dataset.test_targets) == tested
  finally:
    run.store.close()


def test_a_batch_larger_than_the_labelled_set_trains_on_the_whole_set(tmp_path, npz_path,
                                                                      capsys):
  # 40 then 60 labelled: batch 1000 trains as batches of 40 and 60 would, and says so once.
  huge = loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=2,
                              train__batch_size=1000), tmp_path / "huge")
  out = capsys.readouterr().out
  assert out.count("note: train.batch_size 1000 is larger than the labelled set (40)") == 1
  exact = loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=1,
                               train__batch_size=40), tmp_path / "exact")
  assert "note:" not in capsys.readouterr().out
  assert huge[0].metric == exact[0].metric

  def losses(workdir):
    return [p["train/loss"] for p in metrics_lib.read_jsonl(workdir)
            if p["kind"] == "epoch" and p["cycle"] == 0]

  assert losses(tmp_path / "huge") == losses(tmp_path / "exact")
  # The config (and so resume) is untouched: a rerun finds the run finished.
  assert loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=2,
                              train__batch_size=1000), tmp_path / "huge") == huge


def test_a_diverging_sampler_is_a_run_error(tmp_path, npz_path):
  with pytest.raises(loop.RunError, match=r"trial 1/1 cycle 1/2: the sampler's GCN diverged.*"
                                          r"Earlier cycles are saved"):
    loop.run(tiny_config(npz_path, sampler__name="UncertainGCN", sampler__learning_rate=1e30,
                         al__cycles=2), tmp_path)


@pytest.mark.parametrize("flag, field", [("--config.al.foo=1", "foo"),
                                         ("--config.bogus=1", "bogus"),
                                         ("--config.al.foo.bar=2", "foo")])
def test_an_unknown_config_field_is_one_line(tmp_path, flag, field):
  out = run_python(*main_args(tmp_path / "w", flag), timeout=120)
  assert out.returncode != 0
  assert out.stderr.strip() == (f"error: {flag.split('=')[0]}: the config has no field "
                                f"'{field}' (configs/default.py lists every field)"), out.stderr
  assert not (tmp_path / "w").exists()


def test_lock_messages_do_not_wait_long_for_a_live_holder(tmp_path):
  # The holder's pid is alive: named at once (no retry delay).
  with workdir_lib.lock(tmp_path):
    start = time.perf_counter()
    with pytest.raises(workdir_lib.WorkdirError, match=f"pid {os.getpid()}"):
      with workdir_lib.lock(tmp_path):
        pass
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 2 ** 70, True])
def test_a_seed_outside_32_bits_is_refused_before_any_work(tmp_path, npz_path, seed):
  config = tiny_config(npz_path, sampler__name="Random")
  config.seed = seed
  with pytest.raises(loop.ConfigError, match=r"seed must be an int in \[0, 2\*\*32\)"):
    loop.run(config, tmp_path / "w")
  assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
