"""Benchmark (not a test): seconds per training epoch as the work grows, on real images.

One epoch of the real pipeline (all layers train, no validation) at 1k, 5k and 10k CIFAR-100 coarse
images from ../shared and at 32, 64 and 128 px, with the demo config's backbone and its measured
precision and memory format. Skips cleanly where ../shared is absent.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from finetune_study import DATA, REPO, build_competition
from labelcomp.bench import fit_one_epoch
from labelcomp.config import load_config
from labelcomp.train import prepare

SIZES = (32, 64, 128)
IMAGES = (1000, 5000, 10000)


def main() -> int:
    if not DATA.is_dir():
        print(f"scaling-study skipped: {DATA} not found")
        return 0
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="scaling-study-"))
    competition = build_competition(work / "competition", per_class=max(IMAGES) // 20, seed=0)
    rows = []
    for size in SIZES:
        config = load_config(REPO / "configs" / "default.yaml", [
            f"competition={competition}", f"paths.runs={work / 'runs'}", f"augment.image_size={size}",
            "trainer.progress_bar=false",
        ])
        prepared = prepare(config)
        row = {"px": size, "precision": f"{config.trainer.precision}{' cl' if config.trainer.channels_last else ''}"}
        for count in IMAGES:
            images = prepared.train.groupby("label").head(count // 20)
            start = time.perf_counter()
            fit_one_epoch(config, prepared.competition, images, prepared.cache)
            seconds = time.perf_counter() - start
            row[f"{count // 1000}k images s/epoch"] = f"{seconds:.1f}"
            row[f"{count // 1000}k images/s"] = f"{len(images) / seconds:.0f}"
        rows.append(row)
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
