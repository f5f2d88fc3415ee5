"""AUBC (area under the budget curve): hand-computed values, per-trial mean ± std, tables."""

import random

import numpy as np
import pytest

from jax_seqgcn.experiment import results


def _trial(counts, metrics, trial=0):
  return [results.Record(trial, c, n, m, 1.0, 0.5, 0.25)
          for c, (n, m) in enumerate(zip(counts, metrics))]


def test_flat_curve_scores_its_level():
  assert results.aubc(_trial([100, 200, 300, 400], [0.8] * 4)) == pytest.approx(0.8)


def test_linear_ramp_scores_its_midpoint():
  counts = [100, 200, 300, 400, 500]
  assert results.aubc(_trial(counts, np.linspace(0.5, 0.9, 5))) == pytest.approx(0.7)


def test_uneven_spacing_by_hand():
  # Trapezoids: (0.5+0.6)/2 * 100 + (0.6+0.9)/2 * 200, over the range 400 - 100.
  got = results.aubc(_trial([100, 200, 400], [0.5, 0.6, 0.9]))
  assert got == pytest.approx((0.55 * 100 + 0.75 * 200) / 300)
  assert got == pytest.approx(0.683333333333)


def test_single_cycle_scores_its_only_value():
  assert results.aubc(_trial([300], [0.42])) == pytest.approx(0.42)
  mean, std, trials = results.summarize_aubc(_trial([300], [0.42]))
  assert (mean, trials) == (pytest.approx(0.42), 1) and np.isnan(std)


def test_order_of_records_does_not_matter():
  records = _trial([100, 200, 400], [0.5, 0.6, 0.9])
  shuffled = list(records)
  random.Random(0).shuffle(shuffled)
  assert shuffled != records
  assert results.aubc(shuffled) == pytest.approx(results.aubc(records))
  assert results.aubc(records[::-1]) == pytest.approx((0.55 * 100 + 0.75 * 200) / 300)


def test_one_trial_only():
  records = _trial([100, 200], [0.5, 0.6], trial=0) + _trial([100, 200], [0.5, 0.6], trial=1)
  with pytest.raises(ValueError, match="one trial"):
    results.aubc(records)
  with pytest.raises(ValueError, match="cycle twice"):
    results.aubc(records[:2] + records[:1])
  with pytest.raises(ValueError):
    results.aubc([])


def test_several_trials_mean_and_sample_std_as_numpy():
  counts = [100, 200, 400, 800]
  curves = {0: [0.5, 0.6, 0.7, 0.9], 1: [0.4, 0.65, 0.8, 0.85], 2: [0.55, 0.5, 0.75, 0.95]}
  records = [r for t, m in curves.items() for r in _trial(counts, m, trial=t)]
  random.Random(1).shuffle(records)
  by_trial = results.aubc_by_trial(records)
  assert list(by_trial) == [0, 1, 2]
  x = np.asarray(counts, float)
  expected = {t: float(np.sum((np.asarray(m[1:]) + np.asarray(m[:-1])) / 2 * np.diff(x))
                       / (x[-1] - x[0])) for t, m in curves.items()}
  np.testing.assert_allclose([by_trial[t] for t in range(3)], [expected[t] for t in range(3)])
  values = np.asarray(list(expected.values()))
  mean, std, trials = results.summarize_aubc(records)
  assert trials == 3
  np.testing.assert_allclose([mean, std], [values.mean(), values.std(ddof=1)])


def test_aubc_of_the_mean_curve_is_the_mean_of_trial_aubcs():
  counts = [100, 200, 400]
  records = _trial(counts, [0.5, 0.6, 0.9], 0) + _trial(counts, [0.7, 0.7, 0.8], 1)
  assert results.aubc_of_mean_curve(results.summarize(records)) == pytest.approx(
      results.summarize_aubc(records).mean)


def test_summary_table_shows_it():
  counts = [100, 200, 400]
  records = _trial(counts, [0.5, 0.6, 0.9], 0) + _trial(counts, [0.7, 0.7, 0.8], 1)
  mean, std, _ = results.summarize_aubc(records)
  table = results.markdown_table({"X": records})
  assert f"| AUBC | 100-400 | {mean * 100:.2f} ± {std * 100:.2f} |  |" in table
  assert "AUBC (last row)" in table
  # The per-cycle rows are unchanged.
  assert "| 0 | 100 | 60.00 ± 14.14 | 1.8 |" in table
  # Joint errors (scale 1) are shown unscaled.
  assert f"| AUBC | 100-400 | {mean:.2f} ± {std:.2f} |" in results.markdown_table(
      {"X": records}, metric_name="mean joint error", scale=1.0, with_time=False)


def test_table_single_trial_and_single_cycle():
  one_trial = _trial([100, 200, 400], [0.5, 0.6, 0.9])
  assert "| AUBC | 100-400 | 68.33 |" in results.markdown_table({"X": one_trial})
  # One cycle: no curve, no AUBC row.
  assert "AUBC" not in results.markdown_table({"X": one_trial[:1]})


def test_table_with_runs_known_only_by_means():
  counts = [100, 200, 400]
  records = _trial(counts, [0.5, 0.6, 0.9], 0) + _trial(counts, [0.7, 0.7, 0.8], 1)
  # Trial AUBCs by hand: (0.55*100 + 0.75*200)/300 = 0.68333 and (0.7*100 + 0.75*200)/300 = 0.73333.
  saved = results.summarize(records)
  only_means = results.markdown_table({"Old": saved}, with_time=False)
  assert "| AUBC of the mean curve | 100-400 | 70.83 |" in only_means
  assert "not recoverable" in only_means
  mixed = results.markdown_table({"New": records, "Old": saved}, with_time=False)
  assert "| AUBC | 100-400 | 70.83 ± 3.54 | 70.83 † |" in mixed
  assert "† AUBC of the mean curve (Old" in mixed


def test_a_trial_still_in_progress_is_left_out():
  counts = [100, 200, 400]
  records = (_trial(counts, [0.5, 0.6, 0.9], 0) + _trial(counts, [0.7, 0.7, 0.8], 1)
             + _trial(counts[:2], [0.1, 0.2], 2))
  assert results.aubc_by_trial(records)[2] == pytest.approx(0.15)  # over its own range
  mean, std, trials = results.summarize_aubc(records)
  assert trials == 2
  np.testing.assert_allclose([mean, std], [np.mean([0.683333333, 0.733333333]),
                                           np.std([0.683333333, 0.733333333], ddof=1)])
  assert "| AUBC | 100-400 | 70.83 ± 3.54 (2 of 3 trials) |" in results.markdown_table(
      {"X": records}, with_time=False)
