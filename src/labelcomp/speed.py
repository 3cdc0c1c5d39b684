"""Measuring code: the model alone trained on synthetic tensors, for every precision and memory format.

Used by `labelcomp bench`, and by `trainer.precision: auto` / `trainer.channels_last: auto` when the
speed cache has no entry for the machine and config (hardware.fastest_variant).
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig

from labelcomp.hardware import device_of


class Variant(NamedTuple):
    precision: str  # Lightning's precision name
    channels_last: bool


def candidates(device: torch.device) -> list[Variant]:
    if device.type == "cuda":
        half = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        precisions = ["32-true", half]
    else:
        precisions = ["32-true", "bf16-mixed"]
    return [Variant(precision, channels_last) for precision in precisions for channels_last in (False, True)]


def _autocast(precision: str, device: torch.device):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_step(
    network: torch.nn.Module, variant: Variant, image_size: int, batch_size: int, num_classes: int,
    device: torch.device,
) -> Callable[[], None]:
    """One training step of `network` (all parameters trained: forward, backward, AdamW step) on a fixed
    synthetic batch, in `variant`'s precision and memory format: what the model alone costs."""
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    network = network.to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, num_classes, (batch_size,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=variant.precision == "16-mixed")

    def step() -> None:
        with _autocast(variant.precision, device):
            loss = torch.nn.functional.cross_entropy(network(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def training_rate(
    network: torch.nn.Module, variant: Variant, image_size: int, batch_size: int, num_classes: int,
    device: torch.device, seconds: float, warmup_steps: int = 3,
) -> float:
    """Training images per second of `network` on synthetic tensors (`synthetic_step`): the model-only
    limit of the hardware for this variant."""
    step = synthetic_step(network, variant, image_size, batch_size, num_classes, device)
    for _ in range(warmup_steps):
        step()
    synchronize(device)
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def measure_variants(config: DictConfig, num_classes: int, seconds: float, rounds: int = 3) -> dict[Variant, list[float]]:
    """Training images/s of every variant, `rounds` measurements of `seconds` each, taken in turn: the
    machine's speed drifts between measurements, and in turn the drift reaches every variant."""
    from labelcomp.model import build_model

    device = device_of(config.trainer.accelerator)
    networks = {}
    for variant in candidates(device):
        torch.manual_seed(0)
        networks[variant] = build_model(config.model, num_classes, load_weights=False)
    rates: dict[Variant, list[float]] = {variant: [] for variant in networks}
    for _ in range(rounds):
        for variant, network in networks.items():
            rates[variant].append(training_rate(network, variant, config.augment.image_size, config.data.batch_size,
                                                num_classes, device, seconds))
    return rates


def median_rates(rates: dict[Variant, list[float]]) -> list[dict]:
    """Each variant's median rate, as the speed cache keeps it."""
    return [{"precision": variant.precision, "channels_last": variant.channels_last,
             "images_per_s": float(np.median(measured))} for variant, measured in rates.items()]
