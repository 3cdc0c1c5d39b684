"""Fold assignment with scikit-learn's StratifiedKFold, stored as the `fold` column of a run's folds.csv."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from labelcomp.errors import LabelcompError


def assign_folds(train: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """Columns id, label, fold; every class spread over every fold, the same for the same seed."""
    if n_folds < 2:
        raise LabelcompError(f"cv.folds is {n_folds}; k-fold cross-validation needs at least 2 folds")
    counts = train["label"].value_counts()
    too_small = counts[counts < n_folds]
    if not too_small.empty:
        raise LabelcompError(
            f"classes {too_small.to_dict()} have fewer images than cv.folds={n_folds}; "
            "lower cv.folds or add images"
        )
    fold = np.empty(len(train), dtype=int)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(train)), train["target"])):
        fold[held_out] = k
    return pd.DataFrame({"id": train["id"].to_numpy(), "label": train["label"].to_numpy(), "fold": fold})
