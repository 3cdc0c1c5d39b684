"""Staged freezing and unfreezing as a Lightning `BaseFinetuning` callback, and the per-stage lr plan.

The head is what timm's `get_classifier()` returns and the backbone is everything else, so no layer
name of one architecture is written here.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from labelcomp.errors import LabelcompError

_logger = logging.getLogger(__name__)

HEAD = "head"
BACKBONE = "backbone"
TRAINABLE_PARTS = ("head", "all")


def check_stages(stages: list[dict[str, Any]]) -> None:
    if not stages:
        raise LabelcompError("finetune.stages is empty; give at least one stage")
    for index, stage in enumerate(stages):
        if stage["train"] not in TRAINABLE_PARTS:
            raise LabelcompError(
                f"finetune.stages[{index}].train is '{stage['train']}'; use one of {list(TRAINABLE_PARTS)}"
            )
        if stage["epochs"] < 1:
            raise LabelcompError(f"finetune.stages[{index}].epochs is {stage['epochs']}; a stage lasts at least 1 epoch")


class StagePlan:
    """Which stage an epoch belongs to, and each param group's lr at each optimizer step.

    Within a stage: linear warmup over `warmup_epochs`, then cosine decay to `min_lr_ratio` of the peak.
    The head's peak is the stage's `lr`; any other group's peak is `lr * backbone_lr_mult`.
    """

    def __init__(self, stages: list[dict[str, Any]], steps_per_epoch: int, min_lr_ratio: float):
        self.stages = stages
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.min_lr_ratio = min_lr_ratio
        self.first_epochs = [sum(stage["epochs"] for stage in stages[:index]) for index in range(len(stages))]

    @property
    def total_epochs(self) -> int:
        return sum(stage["epochs"] for stage in self.stages)

    def stage_at(self, epoch: int) -> int:
        return max(index for index, first in enumerate(self.first_epochs) if first <= epoch)

    def lr(self, group_name: str, step: int) -> float:
        index = self.stage_at(step // self.steps_per_epoch)
        stage = self.stages[index]
        peak = stage["lr"] * (1.0 if group_name == HEAD else stage["backbone_lr_mult"])
        step_in_stage = step - self.first_epochs[index] * self.steps_per_epoch
        stage_steps = stage["epochs"] * self.steps_per_epoch
        warmup_steps = round(stage["warmup_epochs"] * self.steps_per_epoch)
        if step_in_stage < warmup_steps:
            return peak * (step_in_stage + 1) / warmup_steps
        progress = min(1.0, (step_in_stage - warmup_steps) / max(1, stage_steps - warmup_steps))
        return peak * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def plan_for(trainer: "L.Trainer", stages: list[dict[str, Any]], min_lr_ratio: float) -> StagePlan:
    steps_per_epoch = trainer.estimated_stepping_batches // max(1, trainer.max_epochs)
    return StagePlan(stages, int(steps_per_epoch), min_lr_ratio)


def split_head(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Leaf modules of the classifier head, and of everything else."""
    head_ids = {id(module) for module in net.get_classifier().modules()}
    leaves = BaseFinetuning.flatten_modules(net)
    return [m for m in leaves if id(m) in head_ids], [m for m in leaves if id(m) not in head_ids]


class StagedFinetuning(BaseFinetuning):
    """Applies the stage of the current epoch at every epoch start, so a resumed run lands right.

    Frozen parts keep their BatchNorm layers in eval mode (running statistics used, not updated)
    unless the stage sets `train_bn`. Newly trainable parameters join the optimizer as a named
    group whose lr the plan gives; the model's scheduler covers every group present.
    """

    def __init__(self, stages: list[dict[str, Any]], min_lr_ratio: float):
        super().__init__()
        check_stages(stages)
        self.stages = stages
        self.min_lr_ratio = min_lr_ratio

    def freeze_before_training(self, pl_module: "L.LightningModule") -> None:
        self._apply(pl_module.net, self.stages[0])

    def finetune_function(self, pl_module: "L.LightningModule", epoch: int, optimizer: Optimizer) -> None:
        plan = plan_for(pl_module.trainer, self.stages, self.min_lr_ratio)
        index = plan.stage_at(epoch)
        if epoch == plan.first_epochs[index]:
            stage = self.stages[index]
            _logger.info("epoch %d: stage %d/%d trains %s", epoch, index + 1, len(self.stages), stage["train"])
        self._apply(pl_module.net, self.stages[index], optimizer, plan, pl_module.trainer.global_step)

    def _apply(
        self, net: nn.Module, stage: dict[str, Any], optimizer: Optimizer | None = None,
        plan: StagePlan | None = None, step: int = 0,
    ) -> None:
        head, backbone = split_head(net)
        self.make_trainable(head)
        if stage["train"] == "all":
            self.make_trainable(backbone)
        else:
            self.freeze(backbone, train_bn=stage["train_bn"])
        for module in backbone:
            # BaseFinetuning marks frozen BatchNorm by track_running_stats=False; eval mode makes them
            # normalise with their running statistics instead of the batch's
            if isinstance(module, _BatchNorm) and not module.track_running_stats:
                module.eval()
            elif isinstance(module, _BatchNorm) and net.training:
                module.train()
        if optimizer is not None:
            self._add_new_params(backbone, optimizer, plan.lr(BACKBONE, step))

    @staticmethod
    def _add_new_params(modules: list[nn.Module], optimizer: Optimizer, lr: float) -> None:
        # identity, not BaseFinetuning.filter_on_optimizer's value comparison, which would drop a
        # tensor that merely equals one already there (a zero-initialised bias, say)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [
            p for module in modules for p in module.parameters(recurse=False)
            if p.requires_grad and id(p) not in in_optimizer
        ]
        if new:
            names = {group.get("name") for group in optimizer.param_groups}
            name = BACKBONE if BACKBONE not in names else f"{BACKBONE}_{len(optimizer.param_groups)}"
            optimizer.add_param_group({"params": new, "lr": lr, "name": name})
