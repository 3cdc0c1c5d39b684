"""Pseudo-labels: a finished run's fold models (with its TTA policy) label the competition's test
images, and those they are confident of join the training images of a new run with the same folds.

They are never in a validation fold, so a validation image is still predicted only by models that
never trained on it. With `pseudo.labeler=fold` (the default) fold k learns only from the labels of the
parent's fold-k model, which never saw fold k's validation images, so OOF scores stay exactly as honest
as without; `ensemble` gives every fold the labels of the parent's fold ensemble (its submission), more
accurate, at the cost of a little of fold k's validation labels reaching fold k through them. The
parent's OOF predictions choose the confidence threshold: the lowest at which the OOF predictions at
least as confident are right `pseudo.precision` of the time. A pseudo run can be the next round's parent."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from sklearn.metrics import precision_recall_curve

from labelcomp.competition import Competition
from labelcomp.config import load_config
from labelcomp.ensemble import fold_mean, run_fold_weights
from labelcomp.errors import LabelcompError
from labelcomp.predict import load_classifier, run_fold_proba
from labelcomp.runs import RunDir, find_run, read_table

_logger = logging.getLogger(__name__)


def confidence_threshold(proba: np.ndarray, target: np.ndarray, precision: float) -> float | None:
    """The lowest confidence (top probability) at which the predictions at least as confident are right
    at least `precision` of the time; None where no threshold gets there."""
    correct = proba.argmax(axis=1) == target
    if correct.all():
        return float(proba.max(axis=1).min())
    if not correct.any():
        return None
    precisions, _, thresholds = precision_recall_curve(correct, proba.max(axis=1))
    reaching = np.flatnonzero(precisions[:-1] >= precision)  # thresholds ascend: the first is the lowest
    return float(thresholds[reaching[0]]) if len(reaching) else None


def pseudo_labels(config: DictConfig, competition: Competition, test: pd.DataFrame,
                  folds: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The test images the labelling model (`pseudo.labeler`: the parent's model of the same fold, or its
    fold ensemble) labels with enough confidence, for each fold of the new run: fold, id, label, target
    and one probability column per class (paths come from the test table when training, so a moved
    competition folder still trains); and the record of how they were chosen (for scores.json and the
    history). `config.pseudo.threshold` is set to the threshold used.

    With the fold labeler, fold k of the new run learns from the parent's fold-k model only, which never
    saw fold k's validation images: its labels carry nothing of theirs, so OOF scores stay honest, also
    over rounds."""
    settings = config.pseudo
    parent = find_run(config.paths.runs, config.experiment, settings.from_run)
    parent_config = load_config(parent.config)
    parent_scores = json.loads(parent.scores.read_text())
    identity = competition.identity()
    if parent_scores.get("competition", identity) != identity:
        raise LabelcompError(f"pseudo.from_run={parent.run_id}: that run is of competition "
                             f"{parent_scores['competition']}, this one is {identity}; give a run of this competition")
    if settings.init == "parent" and parent_config.model.name != config.model.name:
        raise LabelcompError(f"pseudo.init=parent: run {parent.run_id} trained {parent_config.model.name}, this config "
                             f"{config.model.name}; set model.name={parent_config.model.name} or pseudo.init=pretrained")
    parent_folds = read_table(parent.folds)
    if not (parent_folds["id"].equals(folds["id"]) and parent_folds["fold"].equals(folds["fold"])):
        raise LabelcompError(f"pseudo.from_run={parent.run_id}: that run split the training images into other folds "
                             f"(cv.folds={parent_config.cv.folds}, seed={parent_config.seed}); pseudo-labels need the "
                             "same folds: use its cv.folds and seed")
    if len(test) == 0:
        raise LabelcompError(f"pseudo.from_run={parent.run_id}: the competition's test table is empty; "
                             "there is nothing to pseudo-label")
    labels = competition.labels
    oof = read_table(parent.oof_tta)
    oof_proba = oof[labels].to_numpy(dtype=float)
    oof_target = oof["label"].map({label: index for index, label in enumerate(labels)}).to_numpy()
    threshold = settings.threshold
    if threshold is None:
        threshold = confidence_threshold(oof_proba, oof_target, settings.precision)
        if threshold is None:
            raise LabelcompError(f"pseudo.precision={settings.precision}: no confidence threshold of run "
                                 f"{parent.run_id} reaches it on OOF; lower pseudo.precision or set pseudo.threshold")
    confident = oof_proba.max(axis=1) >= threshold
    parts = []
    fold_proba = np.stack(list(run_fold_proba(parent, parent_config, test, keep_test=True)))
    if settings.labeler == "ensemble":  # the parent's submission probabilities, for every fold
        submission = fold_mean(fold_proba, run_fold_weights(parent_scores, parent_config.ensemble))
        fold_proba = np.broadcast_to(submission, fold_proba.shape)
    for fold, proba in enumerate(fold_proba):
        chosen = proba.max(axis=1) >= threshold
        target = proba.argmax(axis=1)[chosen]
        part = pd.DataFrame({"fold": fold, "id": test["id"].to_numpy()[chosen],
                             "label": [labels[index] for index in target], "target": target})
        parts.append(pd.concat([part, pd.DataFrame(proba[chosen], columns=labels)], axis=1))
    frame = pd.concat(parts, ignore_index=True)
    per_fold = frame.groupby("fold").size().reindex(range(len(parts)), fill_value=0).tolist()
    record = {
        "parent": parent.run_id, "labeler": str(settings.labeler), "targets": str(settings.targets),
        "threshold": float(threshold),
        "precision_target": float(settings.precision) if settings.threshold is None else None,
        "oof_precision": float((oof_proba.argmax(axis=1) == oof_target)[confident].mean()) if confident.any() else None,
        "oof_share": float(confident.mean()), "images": round(float(np.mean(per_fold))), "images_per_fold": per_fold,
        "test_images": len(test),
    }
    config.pseudo.threshold = float(threshold)
    _logger.info("pseudo-labels from run %s: %s of %d test images per fold at confidence >= %.4f (on OOF: %.1f%% "
                 "of the images, %s right)", parent.run_id, "/".join(map(str, per_fold)), len(test), threshold,
                 100 * record["oof_share"],
                 "n/a" if record["oof_precision"] is None else f"{100 * record['oof_precision']:.1f}%")
    return frame, record


