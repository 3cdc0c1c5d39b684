"""Test predictions of a finished run: every fold's best checkpoint with TTA, averaged, written in
the sample submission's format, with the probabilities beside it and a note in the score history;
and the same prediction for any images (`labelcomp predict`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from labelcomp import history
from labelcomp.competition import IMAGE_EXTENSIONS, Competition
from labelcomp.config import load_config
from labelcomp.data import ImageReader
from labelcomp.errors import LabelcompError
from labelcomp.predict import predict_run
from labelcomp.resolve import keep_recorded_choices
from labelcomp.runs import RunDir, find_run, write_csv_atomic
from labelcomp.survey import survey
from labelcomp.train import record_run

_logger = logging.getLogger(__name__)


def submit(config: DictConfig, run_id: str | None = None, overrides: list[str] | None = None) -> Path:
    """Predict the test set with the run `run_id` (default: the experiment's latest finished run).

    The run's own saved config is used, with the same `overrides` applied on top (e.g. tta=none)."""
    run = find_run(config.paths.runs, config.experiment, run_id)
    recorded = load_config(run.config)
    run_config = load_config(run.config, overrides)
    keep_recorded_choices(run_config, recorded)  # overrides may say auto again
    competition = Competition.load(run_config.competition)
    test = competition.read_test()
    history_file = history.history_path(run_config.paths.submissions)
    if not history.is_recorded(history_file, run.run_id):  # its training stopped before recording it
        record_run(run, competition, run_config, json.loads(run.scores.read_text()))
    proba = predict_run_test(run, run_config, test, keep=run_config == recorded)
    return write_submission(competition, run.run_id, test["id"], proba, Path(run_config.paths.submissions))


def predict_run_test(run: RunDir, run_config: DictConfig, test: pd.DataFrame, *, keep: bool) -> np.ndarray:
    """Test probabilities (images, classes): every fold model with the run's TTA policy, averaged with
    the configured fold weights. Each fold's are kept in the run for the next reader (`keep`: where
    `run_config` is the run's recorded one)."""
    images = ImageReader.from_config(run_config)  # the survey fills its cache for the fold models
    survey(test["path"].tolist(), images).raise_problems("test")
    return predict_run(run, run_config, test, images, keep_test=keep)


def image_files(inputs: list[str]) -> list[str]:
    """The image files named or found (recursively, sorted) in the folders named."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(str(found) for found in path.rglob("*")
                            if found.is_file() and found.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(item)
        else:
            raise LabelcompError(f"{item}: no such file or folder; name image files or folders holding them")
    if not files:
        raise LabelcompError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(inputs)}")
    return files


def predict_images(config: DictConfig, run_id: str, inputs: list[str], out: str | None) -> tuple[Path, list[str]]:
    """Predict image files with the run's fold ensemble and TTA policy: a CSV of id (the path as found),
    predicted label and one probability per class. Undecodable files are left out and returned as
    problems, so one bad photo costs only its own row."""
    run = find_run(config.paths.runs, config.experiment, run_id)
    run_config = load_config(run.config)
    competition = Competition.load(run_config.competition)
    paths = image_files(inputs)
    images = ImageReader.from_config(run_config)
    found = survey(paths, images)
    readable = [path for path, digest in zip(paths, found.hashes) if digest]
    if not readable:
        raise LabelcompError(f"none of the {len(paths)} image file(s) could be read: {'; '.join(found.problems[:3])}")
    frame = pd.DataFrame({"id": readable, "path": [str(Path(path).resolve()) for path in readable]})
    proba = predict_run(run, run_config, frame, images)
    labels = np.array(competition.labels)[proba.argmax(axis=1)]
    table = pd.concat([pd.DataFrame({"id": readable, "label": labels}),
                       pd.DataFrame(proba, columns=competition.labels)], axis=1)
    path = Path(out) if out else Path(run_config.paths.submissions) / f"{run.run_id}.predictions.csv"
    write_csv_atomic(table, path)
    return path, found.problems


def write_submission(
    competition: Competition, run_id: str, ids: pd.Series, proba: np.ndarray, submissions: Path
) -> Path:
    """`<run_id>.csv` in the sample's format, the test probabilities beside it for later blending,
    and the file's name in the run's score-history row."""
    path = submissions / f"{run_id}.csv"
    competition.write_submission(ids, proba, path)
    write_test_proba(submissions, run_id, ids, proba, competition.labels)
    history.record_submission(history.history_path(submissions), run_id, path.name)
    return path


def test_proba_path(submissions: Path, run_id: str) -> Path:
    return Path(submissions) / f"{run_id}.test_proba.csv"


def write_test_proba(submissions: Path, run_id: str, ids: pd.Series, proba: np.ndarray, labels: list[str]) -> None:
    """The test probabilities a blend reads instead of predicting again: id, then one column per class."""
    frame = pd.concat([pd.DataFrame({"id": ids.to_numpy()}), pd.DataFrame(proba, columns=labels)], axis=1)
    write_csv_atomic(frame, test_proba_path(submissions, run_id))
