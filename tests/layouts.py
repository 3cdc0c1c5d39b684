"""Competition downloads in the layouts players meet, built from real demo images."""

from __future__ import annotations

from pathlib import Path

import cv2
import pandas as pd

from conftest import DEMO

CLASSES = 3
TRAIN_PER_CLASS = 8
TEST_IMAGES = 6


def _demo_images():
    train = pd.read_csv(DEMO / "train.csv")
    labels = sorted(train["label"].unique())[:CLASSES]
    picked = train[train["label"].isin(labels)].groupby("label").head(TRAIN_PER_CLASS).reset_index(drop=True)
    test = pd.read_csv(DEMO / "test.csv")["image_id"].head(TEST_IMAGES)
    return labels, picked, test


def _copy(source: Path, target: Path) -> None:
    """Re-encode by the target's extension (JPEG, PNG, BMP, WebP), whatever its case."""
    target.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(target.with_suffix(target.suffix.lower())), cv2.imread(str(source)))
    if target.suffix != target.suffix.lower():
        target.with_suffix(target.suffix.lower()).rename(target)


def make_kaggle(root: Path) -> Path:
    """train.csv (id,category) with ids without extension; JPEGs with upper-case extensions in nested
    folders; sample_submission.csv with a header and integer class ids."""
    labels, picked, test = _demo_images()
    ids = [f"tr{position:03d}" for position in range(len(picked))]
    for position, (image_id, source) in enumerate(zip(ids, picked["image_id"])):
        _copy(DEMO / "train_images" / source, root / "train" / f"part{position % 2}" / f"{image_id}.JPG")
    pd.DataFrame({"id": ids, "category": picked["label"]}).to_csv(root / "train.csv", index=False)
    test_ids = [f"te{position:03d}" for position in range(len(test))]
    for image_id, source in zip(test_ids, test):
        _copy(DEMO / "test_images" / source, root / "test" / f"{image_id}.Png")
    pd.DataFrame({"id": test_ids, "category": 0}).to_csv(root / "sample_submission.csv", index=False)
    return root


def make_signate(root: Path) -> Path:
    """train_master.tsv (file_name, label_id), label_master.tsv, train/ and test/ image folders,
    sample_submit.tsv without a header and with CRLF line endings."""
    labels, picked, test = _demo_images()
    names = [f"{position:04d}.jpg" for position in range(len(picked))]
    for name, source in zip(names, picked["image_id"]):
        _copy(DEMO / "train_images" / source, root / "train" / name)
    label_ids = picked["label"].map(labels.index)
    pd.DataFrame({"file_name": names, "label_id": label_ids}).to_csv(root / "train_master.tsv", sep="\t", index=False)
    pd.DataFrame({"label_id": range(len(labels)), "label_name": labels}).to_csv(
        root / "label_master.tsv", sep="\t", index=False)
    test_names = [f"test_{position:03d}.bmp" for position in range(len(test))]
    for name, source in zip(test_names, test):
        _copy(DEMO / "test_images" / source, root / "test" / name)
    rows = "".join(f"{name}\t0\r\n" for name in test_names)
    (root / "sample_submit.tsv").write_bytes(rows.encode())
    return root


def make_folders(root: Path) -> Path:
    """ImageFolder layout: train/<class>/*.webp (one class nested deeper), test/ with no sample submission."""
    labels, picked, test = _demo_images()
    for position, (label, source) in enumerate(zip(picked["label"], picked["image_id"])):
        nested = "batch2/" if label == labels[0] and position % 2 else ""
        _copy(DEMO / "train_images" / source, root / "train" / label / f"{nested}{source[:-4]}.webp")
    for source in test:
        _copy(DEMO / "test_images" / source, root / "test" / source)
    return root
