"""Staged fine-tuning: the lr plan, frozen parameters and BatchNorm statistics, groups and schedule."""

import math

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from torch.nn.modules.batchnorm import _BatchNorm

from labelcomp import train as train_module
from labelcomp.augment import stage_train_transforms
from labelcomp.cli import main
from labelcomp.config import load_config
from labelcomp.data import ImageDataModule
from labelcomp.errors import LabelcompError
from labelcomp.finetune import (BestValidated, EarlyStoppingValidated, StagedFinetuning, ValidationEpochs, block_groups,
                                validated_epochs)
from labelcomp.model import ClassifierModule
from labelcomp.resolve import resolve_config
from labelcomp.schedule import StagePlan, check_stages
from labelcomp.train import build_datamodule, build_module, read_data
from conftest import REPO, make_competition, tiny_config, tiny_overrides

STAGES = [
    {"epochs": 1, "train": "head", "lr": 0.01, "backbone_lr_mult": 0.1, "train_bn": False, "warmup_epochs": 0.0},
    {"epochs": 2, "train": "all", "lr": 0.002, "backbone_lr_mult": 0.1, "train_bn": False, "warmup_epochs": 0.5},
]


def test_plan_warms_up_then_decays_within_each_stage():
    plan = StagePlan(STAGES, steps_per_epoch=10, min_lr_ratio=0.0, n_groups=4)
    assert [plan.stage_at(epoch) for epoch in range(3)] == [0, 1, 1]
    assert plan.lr("head", 0) == pytest.approx(0.01)  # no warmup in stage 1
    assert plan.lr("head", 5) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    # stage 2 starts at step 10 with 5 warmup steps, backbone at a tenth of the head
    assert plan.lr("head", 10) == pytest.approx(0.002 / 5)
    assert plan.lr("backbone.0", 14) == pytest.approx(0.0002)
    assert plan.lr("backbone.3", 29) == pytest.approx(0.0002 * 0.5 * (1 + math.cos(math.pi * 14 / 15)))
    # layer-wise decay: each block group further from the head gets another factor
    decayed = StagePlan([{**STAGES[1], "layer_decay": 0.5}], steps_per_epoch=10, min_lr_ratio=0.0, n_groups=4)
    assert [decayed.lr(f"backbone.{i}", 4) for i in range(4)] == pytest.approx(  # end of warmup: the peak
        [0.002 * 0.5 ** (4 - i) for i in range(4)])


def test_unknown_stage_part_is_refused():
    with pytest.raises(LabelcompError, match=r"finetune.stages\[1\].train is 'middle'"):
        check_stages([STAGES[0], {**STAGES[1], "train": "middle"}])


def test_a_stage_with_its_own_size_resizes_the_augmented_image_to_it():
    augment = load_config(None, ["augment.image_size=32", "augment.mean=[0.5,0.5,0.5]", "augment.std=[0.5,0.5,0.5]"]).augment
    staged = stage_train_transforms(augment, [{"epochs": 2, "image_size": 20}, {"epochs": 1, "image_size": None},
                                              {"epochs": 1, "image_size": 32}], seed=0)
    assert [first for first, _ in staged] == [0, 2, 3]
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    assert [transform(image=image)["image"].shape for _, transform in staged] == [(20, 20, 3), (32, 32, 3), (32, 32, 3)]
    with pytest.raises(LabelcompError, match=r"finetune.stages\[1\].image_size is 0"):
        check_stages([STAGES[0], {**STAGES[1], "image_size": 0}])


