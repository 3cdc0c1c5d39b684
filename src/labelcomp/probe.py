"""`labelcomp probe`: the frozen-feature baseline. Pooled features of the pretrained backbone are
extracted once per image (and TTA view), a scikit-learn LogisticRegression is fitted per fold, and the
run gets OOF scores, a history row and a submission like any other, in seconds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from labelcomp import history
from labelcomp.config import save_config
from labelcomp.augment import merge_views, policy_views, scored_views
from labelcomp.model import build_model
from labelcomp.predict import predict_views, run_fold_weights
from labelcomp.runs import RunDir, new_run, write_csv_atomic
from labelcomp.submit import write_submission
from labelcomp.train import prepare, run_row, write_oof, write_scores

_logger = logging.getLogger(__name__)


class PooledFeatures(nn.Module):
    """The backbone up to its pooled, pre-classifier features (timm's forward_head pre_logits)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(images), pre_logits=True)


def _class_log_proba(classifier, features: np.ndarray, num_classes: int) -> np.ndarray:
    """Log-probabilities over every class of the competition (a class absent from a fold's training
    rows gets a vanishing probability), usable wherever logits are: softmax gives the probabilities back."""
    proba = np.zeros((len(features), num_classes))
    proba[:, classifier.classes_] = classifier.predict_proba(features)
    return np.log(np.maximum(proba, 1e-12))


def run_probe(config: DictConfig) -> tuple[RunDir, dict[str, Any]]:
    config.experiment = f"{config.experiment}-probe"
    competition, train, test, folds, cache = prepare(config)
    features = PooledFeatures(build_model(config.model, competition.num_classes)).eval()
    views = scored_views(config.tta)
    _logger.info("extracting features of %d training and %d test images, %d views", len(train), len(test), len(views))
    train_views = predict_views(features, train, config, views, cache)
    test_views = predict_views(features, test, config, views)
    run_dir = new_run(config.paths.runs, config.experiment)
    save_config(config, run_dir.config)
    write_csv_atomic(folds, run_dir.folds)
    test_outputs = []
    for fold in range(config.cv.folds):
        held_out = folds["fold"].to_numpy() == fold
        classifier = make_pipeline(
            StandardScaler(), LogisticRegression(C=config.probe.C, max_iter=config.probe.max_iter)
        )
        # fitted on the untransformed images; the TTA views are only predicted
        classifier.fit(train_views[views.index("identity")][~held_out], train["target"].to_numpy()[~held_out])
        oof = np.stack([_class_log_proba(classifier, view[held_out], competition.num_classes) for view in train_views])
        write_oof(run_dir, competition, train[held_out], fold, oof, views)
        test_outputs.append(np.stack([_class_log_proba(classifier, view, competition.num_classes) for view in test_views]))
    scores = write_scores(run_dir, competition, config)
    history.record_run(history.history_path(config.paths.submissions), run_row(run_dir, config, scores))
    chosen = [views.index(view) for view in policy_views(scores["tta"]["policy"], config.tta)]
    weights = run_fold_weights(scores, config.ensemble)
    test_proba = sum(weight * merge_views(outputs[chosen], config.tta.merge)
                     for weight, outputs in zip(weights, test_outputs))
    write_submission(competition, run_dir.run_id, test["id"], test_proba, Path(config.paths.submissions))
    return run_dir, scores
