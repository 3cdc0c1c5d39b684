"""Benchmark (not a test): recipes on the 3,068 shared clothing photos (10 classes out of balance).

For each recipe (a config in configs/, or a YAML file) it trains every fold and prints OOF accuracy
without and with TTA (chosen on OOF), OOF macro F1, the wall time and each fold's peak memory. The
photos' own held-out splits are not in ../shared, so the study compares OOF scores only. Skips
cleanly where ../shared is absent. `--competition FOLDER` only writes the competition folder (for
`make photos-bench`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from labelcomp.config import load_config
from labelcomp.train import run
from study_data import PHOTOS, REPO, build_photo_competition, study_folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipes", default="photos", help="configs/<name>.yaml or a YAML file's path, comma-separated")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every recipe")
    parser.add_argument("--competition", metavar="FOLDER", help="only write the photos' competition folder here")
    args = parser.parse_args()
    if args.competition:
        if not PHOTOS.is_dir():
            print(f"skipped: {PHOTOS} not found")
            return 0
        build_photo_competition(Path(args.competition))
        print(f"competition written: {args.competition}")
        return 0
    work = study_folder("photos-study", PHOTOS)
    if work is None:
        return 0
    build_photo_competition(work / "competition")
    rows = []
    for recipe in args.recipes.split(","):
        source = Path(recipe).resolve() if recipe.endswith((".yaml", ".yml")) else REPO / "configs" / f"{recipe}.yaml"
        name = source.stem
        config = load_config(source, [f"competition={work / 'competition'}", f"paths.runs={work / 'runs'}",
                                      f"paths.submissions={work / 'submissions'}", f"experiment=study-{name}",
                                      "trainer.progress_bar=false", *args.set])
        started = time.perf_counter()
        _, scores = run(config)
        memory = [fold["peak_memory_gb"] for fold in scores["folds"]]
        rows.append({
            "recipe": name, "px": config.augment.image_size,
            "epochs": "+".join(str(stage.epochs) for stage in config.finetune.stages) or config.finetune.epochs,
            "class weights": str(config.loss.class_weights),
            "OOF": f"{scores['oof_score']:.4f}", "OOF + TTA": f"{scores['oof_tta_score']:.4f} ({scores['tta']['policy']})",
            "macro F1": f"{scores['oof_macro_f1']['plain']:.4f} / {scores['oof_macro_f1']['tta']:.4f}",
            "min": f"{(time.perf_counter() - started) / 60:.1f}",
            "peak GB by fold": " ".join(f"{value:.2f}" for value in memory),
        })
        print(pd.DataFrame(rows).to_string(index=False), file=sys.stderr, flush=True)
    print(f"{len(pd.read_csv(work / 'competition' / 'train.csv'))} photos, {config.cv.folds} folds")
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
