"""Staged freezing and unfreezing as a Lightning `BaseFinetuning` callback, following the model's
`StagePlan` (schedule.py).

The head is what timm's `get_classifier()` returns; the backbone is split into block groups by the
model's own `group_matcher` (timm), so no layer name of one architecture is written here.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning, Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from timm.models import group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from labelcomp.schedule import BACKBONE, StagePlan, param_groups, trained_groups

_logger = logging.getLogger(__name__)


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

    The stages and their lrs are the module's (`stages`, and the `stage_plan` it builds with its
    optimizer). Frozen block groups keep their BatchNorm layers in eval mode (running statistics used,
    not updated) unless the stage sets `train_bn`. Newly trainable parameters join the optimizer as
    groups of their block group (`backbone.<i>`, with and without weight decay) at the lr the plan
    gives; the module's scheduler covers every group present.
    """

    def freeze_before_training(self, pl_module: "L.LightningModule") -> None:
        self._apply(pl_module.net, pl_module.stages[0])

    def finetune_function(self, pl_module: "L.LightningModule", epoch: int, optimizer: Optimizer) -> None:
        plan: StagePlan = pl_module.stage_plan
        index = plan.stage_at(epoch)
        if epoch == plan.first_epochs[index]:
            _logger.info("epoch %d: stage %d/%d trains %s", epoch, index + 1, len(plan.stages),
                         plan.stages[index]["train"])
        trainable_before = [p.requires_grad for p in pl_module.net.parameters()]
        self._apply(pl_module.net, plan.stages[index])
        self._add_new_params(pl_module, optimizer, plan, pl_module.trainer.global_step)
        if [p.requires_grad for p in pl_module.net.parameters()] != trainable_before:
            _rewrap_ddp(pl_module.trainer)

    def _apply(self, net: nn.Module, stage: dict[str, Any]) -> None:
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

    @staticmethod
    def _thaw(module: nn.Module) -> None:
        """BaseFinetuning.freeze_module undone, for the module's own parameters only: make_trainable
        would recurse, and a model whose root owns parameters (ViT's cls_token) would thaw everything."""
        if isinstance(module, _BatchNorm):
            module.track_running_stats = True
        for param in module.parameters(recurse=False):
            param.requires_grad = True

    @staticmethod
    def _add_new_params(pl_module: "L.LightningModule", optimizer: Optimizer, plan: StagePlan, step: int) -> None:
        # identity, not BaseFinetuning.filter_on_optimizer's value comparison, which would drop a
        # tensor that merely equals one already there (a zero-initialised bias, say)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [(f"{BACKBONE}.{index}", [p for module in modules for p in module.parameters(recurse=False)
                                         if p.requires_grad and id(p) not in in_optimizer])
               for index, modules in enumerate(block_groups(pl_module.net))]
        names = {group["name"] for group in optimizer.param_groups}
        for group in param_groups(new, pl_module.no_decay, pl_module.hparams.optim["weight_decay"],
                                  lambda lr_group: plan.lr(lr_group, step)):
            if group["name"] in names:  # a block whose BatchNorm trained (train_bn) before the rest of it unfroze
                group["name"] = next(f"{group['name']}.{n}" for n in itertools.count(1)
                                     if f"{group['name']}.{n}" not in names)
            optimizer.add_param_group(group)


def resized_epochs(stages: list[dict[str, Any]], image_size: int) -> frozenset[int]:
    """The epochs of the stages that train at a size of their own, not at `image_size`."""
    epochs, first = set(), 0
    for stage in stages:
        if stage.get("image_size") not in (None, image_size):
            epochs.update(range(first, first + stage["epochs"]))
        first += stage["epochs"]
    return frozenset(epochs)


def validated_epochs(stages: list[dict[str, Any]], image_size: int, every: int) -> frozenset[int]:
    """The epochs that end with validation: those at the test size (see _Validated), every `every`-th
    counted back from the last, so that the last epoch is always validated whatever `every` is."""
    total = sum(stage["epochs"] for stage in stages)
    resized = resized_epochs(stages, image_size)
    return frozenset(epoch for epoch in range(total) if epoch not in resized and (total - 1 - epoch) % every == 0)


class ValidationEpochs(Callback):
    """Runs the validation loop at the end of the `validated` epochs only. Lightning's
    check_val_every_n_epoch counts from the first epoch, so it skips the last one unless the interval
    divides the epochs, and cannot pass over stages at another size; switching limit_val_batches off
    and back per epoch is how Lightning's own tuner (lr_finder, batch_size_scaling) pauses validation."""

    def __init__(self, validated: frozenset[int]):
        self.validated = validated

    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._limit = trainer.limit_val_batches

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        trainer.limit_val_batches = self._limit if trainer.current_epoch in self.validated else 0

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        trainer.limit_val_batches = self._limit


class _Validated:
    """For the callbacks that judge the model by its validation score: they judge the `validated`
    epochs only (validated_epochs): at the end of any other epoch the score they would read is stale.
    Stages training at a size of their own are never validated: validation is at augment.image_size,
    the size OOF and test predictions use, where a model trained smaller scores low (the quick recipe
    training at 64 px, validated at 80, scored about 8 points under the 64 px recipe validated at 64 in
    the same epochs); such scores say nothing of the model the stages at the test size make, and a
    checkpoint from those epochs would be tested at a size it never trained at."""

    def __init__(self, *args: Any, validated: frozenset[int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.validated = validated

    # both judge at the end of the training epoch (Lightning's choice when validation runs once an
    # epoch, at its end); at the end of validation they do nothing
    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.current_epoch in self.validated:
            super().on_train_epoch_end(trainer, pl_module)


class BestValidated(_Validated, ModelCheckpoint):
    """ModelCheckpoint over the validated epochs only (also last.ckpt, which resumes a fold: a fold
    killed between validations resumes from the last validated epoch)."""


class EarlyStoppingValidated(_Validated, EarlyStopping):
    """EarlyStopping whose patience counts validated epochs only."""
