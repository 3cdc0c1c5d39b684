"""Input a hostile but realistic user gives: label shapes, damaged files, paths for names, a full disk,
encodings, interruptions. Each ends in a scored and recorded run, or one clear line, exit 2, and
nothing lost or half-written."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from labelcomp import runs as runs_module
from labelcomp.cli import main
from conftest import REPO, make_competition, tiny_overrides

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _train(tmp_path, competition, *extra):
    return main(["train", "--config", SMOKE, *tiny_overrides(tmp_path, competition), *extra])


def _one_error_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.startswith("labelcomp: error: ") and error.count("\n") == 1, error
    return error


def _relabel(competition, names):
    """The competition's classes renamed, in the train table, the sample submission and the spec."""
    spec = yaml.safe_load((competition / "competition.yaml").read_text())
    mapping = dict(zip(spec["labels"], names))
    for table in ("train.csv", "sample_submission.csv"):
        frame = pd.read_csv(competition / table, dtype=str, keep_default_na=False)
        frame["label"] = frame["label"].map(mapping)
        frame.to_csv(competition / table, index=False)
    spec["labels"] = list(names)
    (competition / "competition.yaml").write_text(yaml.safe_dump(spec))


LABEL_SHAPES = {"class ids": ["0", "1", "2", "3"], "zero-padded ids": ["01", "02", "03", "04"],
                "decimals": ["1.0", "2.0", "3.0", "4.0"], "null-like names": ["NA", "None", "null", "nan"]}


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(LABEL_SHAPES))
def test_labels_that_look_like_numbers_or_nulls_stay_labels_from_training_to_submission(shape, tmp_path):
    names = LABEL_SHAPES[shape]
    competition = make_competition(tmp_path / "tiny")
    _relabel(competition, names)
    assert _train(tmp_path, competition) == 0
    run = next((tmp_path / "runs" / "smoke").iterdir())
    oof = pd.read_csv(run / "oof_tta.csv", dtype=str, keep_default_na=False)
    assert sorted(set(oof["label"])) == sorted(names) and list(oof.columns[3:]) == names
    assert 0 <= json.loads((run / "scores.json").read_text())["oof_score"] <= 1
    assert main(["train", "--config", SMOKE, "--resume", run.name, *tiny_overrides(tmp_path, competition)]) == 0
    assert main(["submit", "--config", SMOKE, *tiny_overrides(tmp_path, competition)]) == 0
    submission = pd.read_csv(tmp_path / "submissions" / f"{run.name}.csv", dtype=str, keep_default_na=False)
    assert set(submission["label"]) <= set(names)


@pytest.mark.slow
def test_a_damaged_history_costs_no_run_and_is_never_overwritten(tmp_path, capsys):
    competition = make_competition(tmp_path / "tiny")
    history = tmp_path / "submissions" / "score_history.csv"
    history.parent.mkdir(parents=True)
    damaged = "run_id,created_at,experiment\nold,2026-01-01,x\nhand,2026-01-02,x,extra field\n"
    history.write_text(damaged)
    assert _train(tmp_path, competition) == 2
    error = _one_error_line(capsys)
    run = next((tmp_path / "runs" / "smoke").iterdir())
    assert "damaged" in error and "line 3" in error and f"labelcomp train --resume {run.name}" in error
    assert (run / "scores.json").exists() and history.read_text() == damaged  # scored, file untouched
    for command in (["lb", run.name, "0.5"], ["compare"]):
        assert main([*command, "--config", SMOKE, *tiny_overrides(tmp_path, competition)]) == 2
        assert "damaged" in _one_error_line(capsys) and history.read_text() == damaged
    history.write_text("run_id,created_at,experiment\nold,2026-01-01,x\n")  # the user fixes the line
    assert main(["train", "--config", SMOKE, "--resume", run.name, *tiny_overrides(tmp_path, competition)]) == 0
    rows = pd.read_csv(history)
    assert rows["run_id"].tolist() == ["old", run.name] and rows["cv_mean"].notna().tolist() == [False, True]


