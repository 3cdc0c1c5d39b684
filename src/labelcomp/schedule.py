"""The fine-tuning schedule, in one place: the stages (from a preset or the config), the lr of every
optimizer group at every step (`StagePlan`, `StagedLR`) and the optimizer's groups themselves.

The model module builds one `StagePlan` per fit; the finetune callback reads it to freeze, unfreeze
and give new groups their lr.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from labelcomp.config import StageConfig
from labelcomp.errors import LabelcompError

HEAD = "head"
BACKBONE = "backbone"  # lr groups of the backbone are named backbone.<block group index>

PRESET_MIN_EPOCHS = {"head": 1, "freeze_unfreeze": 2, "gradual": 3}


def preset_stages(preset: str, epochs: int) -> list[dict[str, Any]]:
    """The common recipes over `epochs` epochs in all."""
    if preset not in PRESET_MIN_EPOCHS:
        raise LabelcompError(f"finetune.preset '{preset}' is unknown; use one of {', '.join(PRESET_MIN_EPOCHS)}")
    if epochs < PRESET_MIN_EPOCHS[preset]:
        raise LabelcompError(f"finetune.epochs={epochs} is too few for the '{preset}' preset's stages")
    # frozen parts keep BatchNorm frozen too: fastai's train_bn=True measured +1.4 points CV on the
    # demo but -0.8 (freeze_unfreeze) and -1.6 (gradual) in make finetune-study on 5,000 images
    head = {"train": "head", "lr": 1e-2}
    if preset == "head":  # a linear probe on frozen features
        return [{**head, "epochs": epochs}]
    if preset == "freeze_unfreeze":  # fastai's fine_tune: the head, then all layers at discriminative lrs
        return [{**head, "epochs": 1},
                {"train": "all", "lr": 1e-3, "backbone_lr_mult": 0.1, "warmup_epochs": 0.5, "epochs": epochs - 1}]
    top = max(1, (epochs - 1) // 3)  # gradual: the head, then the top two block groups, then everything
    return [{**head, "epochs": 1},
            {"train": "top:2", "lr": 2e-3, "backbone_lr_mult": 0.3, "warmup_epochs": 0.5, "epochs": top},
            {"train": "all", "lr": 1e-3, "layer_decay": 0.7, "warmup_epochs": 0.5, "epochs": epochs - 1 - top}]


def resolve_stages(finetune: DictConfig) -> list[dict[str, Any]]:
    """The stages a run trains: `finetune.stages`, or the preset's when none are given; checked, with
    every key of the stage schema filled in."""
    if finetune.stages:
        stages = finetune.stages
    elif finetune.preset is None:
        raise LabelcompError("finetune: give finetune.stages or a finetune.preset")
    else:
        stages = preset_stages(str(finetune.preset), finetune.epochs)
    schema = OmegaConf.structured(StageConfig)
    stages = [OmegaConf.to_container(OmegaConf.merge(schema, stage), resolve=True) for stage in stages]
    check_stages(stages)
    return stages


def trained_groups(train: str, n_groups: int) -> range:
    """Indices of the backbone block groups a stage trains: `head` none, `top:N` the last N, `all` all."""
    if train == "head":
        return range(0)
    if train == "all":
        return range(n_groups)
    if train.startswith("top:") and train[4:].isdigit() and int(train[4:]) >= 1:
        return range(max(0, n_groups - int(train[4:])), n_groups)
    raise ValueError(train)


def check_stages(stages: list[dict[str, Any]]) -> None:
    if not stages:
        raise LabelcompError("finetune.stages is empty; give at least one stage or a finetune.preset")
    for index, stage in enumerate(stages):
        try:
            trained_groups(stage["train"], 1)
        except ValueError:
            raise LabelcompError(
                f"finetune.stages[{index}].train is '{stage['train']}'; use head, all or top:N (N >= 1)"
            ) from None
        if stage["epochs"] < 1:
            raise LabelcompError(f"finetune.stages[{index}].epochs is {stage['epochs']}; a stage lasts at least 1 epoch")
        if stage.get("image_size") is not None and stage["image_size"] < 1:
            raise LabelcompError(f"finetune.stages[{index}].image_size is {stage['image_size']}; give a positive "
                                 "number of pixels, or null for augment.image_size")


@dataclass(frozen=True)
class StagePlan:
    """Which stage an epoch belongs to, and each lr group's lr at each optimizer step.

    Within a stage: linear warmup over `warmup_epochs`, then cosine decay to `min_lr_ratio` of the peak.
    The head's peak is the stage's `lr`; block group i of n peaks at `lr * layer_decay ** (n - i)`
    when the stage sets `layer_decay`, else at `lr * backbone_lr_mult`.
    """

    stages: list[dict[str, Any]]
    steps_per_epoch: int
    min_lr_ratio: float
    n_groups: int

    @functools.cached_property  # read at every step for every param group
    def first_epochs(self) -> list[int]:
        return [sum(stage["epochs"] for stage in self.stages[:index]) for index in range(len(self.stages))]

    def stage_at(self, epoch: int) -> int:
        return max(index for index, first in enumerate(self.first_epochs) if first <= epoch)

    def peak_lr(self, stage: dict[str, Any], lr_group: str) -> float:
        if lr_group == HEAD:
            return stage["lr"]
        if stage.get("layer_decay"):
            depth = self.n_groups - int(lr_group.split(".")[1])
            return stage["lr"] * stage["layer_decay"] ** depth
        return stage["lr"] * stage["backbone_lr_mult"]

    def lr(self, lr_group: str, step: int) -> float:
        steps_per_epoch = max(1, self.steps_per_epoch)
        index = self.stage_at(step // steps_per_epoch)
        stage = self.stages[index]
        peak = self.peak_lr(stage, lr_group)
        step_in_stage = step - self.first_epochs[index] * steps_per_epoch
        stage_steps = stage["epochs"] * steps_per_epoch
        warmup_steps = round(stage["warmup_epochs"] * steps_per_epoch)
        if step_in_stage < warmup_steps:
            return peak * (step_in_stage + 1) / warmup_steps
        progress = min(1.0, (step_in_stage - warmup_steps) / max(1, stage_steps - warmup_steps))
        return peak * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StagedLR(LRScheduler):
    """Per-step lr of every param group from the stage plan, including groups added at an unfreeze.

    torch's and timm's schedulers fix their list of groups when built, so a group added later
    would crash them or keep its first lr forever.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: StagePlan):
        self.plan = plan
        super().__init__(optimizer)

    def state_dict(self) -> dict[str, Any]:
        # the plan is rebuilt from the config; checkpoints keep plain values only
        return {key: value for key, value in super().state_dict().items() if key != "plan"}

    def get_lr(self) -> list[float]:
        return [self.plan.lr(group.get("lr_group", HEAD), self.last_epoch) for group in self.optimizer.param_groups]