def test_each_epoch_trains_at_its_stages_size_and_validates_at_the_test_size(tmp_path, monkeypatch):
    seen = []

    class Recording(ImageDataModule):
        def train_dataloader(self):
            loader = super().train_dataloader()
            seen.append(("train", self.trainer.current_epoch, loader.dataset[0][0].shape))
            return loader

        def val_dataloader(self):
            loader = super().val_dataloader()
            seen.append(("val", self.trainer.current_epoch, loader.dataset[0][0].shape))
            return loader

    monkeypatch.setattr(train_module, "ImageDataModule", Recording)
    stages = "[{epochs: 1, train: head, lr: 0.01, image_size: 24}, {epochs: 2, train: all, lr: 0.001}]"
    overrides = tiny_overrides(tmp_path, make_competition(tmp_path / "tiny"))
    assert main(["train", "--config", str(REPO / "configs" / "smoke.yaml"), *overrides, "--folds", "0",
                 f"finetune.stages={stages}"]) == 0
    train_sizes = sorted({(epoch, shape) for split, epoch, shape in seen if split == "train"})
    assert train_sizes == [(0, (24, 24, 3)), (1, (32, 32, 3)), (2, (32, 32, 3))]
    assert {shape for split, _, shape in seen if split == "val"} == {(32, 32, 3)}
    # the epoch at 24 px is not validated: no callback would read its score
    metrics = pd.read_csv(next((tmp_path / "runs").rglob("metrics.csv")))
    assert sorted(metrics.dropna(subset=["val/accuracy"])["epoch"]) == [1, 2]


