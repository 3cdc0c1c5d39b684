import pandas as pd
import pytest
import numpy as np

from labelcomp.competition import Competition
from labelcomp.errors import LabelcompError
from conftest import DEMO


def test_demo_competition_reads_as_a_real_20_class_task():
    competition = Competition.load(DEMO)
    train = competition.read_train()
    assert competition.num_classes == 20 and len(train) == 2000
    assert train["label"].value_counts().eq(100).all()
    assert (train["target"] == train["label"].map(competition.labels.index)).all()
    test = competition.read_test()
    assert len(test) == 400 and list(test["id"]) == list(pd.read_csv(DEMO / "sample_submission.csv")["image_id"])


def test_missing_competition_file(tmp_path):
    with pytest.raises(LabelcompError, match="competition.yaml: competition file not found"):
        Competition.load(tmp_path)


def test_unknown_label_names_file_row_and_column(tiny_competition):
    train = pd.read_csv(tiny_competition / "train.csv")
    train.loc[3, "label"] = "dragons"
    train.to_csv(tiny_competition / "train.csv", index=False)
    with pytest.raises(LabelcompError, match=r"train.csv: line 5, column 'label': label 'dragons' is not in"):
        Competition.load(tiny_competition).read_train()


def test_missing_images_are_listed_with_their_count(tiny_competition):
    train = pd.read_csv(tiny_competition / "train.csv")
    for image_id in train["image_id"][:2]:
        (tiny_competition / "train_images" / image_id).unlink()
    with pytest.raises(LabelcompError, match=r"2 image\(s\) not found") as error:
        Competition.load(tiny_competition).read_train()
    assert train["image_id"][0] in str(error.value) and train["image_id"][1] in str(error.value)


def test_missing_label_column_is_named(tiny_competition):
    pd.read_csv(tiny_competition / "train.csv").rename(columns={"label": "class"}).to_csv(
        tiny_competition / "train.csv", index=False
    )
    with pytest.raises(LabelcompError, match="column 'label' not found"):
        Competition.load(tiny_competition).read_train()


def test_duplicate_ids_are_named(tiny_competition):
    train = pd.read_csv(tiny_competition / "train.csv")
    train.loc[5, "image_id"] = train.loc[1, "image_id"]
    train.to_csv(tiny_competition / "train.csv", index=False)
    with pytest.raises(LabelcompError, match=r"line 7: id .* appears more than once"):
        Competition.load(tiny_competition).read_train()


def test_test_ids_must_match_the_sample_submission(tiny_competition):
    sample = pd.read_csv(tiny_competition / "sample_submission.csv")
    sample.drop(index=0).to_csv(tiny_competition / "sample_submission.csv", index=False)
    with pytest.raises(LabelcompError, match="list different ids"):
        Competition.load(tiny_competition).read_test()


@pytest.mark.parametrize("label_format", ["name", "index"])
def test_submission_keeps_the_sample_format(tiny_competition, tmp_path, label_format):
    spec = (tiny_competition / "competition.yaml").read_text()
    (tiny_competition / "competition.yaml").write_text(spec.replace("label_column: label\n  sample", f"label_column: label\n  label_format: {label_format}\n  sample"))
    competition = Competition.load(tiny_competition)
    test = competition.read_test()
    proba = np.eye(competition.num_classes)[np.arange(len(test)) % competition.num_classes]
    path = tmp_path / "submission.csv"
    competition.write_submission(test["id"], proba, path)
    written = pd.read_csv(path, dtype=str)
    sample = pd.read_csv(tiny_competition / "sample_submission.csv", dtype=str)
    assert list(written.columns) == list(sample.columns)
    assert list(written["image_id"]) == list(sample["image_id"])
    expected = np.arange(len(test)) % competition.num_classes
    if label_format == "name":
        assert list(written["label"]) == [competition.labels[i] for i in expected]
    else:
        assert list(written["label"]) == [str(i) for i in expected]


def test_submission_in_another_order_is_refused_and_not_written(tiny_competition, tmp_path):
    competition = Competition.load(tiny_competition)
    test = competition.read_test()
    path = tmp_path / "submission.csv"
    with pytest.raises(LabelcompError, match="ids or their order differ"):
        competition.write_submission(test["id"][::-1], np.ones((len(test), competition.num_classes)), path)
    assert not path.exists()
