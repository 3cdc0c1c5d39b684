"""`labelcomp report RUN`: report.md in the run folder, with PNGs beside it: the config's differences
from the defaults, the fold table, a confusion matrix, per-class accuracy, the most confident
mistakes and best predictions from OOF, and Grad-CAM maps of some mistakes from the fold model that
never saw them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import ConfusionMatrixDisplay

from labelcomp.augment import build_transforms
from labelcomp.competition import Competition
from labelcomp.config import load_config
from labelcomp.data import normalize, read_image
from labelcomp.history import fold_table
from labelcomp.predict import load_classifier
from labelcomp.runs import RunDir, find_run, read_table, write_figure_atomic, write_text_atomic

GRID = 12
GRAD_CAM = 4


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        return {key: value for name, sub in tree.items() for key, value in _flatten(sub, f"{prefix}{name}.").items()}
    return {prefix[:-1]: tree}


def config_differences(config: DictConfig) -> list[str]:
    defaults = _flatten(OmegaConf.to_container(load_config(None, []), resolve=True))
    current = _flatten(OmegaConf.to_container(config, resolve=True))
    return [f"`{key}`: {defaults.get(key, '—')} → {value}" for key, value in current.items()
            if defaults.get(key) != value]


def _grid(rows: pd.DataFrame, paths: dict[str, str], title: str, path: Path) -> None:
    columns = 6
    lines = max(1, -(-len(rows) // columns))
    figure = Figure(figsize=(2.8 * columns, 2.5 * lines))
    axes = figure.subplots(lines, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (_, row) in zip(axes.flat, rows.iterrows()):
        axis.imshow(read_image(paths[row["id"]]))
        axis.set_title(f"true {row['label']}\npred {row['predicted']} {row['confidence']:.2f}", fontsize=6.5)
    figure.suptitle(title)
    write_figure_atomic(figure, path)


def grad_cam(classifier, image: torch.Tensor, target: int) -> np.ndarray | None:
    """Class-activation map of `target` over the last feature map (CNNs); None where the features
    are not a spatial map (ViT tokens)."""
    net = classifier.predicting_net()
    with torch.no_grad():
        features = net.forward_features(image[None])
    if features.ndim != 4:
        return None
    features.requires_grad_(True)
    net.forward_head(features)[0, target].backward()
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[1:], mode="bilinear", align_corners=False)[0, 0].detach()
    return (cam / cam.max()).numpy() if cam.max() > 0 else cam.numpy()


def write_report(config: DictConfig, run_id: str | None = None) -> Path:
    run: RunDir = find_run(config.paths.runs, config.experiment, run_id)
    run_config = load_config(run.config)
    competition = Competition.load(run_config.competition)
    paths = dict(zip(*competition.read_train()[["id", "path"]].T.values))
    scores = json.loads(run.scores.read_text())
    oof = read_table(run.oof_tta)
    labels = competition.labels
    proba = oof[labels].to_numpy()
    oof["predicted"] = [labels[i] for i in proba.argmax(1)]
    oof["confidence"] = proba.max(1)
    target = oof["label"].map(labels.index).to_numpy()

    figure = Figure(figsize=(0.45 * len(labels) + 4, 0.45 * len(labels) + 3))
    axis = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(target, proba.argmax(1), labels=range(len(labels)), display_labels=labels,
                                            ax=axis, xticks_rotation=90, colorbar=False, include_values=len(labels) <= 25)
    axis.set_title("OOF confusion matrix (with TTA)")
    write_figure_atomic(figure, run.root / "confusion_matrix.png")

    per_class = oof.assign(correct=oof["label"] == oof["predicted"]).groupby("label")["correct"].agg(["mean", "size"])
    per_class = per_class.reindex(labels).rename(columns={"mean": "accuracy", "size": "images"})
    wrong = oof[oof["label"] != oof["predicted"]].sort_values("confidence", ascending=False)
    right = oof[oof["label"] == oof["predicted"]].sort_values("confidence", ascending=False)
    _grid(wrong.head(GRID), paths, "most confident mistakes (OOF)", run.root / "mistakes.png")
    _grid(right.head(GRID), paths, "most confident correct predictions (OOF)", run.root / "best.png")

    cams = []
    transform = build_transforms(run_config.augment, train=False)
    for _, row in wrong.head(GRAD_CAM).iterrows():
        classifier = load_classifier(run.checkpoint(int(row["fold"]))).eval()
        picture = read_image(paths[row["id"]])
        image = normalize(torch.from_numpy(transform(image=picture)["image"])[None], run_config.augment.mean,
                          run_config.augment.std)
        cam = grad_cam(classifier, image[0], labels.index(row["predicted"]))
        if cam is not None:
            cams.append((row, picture, cam))
    if cams:
        figure = Figure(figsize=(2.4 * len(cams), 5))
        axes = figure.subplots(2, len(cams), squeeze=False)
        for column, (row, picture, cam) in enumerate(cams):
            axes[0, column].imshow(picture)
            axes[0, column].set_title(f"true {row['label']}", fontsize=7)
            axes[1, column].imshow(np.asarray(F.interpolate(torch.tensor(picture).permute(2, 0, 1)[None].float(),
                                   size=cam.shape, mode="bilinear")[0].permute(1, 2, 0).byte()))
            axes[1, column].imshow(cam, cmap="jet", alpha=0.45)
            axes[1, column].set_title(f"why {row['predicted']}?", fontsize=7)
            for axis in axes[:, column]:
                axis.axis("off")
        figure.suptitle("Grad-CAM of the predicted class, fold model that never saw the image")
        write_figure_atomic(figure, run.root / "grad_cam.png")

    lines = [
        f"# Run {run.run_id}", "",
        f"Backbone `{run_config.model.name}`, competition `{competition.spec.name}`, metric {scores['metric']}.", "",
        "## Config changes from the defaults", "", *(f"- {change}" for change in config_differences(run_config)), "",
        "## Folds", "", "```", fold_table(scores), "```", "",
        "## Confusion matrix", "", "![confusion matrix](confusion_matrix.png)", "",
        "## Per-class accuracy (OOF with TTA)", "",
        "```", per_class.to_string(float_format=lambda value: f"{value:.3f}"), "```", "",
        "## Most confident mistakes", "", "![mistakes](mistakes.png)", "",
        "## Most confident correct predictions", "", "![best](best.png)", "",
    ]
    if cams:
        lines += ["## Grad-CAM", "", "Where the fold model looked for the class it wrongly predicted.", "",
                  "![grad-cam](grad_cam.png)", ""]
    else:
        lines += ["Grad-CAM: the backbone's features are not a spatial map (e.g. ViT tokens); skipped.", ""]
    path = run.root / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
