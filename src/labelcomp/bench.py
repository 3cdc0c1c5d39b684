"""`make bench`: where training time goes, measured side by side in one process.

(a) the model alone on synthetic tensors, every precision and memory format (the hardware's limit);
(b) the real pipeline: DataModule, Albumentations and the Lightning Trainer with the fine-tuning
callback, steady state, validation excluded; (c) the training loader alone; (d) inference with and
without TTA. (b)/(a) near 1 means the model is what limits training. A benchmark, not a test.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from labelcomp.augment import policy_views
from labelcomp.finetune import StagedFinetuning
from labelcomp.predict import predict_views
from labelcomp.speed import Variant, candidates, cores, device_name, device_of, measure_variants
from labelcomp.train import classifier_module, fold_data, prepare

WARMUP_STEPS = 5
ROUNDS = 5


def _rates(values: list[float]) -> str:
    return " / ".join(f"{value:.0f}" for value in values)


class StepClock(Callback):
    """The time at the end of every training step."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def fit_one_epoch(config: DictConfig, competition, images: pd.DataFrame, cache) -> tuple[StepClock, Any, Any]:
    """One epoch of the real pipeline over `images` in which every layer trains (as in (a)), without
    validation; returns the step clock, the data module and the trained module."""
    data = fold_data(config, images, images.head(config.data.batch_size), cache)
    last = OmegaConf.to_container(config.finetune, resolve=True)["stages"][-1]
    stage = {**last, "train": "all", "epochs": 1}
    module = classifier_module(config, competition, stages=[stage])
    clock = StepClock()
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            max_epochs=1, limit_val_batches=0, accelerator=config.trainer.accelerator, devices=1,
            precision=config.trainer.precision, deterministic=config.trainer.deterministic,
            callbacks=[StagedFinetuning([stage], config.finetune.min_lr_ratio), LearningRateMonitor("step"), clock],
            logger=CSVLogger(logs, name="bench", version=""), log_every_n_steps=10, enable_checkpointing=False,
            enable_model_summary=False, num_sanity_val_steps=0, enable_progress_bar=False,
        )
        trainer.fit(module, datamodule=data)
    # Lightning's deterministic mode is process-wide; (a) measures the hardware without it
    torch.use_deterministic_algorithms(False)
    return clock, data, module


def _pipeline_rate(config: DictConfig, competition, train: pd.DataFrame, cache, steps: int) -> tuple[float, Any, Any]:
    """Training images/s of the real pipeline over `steps` steady-state steps."""
    batch = config.data.batch_size
    repeats = math.ceil((steps + WARMUP_STEPS + 1) * batch / len(train))
    clock, data, module = fit_one_epoch(config, competition, pd.concat([train] * repeats, ignore_index=True), cache)
    ends = clock.ends[WARMUP_STEPS:]
    return (len(ends) - 1) * batch / (ends[-1] - ends[0]), data, module


def _loading_rate(data, steps: int) -> float:
    """Images/s of the training loader alone (decode or cache, augmentation, collation, normalization)."""
    loader = iter(data.train_dataloader())
    for _ in range(WARMUP_STEPS):
        next(loader)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += len(data.on_after_batch_transfer(next(loader), 0)[0])
    return images / (time.perf_counter() - start)


def _inference_rate(module, frame: pd.DataFrame, config: DictConfig, views: list[str]) -> float:
    start = time.perf_counter()
    predict_views(module.eval(), frame, config, views)
    return len(frame) / (time.perf_counter() - start)


def run_bench(config: DictConfig, seconds: float = 3.0) -> str:
    config.trainer.progress_bar = False
    competition, train, _, _, cache = prepare(config)
    device = device_of(config.trainer.accelerator)
    classes, size, batch = competition.num_classes, config.augment.image_size, config.data.batch_size
    lines = [f"{config.model.name} @ {size} px, batch {batch}, {len(train)} images, on {device_name(device)} "
             f"({cores()} cores); pipeline: precision {config.trainer.precision}, channels_last "
             f"{config.trainer.channels_last}, num_workers {config.data.num_workers}"]

    # this machine's speed drifts by 10% and more within seconds: every variant and (b) are measured in
    # turn, round after round, the pipeline's own variant right before (b); (a) is the variant with the
    # best median, not the luckiest measurement, and the ratio is the median of the rounds' ratios of
    # (b) to (a) measured seconds apart, so the drift between rounds cancels out
    chosen = Variant(config.trainer.precision, bool(config.trainer.channels_last))
    limits: dict = {variant: [] for variant in candidates(device)}
    pipelines = []
    for _ in range(ROUNDS):
        for variant, rates in measure_variants(config, classes, seconds, rounds=1, last=chosen).items():
            limits[variant] += rates
        steps = max(20, round(seconds * max(max(rates) for rates in limits.values()) / batch))
        rate, data, module = _pipeline_rate(config, competition, train, cache, steps)
        pipelines.append(rate)
    medians = {variant: float(np.median(rates)) for variant, rates in limits.items()}
    fastest = max(medians, key=medians.get)
    limit, pipeline = medians[fastest], float(np.median(pipelines))
    ratios = [rate / best for rate, best in zip(pipelines, limits[fastest])]
    lines.append(f"(a) model-only training, synthetic tensors, images/s ({ROUNDS} rounds; median):")
    lines += [f"      {variant.precision:<11} {'channels_last' if variant.channels_last else 'contiguous':<14}"
              f"{_rates(limits[variant]):<26}{medians[variant]:6.0f}" + ("  <- (a)" if variant == fastest else "")
              for variant in limits]
    loading = _loading_rate(data, steps)
    lines += [f"(b) pipeline training (all layers, steady state, no validation): {_rates(pipelines)}; "
              f"median {pipeline:.0f} images/s; (b)/(a) by round: "
              + " / ".join(f"{ratio:.2f}" for ratio in ratios),
              f"(c) training loader alone: {loading:.0f} images/s"]

    sample = train.head(min(len(train), 512))
    for policy in ("none", "hflip", "d4"):
        views = policy_views(policy, config.tta)
        rate = _inference_rate(module, sample, config, views)
        lines.append(f"(d) inference, TTA {policy} ({len(views)} view{'s' if len(views) > 1 else ''}): "
                     f"{rate:.0f} images/s ({rate * len(views):.0f} views/s)")
    lines.append(f"pipeline/model-only = {np.median(ratios):.2f}  loading/model-only = {loading / limit:.2f}")
    return "\n".join(lines)

