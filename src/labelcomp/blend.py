"""`labelcomp submit --runs A,B,C`: blend finished runs with weights fitted on their OOF predictions.

Only OOF probabilities and training labels enter the fit; the test probabilities (saved beside each
run's submission, or predicted once from its fold checkpoints) are only combined with the fitted weights.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from scipy.optimize import minimize
from scipy.special import softmax

from labelcomp import history
from labelcomp.competition import Competition
from labelcomp.config import load_config
from labelcomp.errors import LabelcompError
from labelcomp.metrics import METRICS, Metric, multiclass_log_loss
from labelcomp.predict import check_ensemble
from labelcomp.runs import RunDir, find_run, write_text_atomic
from labelcomp.submit import predict_run_test, test_proba_path, write_submission, write_test_proba

_logger = logging.getLogger(__name__)


def fit_blend_weights(oof: np.ndarray, target: np.ndarray, metric: Metric, objective: str) -> np.ndarray:
    """Non-negative weights summing to one for the runs' OOF probabilities (runs, images, classes):
    the blend's log-loss minimised by scipy's SLSQP on the simplex; with objective `metric` the weights
    are then refined by Powell's method on the competition metric, kept only where that improves it."""
    runs = len(oof)
    if runs == 1:
        return np.ones(1)

    def blended(weights: np.ndarray) -> np.ndarray:
        return np.tensordot(weights, oof, axes=1)

    fitted = minimize(
        lambda weights: multiclass_log_loss(target, blended(weights)), np.full(runs, 1 / runs), method="SLSQP",
        bounds=[(0.0, 1.0)] * runs, constraints=({"type": "eq", "fun": lambda weights: weights.sum() - 1},),
    )
    weights = np.clip(fitted.x, 0, None)
    weights = weights / weights.sum()
    if objective == "metric" and metric.name != "logloss":
        sign = -1.0 if metric.mode == "max" else 1.0

        def loss(logits: np.ndarray) -> float:
            return sign * metric.score(target, blended(softmax(logits)))

        start = np.log(np.maximum(weights, 1e-6))
        refined = minimize(loss, start, method="Powell")
        if loss(refined.x) < loss(start):
            weights = softmax(refined.x)
    return weights


def cross_fitted_score(oof: np.ndarray, target: np.ndarray, parts: np.ndarray, metric: Metric, objective: str) -> float:
    """The blend's score where each part's rows are blended with weights fitted on the other parts:
    an estimate of the blend that does not reuse the rows its weights were fitted on."""
    proba = np.zeros(oof.shape[1:])
    for part in np.unique(parts):
        held_out = parts == part
        weights = fit_blend_weights(oof[:, ~held_out], target[~held_out], metric, objective)
        proba[held_out] = np.tensordot(weights, oof[:, held_out], axes=1)
    return metric.score(target, proba)


class BlendInput(NamedTuple):
    runs: list[RunDir]
    backbones: list[str]
    oof: np.ndarray  # (runs, images, classes): each run's OOF probabilities with its TTA policy
    target: np.ndarray  # class index of each OOF image
    folds: np.ndarray  # the first run's fold of each OOF image
    same_folds: bool  # every run split the images the same way


def _read_oof(runs: list[RunDir], competition: Competition) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    frames = [pd.read_csv(run.oof_tta, dtype={"id": str}) for run in runs]
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
        saved = pd.read_csv(path, dtype={"id": str})
        if saved["id"].equals(test["id"].astype(str).reset_index(drop=True)) and list(saved.columns[1:]) == labels:
            return saved[labels].to_numpy(dtype=float)
        _logger.info("%s does not match the current test split; predicting again", path)
    _logger.info("predicting the test set with run %s", run.run_id)
    proba = predict_run_test(run, run_config, test)
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
    metric = METRICS[competition.spec.metric]
    check_ensemble(config.ensemble)
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
    blend_id = _new_blend_id(submissions)
    details = {"blend_id": blend_id, "metric": metric.name, "objective": objective,
               "weights": {run.run_id: float(weight) for run, weight in zip(runs, weights)}, "oof_scores": scores}
    write_text_atomic(submissions / f"{blend_id}.json", json.dumps(details, indent=2) + "\n")
    history.record_run(history.history_path(submissions),
                       _history_row(blend_id, run_configs, metric, weights, runs, scores, target, blended_oof,
                                    folds if same_folds else None))
    path = write_submission(competition, blend_id, test["id"], test_proba, submissions)
    return path, _summary(metric, runs, weights, scores)


def _new_blend_id(submissions: Path) -> str:
    """`blend-<local time>`, with a suffix when a blend of the same second exists; the name is taken
    by creating its details file exclusively, so parallel blends cannot share it."""
    stamp = f"blend-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    submissions.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        blend_id = stamp + (f"-{attempt}" if attempt else "")
        try:
            (submissions / f"{blend_id}.json").open("x").close()
        except FileExistsError:
            continue
        return blend_id
    raise LabelcompError(f"{submissions}: could not name a new blend")


def _history_row(blend_id: str, run_configs: list[DictConfig], metric: Metric, weights: np.ndarray,
                 runs: list[RunDir], scores: dict[str, Any], target: np.ndarray, proba: np.ndarray,
                 folds: np.ndarray | None) -> dict[str, Any]:
    """The blend's history row; fold scores only where every run used the same folds."""
    row: dict[str, Any] = {
        "run_id": blend_id, "created_at": datetime.now().isoformat(timespec="seconds"), "experiment": "blend",
        "backbone": "+".join(dict.fromkeys(str(run_config.model.name) for run_config in run_configs)),
        "metric": metric.name, "oof_score": scores["blend"], "oof_tta_score": scores["blend"],
        "notes": " + ".join(f"{run.run_id} x {weight:.3f}" for run, weight in zip(runs, weights)),
    }
    if folds is not None:
        fold_scores = [metric.score(target[folds == fold], proba[folds == fold]) for fold in np.unique(folds)]
        row.update({f"fold_{fold}": score for fold, score in enumerate(fold_scores)})
        row.update({"n_folds": len(fold_scores), "cv_mean": float(np.mean(fold_scores)),
                    "cv_std": float(np.std(fold_scores, ddof=1)) if len(fold_scores) > 1 else 0.0})
    return row


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
