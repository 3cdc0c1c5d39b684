"""Inference from fold checkpoints: TTA views stacked into one forward pass, raw outputs per view,
merging and fold averaging."""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from labelcomp.augment import build_transforms, merge_views, view_transforms
from labelcomp.data import ImageDataModule
from labelcomp.errors import LabelcompError
from labelcomp.metrics import METRICS
from labelcomp.model import ClassifierModule
from labelcomp.speed import device_of, loader_workers

_logger = logging.getLogger(__name__)

# raised inside Lightning against newer torch, once per fit or predict; nothing for a user to act on
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


class ViewPredictor(L.LightningModule):
    """Wraps a network for `Trainer.predict`: its outputs for every view, (views, batch, ...).

    Each image is decoded and transformed once; the views are tensor operations on that batch. Views
    of one shape go through the network together (one large batch beats several small ones), in
    chunks of at most `max_images` images, which bounds memory whatever the number of views."""

    def __init__(self, network: nn.Module, views: list, max_images: int):
        super().__init__()
        self.network = network
        self.views = views
        self.max_images = max_images

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = batch[0]
        viewed = [view(images) for view in self.views]
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for position, view in enumerate(viewed):
            by_shape[tuple(view.shape)].append(position)
        outputs: list[torch.Tensor | None] = [None] * len(viewed)
        for positions in by_shape.values():
            stacked = torch.cat([viewed[position] for position in positions])
            result = torch.cat([self.network(chunk) for chunk in stacked.split(self.max_images)])
            for position, output in zip(positions, result.split(len(images))):
                outputs[position] = output
        return torch.stack(outputs)


def load_classifier(checkpoint: Path) -> ClassifierModule:
    return ClassifierModule.load_from_checkpoint(checkpoint, map_location="cpu", load_weights=False)


def predict_views(
    network: nn.Module, frame: pd.DataFrame, config: DictConfig, views: list[str],
    cache: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Raw outputs (logits, or features for a feature extractor) of shape (views, images, ...), one
    row per name in `views`."""
    data = ImageDataModule(
        batch_size=config.data.batch_size, num_workers=loader_workers(config), mean=config.augment.mean,
        std=config.augment.std, predict=frame,
        eval_transform=build_transforms(config.augment, train=False), cache=cache,
        pin_memory=device_of(config.trainer.accelerator).type == "cuda",
        channels_last=getattr(network, "memory_format", None) == torch.channels_last,
    )
    trainer = L.Trainer(
        accelerator=config.trainer.accelerator, devices=1, precision=config.trainer.precision, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=config.trainer.progress_bar,
    )
    predictor = ViewPredictor(network, view_transforms(views, config.tta), config.tta.max_images)
    batches = trainer.predict(predictor, datamodule=data)
    return torch.cat(batches, dim=1).float().numpy()


FOLD_WEIGHTS = ("equal", "score")
BLEND_OBJECTIVES = ("logloss", "metric")


def check_ensemble(ensemble: DictConfig) -> None:
    if ensemble.fold_weights not in FOLD_WEIGHTS:
        raise LabelcompError(f"ensemble.fold_weights '{ensemble.fold_weights}' is unknown; use equal or score")
    if ensemble.blend_objective not in BLEND_OBJECTIVES:
        raise LabelcompError(f"ensemble.blend_objective '{ensemble.blend_objective}' is unknown; use logloss or metric")


def fold_weights(fold_scores: list[float], how: str, mode: str) -> np.ndarray:
    """Weights of the fold models in the test average: equal, or proportional to each fold's OOF score
    (to its inverse where lower is better)."""
    weights = np.ones(len(fold_scores))
    if how == "score":
        scores = np.asarray(fold_scores, dtype=float)
        weights = scores if mode == "max" else 1 / scores
    return weights / weights.sum()


def run_fold_weights(scores: dict, ensemble: DictConfig) -> np.ndarray:
    """The fold weights of a finished run from its scores.json, as the ensemble settings ask."""
    check_ensemble(ensemble)
    return fold_weights([fold["score"] for fold in scores["folds"]], ensemble.fold_weights,
                        METRICS[scores["metric"]].mode)


def predict_folds(
    checkpoints: list[Path], frame: pd.DataFrame, config: DictConfig, views: list[str], weights: np.ndarray
) -> np.ndarray:
    """Weighted mean over folds of the TTA-merged probabilities, shape (images, classes)."""
    cache: dict[str, np.ndarray] | None = {} if config.data.cache_images else None
    total = 0.0
    for checkpoint, weight in zip(checkpoints, weights):
        _logger.info("predicting %d images x %d views with %s", len(frame), len(views), checkpoint)
        outputs = predict_views(load_classifier(checkpoint), frame, config, views, cache)
        total = total + weight * merge_views(outputs, config.tta.merge)
    return total