def training_rows(train: pd.DataFrame, pseudo: pd.DataFrame | None, fold: int, test: pd.DataFrame,
                  labels: list[str], soft: bool) -> pd.DataFrame:
    """Fold `fold`'s training images with its pseudo-labelled test images added; with soft targets every
    row carries a probability vector (one-hot for the labelled images) in `soft_target`."""
    if pseudo is None:
        return train
    pseudo = pseudo[pseudo["fold"] == fold]
    if pseudo.empty:
        return train
    paths = test.set_index("id")["path"]
    missing = sorted(set(pseudo["id"]) - set(paths.index))
    if missing:
        raise LabelcompError(f"pseudo-labelled test images {missing[:5]} are no longer in the test table; "
                             "start a new run from the parent run")
    added = pseudo[["id", "label", "target"]].assign(path=paths.loc[pseudo["id"]].to_numpy())
    rows = pd.concat([train, added], ignore_index=True)
    if soft:
        hard = np.eye(len(labels), dtype=np.float32)[train["target"].to_numpy()]
        rows["soft_target"] = list(hard) + list(pseudo[labels].to_numpy(dtype=np.float32))
    return rows


def start_from_parent(module: torch.nn.Module, config: DictConfig, fold: int) -> None:
    """With pseudo.init=parent, the fold's network (and its EMA copy) takes the weights that predicted
    in the parent's fold `fold`."""
    if config.pseudo.from_run is None or config.pseudo.init != "parent":
        return
    parent = find_run(config.paths.runs, config.experiment, config.pseudo.from_run)
    weights = load_classifier(parent.checkpoint(fold)).predicting_net().state_dict()
    for net in (module.net, *((module.ema.module,) if module.ema is not None else ())):
        net.load_state_dict(weights)
    _logger.info("fold %d: starting from the weights of run %s's fold %d", fold + 1, parent.run_id, fold)


def read_pseudo(run_dir: RunDir) -> tuple[pd.DataFrame | None, dict[str, Any] | None]:
    """The run's recorded pseudo-labels and their record, or (None, None) for a run without them."""
    if not run_dir.pseudo_labels.is_file():
        return None, None
    return read_table(run_dir.pseudo_labels), json.loads(run_dir.pseudo_record.read_text())
