"""Benchmark (not a test): staged fine-tuning recipes against each other and the frozen-feature probe.

On real CIFAR-100 coarse images from ../shared/data/cifar100_coarse with the real pretrained
MobileNetV2-0.35 of ../shared/weights (through the identical copy in weights/, which
carries the card with its timm arguments), every recipe trains the same folds for the same total
epochs; prints CV scores and wall times. Skips cleanly where ../shared is absent.
"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd

from labelcomp.config import load_config
from labelcomp.probe import run_probe
from labelcomp.train import run
from study_data import REPO, build_competition, study_folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=250, help="images per class (500 = all 10,000)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="total epochs of every recipe")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    work = study_folder("finetune-study")
    if work is None:
        return 0
    competition = work / "competition"
    build_competition(competition, args.per_class, seed=0)
    common = [
        f"competition={competition}", f"paths.runs={work / 'runs'}", f"paths.submissions={work / 'submissions'}",
        f"model.pretrained={REPO / 'weights/mobilenetv2_035_keras_imagenet_backbone.pth'}",
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
