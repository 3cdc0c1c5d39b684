"""The score-history log `submissions/score_history.csv`: locked atomic upserts, reading, tables.

One row per run, updated when a submission or a leaderboard score is added. Every row names its
competition (name and a digest of its training table): tables, plots and comparisons only relate
runs of one competition.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from labelcomp.errors import LabelcompError
from labelcomp.metrics import METRICS
from labelcomp.runs import write_csv_atomic, write_figure_atomic

LEAD_COLUMNS = ["run_id", "created_at", "competition", "competition_id", "experiment", "backbone", "metric",
                "n_folds"]
TRAIL_COLUMNS = ["cv_mean", "cv_std", "oof_score", "oof_tta_score", "submission", "lb_score", "parent_run",
                 "pseudo_threshold", "pseudo_images", "notes"]


def history_path(submissions_dir: str | Path) -> Path:
    return Path(submissions_dir) / "score_history.csv"


def _fold_columns(columns) -> list[str]:
    folds = [column for column in columns if column.startswith("fold_") and column[5:].isdigit()]
    return sorted(folds, key=lambda column: int(column[5:]))


def read_history(path: Path) -> pd.DataFrame:
    """The history's rows; a damaged file (a hand edit, a foreign tool) is one error naming its line,
    and is never overwritten."""
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=LEAD_COLUMNS + TRAIL_COLUMNS)
    try:
        frame = pd.read_csv(path, dtype={"run_id": str, "submission": str, "notes": str, "competition": str,
                                         "competition_id": str, "parent_run": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[-1].removeprefix("Error tokenizing data. C error: ")
        raise LabelcompError(f"{path}: damaged ({reason}); labelcomp leaves it as it is: fix or remove that line "
                             "in a text editor.") from None
    # files written before rows named their competition
    return frame.reindex(columns=list(dict.fromkeys([*frame.columns, "competition", "competition_id"])))


def _upsert(path: Path, run_id: str, fields: dict[str, Any]) -> None:
    # the lock spans read-modify-write, so parallel fold jobs and submissions cannot lose each other's rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        frame = read_history(path)
        row = {"run_id": run_id, **fields}
        if (frame["run_id"] == run_id).any():
            for column, value in fields.items():
                if column not in frame.columns:
                    frame[column] = None
                frame[column] = frame[column].astype(object)
                frame.loc[frame["run_id"] == run_id, column] = value
        else:
            frame = pd.concat([frame.astype(object), pd.DataFrame([row]).astype(object)], ignore_index=True)
        _write(frame, path)


def _write(frame: pd.DataFrame, path: Path) -> None:
    write_csv_atomic(frame.reindex(columns=LEAD_COLUMNS + _fold_columns(frame.columns) + TRAIL_COLUMNS), path)


def run_row(
    run_id: str, competition: dict[str, str], experiment: str, backbone: str, metric: str, created_at: str,
    fold_scores: list[float] | None, oof_score: float, oof_tta_score: float, notes: str | None = None,
    pseudo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run's history row (a training run, a probe or a blend) for `competition` (Competition.identity);
    fold columns, CV mean and std where it has fold scores."""
    row: dict[str, Any] = {"run_id": run_id, "created_at": created_at, **competition, "experiment": experiment,
                           "backbone": backbone, "metric": metric, "oof_score": oof_score,
                           "oof_tta_score": oof_tta_score}
    if fold_scores:
        row.update({f"fold_{fold}": score for fold, score in enumerate(fold_scores)})
        row.update({"n_folds": len(fold_scores), "cv_mean": float(np.mean(fold_scores)),
                    "cv_std": float(np.std(fold_scores, ddof=1)) if len(fold_scores) > 1 else 0.0})
    if notes is not None:
        row["notes"] = notes
    if pseudo is not None:  # a run that trained on test images its parent run labelled
        row.update({"parent_run": pseudo["parent"], "pseudo_threshold": pseudo["threshold"],
                    "pseudo_images": pseudo["images"]})
    return row


def record_run(path: Path, row: dict[str, Any]) -> None:
    fields = {key: value for key, value in row.items() if key != "run_id"}
    _upsert(path, row["run_id"], fields)


def record_scores(path: Path, run_id: str, competition: dict[str, str], experiment: str, backbone: str,
                  scores: dict[str, Any]) -> None:
    """A finished run's row, from its scores.json."""
    record_run(path, run_row(
        run_id, competition=competition, experiment=experiment, backbone=backbone, metric=scores["metric"], created_at=scores["finished_at"],
        fold_scores=[fold["score"] for fold in scores["folds"]], oof_score=scores["oof_score"],
        oof_tta_score=scores["oof_tta_score"], pseudo=scores.get("pseudo")))


def is_recorded(path: Path, run_id: str) -> bool:
    return run_id in set(read_history(path)["run_id"])


