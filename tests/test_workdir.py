"""A workdir cannot be corrupted or mixed, and every bad input stops the run before any work."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from jax_seqgcn import samplers
from jax_seqgcn import training as train
from jax_seqgcn.data import datasets as data_lib
from jax_seqgcn.experiment import cycle
from jax_seqgcn.experiment import loop
from jax_seqgcn.experiment import results
from jax_seqgcn.experiment import workdir as workdir_lib
from tests.conftest import FAST_SAMPLER_OPTIONS
from tests.conftest import labelled_sets
from tests.conftest import main_args
from tests.conftest import run_python
from tests.conftest import tiny_config


def _no_training(monkeypatch):
  monkeypatch.setattr(cycle, "train_learner", lambda *a, **k: pytest.fail("training started"))


def _no_data(monkeypatch):
  monkeypatch.setattr(data_lib, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))


def _main(workdir, npz, *overrides):
  return main_args(workdir, "--config.data.name=npz", "--config.data.source=npz",
                   f"--config.data.path={npz}", "--config.al.trials=1", "--config.train.epochs=1",
                   "--config.sampler.name=Random", *overrides)


def test_a_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path, npz_path,
                                                                          monkeypatch):
  _no_data(monkeypatch)
  with workdir_lib.lock(tmp_path):
    holder = (tmp_path / workdir_lib.LOCK_FILE).read_text()
    assert f"pid {os.getpid()}" in holder
    with pytest.raises(workdir_lib.WorkdirError, match=f"in use by another run.*pid {os.getpid()}"):
      loop.run(tiny_config(npz_path), tmp_path)
    # A real second process too: one line, non-zero exit, no traceback, nothing written.
    out = run_python(*_main(tmp_path, npz_path), timeout=300)
    assert out.returncode != 0
    assert "error:" in out.stderr and "in use by another run" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "config.json").exists()
  # Released when the holder ends: the run goes ahead.
  monkeypatch.undo()
  assert len(loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=1), tmp_path)) == 1


def test_lost_config_json_cannot_mix_runs(tmp_path, npz_path):
  loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=2), tmp_path)
  (tmp_path / "config.json").unlink()
  for overrides, field in [(dict(sampler__name="CoreSet"), "sampler.name"),
                           (dict(sampler__name="Random", seed=7), "seed")]:
    with pytest.raises(workdir_lib.WorkdirError, match=f"checkpoint 1 differs in: {field}"):
      loop.run(tiny_config(npz_path, al__cycles=2, **overrides), tmp_path)
  # The same config resumes (nothing to do) and rewrites config.json.
  loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=2), tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["sampler"]["name"] == "Random"


def test_refused_config_writes_nothing_so_the_corrected_command_runs(tmp_path, npz_path):
  with pytest.raises(loop.ConfigError, match="larger than the pool"):
    loop.run(tiny_config(npz_path, al__initial=290, al__budget=30), tmp_path)
  assert not (tmp_path / "config.json").exists()
  assert len(loop.run(tiny_config(npz_path, al__cycles=1), tmp_path)) == 1


@pytest.mark.parametrize("overrides, message", [
    (dict(train__learning_rate=-1.0), "train.learning_rate must be a finite number > 0"),
    (dict(train__learning_rate=math.nan), "train.learning_rate must be a finite number > 0"),
    (dict(train__momentum=-0.5), "train.momentum must be a finite number >= 0"),
    (dict(learner__task="segmentation"), "unknown learner.task 'segmentation'"),
    (dict(sampler__name="CoreGCN", sampler__adjacency="eye"), "adjacency must be one of"),
    (dict(sampler__name="CoreGCN", sampler__num_layers=5), "num_layers must be 1, 2 or 3"),
    (dict(sampler__name="UncertainGCN", sampler__hidden=0), "hidden must be an int >= 1"),
    (dict(sampler__name="UncertainGCN", sampler__dropout_rate=1.5), "dropout_rate must be in"),
    (dict(sampler__name="UncertainGCN", sampler__steps=-3), "steps must be an int >= 0"),
    (dict(sampler__name="CoreGCN", sampler__learning_rate=0.0), "learning_rate must be a finite"),
])
def test_every_section_is_checked_before_the_data_is_loaded(tmp_path, npz_path, overrides,
                                                            message, monkeypatch):
  _no_data(monkeypatch)
  with pytest.raises(loop.ConfigError, match=message):
    loop.run(tiny_config(npz_path, **overrides), tmp_path)
  assert not (tmp_path / "config.json").exists()


def test_task_not_matching_the_targets_fails_before_training(tmp_path, npz_path, monkeypatch):
  _no_training(monkeypatch)
  with pytest.raises(loop.ConfigError, match="regression but .* targets have shape"):
    loop.run(tiny_config(npz_path, learner__task="regression"), tmp_path)


def test_a_diverging_learner_stops_with_a_clear_error_keeping_earlier_cycles(tmp_path, npz_path,
                                                                             monkeypatch):
  real_fit, calls = train.fit, []

  def fit(*args, progress=None, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # cycle 1 diverges at its first epoch
      progress(1, kwargs["epochs"], {"loss": float("nan"), "learning_rate": 0.05})
    return real_fit(*args, progress=progress, **kwargs)

  monkeypatch.setattr(train, "fit", fit)
  with pytest.raises(loop.RunError, match="training loss is nan at epoch 1; it diverged"):
    loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=3), tmp_path)
  kept = results.read_jsonl(tmp_path / "results.jsonl")
  assert [(r.trial, r.cycle) for r in kept] == [(0, 0)]


def test_a_really_diverging_learner_is_stopped(tmp_path, npz_path):
  with pytest.raises(loop.RunError, match="diverged"):
    loop.run(tiny_config(npz_path, sampler__name="Random", train__learning_rate=1e12,
                         al__cycles=1), tmp_path)
  assert not (tmp_path / "results.jsonl").exists()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, npz_path):
  config = tiny_config(npz_path, sampler__name="Random", al__cycles=3)
  clean = loop.run(config, tmp_path / "clean")
  broken = tmp_path / "broken"
  loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=3), broken)
  newest = broken / "checkpoints" / "2"
  for path in newest.rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.warns(RuntimeWarning, match="cannot be read"):
    resumed = loop.run(config, broken)
  assert [(r.cycle, r.n_labelled, r.metric) for r in resumed] == \
         [(r.cycle, r.n_labelled, r.metric) for r in clean]
  assert (broken / "checkpoints" / "corrupt-2").exists()


def test_more_trials_extend_a_finished_run(tmp_path, npz_path):
  one = loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=2), tmp_path / "x")
  two = loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=2, al__trials=2),
                 tmp_path / "x")
  fresh = loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=2, al__trials=2),
                   tmp_path / "fresh")
  assert two[:2] == one
  assert [(r.trial, r.cycle, r.metric) for r in two] == \
         [(r.trial, r.cycle, r.metric) for r in fresh]
  for x, y in zip(labelled_sets(tmp_path / "x", 1), labelled_sets(tmp_path / "fresh", 1)):
    np.testing.assert_array_equal(x, y)
  assert json.loads((tmp_path / "x" / "config.json").read_text())["al"]["trials"] == 2
  with pytest.raises(loop.ConfigError, match="already holds 2 trials"):
    loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=2, al__trials=1),
             tmp_path / "x")


def test_workdir_tilde_is_expanded(tmp_path, npz_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=1), "~/run")
  assert (tmp_path / "home" / "run" / "results.jsonl").exists()
  assert not (tmp_path / "~").exists()


def test_main_reports_data_errors_in_one_line(tmp_path):
  missing = tmp_path / "nope.npz"
  out = run_python(*_main(tmp_path / "w", missing), timeout=300)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().startswith("error:") and str(missing) in out.stderr
  bad = tmp_path / "bad.npz"
  bad.write_text("not a zip")
  out = run_python(*_main(tmp_path / "w2", bad), timeout=300)
  assert out.returncode != 0 and "Traceback" not in out.stderr and str(bad) in out.stderr
  shutil.rmtree(tmp_path / "w", ignore_errors=True)


def test_images_too_small_for_the_learner_fail_before_training(tmp_path, monkeypatch):
  _no_training(monkeypatch)
  rng = np.random.default_rng(0)
  path = tmp_path / "tiny_images.npz"
  np.savez(path, images=rng.integers(0, 255, (60, 2, 2, 1), dtype=np.uint8),
           targets=np.arange(60) % 3)
  with pytest.raises(loop.ConfigError, match="small_cnn"):
    loop.run(tiny_config(str(path), al__initial=10, al__budget=5, al__subset=20), tmp_path / "w")


NEW_SAMPLERS = [name for name in samplers.SAMPLERS
                if name not in ("Random", "CoreSet", "UncertainGCN", "CoreGCN")]


@pytest.mark.parametrize("sampler", NEW_SAMPLERS)
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, npz_path, sampler,
                                                              monkeypatch):
  # In-process version of the SIGKILL test (tests/test_loop.py) for every sampler added since:
  # the run dies right after the checkpoint of cycle 0 and is resumed by the same command, which
  # then trains and samples in cycle 1 (the sampler runs after the resume) and trains cycle 2.
  def config():
    c = tiny_config(npz_path, sampler__name=sampler, al__cycles=3)
    for option, value in FAST_SAMPLER_OPTIONS.items():
      c.sampler[option] = value
    return c

  clean = loop.run(config(), tmp_path / "clean")
  real_save = workdir_lib.CheckpointStore.save

  def save_then_die(self, step, tree):
    real_save(self, step, tree)
    if step == 0:
      raise KeyboardInterrupt("killed after cycle 0")

  monkeypatch.setattr(workdir_lib.CheckpointStore, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    loop.run(config(), tmp_path / "killed")
  monkeypatch.undo()
  resumed = loop.run(config(), tmp_path / "killed")
  assert [(r.cycle, r.n_labelled, r.metric) for r in resumed] == \
         [(r.cycle, r.n_labelled, r.metric) for r in clean]
  for x, y in zip(labelled_sets(tmp_path / "killed"), labelled_sets(tmp_path / "clean")):
    np.testing.assert_array_equal(x, y)


def test_workdir_from_before_compute_dtype_resumes_as_float32():
  old = {"train": {"epochs": 3}}  # a config.json written before train.compute_dtype existed
  assert workdir_lib.config_differences(old, {"train": {"epochs": 3,
                                                        "compute_dtype": "float32"}}) == []
  assert workdir_lib.config_differences(old, {"train": {"epochs": 3,
                                                        "compute_dtype": "bfloat16"}}) == [
                                                            "train.compute_dtype"]
