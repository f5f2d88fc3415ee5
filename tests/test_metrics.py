"""Metrics of a run (`experiment.metrics`): TensorBoard event files and metrics.jsonl, no
duplicates on resume, nothing from a process that is not the main one."""

import collections

import numpy as np
import pytest

from jax_seqgcn.experiment import cycle
from jax_seqgcn.experiment import loop
from jax_seqgcn.experiment import metrics
from jax_seqgcn.training import progress
from tests.conftest import tiny_config

EPOCH_KEYS = {"train/loss", "train/accuracy", "train/learning_rate", "train/images_per_s"}
CYCLE_KEYS = {"test/accuracy", "time/train_s", "time/embed_s", "time/sample_s"}


def _points(workdir):
  """(kind, trial, cycle, epoch or stage) of every metrics.jsonl line."""
  return [(p["kind"], p["trial"], p["cycle"], p.get("epoch", p.get("stage")))
          for p in metrics.read_jsonl(workdir)]


def _no_duplicate_events(workdir):
  found = metrics.scalars(workdir)
  duplicates = {tag: steps for tag, by_step in found.items()
                for steps in [[s for s, v in by_step.items() if len(v) > 1]] if steps}
  assert not duplicates
  return {tag: sorted(by_step) for tag, by_step in found.items()}


def test_writer_tags_steps_and_jsonl(tmp_path):
  with metrics.MetricsWriter(tmp_path, cycles=2) as writer:
    for c in range(2):
      writer.start_cycle(0, c)
      for epoch in (1, 2):
        writer.write_epoch(0, c, epoch, {"loss": 1.0 / epoch, "accuracy": 0.5})
      writer.write_sampler(0, c, "gcn", {"loss": np.array([0.7, 0.6, 0.5])})
      writer.write_cycle(0, c, 40 + 20 * c, {"test/accuracy": 0.3 + c, "time/train_s": 1.0})
  events = _no_duplicate_events(tmp_path)
  assert events["trial0/cycle1/train/loss"] == [1, 2]
  assert events["trial0/cycle0/sampler/gcn/loss"] == [0, 1, 2]
  assert events["trial0/test/accuracy"] == [40, 60]
  assert events["trial0/time/train_s"] == [40, 60]
  found = metrics.scalars(tmp_path)
  assert found["trial0/cycle0/train/loss"][2] == [0.5]
  assert found["trial0/test/accuracy"][60] == [pytest.approx(1.3)]
  # One event file per cycle.
  assert len(list(tmp_path.glob("events.out.tfevents.*.trial0_cycle1"))) == 1
  lines = metrics.read_jsonl(tmp_path)
  assert [p["kind"] for p in lines] == ["epoch", "epoch", "sampler", "cycle"] * 2
  assert lines[0] == {"kind": "epoch", "trial": 0, "cycle": 0, "epoch": 1, "train/loss": 1.0,
                      "train/accuracy": 0.5}
  assert lines[2]["loss"] == [0.7, 0.6, 0.5] and lines[2]["first_step"] == 0
  assert lines[3]["n_labelled"] == 40 and lines[3]["test/accuracy"] == 0.3


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricsWriter(workdir, enabled=False, cycles=2) as writer:
    writer.start_cycle(0, 0)
    writer.write_epoch(0, 0, 1, {"loss": 1.0})
    writer.write_sampler(0, 0, "gcn", {"loss": [1.0]})
    writer.write_cycle(0, 0, 40, {"test/accuracy": 0.5})
  assert not workdir.exists()


def test_resume_keeps_completed_cycles_and_checkpointed_epochs_only(tmp_path):
  with metrics.MetricsWriter(tmp_path, cycles=3) as writer:
    for c in range(3):  # cycles 0 and 1 complete, cycle 2 stopped after its epoch 3
      for epoch in (1, 2, 3):
        writer.write_epoch(0, c, epoch, {"loss": float(epoch)})
      if c < 2:
        writer.write_sampler(0, c, "gcn", {"loss": [1.0, 2.0]})
        writer.write_cycle(0, c, 10 * (c + 1), {"test/accuracy": 0.5})
    # A later trial's cycle (e.g. a checkpoint that was never written) must go too.
    writer.write_epoch(1, 0, 1, {"loss": 1.0})
  # Resumed after global cycle 1; cycle 2's epoch checkpoint holds 2 epochs.
  with metrics.MetricsWriter(tmp_path, cycles=3, completed=1) as writer:
    assert ("epoch", 1, 0, 1) not in _points(tmp_path)
    writer.start_cycle(0, 2, start_epoch=2)
    assert [p for p in _points(tmp_path) if p[2] == 2] == [("epoch", 0, 2, 1), ("epoch", 0, 2, 2)]
    writer.write_epoch(0, 2, 3, {"loss": 30.0})
    writer.write_cycle(0, 2, 30, {"test/accuracy": 0.6})
  points = _points(tmp_path)
  assert len(points) == len(set(points))
  assert points.count(("cycle", 0, 2, None)) == 1
  events = _no_duplicate_events(tmp_path)
  assert events["trial0/cycle2/train/loss"] == [1, 2, 3]
  assert metrics.scalars(tmp_path)["trial0/cycle2/train/loss"][3] == [30.0]
  assert events["trial0/test/accuracy"] == [10, 20, 30]
  assert not any(tag.startswith("trial1/") for tag in events)


