"""Saved selections (`config.al.save_embeddings`) and the t-SNE figure command on tiny runs."""

import argparse
import copy
import json
import pathlib
import struct
import sys

import numpy as np
import pytest

from jax_seqgcn.apps import tsne
from jax_seqgcn.experiment import cycle as cycle_lib
from jax_seqgcn.experiment import embeddings
from jax_seqgcn.experiment import loop
from jax_seqgcn.experiment import workdir as workdir_lib
from tests.conftest import ROOT
from tests.conftest import run_python
from tests.conftest import tiny_config

CYCLES = 3


def _config(npz, sampler, **overrides):
  return tiny_config(npz, **{"sampler__name": sampler, "al__cycles": CYCLES, **overrides})


@pytest.fixture(scope="module")
def runs(npz_path, tmp_path_factory):
  """{sampler: workdir} of tiny 3-cycle runs with saved embeddings (CoreSet needs features,
  Random does not)."""
  root = tmp_path_factory.mktemp("runs")
  out = {}
  for sampler in ("CoreSet", "Random"):
    out[sampler] = root / sampler
    loop.run(_config(npz_path, sampler, al__save_embeddings=True), out[sampler])
  return out


@pytest.mark.parametrize("sampler", ["CoreSet", "Random"])
def test_every_selection_is_saved_and_matches_the_next_labelled_set(runs, sampler):
  config = _config(None, sampler)
  workdir = runs[sampler]
  assert embeddings.saved(workdir) == {0: list(range(CYCLES - 1))}  # the last cycle picks nothing
  for cycle in range(CYCLES - 1):
    selection = embeddings.load(embeddings.path(workdir, 0, cycle))
    labelled = np.load(workdir / "labelled" / f"trial0_cycle{cycle}.npy")
    after = np.load(workdir / "labelled" / f"trial0_cycle{cycle + 1}.npy")
    m = config.al.subset + len(labelled)
    assert selection.ids.shape == (m,) and selection.ids.dtype == np.int64
    assert selection.embeddings.dtype == np.float16 and selection.embeddings.shape[0] == m
    assert selection.embeddings.shape[1] > 1 and np.isfinite(selection.embeddings).all()
    assert selection.embeddings.std() > 0
    assert selection.labelled.dtype == bool
    assert selection.picked.shape == (config.al.budget,) and selection.picked.dtype == np.int64
    assert len(np.unique(selection.ids)) == m
    # Node order as the sampler saw it: the unlabelled subset, then the labelled set.
    np.testing.assert_array_equal(selection.labelled, np.arange(m) >= config.al.subset)
    np.testing.assert_array_equal(selection.ids[selection.labelled], labelled)
    assert not selection.labelled[selection.picked].any()
    np.testing.assert_array_equal(
        after, np.concatenate([selection.ids[selection.labelled], selection.ids[selection.picked]]))


@pytest.mark.parametrize("sampler", ["CoreSet", "Random"])  # the sampler's pass / an extra one
def test_saved_embeddings_are_the_learners_to_float16_rounding(tmp_path, npz_path, sampler,
                                                                monkeypatch):
  real_run_cycle = cycle_lib.run_cycle
  learners = []

  def run_and_keep(setup, key, dataset, labelled, **kwargs):
    result = real_run_cycle(setup, key, dataset, labelled, **kwargs)
    learners.append((setup, result.state, dataset.train_images))
    return result

  monkeypatch.setattr(cycle_lib, "run_cycle", run_and_keep)
  loop.run(_config(npz_path, sampler, al__cycles=2, al__save_embeddings=True), tmp_path)
  assert embeddings.saved(tmp_path) == {0: [0]}
  setup, state, images = learners[0]
  saved = embeddings.load(embeddings.path(tmp_path, 0, 0))
  expected = cycle_lib.forward(setup, state, images, saved.ids)["embedding"]
  np.testing.assert_allclose(saved.embeddings.astype(np.float32), expected, rtol=1e-3,
                             atol=1e-3 * np.abs(expected).max())


def test_without_the_option_nothing_is_saved(tmp_path, npz_path):
  loop.run(_config(npz_path, "Random", al__cycles=2), tmp_path)
  assert not (tmp_path / embeddings.DIRECTORY).exists()
  assert embeddings.saved(tmp_path) == {}


def test_save_embeddings_must_be_a_bool(npz_path):
  # ConfigDict refuses other types for a bool field but lets None through.
  with pytest.raises(loop.ConfigError, match="al.save_embeddings must be True or False"):
    loop.validate_config(_config(npz_path, "Random", al__save_embeddings=None))


def test_workdirs_written_before_the_option_still_resume(npz_path):
  config = _config(npz_path, "CoreSet")
  resolved = json.loads(config.to_json_best_effort())
  saved = copy.deepcopy(resolved)
  del saved["al"]["save_embeddings"]
  assert workdir_lib.config_differences(saved, resolved) == []
  resolved["al"]["save_embeddings"] = True
  assert workdir_lib.config_differences(saved, resolved) == ["al.save_embeddings"]


