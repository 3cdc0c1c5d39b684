import pandas as pd
import pytest

from labelcomp.competition import Competition
from labelcomp.errors import LabelcompError
from labelcomp.folds import assign_folds
from conftest import DEMO


def test_folds_are_stratified_and_repeatable():
    train = Competition.load(DEMO).read_train()
    folds = assign_folds(train, 5, seed=7)
    per_class_and_fold = pd.crosstab(folds["label"], folds["fold"])
    assert (per_class_and_fold == 20).all().all()  # 100 images per class, 5 folds
    assert folds["id"].tolist() == train["id"].tolist()
    assert folds.equals(assign_folds(train, 5, seed=7))
    assert not folds["fold"].equals(assign_folds(train, 5, seed=8)["fold"])


def test_classes_smaller_than_the_fold_count_are_refused(tiny_competition):
    train = Competition.load(tiny_competition).read_train()
    with pytest.raises(LabelcompError, match="fewer images than cv.folds=11"):
        assign_folds(train, 11, seed=0)