class ScriptedScores(L.LightningModule):
    """Validation scores set in advance, one per epoch; records the epochs it was validated in."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores
        self.validated = []
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.validated.append(self.current_epoch)
        self.log("val/accuracy", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 2)), batch_size=2)

    val_dataloader = train_dataloader


def fit_scripted(tmp_path, scores, validated, schedule):
    """Fits ScriptedScores with the best checkpoint and early stopping (patience 2) judging `validated`
    epochs; `schedule`: ValidationEpochs runs validation in those epochs only, else Lightning validates
    every epoch."""
    best = BestValidated(dirpath=tmp_path, filename="best", monitor="val/accuracy", mode="max", save_top_k=1,
                         save_last=True, validated=validated)
    stopping = EarlyStoppingValidated(monitor="val/accuracy", mode="max", patience=2, validated=validated)
    module = ScriptedScores(scores)
    trainer = L.Trainer(max_epochs=len(scores), logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu",
                        callbacks=[*([ValidationEpochs(validated)] if schedule else []), best, stopping])
    trainer.fit(module)
    assert (tmp_path / "best.ckpt").is_file() and trainer.limit_val_batches == 1.0
    return float(best.best_model_score), stopping.stopped_epoch, module.validated


@pytest.mark.parametrize("schedule", [False, True])
def test_best_checkpoint_and_early_stopping_pass_over_the_epochs_not_validated(tmp_path, schedule):
    # epoch 0 (at a smaller size, say) scores highest; then 0.5, 0.4, 0.3, 0.8
    scores = [0.9, 0.5, 0.4, 0.3, 0.8]
    best, stopped, validated = fit_scripted(tmp_path, scores, frozenset({1, 2, 3, 4}), schedule)
    assert best == pytest.approx(0.5) and stopped == 3  # judged from epoch 1 on: patience runs out at epoch 3
    assert validated == ([1, 2, 3] if schedule else [0, 1, 2, 3])
    best, stopped, _ = fit_scripted(tmp_path / "every", scores, frozenset(range(5)), schedule)
    assert best == pytest.approx(0.9) and stopped == 2  # plain Lightning: epoch 0 is best, patience runs out at 2


def test_validating_every_other_epoch_counts_patience_in_validations(tmp_path):
    # validated epochs 1, 3, 5, 7: 0.5, then 0.4 and 0.45 (patience 2 runs out at epoch 5)
    scores = [0.9, 0.5, 0.99, 0.4, 0.99, 0.45, 0.99, 0.99]
    validated = validated_epochs([{"epochs": 8}], image_size=32, every=2)
    assert validated == {7, 5, 3, 1}
    best, stopped, epochs = fit_scripted(tmp_path, scores, validated, schedule=True)
    assert epochs == [1, 3, 5] and best == pytest.approx(0.5) and stopped == 5


def test_validated_epochs_end_with_the_last_and_skip_stages_at_another_size():
    quick = [{"epochs": 1, "image_size": 64}, {"epochs": 7, "image_size": 64}, {"epochs": 2, "image_size": None}]
    assert validated_epochs(quick, image_size=80, every=1) == {8, 9}
    assert validated_epochs(quick, image_size=80, every=3) == {9}
    quality = [{"epochs": 1, "image_size": None}, {"epochs": 9, "image_size": 160}]
    assert validated_epochs(quality, image_size=160, every=1) == set(range(10))
    assert validated_epochs(quality, image_size=160, every=3) == {0, 3, 6, 9}


def test_a_last_stage_at_another_size_than_the_test_size_is_refused(tmp_path):
    config = tiny_config(tmp_path, make_competition(tmp_path / "tiny"))
    config.merge_with({"finetune": {"stages": [{**STAGES[0], "image_size": 24}]}})
    with pytest.raises(LabelcompError, match="the last stage trains at 24 px"):
        resolve_config(config, 20)


class Snapshots(Callback):
    """State of the network before training and after each epoch, and the optimizer's group names."""

    def __init__(self):
        self.states = []
        self.group_names = []

    def _snapshot(self, module):
        return {name: tensor.detach().clone() for name, tensor in module.net.state_dict().items()}

    def on_train_start(self, trainer, module):
        self.states.append(self._snapshot(module))

    def on_train_epoch_end(self, trainer, module):
        self.states.append(self._snapshot(module))
        self.group_names.append([group["name"] for group in trainer.optimizers[0].param_groups])

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        frozen_bn = [m for modules in block_groups(module.net) for m in modules
                     if isinstance(m, _BatchNorm) and not m.track_running_stats]
        assert all(not m.training for m in frozen_bn)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two stages (head for 1 epoch, all for 2) on real images with the real pretrained backbone."""
    tmp_path = tmp_path_factory.mktemp("finetune")
    config = tiny_config(tmp_path, make_competition(tmp_path / "tiny"))
    config.merge_with({"finetune": {"stages": STAGES}})
    images = read_data(config)
    config = resolve_config(config, images.competition.num_classes)
    module = build_module(config, images.competition)
    data = build_datamodule(config, images.train, images.train, None)
    snapshots = Snapshots()
    lr_monitor = LearningRateMonitor(logging_interval="step")
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        callbacks=[StagedFinetuning(), snapshots, lr_monitor],
    )
    L.seed_everything(0)
    trainer.fit(module, datamodule=data)
    return module, snapshots, lr_monitor, trainer


def _names(module, kind):
    head = {f"{name}" for name, _ in module.net.get_classifier().named_parameters()}
    classifier = [name for name, m in module.net.named_modules() if m is module.net.get_classifier()][0]
    params = {name for name, _ in module.net.named_parameters()}
    stats = {name for name in module.net.state_dict() if name.endswith(("running_mean", "running_var"))}
    backbone = {name for name in params if not name.startswith(classifier + ".")}
    assert head and backbone
    return {"backbone": backbone, "stats": stats, "head": params - backbone}[kind]


def test_head_stage_leaves_backbone_and_batchnorm_statistics_untouched(fitted):
    module, snapshots, _, _ = fitted
    before, after_head = snapshots.states[0], snapshots.states[1]
    for name in _names(module, "backbone") | _names(module, "stats"):
        assert torch.equal(before[name], after_head[name]), name
    assert any(not torch.equal(before[name], after_head[name]) for name in _names(module, "head"))


def test_all_layers_stage_moves_backbone_and_batchnorm_statistics(fitted):
    module, snapshots, _, _ = fitted
    after_head, after_all = snapshots.states[1], snapshots.states[3]
    changed = [name for name in _names(module, "backbone") if not torch.equal(after_head[name], after_all[name])]
    assert len(changed) == len(_names(module, "backbone"))
    assert all(not torch.equal(after_head[name], after_all[name]) for name in _names(module, "stats"))


def test_unfrozen_backbone_joins_optimizer_with_the_planned_lr(fitted):
    module, snapshots, lr_monitor, trainer = fitted
    blocks = [f"backbone.{i}" for i in range(len(block_groups(module.net)))]
    assert len(blocks) == 8  # mobilenetv2: stem, 7 stages of blocks (+ conv_head)
    assert snapshots.group_names == [["head"], ["head", *blocks], ["head", *blocks]]
    steps_per_epoch = trainer.num_training_batches
    plan = StagePlan(STAGES, steps_per_epoch, 0.01, len(blocks))
    head_lrs = lr_monitor.lrs["lr-AdamW/head"]
    assert head_lrs == pytest.approx([plan.lr("head", step) for step in range(len(head_lrs))])
    # every block group exists from the first step of stage 2 and follows warmup then cosine decay
    for block in blocks:
        lrs = lr_monitor.lrs[f"lr-AdamW/{block}"]
        assert len(lrs) == 2 * steps_per_epoch
        assert lrs == pytest.approx([plan.lr(block, steps_per_epoch + i) for i in range(len(lrs))])
        assert max(lrs) == pytest.approx(0.0002, rel=1e-6)


ARCHITECTURES = {
    "resnet10t": {}, "efficientnet_b0": {}, "mobilenetv2_035": {}, "mobilenetv3_small_050": {},
    "convnext_atto": {}, "vit_tiny_patch16_224": {"img_size": 32},
}
THREE_STAGES = [
    {"epochs": 1, "train": "head", "lr": 0.01, "backbone_lr_mult": 0.1, "train_bn": False, "warmup_epochs": 0.0},
    {"epochs": 1, "train": "top:2", "lr": 0.003, "backbone_lr_mult": 0.3, "train_bn": False, "warmup_epochs": 0.0},
    {"epochs": 1, "train": "all", "lr": 0.001, "layer_decay": 0.7, "backbone_lr_mult": 0.1, "train_bn": False,
     "warmup_epochs": 0.0},
]


class TrainedGroups(Callback):
    """Which block groups have trainable parameters at the first step of each epoch, and the
    parameters at each epoch's start and end."""

    def __init__(self):
        self.per_epoch = []
        self.weights = []

    def _weights(self, module):
        return [[p.detach().clone() for m in modules for p in m.parameters(recurse=False)]
                for modules in block_groups(module.net)]

    def on_train_epoch_end(self, trainer, module):
        self.weights[-1] = (self.weights[-1], self._weights(module))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.weights.append(self._weights(module))
            groups = block_groups(module.net)
            trainable = [i for i, modules in enumerate(groups)
                         if any(p.requires_grad for m in modules for p in m.parameters(recurse=False))]
            names = [group["name"] for group in trainer.optimizers[0].param_groups]
            self.per_epoch.append((len(groups), trainable, names))