@pytest.mark.slow
def test_a_run_stopped_before_its_history_row_is_recorded_by_submit_or_resume(tmp_path):
    competition = make_competition(tmp_path / "tiny")
    assert _train(tmp_path, competition) == 0
    run = next((tmp_path / "runs" / "smoke").iterdir())
    history = tmp_path / "submissions" / "score_history.csv"
    history.unlink()  # as if stopped between scores.json and the row (or the row failed, see above)
    assert main(["submit", "--config", SMOKE, *tiny_overrides(tmp_path, competition)]) == 0
    row = pd.read_csv(history).iloc[0]
    assert row["run_id"] == run.name and row["backbone"] == "mobilenetv2_035" and row["metric"] == "accuracy"
    assert row["cv_mean"] == pytest.approx(json.loads((run / "scores.json").read_text())["cv_mean"])
    # stopped after the row, before scores.json: the run is not finished, and a resume finishes it
    (run / "scores.json").unlink()
    assert main(["submit", "--config", SMOKE, "--run", run.name, *tiny_overrides(tmp_path, competition)]) == 2
    assert main(["train", "--config", SMOKE, "--resume", run.name, *tiny_overrides(tmp_path, competition)]) == 0
    assert (run / "scores.json").exists() and len(pd.read_csv(history)) == 1


@pytest.mark.parametrize("option, run_id", [("--run", "../../escaped"), ("--run", "/tmp/abs_run"),
                                            ("--run", ".."), ("--resume", "../x")])
def test_a_run_id_is_a_name_not_a_path(tmp_path, capsys, option, run_id):
    competition = make_competition(tmp_path / "tiny")
    assert _train(tmp_path, competition, option, run_id, "--folds", "0") == 2
    assert "not a path" in _one_error_line(capsys)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()
    assert not os.path.exists("/tmp/abs_run")


