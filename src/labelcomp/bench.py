"""`make bench`: where training time goes, measured side by side in one process.

(a) the model alone on synthetic tensors, every precision and memory format (the hardware's limit);
(b) the real pipeline: DataModule, Albumentations and the Lightning Trainer with the fine-tuning
callback, steady state, validation excluded; (c) the training loader alone; (d) inference with and
without TTA. (b)/(a) near 1 means the model is what limits training. A benchmark, not a test.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from typing import Any, Callable

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from labelcomp.data import DiskCache, ImageReader
from labelcomp.finetune import StagedFinetuning
from labelcomp.hardware import cores, device_name, device_of
from labelcomp.predict import predict_views
from labelcomp.resolve import resolve_config
from labelcomp.speed import Variant, measure_variants, synchronize, synthetic_step
from labelcomp.train import build_datamodule, build_module, read_data
from labelcomp.tta import policy_views

WARMUP_STEPS = 5
ROUNDS = 3  # of every variant in turn, for the table and to find the fastest
BLOCK_SECONDS = 0.1  # of model-only time between two blocks of pipeline steps


def _rates(values: list[float]) -> str:
    return " / ".join(f"{value:.0f}" for value in values)


class PairedModelOnly(Callback):
    """Every `block` pipeline training steps (after `warmup`), `block` model-only steps on synthetic
    tensors, each block timed on its own. Measured in alternating blocks of about a tenth of a second
    (one step on this CPU), (a) and (b) see the same machine: this one drifts by 10% and more within
    seconds, which measurements taken in turn put into their ratio. Deterministic mode, which the
    pipeline may use, is off during the model-only blocks."""

    def __init__(self, model_step: Callable[[], None], block: int, warmup: int, device: torch.device):
        self.model_step, self.block, self.warmup, self.device = model_step, block, warmup, device
        self.steps = 0
        self.block_start: float | None = None
        self.pipeline_seconds: list[float] = []
        self.model_seconds: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        if self.steps < self.warmup or (self.steps - self.warmup) % self.block:
            return
        synchronize(self.device)
        now = time.perf_counter()
        if self.block_start is not None:
            self.pipeline_seconds.append(now - self.block_start)
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(False)
        for _ in range(self.block):
            self.model_step()
        synchronize(self.device)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        self.model_seconds.append(time.perf_counter() - now)
        self.block_start = time.perf_counter()

    def ratios(self) -> list[float]:
        """(b)/(a) of each pipeline block against the model-only block right before it."""
        return [model / pipeline for model, pipeline in zip(self.model_seconds, self.pipeline_seconds)]


def fit_one_epoch(config: DictConfig, competition, images: pd.DataFrame, reader: ImageReader,
                  callbacks: tuple[Callback, ...] = ()) -> tuple[Any, Any]:
    """One epoch of the real pipeline (a resolved config) over `images` in which every layer trains (as
    in (a)), without validation; returns the data module and the trained module."""
    # at augment.image_size, the size of (a)'s synthetic batches
    stage = {**OmegaConf.to_container(config.finetune.stages[-1]), "train": "all", "epochs": 1, "image_size": None}
    data = build_datamodule(config, images, images.head(config.data.batch_size), reader, stages=[stage])
    module = build_module(config, competition, stages=[stage])
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            max_epochs=1, limit_val_batches=0, accelerator=config.trainer.accelerator, devices=1,
            precision=config.trainer.precision, deterministic=config.trainer.deterministic,
            callbacks=[StagedFinetuning(), LearningRateMonitor("step"), *callbacks],
            logger=CSVLogger(logs, name="bench", version=""), log_every_n_steps=10, enable_checkpointing=False,
            enable_model_summary=False, num_sanity_val_steps=0, enable_progress_bar=False,
        )
        trainer.fit(module, datamodule=data)
    # Lightning's deterministic mode is process-wide; the model-only measurements run without it
    torch.use_deterministic_algorithms(False)
    return data, module


def _paired_rates(config: DictConfig, competition, train: pd.DataFrame, reader: ImageReader, limit: Variant, limit_rate: float,
                  seconds: float) -> tuple[PairedModelOnly, Any, Any]:
    """The pipeline for about `seconds`, in blocks alternating with model-only blocks of variant `limit`."""
    from labelcomp.model import build_model

    device = device_of(config.trainer.accelerator)
    batch = config.data.batch_size
    torch.manual_seed(0)
    network = build_model(config.model, competition.num_classes, load_weights=False)
    model_step = synthetic_step(network, limit, config.augment.image_size, batch, competition.num_classes, device)
    block = max(1, round(BLOCK_SECONDS * limit_rate / batch))
    steps = WARMUP_STEPS + block * max(3, round(seconds * limit_rate / batch / block)) + 1
    repeats = math.ceil(steps * batch / len(train))
    paired = PairedModelOnly(model_step, block, WARMUP_STEPS, device)
    data, module = fit_one_epoch(config, competition, pd.concat([train] * repeats, ignore_index=True).head(steps * batch),
                                 reader, callbacks=(paired,))
    return paired, data, module


def _loading_rate(data, steps: int) -> float:
    """Images/s of the training loader alone (decode or cache, augmentation, collation, normalization)."""
    loader = (batch for _ in itertools.count() for batch in data.train_dataloader())  # epoch after epoch
    for _ in range(WARMUP_STEPS):
        next(loader)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += len(data.on_after_batch_transfer(next(loader), 0)[0])
    return images / (time.perf_counter() - start)


def _reading_rates(reader: ImageReader, paths: list[str]) -> tuple[float, float]:
    """Images/s of one process reading `paths` through an empty disk cache (decoding, reducing, writing
    the entries), then through the filled one, as a loader reads them in a run's first and later epochs."""
    with tempfile.TemporaryDirectory() as folder:
        rates = []
        for _ in range(2 if reader.cache is not None else 1):  # without a cache every pass is the first
            fresh = ImageReader(reader.short_side, DiskCache(folder) if reader.cache is not None else None)
            start = time.perf_counter()
            for path in paths:
                fresh(path)
            rates.append(len(paths) / (time.perf_counter() - start))
    return rates[0], rates[-1]


