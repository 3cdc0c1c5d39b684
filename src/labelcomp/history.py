"""The score-history log `submissions/score_history.csv`: locked atomic upserts, reading, tables.

One row per run, updated when a submission or a leaderboard score is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from labelcomp.runs import write_csv_atomic

LEAD_COLUMNS = ["run_id", "created_at", "experiment", "backbone", "metric", "n_folds"]
TRAIL_COLUMNS = ["cv_mean", "cv_std", "oof_score", "oof_tta_score", "submission", "lb_score", "notes"]


def history_path(submissions_dir: str | Path) -> Path:
    return Path(submissions_dir) / "score_history.csv"


def _fold_columns(columns) -> list[str]:
    folds = [column for column in columns if column.startswith("fold_") and column[5:].isdigit()]
    return sorted(folds, key=lambda column: int(column[5:]))


def read_history(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=LEAD_COLUMNS + TRAIL_COLUMNS)
    return pd.read_csv(path, dtype={"run_id": str, "submission": str, "notes": str})


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
        columns = LEAD_COLUMNS + _fold_columns(frame.columns) + TRAIL_COLUMNS
        write_csv_atomic(frame.reindex(columns=columns), path)


def record_run(path: Path, row: dict[str, Any]) -> None:
    fields = {key: value for key, value in row.items() if key != "run_id"}
    _upsert(path, row["run_id"], fields)


def record_submission(path: Path, run_id: str, submission: str) -> None:
    _upsert(path, run_id, {"submission": submission})


def _number(value: Any, digits: int = 4) -> str:
    return "" if pd.isna(value) else f"{float(value):.{digits}f}"


def fold_table(scores: dict[str, Any]) -> str:
    """The per-fold table of one run, with CV mean ± std and OOF scores with and without TTA."""
    metric = scores["metric"]
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
        f"{_number(scores['oof_tta_score'])} with TTA ({scores['tta']}); OOF loss {_number(scores['oof_loss'])}",
    ])


def compare_table(frame: pd.DataFrame) -> str:
    """Every run in time order: per-fold scores, CV mean ± std, OOF with and without TTA, submission, LB."""
    if frame.empty:
        return "no runs recorded yet; train one with `make train`"
    frame = frame.sort_values("created_at", kind="stable")
    folds = _fold_columns(frame.columns)
    table = pd.DataFrame({"run_id": frame["run_id"], "backbone": frame["backbone"], "metric": frame["metric"]})
    for column in folds:
        table[column] = frame[column].map(_number)
    table["cv"] = [f"{_number(mean)} ± {_number(std)}" for mean, std in zip(frame["cv_mean"], frame["cv_std"])]
    table["oof"] = frame["oof_score"].map(_number)
    table["oof_tta"] = frame["oof_tta_score"].map(_number)
    table["submission"] = frame["submission"].fillna("")
    table["lb"] = frame["lb_score"].map(_number)
    return table.to_string(index=False)
