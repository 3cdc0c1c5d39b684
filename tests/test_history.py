from concurrent.futures import ProcessPoolExecutor

import pytest

import pandas as pd

from labelcomp.history import compare_table, read_history, record_run, record_submission


def _row(run_id, folds, competition="comp", competition_id="c0ffee"):
    row = {"run_id": run_id, "created_at": f"2026-11-24T10:0{folds}", "competition": competition,
           "competition_id": competition_id, "experiment": "e", "backbone": "b",
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
    assert list(history.columns[8:11]) == ["fold_0", "fold_1", "fold_2"]
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


def _three_runs(path):
    record_run(path, {**_row("a", 3), "fold_0": 0.50, "fold_1": 0.60, "fold_2": 0.70, "cv_mean": 0.60})
    record_run(path, {**_row("b", 3), "created_at": "2026-11-24T11:00", "fold_0": 0.55, "fold_1": 0.58,
                      "fold_2": 0.76, "cv_mean": 0.63})
    record_run(path, {**_row("c", 3), "created_at": "2026-11-24T12:00", "cv_mean": 0.61})


def test_leaderboard_scores_and_notes_land_on_their_run(tmp_path):
    from labelcomp.errors import LabelcompError
    from labelcomp.history import record_lb, record_note

    path = tmp_path / "score_history.csv"
    _three_runs(path)
    record_lb(path, "b", 0.612)
    record_note(path, "b", "stronger flips")
    history = read_history(path).set_index("run_id")
    assert history.loc["b", "lb_score"] == 0.612 and history.loc["b", "notes"] == "stronger flips"
    assert pd.isna(history.loc["a", "lb_score"])
    with pytest.raises(LabelcompError, match="no run 'z'"):
        record_lb(path, "z", 0.1)
    table = compare_table(read_history(path))
    # change of CV mean against the best earlier run: b beats a by 0.03; c trails b by 0.02
    lines = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "+0.0300" in lines["b"] and "-0.0200" in lines["c"] and "stronger flips" in lines["b"]


def test_two_runs_side_by_side_with_the_paired_difference(tmp_path):
    from labelcomp.history import compare_runs

    path = tmp_path / "score_history.csv"
    _three_runs(path)
    text = compare_runs(read_history(path), "a", "b")
    assert "+0.0500" in text and "-0.0200" in text and "+0.0600" in text
    differences = [0.05, -0.02, 0.06]
    mean, std = sum(differences) / 3, pd.Series(differences).std()
    assert f"mean difference {mean:+.4f} ± {std:.4f}" in text and "b better on 2 of 3 folds" in text


def test_plot_of_the_score_history_is_written(tmp_path, capsys):
    from labelcomp.cli import main

    path = tmp_path / "score_history.csv"
    _three_runs(path)
    assert main(["compare", "--plot", "--competition", "comp", f"paths.submissions={tmp_path}"]) == 0
    assert (tmp_path / "score_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in capsys.readouterr().out


def test_compare_relates_only_runs_of_one_competition(tmp_path, capsys):
    from labelcomp.cli import main

    path = tmp_path / "score_history.csv"
    _three_runs(path)
    # another competition's run scores far higher: it is neither listed nor the best earlier run
    record_run(path, {**_row("rose", 3, "flowers", "beef00"), "created_at": "2026-11-24T10:30", "cv_mean": 0.95})
    assert main(["compare", "--competition", "comp", f"paths.submissions={tmp_path}"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:4]}
    assert sorted(lines) == ["a", "b", "c"] and "+0.0300" in lines["b"] and "-0.0200" in lines["c"]
    assert "rose" not in out and "1 row(s) of other competitions left out" in out
    # by digest as well as by name
    assert main(["compare", "--competition", "beef00", f"paths.submissions={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "rose" in out and "3 row(s) of other competitions left out" in out
    assert main(["compare", "a", "rose", "--competition", "comp", f"paths.submissions={tmp_path}"]) == 2
    assert "no run 'rose' in the score history of this competition" in capsys.readouterr().err


def test_a_history_from_before_competitions_is_read_and_can_be_labelled(tmp_path, tiny_competition, capsys):
    from labelcomp.cli import main
    from labelcomp.competition import Competition

    path = tmp_path / "score_history.csv"
    old = pd.DataFrame([{key: value for key, value in _row(run_id, 2).items() if not key.startswith("competition")}
                        for run_id in ("a", "b")])
    old.to_csv(path, index=False)
    assert list(read_history(path)["run_id"]) == ["a", "b"]
    settings = [f"competition={tiny_competition}", f"paths.submissions={tmp_path}"]
    assert main(["compare", *settings]) == 0
    out = capsys.readouterr().out
    assert "no runs recorded yet" in out and "2 row(s) recorded before rows named their competition" in out
    assert "labelcomp label-history" in out
    assert main(["label-history", "a", *settings]) == 0
    identity = Competition.load(tiny_competition).identity()
    assert f"1 row(s) now of competition tiny ({identity['competition_id']}): a" in capsys.readouterr().out
    assert main(["label-history", *settings]) == 0  # every row still without one
    assert capsys.readouterr().out.strip().endswith(": b")
    history = read_history(path)
    assert set(history["competition"]) == {"tiny"} and set(history["competition_id"]) == {identity["competition_id"]}
    assert main(["compare", *settings]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["a", "b"] and "left out" not in out


def test_the_competition_digest_follows_the_training_table(tmp_path, tiny_competition):
    from labelcomp.competition import Competition

    first = Competition.load(tiny_competition).identity()
    assert first == Competition.load(tiny_competition).identity() and first["competition"] == "tiny"
    table = tiny_competition / "train.csv"
    frame = pd.read_csv(table)
    frame.loc[0, "label"] = frame["label"].iloc[-1]  # one image relabelled: other data
    frame.to_csv(table, index=False)
    assert Competition.load(tiny_competition).identity()["competition_id"] != first["competition_id"]
