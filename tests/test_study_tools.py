"""The studies' arithmetic (tools/): which held-out images a run gets right, the paired difference of
two runs and the data-size curve's slope. The studies themselves need ../shared; these do not."""

import math

import numpy as np
import pandas as pd
import pytest

from labelcomp.submit import write_test_proba
from quality_study import gain_per_tenth_more
from study_data import held_out_correct, paired_difference


def test_held_out_correct_takes_each_image_s_most_probable_class(tmp_path):
    ids = pd.Series(["b.png", "a.png", "c.png"])
    proba = np.array([[0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.3, 0.3, 0.4]])
    write_test_proba(tmp_path, "run-1", ids, proba, ["cat", "dog", "fox"])
    # the truth in another order than the submission: compared by image id, not by position
    truth = pd.Series({"a.png": "cat", "c.png": "dog", "b.png": "dog"})
    correct = held_out_correct(tmp_path, "run-1", truth)
    assert correct.to_dict() == {"b.png": True, "a.png": True, "c.png": False}


def test_paired_difference_is_the_mean_with_the_standard_error_over_the_same_images():
    baseline = pd.Series([True, True, False, False, False], index=list("abcde"))
    # the same answers listed in another order: aligned by image id, nothing differs
    same = pd.Series([False, False, False, True, True], index=list("edcba"))
    assert paired_difference(same, baseline) == "+0.00 ± 0.00"
    # c now right, d still wrong, a now wrong: c +1, a -1
    other = pd.Series([False, False, True, True, False], index=list("edcba"))
    difference = pd.Series([-1, 0, 1, 0, 0], dtype=float)  # a..e
    assert paired_difference(other, baseline) == f"{100 * difference.mean():+.2f} ± {100 * difference.sem():.2f}"
    # c and d now right, a now wrong: differences -1, 0, +1, +1, 0, by hand: mean +0.2, sample variance
    # 2.8 / 4 = 0.7, standard error sqrt(0.7 / 5) = 0.3742; the sign says which run is the better one
    better = pd.Series([False, True, True, True, False], index=list("edcba"))
    assert paired_difference(better, baseline) == "+20.00 ± 37.42"
    assert paired_difference(baseline, better) == "-20.00 ± 37.42"


def test_gain_per_tenth_more_reads_the_slope_of_accuracy_against_log_size():
    sizes = [400, 360, 320, 280]
    accuracy = [0.6 + 0.05 * math.log(size) for size in sizes]
    gain, error = gain_per_tenth_more(sizes, accuracy, [42] * 4)
    assert gain == pytest.approx(100 * 0.05 * math.log(1.1))
    assert error == pytest.approx(0.0, abs=1e-9)  # on the line: no scatter, no doubt
    # a curve that does not rise gives no gain
    assert gain_per_tenth_more([280, 400, 320], [0.7, 0.7, 0.7], [42] * 3)[0] == pytest.approx(0.0)
    # two points leave nothing to estimate the scatter from
    assert math.isnan(gain_per_tenth_more([280, 400], [0.69, 0.72], [42] * 2)[1])


def test_gain_per_tenth_more_gives_the_slope_s_standard_error_as_numpy_s_line_fit_does():
    sizes = [400, 360, 320, 280]
    accuracy = [0.7230, 0.7210, 0.7150, 0.6980]
    (slope, _), covariance = np.polyfit(np.log(sizes), accuracy, 1, cov=True)
    gain, error = gain_per_tenth_more(sizes, accuracy, [42] * 4)
    assert gain == pytest.approx(100 * slope * math.log(1.1))
    assert error == pytest.approx(100 * math.sqrt(covariance[0, 0]) * math.log(1.1))


def test_gain_per_tenth_more_fits_one_slope_for_several_seeds_each_with_its_own_intercept():
    sizes = np.array([400, 360, 320, 280] * 2)
    seeds = np.array([42] * 4 + [1] * 4)
    # seed 1's curve lies 2 points lower all along: one line through both would be pulled by the shift
    shifted = 0.6 + 0.05 * np.log(sizes) - 0.02 * (seeds == 1)
    gain, error = gain_per_tenth_more(sizes, shifted, seeds)
    assert gain == pytest.approx(100 * 0.05 * math.log(1.1))
    assert error == pytest.approx(0.0, abs=1e-9)
    # with scatter: the slope of the points centred on each seed's means (the same estimate, by the
    # Frisch-Waugh theorem), whose line fit counts one intercept where the pooled fit has two
    accuracy = np.array([0.7230, 0.7210, 0.7150, 0.6980, 0.7205, 0.7165, 0.7045, 0.7040])
    log_size = pd.Series(np.log(sizes))
    centred_x = log_size - log_size.groupby(seeds).transform("mean")
    centred_y = pd.Series(accuracy) - pd.Series(accuracy).groupby(seeds).transform("mean")
    (slope, _), covariance = np.polyfit(centred_x, centred_y, 1, cov=True)
    gain, error = gain_per_tenth_more(sizes, accuracy, seeds)
    assert gain == pytest.approx(100 * slope * math.log(1.1))
    assert error == pytest.approx(100 * math.sqrt(covariance[0, 0] * (8 - 2) / (8 - 3)) * math.log(1.1))
