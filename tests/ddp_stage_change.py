"""Run by test_ddp.py as its own script: Lightning's DDP launcher starts this file again for rank 1.

Trains a tiny model on 2 CPU processes (gloo) through a head -> all stage change and saves each
rank's weights, and the initial ones, to the folder given as argument."""

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from labelcomp.finetune import StagedFinetuning
from labelcomp.model import ClassifierModule

STAGES = [
    {"epochs": 1, "train": "head", "lr": 0.01, "backbone_lr_mult": 0.1, "train_bn": False, "warmup_epochs": 0.0},
    {"epochs": 1, "train": "all", "lr": 0.01, "backbone_lr_mult": 1.0, "train_bn": False, "warmup_epochs": 0.0},
]

if __name__ == "__main__":
    out = sys.argv[1]
    L.seed_everything(0)
    module = ClassifierModule(
        model={"name": "resnet10t", "pretrained": False, "pretrained_cfg": {}, "kwargs": {}, "drop_rate": 0.0,
               "zero_init_head": True},
        optim={"name": "adamw", "weight_decay": 0.0, "label_smoothing": 0.0},
        finetune={"stages": STAGES, "min_lr_ratio": 0.01}, num_classes=3, metric="accuracy",
    )
    initial = {name: tensor.clone() for name, tensor in module.net.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 3, (16,), generator=generator))
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[StagedFinetuning()],
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    torch.save({"initial": initial, "final": module.net.state_dict()}, f"{out}/rank{trainer.global_rank}.pt")