def test_report_without_reporting_does_nothing_and_with_it_calls_back():
  progress.report("gcn", {"loss": [1.0]})  # no reporter: no effect, no error
  seen = []
  with progress.reporting(lambda *args: seen.append(args)):
    progress.report("vaal", {"vae_loss": np.ones((2, 2))}, first_step=16, total_steps=64)
  progress.report("gcn", {"loss": [1.0]})
  assert len(seen) == 1
  stage, values, first_step, total = seen[0]
  assert (stage, first_step, total) == ("vaal", 16, 64)
  np.testing.assert_array_equal(values["vae_loss"], np.ones(4))


def _reporting_select(monkeypatch):
  """Makes every selection report a 3-step "gcn" stage, as a GCN sampler would."""
  select = cycle.select

  def reporting_select(*args, **kwargs):
    progress.report("gcn", {"loss": np.array([0.9, 0.8, 0.7])}, total_steps=3)
    return select(*args, **kwargs)

  monkeypatch.setattr(cycle, "select", reporting_select)


def test_loop_writes_epochs_cycles_and_sampler_stages(tmp_path, npz_path, monkeypatch, capsys):
  _reporting_select(monkeypatch)
  config = tiny_config(npz_path, sampler__name="Random", al__cycles=2, train__epochs=2)
  records = loop.run(config, tmp_path)
  lines = metrics.read_jsonl(tmp_path)
  epochs = [p for p in lines if p["kind"] == "epoch"]
  assert [(p["cycle"], p["epoch"]) for p in epochs] == [(0, 1), (0, 2), (1, 1), (1, 2)]
  assert all(set(p) == {"kind", "trial", "cycle", "epoch"} | EPOCH_KEYS for p in epochs)
  assert all(p["train/images_per_s"] > 0 for p in epochs)
  cycles = [p for p in lines if p["kind"] == "cycle"]
  assert [(p["cycle"], p["n_labelled"]) for p in cycles] == [(r.cycle, r.n_labelled)
                                                             for r in records]
  assert all(set(p) == {"kind", "trial", "cycle", "n_labelled"} | CYCLE_KEYS for p in cycles)
  assert [p["test/accuracy"] for p in cycles] == [r.metric for r in records]
  sampler = [p for p in lines if p["kind"] == "sampler"]
  assert [(p["cycle"], p["stage"], p["loss"]) for p in sampler] == [(0, "gcn", [0.9, 0.8, 0.7])]
  events = _no_duplicate_events(tmp_path)
  assert events["trial0/cycle1/train/loss"] == [1, 2]
  assert events["trial0/cycle0/train/images_per_s"] == [1, 2]
  assert events["trial0/cycle0/sampler/gcn/loss"] == [0, 1, 2]
  assert events["trial0/test/accuracy"] == [r.n_labelled for r in records]
  assert events["trial0/time/sample_s"] == [r.n_labelled for r in records]
  assert "sampler gcn step 3/3 loss 0.7" in capsys.readouterr().err


class _Stop(Exception):
  pass


def _stop_at(monkeypatch, cycle_index, epoch):
  """Makes the run raise `_Stop` in `cycle_index` (0-based) right after recording `epoch`,
  before that epoch's checkpoint."""
  make = loop.progress_callback

  def progress_callback(config, prefix, **kwargs):
    inner = make(config, prefix, **kwargs)

    def progress(e, epochs, values):
      inner(e, epochs, values)
      if f"cycle {cycle_index + 1}/" in prefix and e == epoch:
        raise _Stop()

    return progress

  monkeypatch.setattr(loop, "progress_callback", progress_callback)


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_resumed_run_writes_no_duplicates(tmp_path, npz_path, monkeypatch, capsys,
                                          checkpoint_every):
  # Stopped in cycle 1 at epoch 2 of 3 (its epoch checkpoint, if any, holds epoch 1), resumed.
  _reporting_select(monkeypatch)
  config = tiny_config(npz_path, sampler__name="Random", al__cycles=3, train__epochs=3,
                       train__checkpoint_every=checkpoint_every)
  with monkeypatch.context() as patch:
    _stop_at(patch, 1, 2)
    with pytest.raises(_Stop):
      loop.run(config, tmp_path / "resumed")
  assert ("epoch", 0, 1, 2) in _points(tmp_path / "resumed")
  capsys.readouterr()
  loop.run(config, tmp_path / "resumed")
  if checkpoint_every:  # cycle 1 continued from its epoch 1: that point kept, rewritten once
    assert "resuming trial 1 cycle 2 at epoch 1/3" in capsys.readouterr().out
    assert len(list((tmp_path / "resumed").glob("events.*.kept.trial0_cycle1"))) == 1
  loop.run(config, tmp_path / "clean")
  resumed, clean = _points(tmp_path / "resumed"), _points(tmp_path / "clean")
  assert len(resumed) == len(set(resumed)) == 3 * 3 + 3 + 2
  assert collections.Counter(resumed) == collections.Counter(clean)
  assert _no_duplicate_events(tmp_path / "resumed") == _no_duplicate_events(tmp_path / "clean")


def test_learning_loss_records_the_lossnet_loss(tmp_path, npz_path):
  config = tiny_config(npz_path, sampler__name="LearningLoss", al__cycles=1)
  loop.run(config, tmp_path)
  (epoch,) = [p for p in metrics.read_jsonl(tmp_path) if p["kind"] == "epoch"]
  assert set(epoch) == {"kind", "trial", "cycle", "epoch", "train/ranking_loss"} | EPOCH_KEYS
  assert _no_duplicate_events(tmp_path)["trial0/cycle0/train/ranking_loss"] == [1]
