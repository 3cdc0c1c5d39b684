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
    assert gain_per_tenth_more(sizes, accuracy) == pytest.approx(100 * 0.05 * math.log(1.1))
    # a curve that does not rise gives no gain
    assert gain_per_tenth_more([280, 400, 320], [0.7, 0.7, 0.7]) == pytest.approx(0.0)
