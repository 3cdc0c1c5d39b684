"""Malformed competitions: each gives one error line naming the file and the row or column, exit
code 2, and leaves no run folder and no submission behind."""

import re

import pandas as pd
import pytest
import yaml

from labelcomp.cli import main
from conftest import REPO, make_competition, tiny_overrides

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _train(c):
    return pd.read_csv(c / "train.csv", dtype=str, keep_default_na=False)


def _save(c, table, name="train.csv", **args):
    table.to_csv(c / name, index=False, **args)


def _set_label(row, value):
    def apply(c):
        table = _train(c)
        table.loc[row, "label"] = value
        _save(c, table)
    return apply


def _image(c, row=0, folder="train_images", table="train.csv"):
    return c / folder / pd.read_csv(c / table)["image_id"][row]


def _spec(c, **changes):
    spec = yaml.safe_load((c / "competition.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        spec[section][key] = value
    (c / "competition.yaml").write_text(yaml.safe_dump(spec))


def _truncate_to_half_a_jpeg(c):
    import cv2

    path = _image(c, 4)
    data = cv2.imencode(".jpg", cv2.imread(str(path)))[1].tobytes()
    path.write_bytes(data[: len(data) // 2])


def _duplicate_id(c):
    table = _train(c)
    table.loc[6, "image_id"] = table.loc[1, "image_id"]
    _save(c, table)


def _drop_sample_row(c):
    sample = pd.read_csv(c / "sample_submission.csv")
    sample.drop(index=2).to_csv(c / "sample_submission.csv", index=False)


def _drop_test_row(c):
    test = pd.read_csv(c / "test.csv")
    test.drop(index=3).to_csv(c / "test.csv", index=False)


def _small_class(c):
    table = _train(c)
    first = table["label"].iloc[0]
    keep = ~table["label"].eq(first) | (table.groupby("label").cumcount() < 1)
    _save(c, table[keep])


# case: (how to break the tiny competition, extra overrides, file named, expected message)
CASES = {
    "missing images": (lambda c: [_image(c, row).unlink() for row in (0, 11, 12)], [],
                       "train.csv", r"3 image\(s\) not found in .*train_images/: \["),
    "empty image": (lambda c: _image(c, 2).write_bytes(b""), [], "train_images/", "empty image file"),
    "truncated image": (_truncate_to_half_a_jpeg, [], "train_images/", "truncated JPEG"),
    "undecodable image": (lambda c: _image(c, 3).write_bytes(b"<html>not an image</html>"), [],
                          "train_images/", "cannot be decoded as an image"),
    "unreadable test image": (lambda c: _image(c, 1, "test_images", "test.csv").write_bytes(b"GIF89a..."), [],
                              "test_images/", "1 unreadable test image"),
    "label not in the list": (_set_label(3, "dragons"), [], "train.csv", "line 5, column 'label': label 'dragons'"),
    "blank label": (_set_label(4, "  "), [], "train.csv", "line 6, column 'label': blank label"),
    "NaN label": (lambda c: _save(c, _train(c).assign(label=lambda t: t["label"].where(t.index != 7))), [],
                  "train.csv", "line 9, column 'label': blank label"),
    "duplicate ids": (_duplicate_id, [], "train.csv", "line 8: id .* appears more than once"),
    "class smaller than the folds": (_small_class, [], "train.csv", r"classes \{'.*': 1\} have fewer images than cv.folds=2"),
    "test id missing from the sample": (_drop_sample_row, [], "test.csv", "1 only in the test table"),
    "sample id missing from the test table": (_drop_test_row, [], "test.csv", "1 only in the sample submission"),
    "label column missing": (lambda c: _save(c, _train(c).rename(columns={"label": "class"})), [],
                             "train.csv", "column 'label' not found; columns are \\['image_id', 'class'\\]"),
    "wrong separator": (lambda c: _save(c, _train(c), sep="\t"), [], "train.csv",
                        "one column only with separator ',', but the header holds tabs"),
    "empty csv": (lambda c: (c / "train.csv").write_bytes(b""), [], "train.csv", "the file is empty"),
    "header-only csv": (lambda c: (c / "train.csv").write_text("image_id,label\n"), [], "train.csv",
                        "has a header but no rows"),
    "missing test image": (lambda c: _image(c, 0, "test_images", "test.csv").unlink(), [], "test.csv",
                           r"1 image\(s\) not found in .*test_images/"),
    "group column missing": (lambda c: _spec(c, train__group_column="site"), [], "train.csv", "column 'site' not found"),
    "label id out of range": (lambda c: (_spec(c, train__label_format="index"), _save(c, _train(c).assign(
        label=lambda t: (t.index % 4).astype(str)).replace({"label": {"3": "7"}})))[-1], [], "train.csv",
        "column 'label': label '7' is not in the competition's label ids"),
    "missing competition.yaml": (lambda c: (c / "competition.yaml").unlink(), [], "competition.yaml",
                                 "competition file not found"),
    "unknown key in competition.yaml": (lambda c: _spec(c, train__image_folder="x"), [], "competition.yaml",
                                        "unknown key 'train.image_folder'; known keys here: csv, sep"),
    "unknown metric": (lambda c: (c / "competition.yaml").write_text(
        (c / "competition.yaml").read_text().replace("metric: accuracy", "metric: auc")), [], "competition.yaml",
        r"key 'metric': Invalid value 'auc', expected one of \[accuracy, macro_f1, logloss\]"),
    "unknown label format": (lambda c: _spec(c, submission__label_format="ids"), [], "competition.yaml",
                             r"key 'submission.label_format': Invalid value 'ids', expected one of \[name, index\]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_malformed_competition(case, tmp_path, capfd):
    competition = make_competition(tmp_path / "download")
    breaks, extra, named_file, expected = CASES[case]
    breaks(competition)
    assert main(["train", "--config", SMOKE, *tiny_overrides(tmp_path, competition), *extra]) == 2
    error = capfd.readouterr().err  # file-descriptor level: libraries' own stderr lines count too
    assert error.startswith("labelcomp: error: ") and error.count("\n") == 1, error
    assert named_file in error and re.search(expected, error), error
    assert not (tmp_path / "runs").exists() and not (tmp_path / "submissions").exists()


def test_check_reports_every_problem_and_the_duplicates(tmp_path, capsys):
    competition = make_competition(tmp_path / "download")
    train = _train(competition)
    (competition / "train_images" / train["image_id"][5]).write_bytes(_image(competition, 0).read_bytes())
    _image(competition, 0, "test_images", "test.csv").write_bytes(_image(competition, 1).read_bytes())
    _image(competition, 9).write_bytes(b"")
    _drop_sample_row(competition)
    assert main(["check", str(competition)]) == 2
    report = capsys.readouterr().out
    assert "images per class: " in report and "colour modes RGB" in report
    assert "duplicates within train: 1 sets of identical images" in report
    assert "2 problem(s):" in report and "empty image file" in report and "1 only in the test table" in report


def test_check_counts_train_test_duplicates(tmp_path, capsys):
    competition = make_competition(tmp_path / "download")
    _image(competition, 0, "test_images", "test.csv").write_bytes(_image(competition, 1).read_bytes())
    assert main(["check", str(competition)]) == 0
    assert "duplicates between train and test: 1 test images also in train" in capsys.readouterr().out


@pytest.mark.slow
def test_submit_refuses_a_sample_changed_after_training(tmp_path, capsys):
    competition = make_competition(tmp_path / "download", classes=2, train_per_class=4, test_images=4)
    overrides = tiny_overrides(tmp_path, competition)
    assert main(["train", "--config", SMOKE, *overrides]) == 0
    history = (tmp_path / "submissions" / "score_history.csv").read_text()
    _drop_sample_row(competition)
    capsys.readouterr()
    assert main(["submit", "--config", SMOKE, *overrides]) == 2
    assert "1 only in the test table" in capsys.readouterr().err
    assert not list((tmp_path / "submissions").glob("smoke-*.csv"))
    assert (tmp_path / "submissions" / "score_history.csv").read_text() == history
