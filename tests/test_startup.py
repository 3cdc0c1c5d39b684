"""Importing labelcomp changes nothing global; the CLI's `configure()` makes the process settings."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

IMPORT_EVERYTHING = """
import importlib, os, pkgutil, warnings
import cv2, torch
# the libraries labelcomp uses add filters of their own when imported: in before the comparison
import albumentations, lightning, matplotlib.figure, scipy.optimize, sklearn.linear_model, timm, torchmetrics
from lightning.pytorch.tuner import Tuner
import labelcomp

filters, fill, threads = list(warnings.filters), torch.utils.deterministic.fill_uninitialized_memory, cv2.getNumThreads()
for module in pkgutil.iter_modules(labelcomp.__path__):
    importlib.import_module(f"labelcomp.{module.name}")
assert warnings.filters == filters, [entry for entry in warnings.filters if entry not in filters]
assert torch.utils.deterministic.fill_uninitialized_memory == fill and cv2.getNumThreads() == threads
assert "MPLBACKEND" not in os.environ

from labelcomp.startup import configure

configure()
assert len(warnings.filters) > len(filters) and os.environ["MPLBACKEND"] == "Agg"
# deterministic training without torch's NaN fill of new tensors (14% of the step time)
assert not torch.utils.deterministic.fill_uninitialized_memory and cv2.getNumThreads() == 1
"""


@pytest.mark.slow
def test_importing_every_module_leaves_the_process_as_it_was_and_configure_sets_it():
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_the_training_path_does_not_import_the_measuring_code():
    code = ("import sys, labelcomp.train, labelcomp.submit, labelcomp.blend; "
            "assert not {'labelcomp.speed', 'labelcomp.bench'} & set(sys.modules), 'measuring code imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
