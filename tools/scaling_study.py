"""Benchmark (not a test): seconds per training epoch as the work grows, on real images.

One epoch of the real pipeline (all layers train, no validation) at 1k, 5k and 10k CIFAR-100 coarse
images from ../shared and at 32, 64 and 128 px, with the demo config's backbone and its measured
precision and memory format. Skips cleanly where ../shared is absent.
"""

from __future__ import annotations

import time

import pandas as pd

from labelcomp.bench import fit_one_epoch
from labelcomp.config import load_config
from labelcomp.resolve import resolve_config
from labelcomp.train import read_data
from study_data import REPO, build_competition, study_folder

SIZES = (32, 64, 128)
IMAGES = (1000, 5000, 10000)


def main() -> int:
    work = study_folder("scaling-study")
    if work is None:
        return 0
    competition = work / "competition"
    build_competition(competition, per_class=max(IMAGES) // 20, seed=0)
    rows = []
    for size in SIZES:
        config = load_config(REPO / "configs" / "default.yaml", [
            f"competition={competition}", f"paths.runs={work / 'runs'}", f"augment.image_size={size}",
            "trainer.progress_bar=false",
        ])
        data = read_data(config)
        config = resolve_config(config, data.competition.num_classes)
        row = {"px": size, "precision": f"{config.trainer.precision}{' cl' if config.trainer.channels_last else ''}"}
        for count in IMAGES:
            images = data.train.groupby("label").head(count // 20)
            start = time.perf_counter()
            fit_one_epoch(config, data.competition, images, data.images)
            seconds = time.perf_counter() - start
            row[f"{count // 1000}k images s/epoch"] = f"{seconds:.1f}"
            row[f"{count // 1000}k images/s"] = f"{len(images) / seconds:.0f}"
        rows.append(row)
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