def record_submission(path: Path, run_id: str, submission: str) -> None:
    _upsert(path, run_id, {"submission": submission})


def _known_run(path: Path, run_id: str) -> None:
    if not is_recorded(path, run_id):
        raise LabelcompError(f"{path}: no run '{run_id}'; `make compare` lists the recorded runs")


def record_lb(path: Path, run_id: str, score: float) -> None:
    """The leaderboard score the competition gave the run's submission."""
    if not math.isfinite(score):
        raise LabelcompError(f"leaderboard score {score}: expected a finite number, e.g. 0.8123")
    _known_run(path, run_id)
    _upsert(path, run_id, {"lb_score": score})


def record_note(path: Path, run_id: str, text: str) -> None:
    _known_run(path, run_id)
    _upsert(path, run_id, {"notes": text})


def label_rows(path: Path, competition: dict[str, str], run_ids: list[str]) -> list[str]:
    """Name `competition` in the rows of `run_ids`, or in every row without a competition when none are
    given (histories written before rows named it); returns the run ids labelled."""
    for run_id in run_ids:
        _known_run(path, run_id)
    with FileLock(str(path) + ".lock"):
        frame = read_history(path)
        chosen = frame["run_id"].isin(run_ids) if run_ids else frame["competition"].isna()
        for column, value in competition.items():
            frame[column] = frame[column].astype(object)
            frame.loc[chosen, column] = value
        if chosen.any():
            _write(frame, path)
    return frame.loc[chosen, "run_id"].tolist()


def of_competition(frame: pd.DataFrame, competition: dict[str, str] | str) -> tuple[pd.DataFrame, str]:
    """The rows of one competition, by identity (Competition.identity) or by a name or digest given on the
    command line, and a line saying what was left out ("" when nothing was)."""
    if isinstance(competition, dict):
        chosen = frame["competition_id"] == competition["competition_id"]
    else:
        chosen = (frame["competition_id"] == competition) | (frame["competition"] == competition)
    unlabelled = int(frame["competition"].isna().sum())
    others = int((~chosen).sum()) - unlabelled
    notes = []
    if others:
        notes.append(f"{others} row(s) of other competitions left out (--competition NAME shows one)")
    if unlabelled:
        notes.append(f"{unlabelled} row(s) recorded before rows named their competition left out; "
                     f"`labelcomp label-history --config CONFIG [RUN ...]` names the config's competition in them")
    return frame[chosen].reset_index(drop=True), "; ".join(notes)

def _number(value: Any, digits: int = 4) -> str:
    return "" if pd.isna(value) else f"{float(value):.{digits}f}"


def fold_table(scores: dict[str, Any]) -> str:
    """The per-fold table of one run, with CV mean ± std and OOF scores with and without TTA."""
    metric, tta = scores["metric"], scores["tta"]
    rows = pd.DataFrame(
        {"fold": [row["fold"] for row in scores["folds"]],
         "images": [row["n"] for row in scores["folds"]],
         metric: [_number(row["score"]) for row in scores["folds"]],
         f"{metric} (tta)": [_number(row["score_tta"]) for row in scores["folds"]],
         "loss": [_number(row["loss"]) for row in scores["folds"]]}
    )
    return "\n".join([
        f"run {scores['run_id']}",
        rows.to_string(index=False),
        f"CV {metric}: {_number(scores['cv_mean'])} ± {_number(scores['cv_std'])}",
        f"OOF {metric}: {_number(scores['oof_score'])} without TTA, "
        f"{_number(scores['oof_tta_score'])} with TTA ({tta['policy']}, {tta['chosen_by']}); "
        f"OOF loss {_number(scores['oof_loss'])}",
        f"OOF {metric} by TTA policy ({tta['merge']} merge): "
        + ", ".join(f"{policy} {_number(score)}" for policy, score in tta["oof_scores"].items()),
        *([f"pseudo-labels from run {scores['pseudo']['parent']}: {'/'.join(map(str, scores['pseudo']['images_per_fold']))} "
           f"of {scores['pseudo']['test_images']} test images per fold ({scores['pseudo']['targets']}), confidence >= "
           f"{scores['pseudo']['threshold']:.4f}"] if scores.get("pseudo") else []),
        *([f"OOF macro F1: {_number(scores['oof_macro_f1']['plain'])} without TTA, "
           f"{_number(scores['oof_macro_f1']['tta'])} with TTA"] if metric != "macro_f1" and "oof_macro_f1" in scores
          else []),
    ])


def _change_against_best_earlier(frame: pd.DataFrame) -> list[str]:
    """Each run's CV mean minus the best CV mean of the earlier runs scored with the same metric."""
    changes = []
    for position, (metric, mean) in enumerate(zip(frame["metric"], frame["cv_mean"])):
        earlier = frame.iloc[:position]
        earlier = earlier.loc[earlier["metric"] == metric, "cv_mean"].dropna()
        if earlier.empty or pd.isna(mean):
            changes.append("")
            continue
        best = earlier.max() if METRICS[metric].mode == "max" else earlier.min()
        changes.append(f"{float(mean) - float(best):+.4f}")
    return changes


