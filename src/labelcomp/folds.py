"""Fold assignment, stored as the `fold` column of a run's folds.csv.

StratifiedKFold, or StratifiedGroupKFold where rows are tied together: by the competition's group
column or by having identical pixels, so that no image is validated on a copy of itself.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from labelcomp.errors import LabelcompError

_logger = logging.getLogger(__name__)


def fold_groups(train: pd.DataFrame, duplicate_sets: list[list[int]]) -> Optional[np.ndarray]:
    """A group number per row, joining rows with the same `group` value or identical pixels;
    None when every row stands alone."""
    # a blank group value means no group: the row stands alone
    grouped = train.reset_index(drop=True)
    by_group = ([list(rows) for rows in grouped[grouped["group"] != ""].groupby("group").groups.values()]
                if "group" in train else [])
    ties = [list(tie) for tie in by_group + duplicate_sets if len(tie) > 1]
    if not ties:
        return None
    rows = np.concatenate([tie[:-1] for tie in ties])
    cols = np.concatenate([tie[1:] for tie in ties])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(train), len(train)))
    return connected_components(graph, directed=False)[1]


def assign_folds(
    train: pd.DataFrame, n_folds: int, seed: int, groups: Optional[np.ndarray] = None, source: str = "train",
    classes: Optional[list[str]] = None,
) -> pd.DataFrame:
    """Columns id, label, fold; every class spread over every fold, the same for the same seed."""
    if n_folds < 2:
        raise LabelcompError(f"cv.folds is {n_folds}; k-fold cross-validation needs at least 2 folds")
    # every class of the competition: one without images is as short as can be
    counts = train["label"].value_counts().reindex(classes if classes is not None else None, fill_value=0)
    too_small = counts[counts < n_folds]
    if not too_small.empty:
        raise LabelcompError(
            f"{source}: classes {too_small.to_dict()} have fewer images than cv.folds={n_folds}; "
            "lower cv.folds or add images"
        )
    fold = np.empty(len(train), dtype=int)
    if groups is None:
        splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(
            np.zeros(len(train)), train["target"])
    else:
        if len(np.unique(groups)) < n_folds:
            raise LabelcompError(f"{source}: only {len(np.unique(groups))} groups of images for cv.folds={n_folds}")
        splits = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(
            np.zeros(len(train)), train["target"], groups)
    for k, (_, held_out) in enumerate(splits):
        fold[held_out] = k
    folds = pd.DataFrame({"id": train["id"].to_numpy(), "label": train["label"].to_numpy(), "fold": fold})
    missing = {k: sorted(set(counts.index) - set(folds.loc[folds["fold"] == k, "label"])) for k in range(n_folds)}
    for k, labels in missing.items():
        if labels:
            _logger.warning("fold %d validates no image of %d classes (%s): groups of images tie them to other "
                            "folds; its score leaves them out", k, len(labels), ", ".join(labels[:10]))
    return folds