def _inference_rate(module, frame: pd.DataFrame, config: DictConfig, views: list[str]) -> float:
    start = time.perf_counter()
    predict_views(module.eval(), frame, config, views)
    return len(frame) / (time.perf_counter() - start)


def run_bench(config: DictConfig, seconds: float = 3.0) -> str:
    data = read_data(config)
    competition, train, reader = data.competition, data.train, data.images
    config = resolve_config(OmegaConf.merge(config, {"trainer": {"progress_bar": False}}), competition.num_classes)
    device = device_of(config.trainer.accelerator)
    classes, size, batch = competition.num_classes, config.augment.image_size, config.data.batch_size
    lines = [f"{config.model.name} @ {size} px, batch {batch}, {len(train)} images, on {device_name(device)} "
             f"({cores()} cores); pipeline: precision {config.trainer.precision}, channels_last "
             f"{config.trainer.channels_last}, num_workers {config.data.num_workers}"]

    # (a) is the fastest variant by its median over rounds in turn, whatever the pipeline chose
    limits = measure_variants(config, classes, seconds, rounds=ROUNDS)
    medians = {variant: float(np.median(rates)) for variant, rates in limits.items()}
    fastest = max(medians, key=medians.get)
    lines.append(f"model-only training, synthetic tensors, images/s ({ROUNDS} rounds of {seconds:g} s in turn; median):")
    lines += [f"      {variant.precision:<11} {'channels_last' if variant.channels_last else 'contiguous':<14}"
              f"{_rates(limits[variant]):<20}{medians[variant]:6.0f}" + ("  <- (a)" if variant == fastest else "")
              for variant in limits]

    paired, data, module = _paired_rates(config, competition, train, reader, fastest, medians[fastest],
                                         seconds * ROUNDS * 4)
    images = paired.block * batch
    limit = images / float(np.median(paired.model_seconds))
    pipeline = images / float(np.median(paired.pipeline_seconds))
    ratios = paired.ratios()
    quartiles = np.quantile(ratios, [0.25, 0.5, 0.75])
    lines += [f"(a) and (b) in {len(ratios)} alternating pairs of {paired.block} step{'s' if paired.block > 1 else ''}"
              f" each (medians):",
              f"(a) model-only training ({fastest.precision}{', channels_last' if fastest.channels_last else ''}): "
              f"{limit:.0f} images/s",
              f"(b) pipeline training (all layers, steady state, no validation): {pipeline:.0f} images/s; (b)/(a) by "
              f"pair: min {min(ratios):.2f}, quartiles {' / '.join(f'{q:.2f}' for q in quartiles)}, "
              f"max {max(ratios):.2f}"]
    loading = _loading_rate(data, max(20, round(seconds * limit / batch)))
    lines.append(f"(c) training loader alone: {loading:.0f} images/s")
    cold, warm = _reading_rates(reader, train["path"].head(256).tolist())
    if reader.cache is not None:
        lines.append(f"(e) reading images at {reader.short_side} px, one process: {cold:.0f} images/s with an empty disk "
                     f"cache (decoding, reducing, writing), {warm:.0f} images/s from it; an epoch over a cold cache "
                     f"costs {len(train) * (1 / cold - 1 / warm):.0f} s more for these {len(train)} images (a run's "
                     f"survey fills the cache first, on every core)")
    else:
        size = f"{reader.short_side} px" if reader.short_side else "full size"
        lines.append(f"(e) reading images at {size}, one process, no disk cache: {cold:.0f} images/s")

    sample = train.head(min(len(train), 512))
    for policy in ("none", "hflip", "d4"):
        views = policy_views(policy, config.tta)
        rate = _inference_rate(module, sample, config, views)
        lines.append(f"(d) inference, TTA {policy} ({len(views)} view{'s' if len(views) > 1 else ''}): "
                     f"{rate:.0f} images/s ({rate * len(views):.0f} views/s)")
    lines.append(f"pipeline/model-only = {quartiles[1]:.2f}  loading/model-only = {loading / limit:.2f}")
    return "\n".join(lines)
