"""The LightningModule over a timm backbone: loss, torchmetrics metric, and the optimizer with the
fit's `StagePlan` (schedule.py).

It optimizes whatever is trainable; freezing and unfreezing belong to the finetune callback.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import numpy as np
import timm
import torch
from omegaconf import DictConfig, OmegaConf
from sklearn.utils.class_weight import compute_class_weight
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

from labelcomp.errors import LabelcompError
from labelcomp.finetune import block_groups
from labelcomp.metrics import METRICS
from labelcomp.schedule import BACKBONE, HEAD, StagedLR, StagePlan, no_decay_parameters, param_groups

_logger = logging.getLogger(__name__)

HUB_TIMEOUT_S = 5


def _check_hub_reachable(model_name: str) -> None:
    """Fail in seconds, not after minutes of download retries, when the weights hub is unreachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # the user says the weights are in the local cache
        return
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S).close()
    except OSError as error:
        raise LabelcompError(
            f"model.pretrained=true: cannot reach the timm weights hub ({host}: {error}) to download "
            f"'{model_name}'; give a local weights file with model.pretrained=path/to/weights.pth, "
            "train from scratch with model.pretrained=false, or set HF_HUB_OFFLINE=1 if the weights are cached"
        ) from None


def apply_weights_card(model: DictConfig) -> None:
    """Merge the card beside a local weights file into the model config (config values win).

    The card `<weights>.json` uses the keys of timm's hub config.json: `architecture`, `model_args`
    (create_model arguments the weights need) and `pretrained_cfg` (mean, std, ...). Merged into the
    run's config, it makes checkpoints rebuildable without the card.
    """
    if not isinstance(model.pretrained, str):
        return
    card_path = Path(model.pretrained).with_suffix(".json")
    if not card_path.is_file():
        return
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as error:
        raise LabelcompError(f"{card_path}: not valid JSON ({error})") from None
    architecture = card.get("architecture")
    if architecture and architecture != model.name:
        raise LabelcompError(
            f"model.pretrained: '{model.pretrained}' holds {architecture} weights (see {card_path}), but model.name "
            f"is '{model.name}'; set model.name={architecture}, or model.pretrained=true/false/another file"
        )
    model.kwargs = OmegaConf.merge(card.get("model_args", {}), model.kwargs)
    model.pretrained_cfg = OmegaConf.merge(card.get("pretrained_cfg", {}), model.pretrained_cfg)


def build_model(model: DictConfig, num_classes: int, load_weights: bool = True) -> nn.Module:
    """timm.create_model from the `model` config; `load_weights=False` skips pretrained weights
    (a checkpoint is about to replace them)."""
    if not timm.is_model(model.name):
        raise LabelcompError(f"model.name '{model.name}' is not a timm model; see timm.list_models()")
    pretrained = model.pretrained if load_weights else False
    overlay = dict(OmegaConf.to_container(model.pretrained_cfg, resolve=True))
    if isinstance(pretrained, str):
        path = Path(pretrained)
        if not path.is_file():
            raise LabelcompError(
                f"model.pretrained: weights file '{pretrained}' not found; give an existing file, true (timm hub) or false"
            )
        overlay["file"] = str(path.resolve())
    elif pretrained is True:
        _check_hub_reachable(model.name)
    elif pretrained is not False:
        raise LabelcompError(f"model.pretrained is {pretrained!r}; expected true, false or a weights file path")
    try:
        net = timm.create_model(
            model.name, pretrained=bool(pretrained), num_classes=num_classes, drop_rate=model.drop_rate,
            pretrained_cfg_overlay=overlay, **OmegaConf.to_container(model.kwargs, resolve=True),
        )
    except (OSError, RuntimeError) as error:
        reason = " ".join(str(error).split())  # torch lists missing keys over several lines
        raise LabelcompError(f"model '{model.name}': cannot load pretrained weights ({reason[:300]})") from None
    if model.zero_init_head:
        head = net.get_classifier()
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return net


def class_weights(kind: str, targets: np.ndarray, num_classes: int) -> list[float] | None:
    """Cross-entropy weights per class for `loss.class_weights` from training targets (class indices);
    a class without training images keeps weight 1 (it has nothing to weigh)."""
    if kind == "none":
        return None
    present = np.unique(targets)
    weights = np.ones(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=targets)
    return (np.sqrt(weights) if kind == "sqrt" else weights).tolist()


