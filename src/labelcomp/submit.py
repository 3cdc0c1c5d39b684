"""Test predictions of a finished run: every fold's best checkpoint with TTA, averaged, written in
the sample submission's format, with the probabilities beside it and a note in the score history."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from labelcomp import history
from labelcomp.competition import Competition
from labelcomp.config import load_config
from labelcomp.errors import LabelcompError
from labelcomp.predict import predict_folds
from labelcomp.runs import find_run, write_csv_atomic
from labelcomp.survey import survey

_logger = logging.getLogger(__name__)


def submit(config: DictConfig, run_id: str | None = None, overrides: list[str] | None = None) -> Path:
    """Predict the test set with the run `run_id` (default: the experiment's latest finished run).

    The run's own saved config is used, with the same `overrides` applied on top (e.g. tta=none)."""
    run = find_run(config.paths.runs, config.experiment, run_id)
    run_config = load_config(run.config, overrides)
    competition = Competition.load(run_config.competition)
    test = competition.read_test()
    survey(test["path"].tolist()).raise_problems("test")
    checkpoints = [run.checkpoint(fold) for fold in range(run_config.cv.folds)]
    missing = [str(path) for path in checkpoints if not path.is_file()]
    if missing:
        raise LabelcompError(f"run {run.run_id}: fold checkpoints missing: {missing}; finish training the run first")
    proba = predict_folds(checkpoints, test, run_config)
    return write_submission(competition, run.run_id, test["id"], proba, Path(run_config.paths.submissions))


def write_submission(
    competition: Competition, run_id: str, ids: pd.Series, proba: np.ndarray, submissions: Path
) -> Path:
    """`<run_id>.csv` in the sample's format, the test probabilities beside it for later blending,
    and the file's name in the run's score-history row."""
    path = submissions / f"{run_id}.csv"
    competition.write_submission(ids, proba, path)
    probabilities = pd.concat([pd.DataFrame({"id": ids.to_numpy()}), pd.DataFrame(proba, columns=competition.labels)],
                              axis=1)
    write_csv_atomic(probabilities, submissions / f"{run_id}.test_proba.csv")
    history.record_submission(history.history_path(submissions), run_id, path.name)
    return path