def _tiny_module(name, stages):
    return ClassifierModule(
        model={"name": name, "pretrained": False, "pretrained_cfg": {}, "kwargs": ARCHITECTURES.get(name, {}),
               "drop_rate": 0.0, "zero_init_head": True},
        optim={"name": "adamw", "weight_decay": 0.0, "label_smoothing": 0.0},
        finetune={"stages": stages, "min_lr_ratio": 0.01}, num_classes=3, metric="accuracy",
    )


def _random_loader():
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 3, (8,), generator=generator))
    return DataLoader(data, batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_trains_through_head_top_and_all_stages(name):
    module = _tiny_module(name, THREE_STAGES)
    recorder = TrainedGroups()
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=1, limit_val_batches=1,
        callbacks=[StagedFinetuning(), recorder],
    )
    trainer.fit(module, _random_loader(), _random_loader())
    (n, head_only, head_names), (_, top, top_names), (_, every, all_names) = recorder.per_epoch
    assert n >= 3, "timm's group_matcher found too few block groups"
    assert head_only == [] and head_names == ["head"]
    assert top == [n - 2, n - 1] and top_names == ["head", f"backbone.{n - 2}", f"backbone.{n - 1}"]
    # through the top:2 epoch the frozen groups stay bit-identical and the top two move
    before, after = recorder.weights[1]
    for index in range(n):
        unchanged = all(torch.equal(a, b) for a, b in zip(before[index], after[index]))
        assert unchanged == (index < n - 2), (name, index)
    assert every == list(range(n)) and sorted(all_names) == sorted(["head", *(f"backbone.{i}" for i in range(n))])


