"""`labelcomp report RUN`: report.md in the run folder, with PNGs beside it, and report.html, one
self-contained page to present or share (every image inside it): the score progression over the
competition's runs, the fold table, per-class scores, a confusion matrix, the most confident mistakes
and best predictions from OOF, Grad-CAM maps of some mistakes from the fold model that never saw
them, and the config's differences from the defaults."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import ConfusionMatrixDisplay, classification_report

from labelcomp.augment import build_transforms
from labelcomp.competition import Competition
from labelcomp.config import load_config
from labelcomp.data import normalize, read_image
from labelcomp.history import fold_table, history_path, of_competition, plot_history, read_history
from labelcomp.predict import load_classifier
from labelcomp.runs import RunDir, find_run, read_table, write_figure_atomic, write_text_atomic

GRID = 12
GRAD_CAM = 4


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        return {key: value for name, sub in tree.items() for key, value in _flatten(sub, f"{prefix}{name}.").items()}
    return {prefix[:-1]: tree}


def config_differences(config: DictConfig) -> list[tuple[str, str, str]]:
    """(key, default, value) for every setting the run's config changes."""
    defaults = _flatten(OmegaConf.to_container(load_config(None, []), resolve=True))
    current = _flatten(OmegaConf.to_container(config, resolve=True))
    return [(key, str(defaults.get(key, "—")), str(value)) for key, value in current.items()
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


def grad_cam(net: torch.nn.Module, image: torch.Tensor, target: int) -> np.ndarray | None:
    """Class-activation map of `target` over the last feature map of a timm network (CNNs); None where
    the features are not a spatial map (ViT tokens)."""
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


def write_report(config: DictConfig, run_id: str | None = None) -> tuple[Path, Path]:
    """report.md (PNGs beside it) and report.html (the same with every image inside) in the run folder."""
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
        cam = grad_cam(classifier.predicting_net(), image[0], labels.index(row["predicted"]))
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

    figures = {"confusion matrix": run.root / "confusion_matrix.png", "most confident mistakes": run.root / "mistakes.png",
               "most confident correct predictions": run.root / "best.png"}
    if cams:
        figures["Grad-CAM"] = run.root / "grad_cam.png"
    progression, progression_note, progression_figure = _progression(run, run_config, scores, competition)
    report = Report(
        run_id=run.run_id,
        summary=f"Backbone {run_config.model.name}, competition {competition.spec.name}, metric {scores['metric']}.",
        changes=config_differences(run_config), scores=scores, per_class=per_class_scores(target, proba, labels),
        progression=progression, progression_note=progression_note, progression_figure=progression_figure,
        figures=figures, grad_cam=bool(cams),
    )
    markdown, page = run.root / "report.md", run.root / "report.html"
    write_text_atomic(markdown, report.markdown())
    write_text_atomic(page, report.html())
    return markdown, page


def per_class_scores(target: np.ndarray, proba: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """Precision, recall (the class's accuracy), F1 and images per class, from OOF with TTA."""
    table = classification_report(target, proba.argmax(1), labels=range(len(labels)), target_names=labels,
                                  output_dict=True, zero_division=0)
    frame = pd.DataFrame({label: table[label] for label in labels}).T
    return frame.rename(columns={"recall": "recall (accuracy)", "support": "images"}).astype({"images": int})


def _progression(run: RunDir, run_config: DictConfig, scores: dict, competition: Competition,
                 ) -> tuple[pd.DataFrame | None, str, Path | None]:
    """The competition's runs from the score history, what was left out, and their plot in the run folder."""
    path = history_path(run_config.paths.submissions)
    if not path.is_file():
        return None, f"no score history at {path} yet", None
    rows, left_out = of_competition(read_history(path), scores.get("competition") or competition.identity())
    if rows.empty:
        return None, f"no runs of this competition in {path}", None
    figure = plot_history(rows, run.root / "score_history.png")
    columns = ["run_id", "created_at", "experiment", "backbone", "cv_mean", "cv_std", "oof_score", "oof_tta_score",
               "lb_score", "notes"]
    return rows.sort_values("created_at", kind="stable")[columns], left_out, figure


@dataclass
class Report:
    """What the report says, written as Markdown (PNGs beside it) and as one self-contained HTML page."""

    run_id: str
    summary: str
    changes: list[tuple[str, str, str]]
    scores: dict
    per_class: pd.DataFrame
    progression: pd.DataFrame | None
    progression_note: str
    progression_figure: Path | None
    figures: dict[str, Path]
    grad_cam: bool

    def markdown(self) -> str:
        lines = [f"# Run {self.run_id}", "", self.summary, ""]
        lines += ["## Score progression", ""]
        if self.progression is not None:
            lines += [f"![score history]({self.progression_figure.name})", "", "```",
                      self.progression.to_string(index=False, na_rep="", float_format=_four), "```", ""]
        if self.progression_note:
            lines += [self.progression_note, ""]
        lines += ["## Config changes from the defaults", "", *(f"- `{key}`: {default} → {value}" for key, default, value in self.changes), "",
                  "## Folds", "", "```", fold_table(self.scores), "```", "",
                  "## Per-class scores (OOF with TTA)", "", "```", self.per_class.to_string(float_format=_three), "```", ""]
        for title, path in self.figures.items():
            lines += [f"## {_heading(title)}", ""]
            if title == "Grad-CAM":
                lines += ["Where the fold model looked for the class it wrongly predicted.", ""]
            lines += [f"![{title}]({path.name})", ""]
        if not self.grad_cam:
            lines += ["Grad-CAM: the backbone's features are not a spatial map (e.g. ViT tokens); skipped.", ""]
        return "\n".join(lines)

    def html(self) -> str:
        body = [f"<h1>Run {escape(self.run_id)}</h1>", f"<p>{escape(self.summary)}</p>", "<h2>Score progression</h2>"]
        if self.progression is not None:
            body += [_embedded(self.progression_figure, "score history"),
                     self.progression.to_html(index=False, na_rep="", float_format=_four, classes="table")]
        if self.progression_note:
            body.append(f"<p class=note>{escape(self.progression_note)}</p>")
        body += ["<h2>Folds</h2>", f"<pre>{escape(fold_table(self.scores))}</pre>",
                 "<h2>Per-class scores (OOF with TTA)</h2>", self.per_class.to_html(float_format=_three, classes="table")]
        for title, path in self.figures.items():
            body += [f"<h2>{escape(_heading(title))}</h2>", _embedded(path, title)]
        if not self.grad_cam:
            body.append("<p class=note>Grad-CAM: the backbone's features are not a spatial map (e.g. ViT tokens); "
                        "skipped.</p>")
        body += ["<h2>Config changes from the defaults</h2>",
                 "<ul>" + "".join(f"<li><code>{escape(key)}</code>: {escape(default)} → {escape(value)}</li>"
                                 for key, default, value in self.changes) + "</ul>"]
        return _PAGE.format(title=escape(f"labelcomp run {self.run_id}"), body="\n".join(body))

def _heading(title: str) -> str:
    return title[0].upper() + title[1:]


def _three(value: float) -> str:
    return f"{value:.3f}"


def _four(value: float) -> str:
    return f"{value:.4f}"


def _embedded(path: Path, alt: str) -> str:
    """The PNG inside the page, so the one file can be mailed or presented as it is."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0 1em; }}
table.table {{ border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1em; }}
table.table th, table.table td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
table.table th {{ background: #f3f3f3; }}
pre {{ background: #f7f7f7; padding: 0.8em; overflow-x: auto; }}
.note {{ color: #666; font-style: italic; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
