"""Process-wide settings labelcomp runs with, made in one place: the CLI calls `configure()` once a
command's config has loaded (and the tests' conftest at the start of the session). Importing any
labelcomp module changes nothing global.
"""

from __future__ import annotations

import logging
import os
import warnings

# deliberate conditions of labelcomp's training, nothing for a user to act on
_QUIET_WARNINGS = (
    # few or no loader workers is a measured choice on small machines (hardware.loader_workers)
    ".*does not have many workers.*",
    # frozen BatchNorm layers are put in eval mode on purpose (finetune.py)
    ".*module\\(s\\) in eval mode at the start of training.*",
    # a fold folder holds its checkpoint beside its logs folder
    ".*Checkpoint directory .* exists and is not empty.*",
    # raised inside Lightning against newer torch, once per fit or predict
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
)

# Lightning's hardware and seed notices and timm's weight-loading notices repeat for every fold; the
# ONNX exporter's optimizer narrates each of its passes (hundreds of lines per fold model)
_QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed", "timm",
                  "onnxscript", "onnx_ir", "torch.onnx")


def configure() -> None:
    """Warnings, log levels, plotting backend and the torch and OpenCV settings of a labelcomp process."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", pattern)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # plots are only written to files: no display on servers and CI
    os.environ.setdefault("MPLBACKEND", "Agg")

    import cv2
    import torch

    # a process decodes with one thread: the cores are busy with the model
    cv2.setNumThreads(1)
    # an undecodable file becomes one clear LabelcompError; OpenCV's own stderr line would only add noise
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    # with deterministic algorithms on (trainer.deterministic), torch also fills every new tensor with
    # NaN, a debugging aid against reading uninitialized memory that reproducibility does not need; it
    # cost 14% of the training steps' time (mobilenetv2_035 at 96 px on 2 CPU cores: 385 vs 434 images/s)
    torch.utils.deterministic.fill_uninitialized_memory = False
