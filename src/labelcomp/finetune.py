"""Staged freezing and unfreezing as a Lightning `BaseFinetuning` callback, and the per-stage lr plan.

The head is what timm's `get_classifier()` returns; the backbone is split into block groups by the
model's own `group_matcher` (timm), so no layer name of one architecture is written here.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from timm.models import group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from labelcomp.errors import LabelcompError

_logger = logging.getLogger(__name__)

HEAD = "head"
BACKBONE = "backbone"  # optimizer groups are named backbone.<block group index>


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


def resolve_stages(finetune: DictConfig) -> None:
    """Fill `finetune.stages` from the preset when none are given, then check them, so the run's
    saved config states the exact stages it trained."""
    if not finetune.stages:
        if finetune.preset is None:
            raise LabelcompError("finetune: give finetune.stages or a finetune.preset")
        finetune.merge_with({"stages": preset_stages(finetune.preset, finetune.epochs)})
    check_stages(OmegaConf.to_container(finetune.stages, resolve=True))


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


class StagePlan:
    """Which stage an epoch belongs to, and each param group's lr at each optimizer step.

    Within a stage: linear warmup over `warmup_epochs`, then cosine decay to `min_lr_ratio` of the peak.
    The head's peak is the stage's `lr`; block group i of n peaks at `lr * layer_decay ** (n - i)`
    when the stage sets `layer_decay`, else at `lr * backbone_lr_mult`.
    """

    def __init__(self, stages: list[dict[str, Any]], steps_per_epoch: int, min_lr_ratio: float, n_groups: int):
        self.stages = stages
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.min_lr_ratio = min_lr_ratio
        self.n_groups = n_groups
        self.first_epochs = [sum(stage["epochs"] for stage in stages[:index]) for index in range(len(stages))]

    def stage_at(self, epoch: int) -> int:
        return max(index for index, first in enumerate(self.first_epochs) if first <= epoch)

    def peak_lr(self, stage: dict[str, Any], group_name: str) -> float:
        if group_name == HEAD:
            return stage["lr"]
        if stage.get("layer_decay"):
            depth = self.n_groups - int(group_name.split(".")[1])
            return stage["lr"] * stage["layer_decay"] ** depth
        return stage["lr"] * stage["backbone_lr_mult"]

    def lr(self, group_name: str, step: int) -> float:
        index = self.stage_at(step // self.steps_per_epoch)
        stage = self.stages[index]
        peak = self.peak_lr(stage, group_name)
        step_in_stage = step - self.first_epochs[index] * self.steps_per_epoch
        stage_steps = stage["epochs"] * self.steps_per_epoch
        warmup_steps = round(stage["warmup_epochs"] * self.steps_per_epoch)
        if step_in_stage < warmup_steps:
            return peak * (step_in_stage + 1) / warmup_steps
        progress = min(1.0, (step_in_stage - warmup_steps) / max(1, stage_steps - warmup_steps))
        return peak * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def head_modules(net: nn.Module) -> list[nn.Module]:
    return BaseFinetuning.flatten_modules(net.get_classifier())


def block_groups(net: nn.Module) -> list[list[nn.Module]]:
    """Backbone modules holding parameters, by timm's coarse block groups, input side first."""
    head_ids = {id(p) for p in net.get_classifier().parameters()}
    head_names = {name for name, p in net.named_parameters() if id(p) in head_ids}
    grouped = group_parameters(net, net.group_matcher(coarse=True))
    group_of = {}
    for index, key in enumerate(sorted(grouped)):
        for name in grouped[key]:
            group_of[name] = index
    groups: dict[int, list[nn.Module]] = {}
    for module_name, module in net.named_modules():
        own = [f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters(recurse=False)]
        own = [name for name in own if name not in head_names]
        if own:
            groups.setdefault(group_of[own[0]], []).append(module)
    return [groups[key] for key in sorted(groups)]


def plan_for(trainer: "L.Trainer", net: nn.Module, stages: list[dict[str, Any]], min_lr_ratio: float) -> StagePlan:
    steps_per_epoch = trainer.estimated_stepping_batches // max(1, trainer.max_epochs)
    return StagePlan(stages, int(steps_per_epoch), min_lr_ratio, len(block_groups(net)))