def compare_table(frame: pd.DataFrame) -> str:
    """Every run in time order: per-fold scores, CV mean ± std, the change against the best earlier
    run, OOF with and without TTA, submission, leaderboard score and note."""
    if frame.empty:
        return "no runs recorded yet; train one with `make train`"
    frame = frame.sort_values("created_at", kind="stable").reset_index(drop=True)
    folds = _fold_columns(frame.columns)
    table = pd.DataFrame({"run_id": frame["run_id"], "backbone": frame["backbone"], "metric": frame["metric"]})
    for column in folds:
        table[column] = frame[column].map(_number)
    table["cv"] = [f"{_number(mean)} ± {_number(std)}" for mean, std in zip(frame["cv_mean"], frame["cv_std"])]
    table["vs best"] = _change_against_best_earlier(frame)
    table["oof"] = frame["oof_score"].map(_number)
    table["oof_tta"] = frame["oof_tta_score"].map(_number)
    table["submission"] = frame["submission"].fillna("")
    table["lb"] = frame["lb_score"].map(_number)
    table["note"] = frame["notes"].fillna("")
    return table.to_string(index=False)


def compare_runs(frame: pd.DataFrame, first: str, second: str) -> str:
    """Two runs fold by fold with the paired difference (second minus first)."""
    rows = {}
    for run_id in (first, second):
        match = frame[frame["run_id"] == run_id]
        if match.empty:
            raise LabelcompError(f"no run '{run_id}' in the score history of this competition; `make compare` "
                                 "lists them")
        rows[run_id] = match.iloc[0]
    a, b = rows[first], rows[second]
    if a["metric"] != b["metric"] or a["n_folds"] != b["n_folds"]:
        raise LabelcompError(
            f"runs {first} ({a['n_folds']} folds, {a['metric']}) and {second} ({b['n_folds']} folds, "
            f"{b['metric']}) are not scored on the same folds and metric; a paired comparison needs both"
        )
    folds = [f"fold_{k}" for k in range(int(a["n_folds"]))]
    difference = b[folds].astype(float).to_numpy() - a[folds].astype(float).to_numpy()
    table = pd.DataFrame({"fold": range(len(folds)), first: a[folds].map(_number).to_numpy(),
                          second: b[folds].map(_number).to_numpy(),
                          "difference": [f"{value:+.4f}" for value in difference]})
    spread = difference.std(ddof=1) if len(difference) > 1 else 0.0
    wins = int((difference > 0).sum()) if METRICS[a["metric"]].mode == "max" else int((difference < 0).sum())
    return "\n".join([
        table.to_string(index=False),
        f"mean difference {difference.mean():+.4f} ± {spread:.4f} (std over folds); "
        f"{second} better on {wins} of {len(folds)} folds ({a['metric']})",
    ])


def plot_history(frame: pd.DataFrame, path: Path) -> Path:
    """Score progression over time: CV mean with each run's fold spread, OOF with and without TTA, and
    leaderboard scores."""
    from matplotlib.figure import Figure

    if frame.empty:
        raise LabelcompError("no runs recorded yet; train one with `make train`")
    frame = frame.sort_values("created_at", kind="stable").reset_index(drop=True)
    folds = _fold_columns(frame.columns)
    figure = Figure(figsize=(max(6, 0.9 * len(frame) + 3), 4.5))
    axis = figure.subplots()
    order = range(len(frame))
    for position, row in frame.iterrows():
        scores = row[folds].dropna().astype(float)
        axis.scatter([position] * len(scores), scores, color="tab:blue", alpha=0.35, s=14,
                     label="fold scores" if position == 0 else None)
    axis.plot(order, frame["cv_mean"].astype(float), "o-", color="tab:blue", label="CV mean")
    axis.plot(order, frame["oof_score"].astype(float), "^:", color="tab:olive", alpha=0.8, label="OOF")
    axis.plot(order, frame["oof_tta_score"].astype(float), "s--", color="tab:green", alpha=0.8, label="OOF with TTA")
    if frame["lb_score"].notna().any():
        axis.plot(order, frame["lb_score"].astype(float), "D", color="tab:red", label="leaderboard")
    axis.set_xticks(list(order))
    axis.set_xticklabels([f"{run}\n{str(created)[:10]}" for run, created in zip(frame["run_id"], frame["created_at"])],
                         rotation=30, ha="right", fontsize=7)
    axis.set_ylabel(", ".join(sorted(frame["metric"].dropna().unique())))
    axis.set_title("score history")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    write_figure_atomic(figure, path, dpi=110)
    return path
