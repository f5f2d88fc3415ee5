"""End-to-end tests of the active learning loop (tiny configs), resume after SIGKILL, configs."""

import json
import signal
import subprocess
import time

import numpy as np
import pytest

from jax_seqgcn import samplers
from jax_seqgcn.experiment import cycle
from jax_seqgcn.experiment import loop
from jax_seqgcn.experiment import results
from jax_seqgcn.experiment import workdir as workdir_lib
from tests.conftest import FAST_SAMPLER_OPTIONS
from tests.conftest import ROOT
from tests.conftest import labelled_sets
from tests.conftest import main_args
from tests.conftest import python_command
from tests.conftest import python_env
from tests.conftest import run_python
from tests.conftest import tiny_config


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_each_sampler_end_to_end(tmp_path, npz_path, sampler):
  config = tiny_config(npz_path, sampler__name=sampler)
  for option, value in FAST_SAMPLER_OPTIONS.items():
    config.sampler[option] = value
  records = loop.run(config, tmp_path)
  al = config.al
  assert [r.n_labelled for r in records] == [al.initial + c * al.budget for c in range(al.cycles)]
  assert all(0.0 <= r.metric <= 1.0 for r in records)
  assert records[1].sample_s > 0 and records[-1].sample_s == 0  # no selection after the last
  sets = labelled_sets(tmp_path)
  assert len(sets) == al.cycles
  for before, after in zip(sets, sets[1:]):
    assert len(np.unique(after)) == len(after) == len(before) + al.budget
    np.testing.assert_array_equal(after[:len(before)], before)
  assert results.read_jsonl(tmp_path / "results.jsonl") == records
  assert "± " in (tmp_path / "summary.md").read_text()
  assert (tmp_path / "curve.png").stat().st_size > 1000
  assert json.loads((tmp_path / "config.json").read_text())["sampler"]["name"] == sampler


def test_same_config_twice_gives_identical_results(tmp_path, npz_path):
  config = tiny_config(npz_path, sampler__name="CoreGCN", al__trials=2, al__cycles=2)
  first = loop.run(config, tmp_path / "a")
  second = loop.run(config, tmp_path / "b")
  assert [(r.trial, r.cycle, r.n_labelled, r.metric) for r in first] == \
         [(r.trial, r.cycle, r.n_labelled, r.metric) for r in second]
  for trial in range(2):
    for x, y in zip(labelled_sets(tmp_path / "a", trial), labelled_sets(tmp_path / "b", trial)):
      np.testing.assert_array_equal(x, y)
  # Trials differ (their keys do).
  assert not np.array_equal(labelled_sets(tmp_path / "a", 0)[0], labelled_sets(tmp_path / "a", 1)[0])


def test_rerun_of_a_finished_workdir_trains_nothing(tmp_path, npz_path, monkeypatch):
  config = tiny_config(npz_path, sampler__name="Random", al__cycles=2)
  first = loop.run(config, tmp_path)
  monkeypatch.setattr(cycle, "train_learner", lambda *a, **k: pytest.fail("trained again"))
  assert loop.run(config, tmp_path) == first


def _main(workdir, *overrides):
  return main_args(workdir, "--config.al.trials=1", "--config.sampler.name=UncertainGCN",
                   *overrides)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
  # Real Fashion-MNIST, real processes: kill -9 right after the first cycle's checkpoint and
  # again in the middle of the resumed run's training, then let it finish.
  env = python_env(PYTHONUNBUFFERED="1")
  workdir = tmp_path / "killed"
  for kill_after_lines in (1, 0):
    proc = subprocess.Popen(python_command(*_main(workdir)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    seen = 0
    deadline = time.time() + 400
    for line in proc.stdout:
      if "| labelled" in line:
        seen += 1
      if seen >= kill_after_lines and (kill_after_lines or "epoch 1/" in line):
        time.sleep(0.5 if kill_after_lines else 0.0)
        proc.send_signal(signal.SIGKILL)
        break
      assert time.time() < deadline, "run did not reach the kill point"
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
  finish = run_python(*_main(workdir), env=env, timeout=600)
  assert finish.returncode == 0, finish.stdout + finish.stderr
  assert "resuming" in finish.stdout
  clean = run_python(*_main(tmp_path / "clean"), env=env, timeout=600)
  assert clean.returncode == 0, clean.stdout + clean.stderr
  killed = results.read_jsonl(workdir / "results.jsonl")
  uninterrupted = results.read_jsonl(tmp_path / "clean" / "results.jsonl")
  assert len(killed) == 3
  assert [(r.cycle, r.n_labelled, r.metric) for r in killed] == \
         [(r.cycle, r.n_labelled, r.metric) for r in uninterrupted]
  for x, y in zip(labelled_sets(workdir), labelled_sets(tmp_path / "clean")):
    np.testing.assert_array_equal(x, y)


def test_different_config_on_existing_workdir_is_refused(tmp_path, npz_path):
  loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=1), tmp_path)
  with pytest.raises(workdir_lib.WorkdirError, match="different config.*sampler.name"):
    loop.run(tiny_config(npz_path, sampler__name="CoreSet", al__cycles=1), tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (dict(sampler__name="Uncertain"), "unknown sampler 'Uncertain'; valid: Random, CoreSet"),
    (dict(data__name="mnist"), "unknown dataset 'mnist'; valid: cifar10"),
    (dict(learner__name="resnet50"), "unknown learner 'resnet50'; valid:"),
    (dict(al__budget=0), "al.budget must be a positive int"),
    (dict(al__subset=-5), "al.subset must be a positive int"),
    (dict(train__epochs=0), "train.epochs must be a positive int"),
    (dict(al__subset=10, al__budget=20), "smaller than al.budget"),
    (dict(al__initial=250, al__budget=30), "larger than the pool of 300"),
    (dict(train__compute_dtype="float16"), "train.compute_dtype must be one of"),
])
def test_bad_config_fails_before_training(tmp_path, npz_path, overrides, message, monkeypatch):
  monkeypatch.setattr(cycle, "train_learner", lambda *a, **k: pytest.fail("training started"))
  with pytest.raises(loop.ConfigError, match=message):
    loop.run(tiny_config(npz_path, **overrides), tmp_path)