def _rewrap_ddp(trainer: "L.Trainer") -> None:
    """DistributedDataParallel registers the parameters that require gradients when it wraps the
    model; parameters unfrozen later would train on each process apart and the replicas drift
    (cf. Lightning issue 20340). Wrapping again after the change registers them; every process runs
    this at the same epoch, as the wrap's collective broadcast requires."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy._setup_model(strategy.model.module)


class StagedFinetuning(BaseFinetuning):
    """Applies the stage of the current epoch at every epoch start, so a resumed run lands right.

    Frozen block groups keep their BatchNorm layers in eval mode (running statistics used, not
    updated) unless the stage sets `train_bn`. Newly trainable parameters join the optimizer as a
    group per block group (`backbone.<i>`) with the lr the plan gives; the model's scheduler
    covers every group present.
    """

    def __init__(self, stages: list[dict[str, Any]], min_lr_ratio: float):
        super().__init__()
        check_stages(stages)
        self.stages = stages
        self.min_lr_ratio = min_lr_ratio

    def freeze_before_training(self, pl_module: "L.LightningModule") -> None:
        self._apply(pl_module.net, self.stages[0])

    def finetune_function(self, pl_module: "L.LightningModule", epoch: int, optimizer: Optimizer) -> None:
        plan = plan_for(pl_module.trainer, pl_module.net, self.stages, self.min_lr_ratio)
        index = plan.stage_at(epoch)
        if epoch == plan.first_epochs[index]:
            stage = self.stages[index]
            _logger.info("epoch %d: stage %d/%d trains %s", epoch, index + 1, len(self.stages), stage["train"])
        trainable_before = [p.requires_grad for p in pl_module.net.parameters()]
        self._apply(pl_module.net, self.stages[index], optimizer, plan, pl_module.trainer.global_step)
        if [p.requires_grad for p in pl_module.net.parameters()] != trainable_before:
            _rewrap_ddp(pl_module.trainer)

    def _apply(
        self, net: nn.Module, stage: dict[str, Any], optimizer: Optimizer | None = None,
        plan: StagePlan | None = None, step: int = 0,
    ) -> None:
        self.make_trainable(head_modules(net))
        groups = block_groups(net)
        trained = trained_groups(stage["train"], len(groups))
        for index, modules in enumerate(groups):
            for module in modules:
                if index in trained or (stage["train_bn"] and isinstance(module, _BatchNorm)):
                    self._thaw(module)
                else:
                    self.freeze_module(module)
                # BaseFinetuning marks frozen BatchNorm by track_running_stats=False; eval mode makes them
                # normalise with their running statistics instead of the batch's
                if isinstance(module, _BatchNorm):
                    module.train(net.training and module.track_running_stats)
            if optimizer is not None:
                self._add_new_params(modules, optimizer, f"{BACKBONE}.{index}", plan.lr(f"{BACKBONE}.{index}", step))

    @staticmethod
    def _thaw(module: nn.Module) -> None:
        """BaseFinetuning.freeze_module undone, for the module's own parameters only: make_trainable
        would recurse, and a model whose root owns parameters (ViT's cls_token) would thaw everything."""
        if isinstance(module, _BatchNorm):
            module.track_running_stats = True
        for param in module.parameters(recurse=False):
            param.requires_grad = True

    @staticmethod
    def _add_new_params(modules: list[nn.Module], optimizer: Optimizer, name: str, lr: float) -> None:
        # identity, not BaseFinetuning.filter_on_optimizer's value comparison, which would drop a
        # tensor that merely equals one already there (a zero-initialised bias, say)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [
            p for module in modules for p in module.parameters(recurse=False)
            if p.requires_grad and id(p) not in in_optimizer
        ]
        if not new:
            return
        names = {group.get("name") for group in optimizer.param_groups}
        if name in names:  # a block whose BatchNorm trained (train_bn) before the rest of it unfroze
            name = next(f"{name}.{n}" for n in itertools.count(1) if f"{name}.{n}" not in names)
        optimizer.add_param_group({"params": new, "lr": lr, "name": name})
