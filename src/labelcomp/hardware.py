"""What the training path asks of the machine: its device, the loader workers for its cores, the
process's peak memory, and the training speed variant chosen for it (from the speed cache).

The speed cache `<paths.runs>/.speed.json` holds, per key, the training images/s of every precision
and memory-format variant that `speed.measure_variants` measured. The key names the model, image
size, batch size, device and library versions, so another machine, GPU or release measures anew;
delete the file to measure again. Only a key missing from the cache imports the measuring code.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path

import torch
from filelock import FileLock
from omegaconf import DictConfig

from labelcomp.runs import write_text_atomic

_logger = logging.getLogger(__name__)


def device_of(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpu_processes(devices) -> int:
    """How many training processes `trainer.devices` starts on this machine (one per GPU)."""
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        return int(devices) if devices.isdigit() else len([item for item in devices.split(",") if item.strip()])
    if not isinstance(devices, (int, str)):  # a list of device indices
        return len(devices)
    return max(1, torch.cuda.device_count())


def loader_workers(config: DictConfig) -> int:
    """`data.num_workers`, with `auto` chosen for the cores. On CPU the model already uses every core and
    loader workers only take time from it (measured on 2 cores: 0 workers gave the best end-to-end
    rate, 1 worker 0.67 of it; at 224 px the loader alone runs 35x the model's rate: see the README),
    so workers start at 8 cores. With GPUs the cores are free for loading, and one loading process
    (about 1,500 augmented 224 px photos/s from the disk cache on this CPU) is what a GPU outruns:
    each GPU process gets its share of the cores, less one for itself (not measured on a GPU)."""
    if config.data.num_workers != "auto":
        return int(config.data.num_workers)
    available = cores()
    if device_of(config.trainer.accelerator).type == "cuda":
        processes = gpu_processes(config.trainer.devices)
        return max(1, available // processes - 1)
    return 0 if available < 8 else min(4, available // 4)


def speed_key(config: DictConfig, device: torch.device) -> str:
    import lightning
    import timm

    return (f"{config.model.name} {config.augment.image_size}px batch {config.data.batch_size} on "
            f"{device_name(device)}, torch {torch.__version__}, timm {timm.__version__}, "
            f"lightning {lightning.__version__}")


def fastest_variant(config: DictConfig, num_classes: int, seconds: float = 0.6) -> tuple[str, bool]:
    """(precision, channels_last) for `trainer.precision` / `trainer.channels_last`: a value the config
    fixes is kept, `auto` becomes the fastest measured variant that agrees with the fixed half."""
    precision_auto, layout_auto = config.trainer.precision == "auto", config.trainer.channels_last == "auto"
    if not (precision_auto or layout_auto):
        return config.trainer.precision, bool(config.trainer.channels_last)
    device = device_of(config.trainer.accelerator)
    cache = Path(config.paths.runs) / ".speed.json"
    key = speed_key(config, device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if key not in known:
            from labelcomp.speed import measure_variants, median_rates

            _logger.info("measuring training speed of %s variants (once for this machine and config)", key)
            known[key] = median_rates(measure_variants(config, num_classes, seconds))
            write_text_atomic(cache, json.dumps(known, indent=2) + "\n")
    measured = [row for row in known[key]
                if (precision_auto or row["precision"] == config.trainer.precision)
                and (layout_auto or row["channels_last"] == bool(config.trainer.channels_last))]
    best = max(measured, key=lambda row: row["images_per_s"])
    _logger.info("precision %s, channels_last %s: fastest measured (%s)", best["precision"], best["channels_last"],
                 ", ".join(f"{row['precision']}{' cl' if row['channels_last'] else ''} {row['images_per_s']:.0f}/s"
                           for row in known[key]))
    return best["precision"], best["channels_last"]


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