def test_train_bn_trains_batchnorm_of_frozen_blocks_only():
    stages = [{**THREE_STAGES[0], "train_bn": True}]
    module = _tiny_module("mobilenetv2_035", stages)
    before = {name: tensor.clone() for name, tensor in module.net.state_dict().items()}
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StagedFinetuning()])
    trainer.fit(module, _random_loader())
    after = module.net.state_dict()
    bn_names = {f"{name}.{suffix}" for name, m in module.net.named_modules() if isinstance(m, _BatchNorm)
                for suffix in ("weight", "running_mean")}
    conv_names = {f"{name}.weight" for name, m in module.net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert all(not torch.equal(before[name], after[name]) for name in bn_names)
    assert all(torch.equal(before[name], after[name]) for name in conv_names)


@pytest.mark.slow
def test_resumed_mid_stage_run_continues_with_the_right_stage_and_groups(tmp_path):
    """Stopped inside the top:2 stage and resumed from the checkpoint, a run ends exactly where an
    uninterrupted one does (cf. Lightning issue 6891: param groups lost on resume)."""
    stages = [{**THREE_STAGES[0]}, {**THREE_STAGES[1], "epochs": 2}, {**THREE_STAGES[2]}]

    def trainer(max_epochs, recorder):
        return L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[StagedFinetuning(), recorder])

    L.seed_everything(0)
    straight, straight_groups = _tiny_module("resnet10t", stages), TrainedGroups()
    trainer(4, straight_groups).fit(straight, _random_loader())

    L.seed_everything(0)
    first, first_groups = _tiny_module("resnet10t", stages), TrainedGroups()
    stopped = trainer(2, first_groups)
    stopped.fit(first, _random_loader())
    stopped.save_checkpoint(tmp_path / "mid_stage.ckpt")

    resumed, resumed_groups = _tiny_module("resnet10t", stages), TrainedGroups()
    resumed_trainer = trainer(4, resumed_groups)
    resumed_trainer.fit(resumed, _random_loader(), ckpt_path=tmp_path / "mid_stage.ckpt")

    assert first_groups.per_epoch + resumed_groups.per_epoch == straight_groups.per_epoch
    n = straight_groups.per_epoch[0][0]
    assert resumed_groups.per_epoch[0][1] == [n - 2, n - 1]  # back in the top:2 stage
    assert resumed_trainer.lr_scheduler_configs[0].scheduler.last_epoch == straight.trainer.global_step
    for name, tensor in straight.net.state_dict().items():
        assert torch.allclose(tensor.float(), resumed.net.state_dict()[name].float(), atol=1e-6), name


def test_presets_cover_the_epochs_and_explicit_stages_win():
    from omegaconf import OmegaConf

    from labelcomp.config import FinetuneConfig
    from labelcomp.schedule import preset_stages, resolve_stages

    for preset in ("head", "freeze_unfreeze", "gradual"):
        stages = preset_stages(preset, 7)
        assert sum(stage["epochs"] for stage in stages) == 7
        assert stages[0]["train"] == "head" and stages[-1]["train"] == ("head" if preset == "head" else "all")
    assert [stage["train"] for stage in preset_stages("gradual", 7)] == ["head", "top:2", "all"]
    explicit = OmegaConf.structured(FinetuneConfig(preset="gradual"))
    explicit.merge_with({"stages": [STAGES[1]]})
    assert [stage["train"] for stage in resolve_stages(explicit)] == ["all"]
    with pytest.raises(LabelcompError, match="finetune.epochs=2 is too few for the 'gradual' preset"):
        preset_stages("gradual", 2)
    with pytest.raises(LabelcompError, match="finetune.preset 'slow' is unknown"):
        preset_stages("slow", 6)


@pytest.mark.parametrize("filter_bias_and_bn", [True, False])
def test_biases_and_norm_weights_get_no_weight_decay_as_timm_does(filter_bias_and_bn):
    stages = [{**THREE_STAGES[0]}, {**THREE_STAGES[2]}]
    module = ClassifierModule(
        model={"name": "mobilenetv2_035", "pretrained": False, "pretrained_cfg": {}, "kwargs": {}, "drop_rate": 0.0,
               "zero_init_head": True},
        optim={"name": "adamw", "weight_decay": 0.05, "label_smoothing": 0.0, "filter_bias_and_bn": filter_bias_and_bn},
        finetune={"stages": stages, "min_lr_ratio": 0.01}, num_classes=3, metric="accuracy",
    )
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=1,
                        callbacks=[StagedFinetuning()])
    trainer.fit(module, _random_loader())
    # after the unfreeze every parameter is in the optimizer, head and backbone groups alike
    decay_of = {id(p): group["weight_decay"] for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert len(decay_of) == len(list(module.net.parameters()))
    for name, parameter in module.net.named_parameters():
        one_dimensional = parameter.ndim <= 1  # biases, BatchNorm weights
        assert decay_of[id(parameter)] == (0.0 if filter_bias_and_bn and one_dimensional else 0.05), name
