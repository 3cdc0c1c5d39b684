"""Builds competition/demo/ from ../shared/data/cifar100_coarse (run once; the result is committed).

The demo is laid out like a competition download: train.csv, test.csv, sample_submission.csv
and image folders, with the test labels kept out of the repository.
"""

import argparse
import shutil
from pathlib import Path

import pandas as pd

TRAIN_PER_CLASS = 100
TEST_PER_CLASS = 20


def build(source: Path, target: Path, seed: int) -> None:
    table = pd.read_csv(source / "train.csv")
    shuffled = table.sample(frac=1.0, random_state=seed)
    per_class = shuffled.groupby("label", sort=True).head(TRAIN_PER_CLASS + TEST_PER_CLASS)
    rank = per_class.groupby("label").cumcount()
    splits = {"train": per_class[rank < TRAIN_PER_CLASS], "test": per_class[rank >= TRAIN_PER_CLASS]}
    for split, rows in splits.items():
        rows = rows.sort_values("image")
        folder = target / f"{split}_images"
        folder.mkdir(parents=True, exist_ok=True)
        for image in rows["image"]:
            shutil.copyfile(source / image, folder / Path(image).name)
        ids = rows["image"].map(lambda path: Path(path).name)
        if split == "train":
            pd.DataFrame({"image_id": ids, "label": rows["label"]}).to_csv(target / "train.csv", index=False)
        else:
            pd.DataFrame({"image_id": ids}).to_csv(target / "test.csv", index=False)
            placeholder = sorted(table["label"].unique())[0]
            pd.DataFrame({"image_id": ids, "label": placeholder}).to_csv(target / "sample_submission.csv", index=False)
    print(sorted(table["label"].unique()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=Path("../shared/data/cifar100_coarse"))
    parser.add_argument("--target", type=Path, default=Path("competition/demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.source, args.target, args.seed)
