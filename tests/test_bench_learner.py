"""experiments/bench_learner.py: one record per case from repeated, alternating measurements."""

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))

import bench_learner  # noqa: E402  (a script directory, not a package)


def _ours(rate, ms, epochs):
  return {"learner": "small_cnn", "batch_size": 64, "images_per_s": rate, "ms_per_step": ms,
          "epoch_s": epochs}


def test_one_repeat_keeps_the_record_and_ratio():
  record = bench_learner.summarise([_ours(3000.0, 21.3, [1.4, 1.3])],
                                   [{"framework": "torch 2.13", "images_per_s": 2500.0}])
  assert record["images_per_s"] == 3000.0 and record["torch_images_per_s"] == 2500.0
  assert record["ratio_vs_torch"] == 1.2 and record["torch"] == "torch 2.13"
  assert "repeats" not in record and "repeat_ratios" not in record
  assert bench_learner.summarise([_ours(3000.0, 21.3, [1.4])], []).keys() == _ours(
      0, 0, 0).keys()


def test_repeats_report_medians_and_every_repeat():
  ours = [_ours(3000.0, 21.0, [1.4]), _ours(3600.0, 18.0, [1.1]), _ours(3300.0, 19.0, [1.2])]
  theirs = [{"framework": "torch", "images_per_s": r} for r in (3000.0, 4000.0, 2400.0)]
  record = bench_learner.summarise(ours, theirs)
  assert record["images_per_s"] == 3300.0 and record["torch_images_per_s"] == 3000.0
  assert record["ratio_vs_torch"] == 1.1
  assert record["repeats"] == 3 and record["ms_per_step"] == 19.0
  assert record["repeat_images_per_s"] == [3000.0, 3600.0, 3300.0]
  assert record["repeat_torch_images_per_s"] == [3000.0, 4000.0, 2400.0]
  assert record["repeat_ratios"] == [1.0, 0.9, 1.375]
  assert record["epoch_s"] == [1.4, 1.1, 1.2]
