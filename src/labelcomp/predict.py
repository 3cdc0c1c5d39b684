"""Inference from fold checkpoints: TTA views in one forward pass, probabilities per view, fold averaging."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from labelcomp.augment import build_transforms, tta_views
from labelcomp.data import ImageDataModule
from labelcomp.model import ClassifierModule

_logger = logging.getLogger(__name__)


class ViewPredictor(L.LightningModule):
    """Wraps a network for `Trainer.predict`: its outputs for every TTA view, (views, batch, ...)."""

    def __init__(self, network: nn.Module, views: list, softmax: bool):
        super().__init__()
        self.network = network
        self.views = views
        self.softmax = softmax

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = batch[0]
        # all views stacked into one forward pass: one large batch beats several small ones
        outputs = self.network(torch.cat([view(images) for view in self.views]))
        if self.softmax:
            outputs = outputs.softmax(dim=-1)
        return outputs.view(len(self.views), len(images), -1)


def load_classifier(checkpoint: Path) -> ClassifierModule:
    return ClassifierModule.load_from_checkpoint(checkpoint, map_location="cpu", load_weights=False)


def predict_views(
    network: nn.Module, frame: pd.DataFrame, config: DictConfig,
    cache: dict[str, np.ndarray] | None = None, softmax: bool = True,
) -> np.ndarray:
    """Outputs (probabilities, or raw with softmax=False) of shape (views, images, ...); view 0 is
    the untransformed image."""
    data = ImageDataModule(
        batch_size=config.data.batch_size, num_workers=config.data.num_workers, predict=frame,
        eval_transform=build_transforms(config.augment, train=False), cache=cache,
    )
    trainer = L.Trainer(
        accelerator=config.trainer.accelerator, devices=1, precision=config.trainer.precision, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=config.trainer.progress_bar,
    )
    batches = trainer.predict(ViewPredictor(network, tta_views(config.tta), softmax), datamodule=data)
    return torch.cat(batches, dim=1).float().numpy()


def predict_folds(checkpoints: list[Path], frame: pd.DataFrame, config: DictConfig) -> np.ndarray:
    """Mean over folds of the TTA-merged probabilities, shape (images, classes)."""
    cache: dict[str, np.ndarray] | None = {} if config.data.cache_images else None
    total = None
    for checkpoint in checkpoints:
        _logger.info("predicting %d images with %s", len(frame), checkpoint)
        proba = predict_views(load_classifier(checkpoint), frame, config, cache).mean(axis=0)
        total = proba if total is None else total + proba
    return total / len(checkpoints)
