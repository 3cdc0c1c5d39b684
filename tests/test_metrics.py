import math

import numpy as np
import pytest
import torch

from labelcomp.metrics import METRICS

TARGET = np.array([0, 1, 2, 2])
PROBA = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])


def test_scores_match_hand_computed_values():
    assert METRICS["accuracy"].score(TARGET, PROBA) == pytest.approx(0.5)  # rows 0 and 2 right
    # per class F1: class 0: p=1/2, r=1 -> 2/3; class 1: p=0, r=0 -> 0; class 2: p=1, r=1/2 -> 2/3
    assert METRICS["macro_f1"].score(TARGET, PROBA) == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    expected = -(math.log(0.7) + math.log(0.4) + math.log(0.8) + math.log(0.2)) / 4
    assert METRICS["logloss"].score(TARGET, PROBA) == pytest.approx(expected)


def test_validation_twins_agree_and_logloss_watches_the_loss():
    for name in ("accuracy", "macro_f1"):
        metric = METRICS[name]
        value = metric.build_torchmetric(3)(torch.tensor(PROBA), torch.tensor(TARGET)).item()
        assert value == pytest.approx(metric.score(TARGET, PROBA)) and metric.mode == "max"
    assert METRICS["logloss"].monitor == "val/loss" and METRICS["logloss"].mode == "min"
