"""Benchmark (not a test): labelcomp's recipes on the 10,000 shared CIFAR-100 coarse images.

The images become a competition: a held-out part (100 per class by default) is its test split, with
labels only this script knows; the rest is the training split. For each recipe (a config in
configs/) it trains every fold, predicts the held-out images with the fold ensemble and TTA, and
prints the OOF accuracy without and with TTA, the fold ensemble's held-out accuracy and the wall
times. Skips cleanly where ../shared is absent.

Several training sizes (`--per-class 280,320,360,400`: nested subsets, the same held-out images) make
a data-size curve: each row's held-out difference from the same recipe and seed at the largest size
(paired, image by image) and, per recipe, the held-out points that 10% more training images give by a
least-squares fit on the logarithm of the size, with the slope's standard error. That is what perfectly
labelled extra images, such as pseudo-labels at best, can be expected to add. Several seeds
(`--seeds 42,1`: other folds and training randomness, the same images) give a fit per seed and one for
all, each seed with its own intercept.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from labelcomp.config import load_config
from labelcomp.probe import run_probe
from labelcomp.submit import submit
from labelcomp.train import run
from study_data import REPO, build_competition, held_out_correct, paired_difference, study_folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="probe,quick,quality", help="configs/<name>.yaml, a YAML file's path, or probe")
    parser.add_argument("--per-class", default="400", help="training images per class; several (280,400) for a curve")
    parser.add_argument("--holdout-per-class", type=int, default=100, help="held-out images per class")
    parser.add_argument("--seeds", default="", help="seeds to train each recipe with (42,1); default: the recipe's own")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every recipe")
    args = parser.parse_args()
    sizes = sorted((int(size) for size in args.per_class.split(",")), reverse=True)  # the largest is the baseline
    work = study_folder("quality-study")
    if work is None:
        return 0
    seed_overrides = [[f"seed={seed}"] for seed in args.seeds.split(",")] if args.seeds else [[]]
    rows, correct_at = [], {}
    for per_class in sizes:
        competition = work / f"competition-{per_class}"
        truth = build_competition(competition, per_class, seed=0,
                                  holdout_per_class=args.holdout_per_class).set_index("image")["label"]
        for seed_override in seed_overrides:
            for recipe in args.recipes.split(","):
                row, correct = train_recipe(recipe, competition, work, [*args.set, *seed_override], truth)
                row = {"train images": per_class * 20, **row}
                if correct is not None:
                    correct_at[row["recipe"], row["seed"], per_class] = correct
                    if len(sizes) > 1:  # the largest size is the baseline: its own row has nothing to compare
                        baseline = correct_at[row["recipe"], row["seed"], sizes[0]]
                        row["vs largest"] = "–" if per_class == sizes[0] else paired_difference(correct, baseline)
                rows.append(row)
                print(pd.DataFrame(rows).to_string(index=False), file=sys.stderr, flush=True)
    print(f"{', '.join(str(size * 20) for size in sizes)} training images, {args.holdout_per_class * 20} held out")
    print(pd.DataFrame(rows).to_string(index=False))
    if len(sizes) > 1:
        curve = pd.DataFrame([{"recipe": recipe, "seed": seed, "size": size, "accuracy": correct.mean()}
                              for (recipe, seed, size), correct in correct_at.items()])
        for recipe, points in curve.groupby("recipe", sort=False):
            fits = [(f"seed {seed}", part) for seed, part in points.groupby("seed", sort=False)]
            if len(fits) > 1:
                fits.append(("all seeds, each its own intercept", points))
            for name, part in fits:
                gain, error = gain_per_tenth_more(part["size"], part["accuracy"], part["seed"])
                print(f"{recipe}, {name}: {gain:+.2f} ± {error:.2f} held-out points per 10% more training images "
                      "(least-squares fit on log size, ± the slope's standard error)")
    return 0


def train_recipe(recipe: str, competition: Path, work: Path, common: list[str],
                 truth: pd.Series) -> tuple[dict, pd.Series | None]:
    """Train one recipe on the competition and predict its held-out images: its row of the table and
    which held-out images it gets right (None without held-out images)."""
    if recipe.endswith((".yaml", ".yml")):
        source, recipe = Path(recipe).resolve(), Path(recipe).stem
    else:
        source = REPO / "configs" / f"{'default' if recipe == 'probe' else recipe}.yaml"
    overrides = [f"competition={competition}", f"paths.runs={work / 'runs'}",
                 f"paths.submissions={work / 'submissions'}", f"experiment=study-{recipe}",
                 # the images are small: decoded once, kept in memory (the recipes' figures were measured so)
                 "data.cache_images=true", "trainer.progress_bar=false", *common]
    if recipe == "probe":
        overrides.append("augment.image_size=128")
    config = load_config(source, overrides)
    started = time.perf_counter()
    run_dir, scores = run_probe(config) if recipe == "probe" else run(config)
    trained = time.perf_counter()
    held_out, correct = "-", None  # without held-out images (--holdout-per-class 0) the study compares OOF only
    if len(truth):
        if recipe != "probe":
            submit(config, run_dir.run_id)
        correct = held_out_correct(config.paths.submissions, run_dir.run_id, truth)
        held_out = f"{correct.mean():.4f}"
    return {
        "recipe": recipe, "seed": config.seed, "px": config.augment.image_size, "OOF": f"{scores['oof_score']:.4f}",
        "OOF + TTA": f"{scores['oof_tta_score']:.4f} ({scores['tta']['policy']})",
        "fold ensemble, held out": held_out,
        "train min": f"{(trained - started) / 60:.1f}", "+ test min": f"{(time.perf_counter() - trained) / 60:.1f}",
    }, correct


def gain_per_tenth_more(sizes, accuracy, groups) -> tuple[float, float]:
    """Accuracy points that 10% more training images add and their standard error, by least squares on
    the logarithm of the training size (over a few sizes, a learning curve is close to straight on that
    scale): one slope for all points, one intercept per group (a seed shifts the whole curve). The error
    is nan where the points leave no residual degrees of freedom."""
    intercepts = pd.get_dummies(np.asarray(groups), dtype=float).to_numpy()
    design = np.column_stack([np.log(np.asarray(sizes, dtype=float)), intercepts])
    accuracy = np.asarray(accuracy, dtype=float)
    coefficients, *_ = np.linalg.lstsq(design, accuracy, rcond=None)
    residual_dof = len(accuracy) - design.shape[1]
    if residual_dof > 0:
        variance = np.sum((accuracy - design @ coefficients) ** 2) / residual_dof
        error = np.sqrt(variance * np.linalg.inv(design.T @ design)[0, 0])
    else:
        error = np.nan
    return 100 * coefficients[0] * np.log(1.1), 100 * error * np.log(1.1)


if __name__ == "__main__":
    sys.exit(main())
