"""Benchmark (not a test): pseudo-labelling rounds on the shared CIFAR-100 coarse images.

The images become a competition whose test split is a held-out part (100 per class by default), with
labels only this script knows. A recipe (configs/<name>.yaml) trains every fold (the parent); each
variant then trains a pseudo-label round from it (`pseudo.from_run`, the variant's overrides on top)
on the same folds. For every run it prints OOF accuracy without and with TTA, the fold ensemble's
accuracy on the held-out images, its difference from the parent's with that difference's standard
error (paired, image by image: both ensembles score the same images, so only the images on which they
disagree make it uncertain), its own minutes (training + predicting the held-out images) and the total
with the parent's. Skips cleanly where ../shared is absent.

    python tools/pseudo_study.py --recipe quick \\
        --variant "continued: pseudo.init=parent finetune.stages=[{epochs: 2, train: all, lr: 0.001}]"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from labelcomp.config import load_config
from labelcomp.runs import find_run
from labelcomp.submit import submit
from labelcomp.train import run
from study_data import REPO, build_competition, held_out_correct, paired_difference, study_folder


# two more epochs from each parent fold's weights at the recipe's test size, with and without the
# pseudo-labels (threshold 1.0 adds none): what the pseudo-labels themselves give. On day 8 they took 3.5
# minutes after quick.yaml's 8.1, within the budget of 1.5 x the recipe's time
_CONTINUED = "pseudo.init=parent finetune.stages=[{epochs: 2, train: all, lr: 0.001, backbone_lr_mult: 0.5, warmup_epochs: 0.3}]"
DEFAULT_VARIANTS = [f"hard2: {_CONTINUED}", f"control2: pseudo.threshold=1.0 {_CONTINUED}"]


def train_and_score(config, truth: pd.Series) -> tuple[str, dict, pd.Series, float]:
    """Train, predict the held-out images; the run id, scores, which held-out images its fold ensemble
    gets right, and minutes."""
    started = time.perf_counter()
    run_dir, scores = run(config)
    submit(config, run_dir.run_id)
    correct = held_out_correct(config.paths.submissions, run_dir.run_id, truth)
    return run_dir.run_id, scores, correct, (time.perf_counter() - started) / 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quick", help="configs/<name>.yaml of the parent (and the variants)")
    parser.add_argument("--variant", action="append", metavar="NAME: key=value ...",
                        help="a pseudo-label round from the parent with these overrides (repeatable); default: "
                             "the round of the README's table and its control without pseudo-labels")
    parser.add_argument("--per-class", type=int, default=400, help="training images per class")
    parser.add_argument("--holdout-per-class", type=int, default=100, help="held-out (test) images per class")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every run")
    parser.add_argument("--work", help="a folder of an earlier study of the same recipe: its parent run is reused")
    args = parser.parse_args()
    args.variant = args.variant or DEFAULT_VARIANTS
    work = study_folder("pseudo-study") if args.work is None else Path(args.work)
    if work is None:
        return 0
    if args.work is None or not (work / "truth.csv").is_file():
        build_competition(work / "competition", args.per_class, seed=0,
                          holdout_per_class=args.holdout_per_class).to_csv(work / "truth.csv", index=False)
    truth = pd.read_csv(work / "truth.csv", dtype=str).set_index("image")["label"]
    source = REPO / "configs" / f"{args.recipe}.yaml"
    common = [f"competition={work / 'competition'}", f"paths.runs={work / 'runs'}",
              f"paths.submissions={work / 'submissions'}", "data.cache_images=true", "trainer.progress_bar=false",
              *args.set]
    config = load_config(source, [*common, f"experiment=study-{args.recipe}"])
    parent_file = work / "parent.json"
    if parent_file.is_file():
        parent = json.loads(parent_file.read_text())
        find_run(config.paths.runs, config.experiment, parent["run"])  # it is still there
        parent_correct = held_out_correct(config.paths.submissions, parent["run"], truth)
    else:
        run_id, scores, parent_correct, minutes = train_and_score(config, truth)
        parent = {"run": run_id, "oof": scores["oof_score"], "oof_tta": scores["oof_tta_score"],
                  "policy": scores["tta"]["policy"], "minutes": minutes}
        parent_file.write_text(json.dumps(parent))
    rows = [{"run": args.recipe, "pseudo images / fold": "-", "OOF": f"{parent['oof']:.4f}",
             "OOF + TTA": f"{parent['oof_tta']:.4f} ({parent['policy']})", "held out": f"{parent_correct.mean():.4f}",
             "vs recipe": "-", "min": f"{parent['minutes']:.1f}", "total min": f"{parent['minutes']:.1f}", "x recipe": "1.00"}]
    print(pd.DataFrame(rows).to_string(index=False), file=sys.stderr, flush=True)
    for variant in args.variant:
        name, _, overrides = variant.partition(":")
        child = load_config(source, [*common, f"experiment=study-{args.recipe}-{name.strip()}",
                                     f"pseudo.from_run={parent['run']}", *_split(overrides)])
        _, scores, correct, minutes = train_and_score(child, truth)
        record = scores["pseudo"]
        rows.append({"run": f"+ {name.strip()}", "pseudo images / fold": f"{record['images']} (>= {record['threshold']:.3f})",
                     "OOF": f"{scores['oof_score']:.4f}",
                     "OOF + TTA": f"{scores['oof_tta_score']:.4f} ({scores['tta']['policy']})",
                     "held out": f"{correct.mean():.4f}", "vs recipe": paired_difference(correct, parent_correct),
                     "min": f"{minutes:.1f}",
                     "total min": f"{parent['minutes'] + minutes:.1f}",
                     "x recipe": f"{(parent['minutes'] + minutes) / parent['minutes']:.2f}"})
        print(pd.DataFrame(rows).to_string(index=False), file=sys.stderr, flush=True)
    print(f"{len(truth)} held-out images; work folder {work}")
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def _split(overrides: str) -> list[str]:
    """`a=1 b=[{x: 1, y: 2}]` into overrides, keeping the spaces inside brackets."""
    items, depth, current = [], 0, ""
    for character in overrides.strip():
        depth += character in "[{"
        depth -= character in "]}"
        if character == " " and depth == 0:
            if current:
                items.append(current)
            current = ""
        else:
            current += character
    return items + ([current] if current else [])


if __name__ == "__main__":
    sys.exit(main())
