"""The fastest way to train a model on this hardware, measured rather than guessed.

`trainer.precision: auto` and `trainer.channels_last: auto` time a few training steps of the config's
backbone on synthetic tensors for every candidate (fp32 or bf16/fp16 autocast, contiguous or
channels_last) and keep the fastest; the choice is cached per machine, model, image and batch size in
`<paths.runs>/.speed.json`, so runs of one config make the same choice. `data.num_workers: auto`
follows the cores.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from filelock import FileLock
from omegaconf import DictConfig

from labelcomp.runs import write_text_atomic

_logger = logging.getLogger(__name__)


class Variant(NamedTuple):
    precision: str  # Lightning's precision name
    channels_last: bool


def device_of(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


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


def _cache_key(config: DictConfig, device: torch.device) -> str:
    return (f"{config.model.name} {config.augment.image_size}px batch {config.data.batch_size} on "
            f"{device_name(device)}, torch {torch.__version__}")


def resolve_speed(config: DictConfig, num_classes: int, seconds: float = 0.6) -> None:
    """Replace `auto` in trainer.precision / trainer.channels_last by the fastest measured variant."""
    precision_auto, layout_auto = config.trainer.precision == "auto", config.trainer.channels_last == "auto"
    if not (precision_auto or layout_auto):
        return
    device = device_of(config.trainer.accelerator)
    cache = Path(config.paths.runs) / ".speed.json"
    key = _cache_key(config, device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if key not in known:
            _logger.info("measuring training speed of %s variants (once for this machine and config)", key)
            rates = measure_variants(config, num_classes, seconds)
            known[key] = [{"precision": variant.precision, "channels_last": variant.channels_last,
                           "images_per_s": float(np.median(measured))} for variant, measured in rates.items()]
            write_text_atomic(cache, json.dumps(known, indent=2) + "\n")
    measured = [row for row in known[key]
                if (precision_auto or row["precision"] == config.trainer.precision)
                and (layout_auto or row["channels_last"] == bool(config.trainer.channels_last))]
    best = max(measured, key=lambda row: row["images_per_s"])
    config.trainer.precision = best["precision"]
    config.trainer.channels_last = best["channels_last"]
    _logger.info("precision %s, channels_last %s: fastest measured (%s)", best["precision"], best["channels_last"],
                 ", ".join(f"{row['precision']}{' cl' if row['channels_last'] else ''} {row['images_per_s']:.0f}/s"
                           for row in known[key]))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(config: DictConfig) -> int:
    """`data.num_workers`, with `auto` chosen for the cores: on CPU the model already uses every core and
    loader workers only take time from it (measured on 2 cores: 0 workers gave the best end-to-end
    rate, 1 worker 0.67 of it), so workers start at 8 cores; with a GPU the cores are free for loading."""
    if config.data.num_workers != "auto":
        return int(config.data.num_workers)
    available = cores()
    if device_of(config.trainer.accelerator).type == "cuda":
        return min(8, max(available - 1, 0))
    return 0 if available < 8 else min(4, available // 4)


def resolve_workers(config: DictConfig) -> None:
    config.data.num_workers = loader_workers(config)


def reset_peak_memory() -> None:
    """Start a new peak of this process's resident memory (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gb() -> float | None:
    """This process's peak resident memory since the last reset, in GB (None where /proc is absent)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 3)
    return None
