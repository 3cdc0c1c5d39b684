"""Training recipe options: label smoothing, timm Mixup/CutMix with a switch-off epoch, weight EMA."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from labelcomp.finetune import StagedFinetuning
from labelcomp.model import ClassifierModule
from labelcomp.predict import load_classifier

STAGES = [{"epochs": 2, "train": "all", "lr": 0.01, "backbone_lr_mult": 1.0, "train_bn": False, "warmup_epochs": 0.0}]
MIXUP_OFF = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5, "off_epoch": None}


def _module(label_smoothing=0.0, mixup=MIXUP_OFF, ema=None):
    return ClassifierModule(
        model={"name": "resnet10t", "pretrained": False, "pretrained_cfg": {}, "kwargs": {}, "drop_rate": 0.0,
               "zero_init_head": False},
        optim={"name": "adamw", "weight_decay": 0.0, "label_smoothing": label_smoothing},
        finetune={"stages": STAGES, "min_lr_ratio": 0.01}, num_classes=3, metric="accuracy", mixup=mixup,
        ema=ema or {"enabled": False, "decay": 0.9, "use_warmup": False},
    )


def _batches():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    return TensorDataset(images, torch.randint(0, 3, (8,), generator=generator))


def _fit(module, callbacks=(), epochs=2, path=None):
    L.seed_everything(0)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StagedFinetuning(), *callbacks])
    trainer.fit(module, DataLoader(_batches(), batch_size=4), DataLoader(_batches(), batch_size=4))
    if path is not None:
        trainer.save_checkpoint(path)
    return trainer


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")
def test_label_smoothing_reaches_the_training_loss_only():
    module = _module(label_smoothing=0.2)
    images, targets = _batches().tensors
    with torch.no_grad():
        logits = module(images)
        loss = module.training_step((images, targets), 0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets, label_smoothing=0.2).item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-3)
    assert module.val_loss.label_smoothing == 0.0  # validation loss stays the log-loss


class NetInputs(Callback):
    """The batch the loader gave and the images the network saw, per epoch."""

    def __init__(self):
        self.pairs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        seen = []
        handle = module.net.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
        self.pairs.append((trainer.current_epoch, batch[0].clone(), seen, handle))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.pairs[-1][3].remove()


def test_mixup_mixes_batches_until_its_off_epoch():
    recorder = NetInputs()
    _fit(_module(mixup={**MIXUP_OFF, "mixup_alpha": 0.4, "cutmix_alpha": 1.0, "off_epoch": 1}), [recorder])
    for epoch, given, seen, _ in recorder.pairs:
        if epoch == 0:
            assert not torch.equal(given, seen[0])  # mixed: pairs blended or patches pasted
        else:
            assert torch.equal(given, seen[0])


def test_ema_weights_are_validated_checkpointed_and_predict(tmp_path):
    module = _module(ema={"enabled": True, "decay": 0.5, "use_warmup": False})
    _fit(module, path=tmp_path / "ema.ckpt")
    images = _batches().tensors[0]
    module.eval()
    with torch.no_grad():
        averaged, raw = module.ema.module(images), module.net(images)
        assert not torch.allclose(averaged, raw)
        assert torch.equal(module(images), averaged)  # what validation and prediction call
        reloaded = load_classifier(tmp_path / "ema.ckpt").eval()
        assert torch.allclose(reloaded(images), averaged, atol=1e-6)


def test_grad_cam_points_at_the_evidence_and_skips_vit_tokens():

    from labelcomp.report import grad_cam

    class HotSpot(torch.nn.Module):
        """Features light up in the top-left quarter; class 1 is that channel's positive evidence."""

        def forward_features(self, images):
            features = torch.zeros(1, 2, 4, 4)
            features[0, 0, :2, :2] = images.mean() + 1.0
            return features

        def forward_head(self, features):
            return features.mean(dim=(2, 3)) @ torch.tensor([[0.0, 3.0], [1.0, 0.0]])

    cam = grad_cam(HotSpot(), torch.zeros(3, 32, 32), target=1)
    assert cam.shape == (32, 32) and cam.max() == pytest.approx(1.0) and cam.min() >= 0
    assert cam[:8, :8].mean() > 0.9 and cam[24:, 24:].max() == 0  # bright where the evidence is
    vit = ClassifierModule(
        model={"name": "vit_tiny_patch16_224", "pretrained": False, "pretrained_cfg": {}, "kwargs": {"img_size": 32},
               "drop_rate": 0.0, "zero_init_head": False},
        optim={"name": "adamw", "weight_decay": 0.0, "label_smoothing": 0.0},
        finetune={"stages": STAGES, "min_lr_ratio": 0.01}, num_classes=3, metric="accuracy",
    ).eval()
    assert grad_cam(vit.predicting_net(), torch.zeros(3, 32, 32), target=1) is None
