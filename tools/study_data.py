"""What the studies share: the 10,000 CIFAR-100 coarse images and the 3,068 clothing photos of
../shared as competitions."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from labelcomp.runs import read_table
from labelcomp.startup import configure
from labelcomp.submit import test_proba_path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "cifar100_coarse"
PHOTOS = SHARED / "data" / "clothing_photos"
WEIGHTS = SHARED / "weights" / "mobilenetv2_035_keras_imagenet_backbone.pth"


def study_folder(name: str, data: Path = DATA) -> Path | None:
    """A fresh working folder for study `name`, or None (with a message) where ../shared is absent."""
    if not data.is_dir() or not WEIGHTS.is_file():
        print(f"{name} skipped: {data} or {WEIGHTS} not found")
        return None
    logging.basicConfig(level=logging.WARNING)
    configure()
    for logger in ("lightning.pytorch", "lightning.fabric"):  # per-fold hardware notices
        logging.getLogger(logger).setLevel(logging.WARNING)
    return Path(tempfile.mkdtemp(prefix=f"{name}-"))


def build_competition(folder: Path, per_class: int, seed: int, holdout_per_class: int = 0) -> pd.DataFrame:
    """A Kaggle-style competition reading the shared images in place: `per_class` training images per
    class (shuffled with `seed`) and a test split of `holdout_per_class` other images per class, whose
    labels only the caller gets (the returned frame). Without a holdout, 20 training images stand in
    for the test split."""
    table = pd.read_csv(DATA / "train.csv").sample(frac=1.0, random_state=seed)
    holdout = table.groupby("label").head(holdout_per_class)
    train = table.drop(holdout.index).groupby("label").head(per_class)
    test_ids = holdout["image"] if holdout_per_class else train["image"].head(20)
    write_competition(folder, "cifar100-coarse-study", train.rename(columns={"image": "image_id"}), test_ids,
                      sorted(table["label"].unique()), DATA)
    return holdout


def build_photo_competition(folder: Path) -> None:
    """The clothing photos as a competition read in place: all 3,068 for training (their held-out
    splits are not in ../shared), 20 of them standing in for the test split."""
    table = pd.read_csv(PHOTOS / "train.csv").rename(columns={"image": "image_id"})
    write_competition(folder, "clothing-photos-study", table, table["image_id"].head(20),
                      sorted(table["label"].unique()), PHOTOS)


def write_competition(folder: Path, name: str, train: pd.DataFrame, test_ids: pd.Series, labels: list[str],
                      images: Path) -> None:
    """A Kaggle-style competition folder over `images` read in place: `train` (image_id, label), the
    test split `test_ids` and a sample submission."""
    folder.mkdir(parents=True, exist_ok=True)
    train.to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"image_id": test_ids}).to_csv(folder / "test.csv", index=False)
    pd.DataFrame({"image_id": test_ids, "label": labels[0]}).to_csv(folder / "sample_submission.csv", index=False)
    spec = {
        "name": name, "metric": "accuracy", "labels": labels,
        "train": {"csv": "train.csv", "id_column": "image_id", "label_column": "label", "images": str(images)},
        "test": {"csv": "test.csv", "id_column": "image_id", "images": str(images)},
        "submission": {"sample": "sample_submission.csv", "id_column": "image_id", "label_column": "label"},
    }
    (folder / "competition.yaml").write_text(yaml.safe_dump(spec))


def held_out_correct(submissions: Path, run_id: str, truth: pd.Series) -> pd.Series:
    """Whether the run's fold ensemble (its submission's probabilities) gets each held-out image right,
    by image id: its mean is the held-out accuracy; two runs' series compare image by image."""
    proba = read_table(test_proba_path(Path(submissions), run_id)).set_index("id")
    return proba.idxmax(axis=1) == truth.loc[proba.index]


def paired_difference(correct: pd.Series, baseline: pd.Series) -> str:
    """The accuracy difference in points, ± its standard error over the images both scored."""
    difference = correct.astype(float) - baseline.astype(float)  # aligned by image id
    return f"{100 * difference.mean():+.2f} ± {100 * difference.sem():.2f}"
