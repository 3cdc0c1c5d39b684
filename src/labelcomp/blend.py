"""`labelcomp submit --runs A,B,C`: blend finished runs with weights fitted on their OOF predictions.

Only OOF probabilities and training labels enter the fit; the test probabilities (saved beside each
run's submission, or predicted once from its fold checkpoints) are only combined with the fitted weights.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from labelcomp import history
from labelcomp.competition import Competition
from labelcomp.config import load_config
from labelcomp.errors import LabelcompError
from labelcomp.ensemble import cross_fitted_score, fit_blend_weights
from labelcomp.metrics import METRICS, Metric, multiclass_log_loss
from labelcomp.runs import RunDir, claim_name, find_run, read_table, write_text_atomic
from labelcomp.submit import predict_run_test, test_proba_path, write_submission, write_test_proba

_logger = logging.getLogger(__name__)


def _read_oof(runs: list[RunDir], competition: Competition) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    frames = [read_table(run.oof_tta) for run in runs]
    order = frames[0]["id"]
    aligned = []
    for run, frame in zip(runs, frames):
        if set(frame["id"]) != set(order) or list(frame.columns) != list(frames[0].columns):
            raise LabelcompError(f"{run.oof_tta}: its OOF images or classes differ from run {runs[0].run_id}'s; "
                                 "blend runs of the same competition")
        aligned.append(frame.set_index("id").loc[order])
    index = {label: position for position, label in enumerate(competition.labels)}
    target = aligned[0]["label"].map(index).to_numpy()
    same_folds = all(frame["fold"].equals(aligned[0]["fold"]) for frame in aligned)
    oof = np.stack([frame[competition.labels].to_numpy(dtype=float) for frame in aligned])
    return oof, target, aligned[0]["fold"].to_numpy(), same_folds


def _test_proba(run: RunDir, run_config: DictConfig, test: pd.DataFrame, submissions: Path,
                labels: list[str]) -> np.ndarray:
    """The run's saved test probabilities, or its fold models' predictions, then saved for next time."""
    path = test_proba_path(submissions, run.run_id)
    if path.is_file():
        saved = read_table(path)
        if saved["id"].equals(test["id"].astype(str).reset_index(drop=True)) and list(saved.columns[1:]) == labels:
            return saved[labels].to_numpy(dtype=float)
        _logger.info("%s does not match the current test split; predicting again", path)
    _logger.info("predicting the test set with run %s", run.run_id)
    proba = predict_run_test(run, run_config, test, keep=True)  # the run's recorded config
    write_test_proba(submissions, run.run_id, test["id"], proba, labels)
    return proba


def blend(config: DictConfig, run_ids: list[str]) -> tuple[Path, str]:
    """Fit blend weights on the runs' OOF predictions, write the blended submission, its details
    (`<blend_id>.json`) and a history row; returns the submission's path and a summary table."""
    if len(set(run_ids)) != len(run_ids) or not run_ids:
        raise LabelcompError(f"--runs {','.join(run_ids)}: name each run to blend once, e.g. --runs A,B")
    runs = [find_run(config.paths.runs, config.experiment, run_id) for run_id in run_ids]
    run_configs = [load_config(run.config) for run in runs]
    competition = Competition.load(run_configs[0].competition)
    identity = competition.identity()
    for run, run_config in zip(runs[1:], run_configs[1:]):
        other = Competition.load(run_config.competition).identity()
        if other != identity:
            raise LabelcompError(f"run {run.run_id} is of competition {other['competition']} ({other['competition_id']}),"
                                 f" run {runs[0].run_id} of {identity['competition']} ({identity['competition_id']}); "
                                 "blend runs of the same competition")
    metric = METRICS[competition.spec.metric]
    objective = config.ensemble.blend_objective
    oof, target, folds, same_folds = _read_oof(runs, competition)

    weights = fit_blend_weights(oof, target, metric, objective)
    blended_oof = np.tensordot(weights, oof, axes=1)
    scores = {
        "alone": {run.run_id: metric.score(target, proba) for run, proba in zip(runs, oof)},
        "equal_weights": metric.score(target, oof.mean(axis=0)),
        "blend": metric.score(target, blended_oof),
        "blend_cross_fitted": cross_fitted_score(oof, target, folds, metric, objective),
        "blend_loss": multiclass_log_loss(target, blended_oof),
    }

    test = competition.read_test()
    submissions = Path(config.paths.submissions)
    test_proba = sum(weight * _test_proba(run, run_config, test, submissions, competition.labels)
                     for weight, run, run_config in zip(weights, runs, run_configs))
    submissions.mkdir(parents=True, exist_ok=True)
    # the details file is created exclusively to claim the name; written in full below
    blend_id = claim_name("blend", lambda name: (submissions / f"{name}.json").open("x").close())
    details = {"blend_id": blend_id, "metric": metric.name, "objective": objective,
               "weights": {run.run_id: float(weight) for run, weight in zip(runs, weights)}, "oof_scores": scores}
    write_text_atomic(submissions / f"{blend_id}.json", json.dumps(details, indent=2) + "\n")
    # fold scores only where every run used the same folds
    fold_scores = ([metric.score(target[folds == fold], blended_oof[folds == fold]) for fold in np.unique(folds)]
                   if same_folds else None)
    history.record_run(history.history_path(submissions), history.run_row(
        blend_id, competition=identity, experiment="blend",
        backbone="+".join(dict.fromkeys(str(run_config.model.name) for run_config in run_configs)),
        metric=metric.name, created_at=datetime.now().isoformat(timespec="seconds"), fold_scores=fold_scores,
        oof_score=scores["blend"], oof_tta_score=scores["blend"],
        notes=" + ".join(f"{run.run_id} x {weight:.3f}" for run, weight in zip(runs, weights))))
    path = write_submission(competition, blend_id, test["id"], test_proba, submissions)
    return path, _summary(metric, runs, weights, scores)


def _summary(metric: Metric, runs: list[RunDir], weights: np.ndarray, scores: dict[str, Any]) -> str:
    table = pd.DataFrame({
        "run": [run.run_id for run in runs],
        "weight": [f"{weight:.3f}" for weight in weights],
        f"OOF {metric.name}": [f"{scores['alone'][run.run_id]:.4f}" for run in runs],
    })
    return "\n".join([
        table.to_string(index=False),
        f"OOF {metric.name} of the blend: {scores['blend']:.4f} with the fitted weights, "
        f"{scores['blend_cross_fitted']:.4f} with weights fitted on the other folds, "
        f"{scores['equal_weights']:.4f} with equal weights (log-loss {scores['blend_loss']:.4f})",
    ])