def test_main_reports_config_errors_cleanly(tmp_path):
  out = run_python(*_main(tmp_path, "--config.sampler.name=Nope"))
  assert out.returncode != 0
  assert "error: bad config" in out.stderr and "valid: Random" in out.stderr
  assert "Traceback" not in out.stderr


def test_upper_bound_trains_once_on_the_whole_split(tmp_path, npz_path):
  records = loop.run(tiny_config(npz_path, al__upper_bound=True, al__trials=2), tmp_path)
  assert [(r.trial, r.cycle, r.n_labelled) for r in records] == [(0, 0, 300), (1, 0, 300)]


def test_plot_overlays_runs(tmp_path, npz_path):
  for sampler in ("Random", "CoreSet"):
    loop.run(tiny_config(npz_path, sampler__name=sampler, al__cycles=2), tmp_path / sampler)
  out = run_python(ROOT / "experiments" / "plot.py", tmp_path / "Random", tmp_path / "CoreSet",
                   "--out", tmp_path / "both.png", "--table", tmp_path / "t.md")
  assert out.returncode == 0, out.stderr
  table = (tmp_path / "t.md").read_text()
  assert "Random (accuracy %)" in table and "CoreSet (accuracy %)" in table
  assert (tmp_path / "both.png").stat().st_size > 1000


def test_summary_statistics_by_hand():
  records = [results.Record(t, c, 10 * (c + 1), m, 1.0, 0.5, 0.25)
             for t, c, m in [(0, 0, 0.5), (1, 0, 0.7), (0, 1, 0.6), (1, 1, 0.6)]]
  summary = results.summarize(records)
  assert [(s.cycle, s.n_labelled, s.trials) for s in summary] == [(0, 10, 2), (1, 20, 2)]
  np.testing.assert_allclose([s.mean for s in summary], [0.6, 0.6])
  # Sample standard deviation (ddof=1): sqrt(((0.5-0.6)^2 + (0.7-0.6)^2) / 1).
  np.testing.assert_allclose([s.std for s in summary], [np.sqrt(0.02), 0.0], atol=1e-12)
  np.testing.assert_allclose(summary[0].seconds, 1.75)
  table = results.markdown_table({"X": records})
  assert "60.00 ± 14.14" in table and "ddof=1" in table and "X: 2" in table
  single = results.summarize(records[:1])
  assert np.isnan(single[0].std) and "| 50.00 |" in results.markdown_table({"X": records[:1]})


def test_import_and_plot_leave_the_matplotlib_backend_alone(tmp_path):
  code = ("import matplotlib; matplotlib.use('svg'); import jax_seqgcn; "
          "from jax_seqgcn.experiment import results; "
          "r = [results.Record(0, 0, 10, 0.5, 1, 1, 1), results.Record(1, 0, 10, 0.6, 1, 1, 1)]; "
          f"results.plot_curves({{'X': r}}, {str(tmp_path / 'c.png')!r}); "
          "print(matplotlib.get_backend())")
  out = run_python("-c", code, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "svg"
  assert (tmp_path / "c.png").stat().st_size > 1000


def test_plot_mixes_workdirs_and_saved_summaries(tmp_path, npz_path):
  loop.run(tiny_config(npz_path, sampler__name="Random", al__cycles=2, al__trials=2),
           tmp_path / "Random")
  saved = {"runs": {"Old": [dict(cycle=0, n_labelled=40, mean=0.5, std=0.1, trials=3,
                                 seconds=2.0),
                            dict(cycle=1, n_labelled=60, mean=0.6, std=0.05, trials=3,
                                 seconds=3.0)]}}
  (tmp_path / "old.json").write_text(json.dumps(saved))
  out = run_python(ROOT / "experiments" / "plot.py", tmp_path / "Random",
                   "--summaries", f"{tmp_path / 'old.json'}:Old",
                   "--out", tmp_path / "mix.png", "--table", tmp_path / "t.md")
  assert out.returncode == 0, out.stderr
  table = (tmp_path / "t.md").read_text()
  assert "| 0 | 40 | 50.00 ± 10.00 |" in table and "| 1 | 60 | 60.00 ± 5.00 |" in table
  assert "Old: 3, Random: 2" in table
  bad = run_python(ROOT / "experiments" / "plot.py", "--summaries",
                   f"{tmp_path / 'old.json'}:Nope", tmp_path / "Random")
  assert bad.returncode != 0 and "has no run 'Nope'" in bad.stderr
