"""`labelcomp probe`: the frozen-feature baseline. Pooled features of the pretrained backbone are
extracted once per image (and TTA view), a scikit-learn LogisticRegression is fitted per fold, and the
run gets OOF scores, a history row and a submission like any other, in seconds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from labelcomp.ensemble import fold_average, run_fold_weights
from labelcomp.model import build_model
from labelcomp.predict import predict_views
from labelcomp.resolve import resolve_config
from labelcomp.runs import RunDir
from labelcomp.submit import write_submission
from labelcomp.train import finish_run, open_run, read_data, split_folds, write_oof
from labelcomp.tta import policy_views, scored_views

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
    data = read_data(config)
    competition, train, test = data.competition, data.train, data.test
    probe = OmegaConf.merge(config, {"experiment": f"{config.experiment}-probe"})
    probe = resolve_config(probe, competition.num_classes)
    folds = split_folds(probe, data)
    features = PooledFeatures(build_model(probe.model, competition.num_classes)).eval()
    views = scored_views(probe.tta)
    _logger.info("extracting features of %d training and %d test images, %d views", len(train), len(test), len(views))
    train_views = predict_views(features, train, probe, views, data.images)
    test_views = predict_views(features, test, probe, views)
    run_dir, folds, _ = open_run(probe, data, folds, None)
    test_outputs = []
    for fold in range(probe.cv.folds):
        held_out = folds["fold"].to_numpy() == fold
        classifier = make_pipeline(
            StandardScaler(), LogisticRegression(C=probe.probe.C, max_iter=probe.probe.max_iter)
        )
        # fitted on the untransformed images; the TTA views are only predicted
        classifier.fit(train_views[views.index("identity")][~held_out], train["target"].to_numpy()[~held_out])
        oof = np.stack([_class_log_proba(classifier, view[held_out], competition.num_classes) for view in train_views])
        write_oof(run_dir, competition, train[held_out], fold, oof, views)
        test_outputs.append(np.stack([_class_log_proba(classifier, view, competition.num_classes) for view in test_views]))
    scores = finish_run(run_dir, competition, probe)
    chosen = [views.index(view) for view in policy_views(scores["tta"]["policy"], probe.tta)]
    test_proba = fold_average((outputs[chosen] for outputs in test_outputs), run_fold_weights(scores, probe.ensemble),
                              probe.tta.merge)
    write_submission(competition, run_dir.run_id, test["id"], test_proba, Path(probe.paths.submissions))
    return run_dir, scores
