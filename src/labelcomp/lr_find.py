"""`labelcomp lr-find`: Lightning's learning-rate range test for one fine-tuning stage.

It trains fold 0's training part with the stage's frozen/trainable split while the lr grows
exponentially, for every trainable group alike, then saves the loss curve as a PNG in a run folder
of its own and returns the suggested lr (steepest descent of the smoothed loss).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.tuner import Tuner
from omegaconf import DictConfig, OmegaConf

from labelcomp.config import save_config
from labelcomp.errors import LabelcompError
from labelcomp.finetune import StagedFinetuning
from labelcomp.resolve import resolve_config
from labelcomp.runs import new_run, write_figure_atomic, write_text_atomic
from labelcomp.train import build_datamodule, build_module, read_data, split_folds

_logger = logging.getLogger(__name__)


def find_lr(config: DictConfig, stage_index: int = 0, num_training: int = 100) -> tuple[float | None, Path]:
    """The suggested lr for stage `stage_index` (None when the curve gives none) and the plot's path."""
    data = read_data(config)
    config = resolve_config(config, data.competition.num_classes)
    stages = OmegaConf.to_container(config.finetune.stages, resolve=True)
    if not 0 <= stage_index < len(stages):
        raise LabelcompError(f"--stage {stage_index}: the config has stages 0 to {len(stages) - 1}")
    stage = stages[stage_index]
    held_out = split_folds(config, data)["fold"].to_numpy() == 0
    loaders = build_datamodule(config, data.train[~held_out], data.train[held_out], data.images, stages=[stage])
    module = build_module(config, data.competition, stages=[stage])
    run_dir = new_run(config.paths.runs, f"{config.experiment}-lr-find")
    save_config(config, run_dir.config)
    trainer = L.Trainer(
        # enough epochs for the range test's `num_training` steps (one epoch may be shorter)
        max_epochs=math.ceil(num_training / len(loaders.train_dataloader())) + 1,
        accelerator=config.trainer.accelerator, devices=1,
        precision=config.trainer.precision, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=config.trainer.progress_bar,
        default_root_dir=run_dir.root, callbacks=[StagedFinetuning()],
    )
    L.seed_everything(config.seed)
    finder = Tuner(trainer).lr_find(module, datamodule=loaders, num_training=num_training, update_attr=False)
    suggestion = finder.suggestion()
    plot = run_dir.root / f"lr_find_stage{stage_index}.png"
    figure = finder.plot(suggest=suggestion is not None)
    figure.axes[0].set_title(f"{config.model.name}, stage {stage_index} ({stage['train']}): lr range test")
    write_figure_atomic(figure, plot)
    write_text_atomic(run_dir.root / "lr_find.json",
                      json.dumps({"stage": stage_index, "suggestion": suggestion, "results": finder.results}) + "\n")
    return suggestion, plot
