"""Benchmark (not a test): labelcomp's recipes on the 10,000 shared CIFAR-100 coarse images.

The images become a competition: a held-out part (100 per class by default) is its test split, with
labels only this script knows; the rest is the training split. For each recipe (a config in
configs/) it trains every fold, predicts the held-out images with the fold ensemble and TTA, and
prints the OOF accuracy without and with TTA, the fold ensemble's held-out accuracy and the wall
times. Skips cleanly where ../shared is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from labelcomp.config import load_config
from labelcomp.probe import run_probe
from labelcomp.submit import submit
from labelcomp.train import run
from study_data import REPO, build_competition, held_out_correct, study_folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipes", default="probe,quick,quality", help="configs/<name>.yaml, a YAML file's path, or probe")
    parser.add_argument("--per-class", type=int, default=400, help="training images per class")
    parser.add_argument("--holdout-per-class", type=int, default=100, help="held-out images per class")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every recipe")
    args = parser.parse_args()
    work = study_folder("quality-study")
    if work is None:
        return 0
    holdout = build_competition(work / "competition", args.per_class, seed=0,
                                holdout_per_class=args.holdout_per_class)
    truth = holdout.set_index("image")["label"]
    rows = []
    for recipe in args.recipes.split(","):
        if recipe.endswith((".yaml", ".yml")):
            source, recipe = Path(recipe).resolve(), Path(recipe).stem
        else:
            source = REPO / "configs" / f"{'default' if recipe == 'probe' else recipe}.yaml"
        overrides = [f"competition={work / 'competition'}", f"paths.runs={work / 'runs'}",
                     f"paths.submissions={work / 'submissions'}", f"experiment=study-{recipe}",
                     # the images are small: decoded once, kept in memory (the recipes' figures were measured so)
                     "data.cache_images=true", "trainer.progress_bar=false", *args.set]
        if recipe == "probe":
            overrides.append("augment.image_size=128")
        config = load_config(source, overrides)
        started = time.perf_counter()
        if recipe == "probe":
            run_dir, scores = run_probe(config)
            trained = time.perf_counter()
        else:
            run_dir, scores = run(config)
            trained = time.perf_counter()
        held_out = "-"  # without held-out images (--holdout-per-class 0) the study compares OOF only
        if len(truth):
            if recipe != "probe":
                submit(config, run_dir.run_id)
            held_out = f"{held_out_correct(config.paths.submissions, run_dir.run_id, truth).mean():.4f}"
        rows.append({
            "recipe": recipe, "px": config.augment.image_size, "OOF": f"{scores['oof_score']:.4f}",
            "OOF + TTA": f"{scores['oof_tta_score']:.4f} ({scores['tta']['policy']})",
            "fold ensemble, held out": held_out,
            "train min": f"{(trained - started) / 60:.1f}", "+ test min": f"{(time.perf_counter() - trained) / 60:.1f}",
        })
        print(pd.DataFrame(rows).to_string(index=False), file=sys.stderr, flush=True)
    print(f"{args.per_class * 20} training images, {len(truth)} held out")
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