class ClassifierModule(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        finetune: dict[str, Any],
        num_classes: int,
        metric: str,
        mixup: dict[str, Any] | None = None,
        ema: dict[str, Any] | None = None,
        channels_last: bool = False,
        load_weights: bool = True,
        class_weights: list[float] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["load_weights"])
        self.net = build_model(OmegaConf.create(model), num_classes, load_weights)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        self.stages = finetune["stages"]
        # .get: checkpoints saved before the key existed are still predicted from
        self.no_decay = no_decay_parameters(self.net, optim["weight_decay"], optim.get("filter_bias_and_bn", False))
        self.stage_plan: StagePlan | None = None  # built with the optimizer, once the fit's length is known
        self.metric = METRICS[metric]
        self.mixup = None
        if mixup and (mixup["mixup_alpha"] > 0 or mixup["cutmix_alpha"] > 0):
            # timm's Mixup makes soft targets and applies the label smoothing itself
            self.mixup = Mixup(
                mixup_alpha=mixup["mixup_alpha"], cutmix_alpha=mixup["cutmix_alpha"], prob=mixup["prob"],
                switch_prob=mixup["switch_prob"], label_smoothing=optim["label_smoothing"], num_classes=num_classes,
            )
            self.mixed_loss = SoftTargetCrossEntropy()
        self.train_loss = nn.CrossEntropyLoss(
            weight=torch.tensor(class_weights, dtype=torch.float32) if class_weights else None,
            label_smoothing=optim["label_smoothing"])
        # validation loss stays plain cross-entropy so it is the log-loss whatever the smoothing
        self.val_loss = nn.CrossEntropyLoss()
        self.val_metric = self.metric.build_torchmetric(num_classes) if self.metric.torchmetric else None
        self.ema = None
        if ema and ema["enabled"]:
            self.ema = ModelEmaV3(self.net, decay=ema["decay"], use_warmup=ema["use_warmup"])

    def predicting_net(self) -> nn.Module:
        """The network that predicts outside training (validation, checkpoint selection, OOF, test,
        export): the averaged weights where EMA keeps them."""
        return self.ema.module if self.ema is not None else self.net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net if self.training else self.predicting_net()
        return net(images.contiguous(memory_format=self.memory_format))

    def _mixes(self) -> bool:
        off_epoch = self.hparams.mixup["off_epoch"] if self.mixup is not None else None
        return self.mixup is not None and (off_epoch is None or self.current_epoch < off_epoch)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self._mixes() and len(images) % 2 == 0:  # timm mixes pairs within a batch
            images, soft_targets = self.mixup(images, targets)
            loss = self.mixed_loss(self(images), soft_targets)
        else:
            loss = self.train_loss(self(images), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets),
                 sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.net, step=self.global_step)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        # synced across processes, so checkpointing and early stopping decide alike on every one
        self.log("val/loss", self.val_loss(logits, targets), prog_bar=True, batch_size=len(targets), sync_dist=True)
        if self.val_metric is not None:
            self.val_metric(logits, targets)
            self.log(self.metric.monitor, self.val_metric, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """An optimizer over what is trainable now (the finetune callback has applied the first
        stage): the head, and groups per backbone block group; later stages add groups."""
        steps_per_epoch = self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs)
        self.stage_plan = StagePlan(self.stages, int(steps_per_epoch), self.hparams.finetune["min_lr_ratio"],
                                    len(block_groups(self.net)))
        trainable = [(HEAD, [p for p in self.net.get_classifier().parameters() if p.requires_grad])] + [
            (f"{BACKBONE}.{index}",
             [p for module in modules for p in module.parameters(recurse=False) if p.requires_grad])
            for index, modules in enumerate(block_groups(self.net))
        ]
        groups = param_groups(trainable, self.no_decay, self.hparams.optim["weight_decay"],
                              lambda lr_group: self.stage_plan.lr(lr_group, 0))
        optimizer = create_optimizer_v2(groups, opt=self.hparams.optim["name"], lr=self.stages[0]["lr"],
                                        weight_decay=self.hparams.optim["weight_decay"])
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": StagedLR(optimizer, self.stage_plan), "interval": "step"}}
