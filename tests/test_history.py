from concurrent.futures import ProcessPoolExecutor

import pandas as pd

from labelcomp.history import compare_table, read_history, record_run, record_submission


def _row(run_id, folds):
    row = {"run_id": run_id, "created_at": f"2026-11-24T10:0{folds}", "experiment": "e", "backbone": "b",
           "metric": "accuracy", "n_folds": folds, "cv_mean": 0.5, "cv_std": 0.1, "oof_score": 0.5,
           "oof_tta_score": 0.6}
    row.update({f"fold_{k}": 0.1 * k for k in range(folds)})
    return row


def test_runs_with_different_fold_counts_share_one_file(tmp_path):
    path = tmp_path / "score_history.csv"
    record_run(path, _row("a", 2))
    record_run(path, _row("b", 3))
    record_submission(path, "a", "a.csv")
    history = read_history(path)
    assert list(history["run_id"]) == ["a", "b"]
    assert list(history.columns[6:9]) == ["fold_0", "fold_1", "fold_2"]
    assert pd.isna(history.loc[0, "fold_2"]) and history.loc[1, "fold_2"] == 0.2
    assert history.loc[0, "submission"] == "a.csv" and pd.isna(history.loc[1, "submission"])
    table = compare_table(history)
    assert "0.5000 ± 0.1000" in table and "a.csv" in table


def _write(args):
    path, index = args
    record_run(path, _row(f"run{index}", 2))


def test_parallel_writers_lose_no_row(tmp_path):
    path = tmp_path / "score_history.csv"
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(_write, [(path, index) for index in range(24)]))
    assert sorted(read_history(path)["run_id"]) == sorted(f"run{index}" for index in range(24))
