"""Ensembling, in one place: the weights of a run's fold models in its test average, and the weights
of a blend of runs, fitted on their OOF predictions."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from omegaconf import DictConfig
from scipy.optimize import minimize
from scipy.special import softmax

from labelcomp.metrics import METRICS, Metric, multiclass_log_loss
from labelcomp.tta import merge_views


def fold_weights(fold_scores: list[float], how: str, mode: str) -> np.ndarray:
    """Weights of the fold models in the test average: equal, or proportional to each fold's OOF score
    (to its inverse where lower is better)."""
    weights = np.ones(len(fold_scores))
    if how == "score":
        scores = np.asarray(fold_scores, dtype=float)
        weights = scores if mode == "max" else 1 / scores
    return weights / weights.sum()


def fold_mean(fold_proba: Iterable[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Weighted mean over folds of each fold's probabilities (images, classes); given as a generator,
    one fold's are in memory at a time."""
    return sum(weight * proba for weight, proba in zip(weights, fold_proba))


def fold_average(fold_outputs: Iterable[np.ndarray], weights: np.ndarray, merge: str) -> np.ndarray:
    """`fold_mean` of each fold's TTA-merged outputs, which are (views, images, classes)."""
    return fold_mean((merge_views(outputs, merge) for outputs in fold_outputs), weights)


def run_fold_weights(scores: dict, ensemble: DictConfig) -> np.ndarray:
    """The fold weights of a finished run from its scores.json, as the ensemble settings ask."""
    return fold_weights([fold["score"] for fold in scores["folds"]], ensemble.fold_weights,
                        METRICS[scores["metric"]].mode)


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