def _full_disk(monkeypatch, when):
    """Writes of files whose name contains `when` fail as on a full disk."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(handle, mode="r", *args, **kwargs):
        stream = real_fdopen(handle, mode, *args, **kwargs)
        return Full(stream) if when in os.readlink(f"/proc/self/fd/{handle}") else stream

    monkeypatch.setattr(runs_module.os, "fdopen", fdopen)


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file_and_the_run_resumes_after(tmp_path, monkeypatch, capsys):
    competition = make_competition(tmp_path / "tiny")
    _full_disk(monkeypatch, "oof_views.npz")
    assert _train(tmp_path, competition, "--run", "full") == 2
    error = _one_error_line(capsys)
    assert "oof_views.npz: could not be written (No space left on device)" in error and "--resume" in error
    run = tmp_path / "runs" / "smoke" / "full"
    assert not list(run.rglob("*.tmp")) and not (run / "fold_0" / "oof.csv").exists()
    monkeypatch.undo()
    assert main(["train", "--config", SMOKE, "--resume", "full", *tiny_overrides(tmp_path, competition)]) == 0
    assert (run / "scores.json").exists()
    history = (tmp_path / "submissions" / "score_history.csv").read_text()
    _full_disk(monkeypatch, "score_history.csv")
    assert main(["note", "full", "a note", "--config", SMOKE, *tiny_overrides(tmp_path, competition)]) == 2
    assert "score_history.csv: could not be written" in _one_error_line(capsys)
    assert (tmp_path / "submissions" / "score_history.csv").read_text() == history


def test_blank_group_values_are_no_group_and_classes_left_out_of_a_fold_are_reported(tmp_path, caplog):
    from labelcomp.config import load_config
    from labelcomp.train import read_data, split_folds

    competition = make_competition(tmp_path / "tiny")
    train = pd.read_csv(competition / "train.csv", dtype=str)
    train["site"] = ""
    train.loc[:1, "site"] = "s1"  # 2 of 40 rows in a group, the rest blank
    train.to_csv(competition / "train.csv", index=False)
    spec = yaml.safe_load((competition / "competition.yaml").read_text())
    spec["train"]["group_column"] = "site"
    (competition / "competition.yaml").write_text(yaml.safe_dump(spec))
    config = load_config(SMOKE, tiny_overrides(tmp_path, competition))
    folds = split_folds(config, read_data(config))
    assert folds["fold"].value_counts().tolist() == [20, 20]
    assert all(set(part["label"]) == set(spec["labels"]) for _, part in folds.groupby("fold"))
    # one class in a single group: it can only be in one fold, and that is said
    first = spec["labels"][0]
    train["site"] = ["g0" if label == first else "" for label in train["label"]]
    train.to_csv(competition / "train.csv", index=False)
    split_folds(config, read_data(config))
    assert f"validates no image of 1 classes ({first})" in caplog.text


def _write_encoded(competition, encoding, names):
    _relabel(competition, names)
    for table in ("train.csv", "sample_submission.csv", "test.csv"):
        text = (competition / table).read_text(encoding="utf-8")
        (competition / table).write_bytes(text.encode(encoding))
    (competition / "competition.yaml").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("encoding, names", [("cp932", ["犬", "猫", "鳥", "魚"]), ("cp1252", ["café", "crème", "naïve", "über"])])
def test_tables_in_shift_jis_or_cp1252_are_read_and_the_submission_keeps_the_encoding(tmp_path, capsys, encoding, names):
    competition = make_competition(tmp_path / "tiny")
    _write_encoded(competition, encoding, names)
    assert main(["init", str(competition)]) == 0
    assert yaml.safe_load((competition / "competition.yaml").read_text(encoding="utf-8"))["encoding"] == encoding
    assert main(["check", str(competition)]) == 0
    assert _train(tmp_path, competition) == 0
    assert main(["submit", "--config", SMOKE, *tiny_overrides(tmp_path, competition)]) == 0
    submission = next((tmp_path / "submissions").glob("smoke-*[0-9].csv")).read_bytes().decode(encoding)
    assert set(line.split(",")[1] for line in submission.splitlines()[1:]) <= set(names)


@pytest.mark.slow
def test_a_table_that_cannot_be_decoded_is_one_line_for_init_check_and_train(tmp_path, capsys):
    competition = make_competition(tmp_path / "tiny")
    (competition / "train.csv").write_bytes(b"image_id,label\n\x81\xff\x81,x\n")
    assert _train(tmp_path, competition) == 2
    assert "train.csv: cannot be decoded" in _one_error_line(capsys)
    assert main(["check", str(competition)]) == 2
    assert "train.csv: cannot be decoded" in capsys.readouterr().out
    (competition / "competition.yaml").unlink()
    assert main(["init", str(competition)]) == 2
    assert "train.csv: cannot be decoded" in _one_error_line(capsys)


@pytest.mark.parametrize("table", ["train.csv", "sample_submission.csv"])
def test_init_on_an_empty_table_is_one_line(tmp_path, capsys, table):
    competition = make_competition(tmp_path / "tiny")
    (competition / "competition.yaml").unlink()
    (competition / table).write_bytes(b"")
    assert main(["init", str(competition)]) == 2
    assert f"{table}: the file is empty" in _one_error_line(capsys)


def test_a_dangling_link_among_the_images_is_one_line_for_train_and_check(tmp_path, capsys):
    competition = make_competition(tmp_path / "tiny")
    image = competition / "train_images" / pd.read_csv(competition / "train.csv")["image_id"][3]
    image.unlink()
    image.symlink_to(tmp_path / "gone.png")
    assert _train(tmp_path, competition) == 2
    assert f"{image}: cannot be opened (No such file or directory)" in _one_error_line(capsys)
    assert main(["check", str(competition)]) == 2
    assert f"{image}: cannot be opened" in capsys.readouterr().out


@pytest.mark.parametrize("override, expected", [
    ("augment.image_size=-5", "'augment.image_size': -5; expected a positive number of pixels"),
    ("augment.image_size=0", "'augment.image_size': 0; expected a positive number of pixels"),
    ("data.batch_size=0", "'data.batch_size': 0; expected at least 1"),
    ("trainer.validate_every_n_epochs=0", "'trainer.validate_every_n_epochs': 0; expected at least 1"),
    ("trainer.precision=fp8", "Precision 'fp8' is invalid"),
    ("paths.runs=FILE", "'paths.runs' is"),
    ("paths.submissions=FILE", "'paths.submissions' is"),
])
@pytest.mark.slow
def test_config_values_no_run_can_use_are_one_line_and_leave_nothing(tmp_path, capsys, override, expected):
    competition = make_competition(tmp_path / "tiny")
    (tmp_path / "a_file").write_text("")
    assert _train(tmp_path, competition, override.replace("FILE", str(tmp_path / "a_file")), "--folds", "0") == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


def test_a_fold_that_does_not_exist_leaves_no_run_folder(tmp_path, capsys):
    assert _train(tmp_path, make_competition(tmp_path / "tiny"), "--run", "r", "--folds", "7") == 2
    assert "fold 7 does not exist" in _one_error_line(capsys) and not (tmp_path / "runs").exists()


def test_line_numbers_count_blank_lines_and_trailing_separators_are_not_an_index(tmp_path, capsys):
    competition = make_competition(tmp_path / "tiny")
    lines = (competition / "train.csv").read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",dragons"  # line 6 of the file
    (competition / "train.csv").write_text("\n".join(lines[:3] + ["", "", ""] + lines[3:]) + "\n")
    assert _train(tmp_path, competition) == 2
    assert "train.csv: line 9, column 'label': label 'dragons'" in _one_error_line(capsys)
    # a separator at the end of every data row (not the header): the rows still read as id, label
    competition = make_competition(tmp_path / "second")
    lines = (competition / "train.csv").read_text().splitlines()
    (competition / "train.csv").write_text("\n".join(lines[:1] + [line + "," for line in lines[1:]]) + "\n")
    from labelcomp.competition import Competition

    train = Competition.load(competition).read_train()
    assert train["id"].tolist() == [line.split(",")[0] for line in lines[1:]]


@pytest.mark.parametrize("score", ["nan", "inf"])
def test_a_leaderboard_score_must_be_a_number(tmp_path, capsys, score):
    assert main(["lb", "some-run", score, "--config", SMOKE, f"paths.submissions={tmp_path}"]) == 2
    assert "expected a finite number" in _one_error_line(capsys)


def test_overrides_may_follow_the_options(tmp_path, capsys):
    history = tmp_path / "score_history.csv"
    history.write_text("run_id,created_at,experiment\nr1,2026-01-01,x\n")
    assert main(["lb", "r1", "0.75", "--config", SMOKE, f"paths.submissions={tmp_path}"]) == 0
    assert pd.read_csv(history)["lb_score"].tolist() == [0.75]


def test_check_and_train_agree_on_a_class_with_a_single_image(tmp_path, capsys):
    competition = make_competition(tmp_path / "tiny")
    train = pd.read_csv(competition / "train.csv", dtype=str)
    first = train["label"].iloc[0]
    train = train[(train["label"] != first) | ~train["label"].duplicated()]
    train.to_csv(competition / "train.csv", index=False)
    assert main(["check", str(competition)]) == 2
    assert f"classes with a single training image: ['{first}']" in capsys.readouterr().out
    assert _train(tmp_path, competition) == 2
    assert f"{{'{first}': 1}} have fewer images than cv.folds=2" in _one_error_line(capsys)


def test_a_backbone_only_weights_file_loads_for_a_thousand_classes():
    from labelcomp.config import load_config
    from labelcomp.model import apply_weights_card, build_model

    model = load_config(REPO / "configs" / "default.yaml").model
    apply_weights_card(model)
    assert build_model(model, num_classes=1000).get_classifier().out_features == 1000


@pytest.mark.slow
def test_ctrl_c_during_training_is_the_interrupted_line_and_exit_130(tmp_path):
    competition = make_competition(tmp_path / "tiny")
    longer = "finetune.stages=[{epochs: 2, train: head, lr: 0.01}, {epochs: 30, train: all, lr: 0.001}]"
    process = subprocess.Popen([sys.executable, "-m", "labelcomp.cli", "train", "--config", SMOKE, "--run", "r",
                                *tiny_overrides(tmp_path, competition), longer],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / "runs" / "smoke" / "r" / "fold_0" / "last.ckpt").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "labelcomp: interrupted"
