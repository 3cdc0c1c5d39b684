"""Benchmark (not a test): staged fine-tuning recipes against each other and the frozen-feature probe.

On real CIFAR-100 coarse images from ../shared/data/cifar100_coarse with the real pretrained
MobileNetV2-0.35 of ../shared/weights (through the identical copy in competition/demo/weights, which
carries the card with its timm arguments), every recipe trains the same folds for the same total
epochs; prints CV scores and wall times. Skips cleanly where ../shared is absent.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from labelcomp.config import load_config
from labelcomp.probe import run_probe
from labelcomp.train import run

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "cifar100_coarse"
WEIGHTS = SHARED / "weights" / "mobilenetv2_035_keras_imagenet_backbone.pth"


def build_competition(folder: Path, per_class: int, seed: int) -> Path:
    """The first `per_class` images of each class (shuffled with `seed`) as a Kaggle-style competition
    that reads the shared images in place; a few images stand in for the unused test split."""
    table = pd.read_csv(DATA / "train.csv").sample(frac=1.0, random_state=seed)
    picked = table.groupby("label").head(per_class)
    folder.mkdir(parents=True, exist_ok=True)
    picked.rename(columns={"image": "image_id"}).to_csv(folder / "train.csv", index=False)
    test_ids = picked["image"].head(20)
    pd.DataFrame({"image_id": test_ids}).to_csv(folder / "test.csv", index=False)
    labels = sorted(table["label"].unique())
    pd.DataFrame({"image_id": test_ids, "label": labels[0]}).to_csv(folder / "sample_submission.csv", index=False)
    spec = {
        "name": "cifar100-coarse-study", "metric": "accuracy", "labels": labels,
        "train": {"csv": "train.csv", "id_column": "image_id", "label_column": "label", "images": str(DATA)},
        "test": {"csv": "test.csv", "id_column": "image_id", "images": str(DATA)},
        "submission": {"sample": "sample_submission.csv", "id_column": "image_id", "label_column": "label"},
    }
    (folder / "competition.yaml").write_text(yaml.safe_dump(spec))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=250, help="images per class (500 = all 10,000)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="total epochs of every recipe")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    if not DATA.is_dir() or not WEIGHTS.is_file():
        print(f"finetune-study skipped: {DATA} or {WEIGHTS} not found")
        return 0
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric"):  # per-fold hardware notices
        logging.getLogger(name).setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="finetune-study-"))
    competition = build_competition(work / "competition", args.per_class, seed=0)
    common = [
        f"competition={competition}", f"paths.runs={work / 'runs'}", f"paths.submissions={work / 'submissions'}",
        f"model.pretrained={REPO / 'competition/demo/weights/mobilenetv2_035_keras_imagenet_backbone.pth'}",
        f"cv.folds={args.folds}", f"augment.image_size={args.image_size}", f"finetune.epochs={args.epochs}",
        "trainer.progress_bar=false", "trainer.early_stopping_patience=100",
    ]
    all_layers = (f"finetune.stages=[{{epochs: {args.epochs}, train: all, lr: 0.001, backbone_lr_mult: 0.1, "
                  "warmup_epochs: 0.5}]")
    recipes = {
        "probe (LogisticRegression)": None,
        "head (linear probe by SGD)": ["finetune.preset=head"],
        "all layers from the start": [all_layers],
        "freeze_unfreeze": ["finetune.preset=freeze_unfreeze"],
        "gradual": ["finetune.preset=gradual"],
    }
    rows = []
    for name, overrides in recipes.items():
        config = load_config(REPO / "configs" / "default.yaml", [*common, *(overrides or []),
                                                                   f"experiment=study-{len(rows)}"])
        started = time.perf_counter()
        _, scores = run_probe(config) if overrides is None else run(config)
        rows.append({"recipe": name, "CV accuracy": f"{scores['cv_mean']:.4f} ± {scores['cv_std']:.4f}",
                     "OOF": f"{scores['oof_score']:.4f}", "OOF + TTA": f"{scores['oof_tta_score']:.4f}",
                     "wall s": f"{time.perf_counter() - started:.0f}"})
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"{args.per_class * 20} images, {args.folds} folds, {args.image_size} px, {args.epochs} epochs per recipe")
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