def no_decay_parameters(net: nn.Module, weight_decay: float, filter_bias_and_bn: bool) -> set[int]:
    """Identities of the parameters that get no weight decay, by timm's rule (`param_groups_weight_decay`):
    1-d parameters (biases, norm weights) and the model's `no_weight_decay()` names. To be taken when
    the model is built, while every parameter trains: timm's rule skips frozen ones."""
    if not (weight_decay and filter_bias_and_bn):
        return set()
    skip = net.no_weight_decay() if hasattr(net, "no_weight_decay") else ()
    groups = param_groups_weight_decay(net, weight_decay, no_weight_decay_list=skip)
    return {id(p) for group in groups if group["weight_decay"] == 0 for p in group["params"]}


def param_groups(
    lr_groups: Iterable[tuple[str, list[nn.Parameter]]], no_decay: set[int], weight_decay: float,
    lr_of: Callable[[str], float],
) -> list[dict[str, Any]]:
    """Optimizer groups: per lr group (head, backbone.<i>), its parameters with weight decay and,
    apart, those without (`<name>/no_decay`). `lr_group` tells the scheduler whose lr a group follows."""
    groups = []
    for name, params in lr_groups:
        decayed = [p for p in params if id(p) not in no_decay]
        plain = [p for p in params if id(p) in no_decay]
        for group_name, members, decay in ((name, decayed, weight_decay), (f"{name}/no_decay", plain, 0.0)):
            if members:
                groups.append({"params": members, "name": group_name, "lr_group": name, "lr": lr_of(name),
                               "weight_decay": decay})
    return groups
