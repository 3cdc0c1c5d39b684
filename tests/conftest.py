"""Shared fixtures: a tiny real competition cut from the embedded demo, and a fast config over it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from labelcomp.config import load_config
from labelcomp.startup import configure

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    configure()  # the process settings the CLI makes at start
DEMO = REPO / "competition" / "demo"


def make_competition(root: Path, classes: int = 4, train_per_class: int = 10, test_images: int = 8) -> Path:
    """A Kaggle-style competition folder with real demo images: the first `classes` demo classes."""
    demo_train = pd.read_csv(DEMO / "train.csv")
    labels = sorted(demo_train["label"].unique())[:classes]
    picked = demo_train[demo_train["label"].isin(labels)].groupby("label").head(train_per_class)
    test_ids = pd.read_csv(DEMO / "test.csv")["image_id"].head(test_images)
    (root / "train_images").mkdir(parents=True)
    (root / "test_images").mkdir()
    for image_id in picked["image_id"]:
        shutil.copy(DEMO / "train_images" / image_id, root / "train_images" / image_id)
    for image_id in test_ids:
        shutil.copy(DEMO / "test_images" / image_id, root / "test_images" / image_id)
    picked.to_csv(root / "train.csv", index=False)
    pd.DataFrame({"image_id": test_ids}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"image_id": test_ids, "label": labels[0]}).to_csv(root / "sample_submission.csv", index=False)
    spec = {
        "name": "tiny", "metric": "accuracy", "labels": labels,
        "train": {"csv": "train.csv", "id_column": "image_id", "label_column": "label", "images": "train_images"},
        "test": {"csv": "test.csv", "id_column": "image_id", "images": "test_images"},
        "submission": {"sample": "sample_submission.csv", "id_column": "image_id", "label_column": "label"},
    }
    (root / "competition.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.fixture
def tiny_competition(tmp_path: Path) -> Path:
    return make_competition(tmp_path / "tiny")


def tiny_overrides(tmp_path: Path, competition: Path) -> list[str]:
    """The smoke experiment shrunk to the tiny competition, writing only under tmp_path."""
    return [
        f"competition={competition}",
        f"model.pretrained={REPO / 'weights' / 'mobilenetv2_035_keras_imagenet_backbone.pth'}",
        f"paths.runs={tmp_path / 'runs'}",
        f"paths.submissions={tmp_path / 'submissions'}",
        "augment.image_size=32",
        "data.batch_size=8",
        "trainer.progress_bar=false",
        # fixed rather than measured (speed.py has its own tests): each test run would measure anew
        "trainer.precision=32-true",
        "trainer.channels_last=false",
        "data.num_workers=0",
    ]


def tiny_config(tmp_path: Path, competition: Path):
    return load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(tmp_path, competition))