def test_interrupted_and_resumed_run_saves_identical_files(runs, tmp_path, npz_path, monkeypatch):
  # Dies after cycle 0's checkpoint (its selection file written), resumes, selects in cycle 1.
  real_save = workdir_lib.CheckpointStore.save

  def save_then_die(self, step, tree):
    real_save(self, step, tree)
    if step == 0:
      raise KeyboardInterrupt("killed after cycle 0")

  config = _config(npz_path, "CoreSet", al__save_embeddings=True)
  monkeypatch.setattr(workdir_lib.CheckpointStore, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    loop.run(config, tmp_path)
  assert embeddings.saved(tmp_path) == {0: [0]}
  monkeypatch.undo()
  loop.run(config, tmp_path)
  for cycle in range(CYCLES - 1):
    resumed = embeddings.path(tmp_path, 0, cycle).read_bytes()
    assert resumed == embeddings.path(runs["CoreSet"], 0, cycle).read_bytes()


def test_save_is_deterministic_and_checks_its_arrays(tmp_path):
  ids, features = np.arange(10, 20), np.random.default_rng(0).normal(size=(10, 3))
  labelled = np.arange(10) >= 6
  embeddings.save(tmp_path / "a.npz", ids, features, labelled, [2, 0])
  embeddings.save(tmp_path / "b.npz", ids, features, labelled, [2, 0])
  assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
  loaded = embeddings.load(tmp_path / "a.npz")
  np.testing.assert_array_equal(loaded.embeddings, features.astype(np.float16))
  np.testing.assert_array_equal(loaded.picked, [2, 0])
  unlabelled, is_labelled, picked = embeddings.split_nodes(loaded)
  assert (unlabelled.sum(), is_labelled.sum(), picked.sum()) == (4, 4, 2)
  with pytest.raises(ValueError, match="unlabelled"):
    embeddings.save(tmp_path / "c.npz", ids, features, labelled, [7])
  assert not list(tmp_path.glob("*.tmp"))


def _args(workdir, out, *extra):
  parser = argparse.ArgumentParser()
  tsne.add_arguments(parser)
  return parser.parse_args([str(workdir), "--out", str(out), *map(str, extra)])


def _png_size(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def test_figure_has_a_row_per_workdir_and_a_panel_per_cycle(runs, tmp_path):
  fig = tsne.figure([runs["CoreSet"], runs["Random"]], [0, 1], seed=0)
  panels = [ax for ax in fig.axes if ax.get_title()]
  assert len(panels) == 4
  titles = [ax.get_title() for ax in panels]
  assert titles[0].startswith("CoreSet, cycle 0: 40 labelled") and "+20 picked" in titles[0]
  assert titles[3].startswith("Random, cycle 1: 60 labelled")
  # Three layers per panel: unlabelled, labelled, picked (on top), every node drawn once.
  sizes = [len(c.get_offsets()) for c in panels[1].collections]
  assert sizes == [100 - 20, 60, 20]
  tsne.save_figure(fig, tmp_path / "f.png")
  width, height = _png_size(tmp_path / "f.png")
  assert width > 500 and height > 500


def test_command_writes_a_png_and_is_deterministic(runs, tmp_path, capsys):
  for name in ("a.png", "b.png"):
    assert tsne.run(_args(runs["CoreSet"], tmp_path / name, "--cycles", "1", "--seed", "3",
                          "--max_points", 90)) == 0
  assert "wrote" in capsys.readouterr().out
  assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
  width, height = _png_size(tmp_path / "a.png")
  assert width < height  # one panel, the legend below


def test_subsample_keeps_every_pick(runs):
  selection = tsne.load_selection(runs["CoreSet"], 0, 1)
  kept = tsne.subsample(selection, 50, seed=0)
  assert len(kept) == 50 and set(selection.picked) <= set(kept)
  np.testing.assert_array_equal(kept, np.unique(kept))
  np.testing.assert_array_equal(tsne.subsample(selection, None, seed=0), np.arange(160))


@pytest.mark.parametrize("case, message", [
    ("missing", "no such workdir"),
    ("no_embeddings", "rerun with config.al.save_embeddings=True"),
    ("cycle", "no embeddings for trial 0 cycle 2; cycles saved: 0, 1"),
    ("trial", "no embeddings for trial 4; trials saved: 0"),
    ("cycles_syntax", "--cycles must be comma-separated"),
    ("max_points", "--max_points 20 must be larger than the 20 picks"),
    ("suffix", "the suffix must name an image format"),
])
def test_user_errors_are_one_line(runs, tmp_path, capsys, case, message):
  (tmp_path / "empty").mkdir()
  workdir, out, extra = runs["CoreSet"], tmp_path / "f.png", ["--cycles", "1"]
  if case == "missing":
    workdir = tmp_path / "nope"
  elif case == "no_embeddings":
    workdir = tmp_path / "empty"
  elif case == "cycle":
    extra = ["--cycles", "1,2"]
  elif case == "trial":
    extra += ["--trial", 4]
  elif case == "cycles_syntax":
    extra = ["--cycles", "one"]
  elif case == "max_points":
    extra += ["--max_points", 20]
  elif case == "suffix":
    out = tmp_path / "f.txt"
  assert tsne.run(_args(workdir, out, *extra)) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1
  assert not out.exists()


def test_missing_scikit_learn_says_what_to_install(runs, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
  assert tsne.run(_args(runs["CoreSet"], tmp_path / "f.png", "--cycles", "0")) == 2
  assert 'pip install "jax-seqgcn[tsne]"' in capsys.readouterr().err


def test_standalone_script_reports_errors_without_traceback(tmp_path):
  out = run_python(ROOT / "experiments" / "tsne.py", tmp_path / "x", "--cycles", 1,
                   "--out", tmp_path / "f.png")
  assert out.returncode == 2
  assert out.stderr == f"error: no such workdir: {tmp_path / 'x'}\n"
