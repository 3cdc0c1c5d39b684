"""Inference from fold checkpoints: TTA views stacked into one forward pass, raw outputs per view,
merging and fold averaging."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import LightningEnvironment
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from labelcomp.augment import build_transforms
from labelcomp.data import ImageDataModule, ImageReader
from labelcomp.ensemble import fold_mean, run_fold_weights
from labelcomp.errors import LabelcompError
from labelcomp.hardware import device_of
from labelcomp.model import ClassifierModule
from labelcomp.runs import RunDir, write_text_atomic
from labelcomp.tta import merge_views, policy_views, run_policy, view_transforms

_logger = logging.getLogger(__name__)


class ViewPredictor(L.LightningModule):
    """Wraps a network for `Trainer.predict`: its outputs for every view, (views, batch, ...).

    Each image is decoded and transformed once; the views are tensor operations on that batch. Views
    of one shape go through the network together (one large batch beats several small ones), in
    chunks of at most `max_images` images, which bounds memory whatever the number of views."""

    def __init__(self, network: nn.Module, views: list, max_images: int | None):
        super().__init__()
        self.network = network
        self.views = views
        self.max_images = max_images  # None: one pass per shape (an exported graph, whose batch varies)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        viewed = [view(images) for view in self.views]
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for position, view in enumerate(viewed):
            by_shape[tuple(view.shape[1:])].append(position)  # the batch size is free in an exported graph
        outputs: list[torch.Tensor | None] = [None] * len(viewed)
        for positions in by_shape.values():
            stacked = torch.cat([viewed[position] for position in positions])
            chunks = stacked.split(self.max_images) if self.max_images else [stacked]
            result = torch.cat([self.network(chunk) for chunk in chunks])
            for position, output in zip(positions, result.unflatten(0, (len(positions), -1))):
                outputs[position] = output
        return torch.stack(outputs)


def load_classifier(checkpoint: Path) -> ClassifierModule:
    return ClassifierModule.load_from_checkpoint(checkpoint, map_location="cpu", load_weights=False)


def predict_views(
    network: nn.Module, frame: pd.DataFrame, config: DictConfig, views: list[str],
    images: ImageReader | None = None,
) -> np.ndarray:
    """Raw outputs (logits, or features for a feature extractor) of shape (views, images, ...), one
    row per name in `views`."""
    data = ImageDataModule(
        batch_size=config.data.batch_size, num_workers=config.data.num_workers, mean=config.augment.mean,
        std=config.augment.std, predict=frame,
        eval_transform=build_transforms(config.augment, train=False), images=images or ImageReader.from_config(config),
        pin_memory=device_of(config.trainer.accelerator).type == "cuda",
        channels_last=getattr(network, "memory_format", None) == torch.channels_last,
    )
    trainer = L.Trainer(
        accelerator=config.trainer.accelerator, devices=1, precision=config.trainer.precision, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=config.trainer.progress_bar,
        # one process predicts, also inside a multi-process job (torchrun, SLURM), whose cluster
        # environment would otherwise ask for every process of the job
        plugins=[LightningEnvironment()],
    )
    predictor = ViewPredictor(network, view_transforms(views, config.tta), config.tta.max_images)
    batches = trainer.predict(predictor, datamodule=data)
    return torch.cat(batches, dim=1).float().numpy()


def fold_checkpoints(run: RunDir, run_config: DictConfig) -> list[Path]:
    """Every fold's best checkpoint of a finished run."""
    checkpoints = [run.checkpoint(fold) for fold in range(run_config.cv.folds)]
    missing = [str(path) for path in checkpoints if not path.is_file()]
    if missing:
        raise LabelcompError(f"run {run.run_id}: fold checkpoints missing: {missing}; finish training the run first")
    return checkpoints


def run_fold_proba(run: RunDir, run_config: DictConfig, frame: pd.DataFrame, images: ImageReader | None = None,
                   keep_test: bool = False) -> Iterator[np.ndarray]:
    """Each fold model's TTA-merged probabilities (images, classes) of the images in `frame`, in fold order.

    With `keep_test` (for the competition's test images, and only where `run_config` is the run's
    recorded one: an override could change the prediction) each fold's are kept in its folder
    (`test_proba.npz`, with the ids, the views and the checkpoint's size and time) and read back while
    all of them still match: a second submission of the run, or a pseudo-label round from it, does not
    predict the test images again."""
    views = policy_views(run_policy(json.loads(run.scores.read_text()), run_config.tta), run_config.tta)
    ids = frame["id"].to_numpy().astype(str)
    for fold, checkpoint in enumerate(fold_checkpoints(run, run_config)):
        kept = run.fold_dir(fold) / "test_proba.npz"
        stat = checkpoint.stat()
        checkpoint_stamp = np.array([stat.st_size, stat.st_mtime_ns])
        if keep_test and (proba := _kept_proba(kept, ids, views, checkpoint_stamp)) is not None:
            yield proba
            continue
        _logger.info("predicting %d images x %d views with %s", len(frame), len(views), checkpoint)
        images = images or ImageReader.from_config(run_config)  # one for every fold: what it keeps in memory serves all
        proba = merge_views(predict_views(load_classifier(checkpoint), frame, run_config, views, images),
                            run_config.tta.merge)
        if keep_test:
            buffer = io.BytesIO()
            np.savez(buffer, proba=proba, ids=ids, views=np.array(views), checkpoint=checkpoint_stamp)
            write_text_atomic(kept, buffer.getvalue())
        yield proba


def _kept_proba(kept: Path, ids: np.ndarray, views: list[str], checkpoint_stamp: np.ndarray) -> np.ndarray | None:
    """The kept test probabilities where they are of these test ids, views and checkpoint; None where
    they are missing, of something else or unreadable (a damaged copy is predicted again, not fatal)."""
    try:
        with np.load(kept) as archive:
            if (set(archive.files) >= {"proba", "ids", "views", "checkpoint"} and np.array_equal(archive["ids"], ids)
                    and archive["views"].tolist() == views and np.array_equal(archive["checkpoint"], checkpoint_stamp)):
                return archive["proba"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        _logger.warning("%s: unreadable (%s); predicting the test images again", kept, error)
    return None


def predict_run(run: RunDir, run_config: DictConfig, frame: pd.DataFrame, images: ImageReader,
                keep_test: bool = False) -> np.ndarray:
    """Probabilities (images, classes) of the images in `frame` (readable ones) from the run's fold models,
    averaged with the configured fold weights (`keep_test`: see `run_fold_proba`)."""
    weights = run_fold_weights(json.loads(run.scores.read_text()), run_config.ensemble)
    return fold_mean(run_fold_proba(run, run_config, frame, images, keep_test), weights)
