"""Pseudo-labels from a finished run: chosen per fold on OOF evidence, never in a validation fold."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from labelcomp import predict as predict_module
from labelcomp import train as train_module
from labelcomp.cli import main
from labelcomp.config import load_config
from labelcomp.data import ImageDataModule, ImageDataset, ImageReader
from labelcomp.errors import LabelcompError
from labelcomp.predict import load_classifier, predict_views
from labelcomp.pseudo import confidence_threshold
from labelcomp.tta import merge_views, policy_views
from conftest import REPO, make_competition, tiny_overrides

SMOKE = str(REPO / "configs" / "smoke.yaml")


def test_threshold_is_the_lowest_confidence_whose_predictions_reach_the_precision():
    generator = np.random.default_rng(0)
    proba = generator.dirichlet(np.ones(4) * 0.3, size=400)
    # the more confident, the more often right: a calibrated-looking model
    right = generator.random(400) < proba.max(axis=1)
    target = np.where(right, proba.argmax(axis=1), (proba.argmax(axis=1) + 1) % 4)
    confidence = proba.max(axis=1)
    for precision in (0.8, 0.9, 0.95):
        threshold = confidence_threshold(proba, target, precision)
        # brute force over every candidate threshold
        reaching = [value for value in np.unique(confidence)
                    if right[confidence >= value].mean() >= precision]
        assert threshold == pytest.approx(min(reaching))
    assert confidence_threshold(proba, (proba.argmax(axis=1) + 1) % 4, 0.5) is None
    assert confidence_threshold(proba, proba.argmax(axis=1), 0.99) == pytest.approx(confidence.min())


def test_soft_targets_reach_the_loss_as_probabilities():
    frame = pd.DataFrame({"path": ["a", "b"], "target": [1, 0],
                          "soft_target": [np.array([0, 1, 0], np.float32), np.array([0.7, 0.2, 0.1], np.float32)]})
    dataset = ImageDataset(frame, lambda image: {"image": image}, lambda path: np.zeros((2, 2, 3), np.uint8))
    assert dataset[1][1].tolist() == pytest.approx([0.7, 0.2, 0.1])
    hard = ImageDataset(frame.drop(columns="soft_target"), lambda image: {"image": image},
                        lambda path: np.zeros((2, 2, 3), np.uint8))
    assert hard[0][1] == 1 and isinstance(hard[0][1], int)


def test_soft_pseudo_labels_and_mixup_are_refused_at_load():
    with pytest.raises(LabelcompError, match="pseudo.targets=soft and mixup"):
        load_config(None, ["pseudo.from_run=parent", "pseudo.targets=soft", "mixup.mixup_alpha=0.2"])
    with pytest.raises(LabelcompError, match="pseudo.precision"):
        load_config(None, ["pseudo.precision=1.5"])


class RecordingDataModule(ImageDataModule):
    """Records each fold's training and validation frames."""

    seen: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if kwargs.get("train") is not None:
            RecordingDataModule.seen.append((kwargs["train"].copy(), kwargs["val"].copy()))


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pseudo")
    competition = make_competition(tmp_path / "tiny", test_images=16)
    overrides = tiny_overrides(tmp_path, competition) + ["tta.policy=hflip"]
    assert main(["train", "--config", SMOKE, *overrides]) == 0
    (run_dir,) = (tmp_path / "runs" / "smoke").iterdir()
    return {"tmp": tmp_path, "competition": competition, "overrides": overrides, "run": run_dir}


def _train_child(parent, *extra):
    RecordingDataModule.seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "ImageDataModule", RecordingDataModule)
        code = main(["train", "--config", SMOKE, *parent["overrides"], *extra])
    return code, list(RecordingDataModule.seen)


@pytest.mark.slow
def test_each_fold_trains_on_the_test_images_its_parent_fold_labelled_and_validates_on_its_own(parent, capsys):
    code, seen = _train_child(parent, f"pseudo.from_run={parent['run'].name}", "pseudo.threshold=0.3",
                              "experiment=pseudo")
    assert code == 0
    (child,) = (parent["tmp"] / "runs" / "pseudo").iterdir()
    config = load_config(parent["run"] / "config.yaml")
    test = pd.read_csv(parent["competition"] / "test.csv", dtype=str)["image_id"].tolist()
    paths = [str(parent["competition"] / "test_images" / name) for name in test]
    folds = pd.read_csv(parent["run"] / "folds.csv", dtype={"id": str})
    labels = yaml.safe_load((parent["competition"] / "competition.yaml").read_text())["labels"]
    added_total = 0
    for fold, (train_rows, val_rows) in enumerate(seen):
        # the validation fold is the parent's, with no test image in it
        assert set(val_rows["id"]) == set(folds.loc[folds["fold"] == fold, "id"])
        assert not set(val_rows["id"]) & set(test)
        # the added rows are exactly the test images the parent's fold model labels at >= 0.3, with its labels
        views = policy_views("hflip", config.tta)
        outputs = predict_views(load_classifier(parent["run"] / f"fold_{fold}" / "best.ckpt"),
                                pd.DataFrame({"id": test, "path": paths}), config, views, ImageReader())
        proba = merge_views(outputs, "mean")
        expected = {name: labels[index] for name, index, top in zip(test, proba.argmax(1), proba.max(1)) if top >= 0.3}
        added = train_rows[train_rows["id"].isin(test)]
        assert dict(zip(added["id"], added["label"])) == expected
        assert set(train_rows["id"]) - set(test) == set(folds.loc[folds["fold"] != fold, "id"])
        added_total += len(added)
    assert added_total > 0
    scores = json.loads((child / "scores.json").read_text())
    record = scores["pseudo"]
    assert record["parent"] == parent["run"].name and record["threshold"] == 0.3
    assert sum(record["images_per_fold"]) == added_total and record["test_images"] == 16
    assert yaml.safe_load((child / "config.yaml").read_text())["pseudo"]["threshold"] == 0.3
    # OOF stays the training table's images, in its order
    assert pd.read_csv(child / "oof.csv", dtype={"id": str})["id"].tolist() == folds["id"].tolist()
    history = pd.read_csv(parent["tmp"] / "submissions" / "score_history.csv", dtype=str).set_index("run_id")
    assert history.loc[child.name, "parent_run"] == parent["run"].name
    assert float(history.loc[child.name, "pseudo_threshold"]) == 0.3
    assert "pseudo-labels from run" in capsys.readouterr().out

    # a second round: the pseudo run as parent, soft targets, the threshold from the OOF precision
    code, seen = _train_child(parent, f"pseudo.from_run={child.name}", "pseudo.targets=soft",
                              "pseudo.precision=0.3", "experiment=round2")
    assert code == 0
    (second,) = (parent["tmp"] / "runs" / "round2").iterdir()
    record = json.loads((second / "scores.json").read_text())["pseudo"]
    assert record["parent"] == child.name and record["precision_target"] == 0.3
    assert record["oof_precision"] >= 0.3
    for train_rows, _ in seen:
        soft = np.stack(train_rows["soft_target"].to_numpy())
        assert np.allclose(soft.sum(axis=1), 1, atol=1e-5)
        labelled = ~train_rows["id"].isin(test).to_numpy()
        assert (soft[labelled].max(axis=1) == 1).all()  # the labelled images keep one-hot targets


@pytest.mark.slow
def test_the_ensemble_labeler_gives_every_fold_the_test_images_the_parents_submission_is_confident_of(parent,
                                                                                                     monkeypatch):
    for kept in parent["run"].glob("fold_*/test_proba.npz"):  # an earlier round's, not the submission's
        kept.unlink()
    assert main(["submit", "--config", SMOKE, *parent["overrides"], "--run", parent["run"].name]) == 0
    predicted_again = []
    monkeypatch.setattr(predict_module, "predict_views", lambda *args: predicted_again.append(args))
    submission = pd.read_csv(parent["tmp"] / "submissions" / f"{parent['run'].name}.test_proba.csv", dtype={"id": str})
    labels = list(submission.columns[1:])
    proba = submission[labels].to_numpy()
    expected = {name: labels[index] for name, index, top in zip(submission["id"], proba.argmax(1), proba.max(1))
                if top >= 0.3}
    assert expected  # the check below compares something
    code, seen = _train_child(parent, f"pseudo.from_run={parent['run'].name}", "pseudo.threshold=0.3",
                              "pseudo.labeler=ensemble", "experiment=ensemble")
    assert code == 0
    folds = pd.read_csv(parent["run"] / "folds.csv", dtype={"id": str})
    for fold, (train_rows, val_rows) in enumerate(seen):
        added = train_rows[train_rows["id"].isin(submission["id"])]
        assert dict(zip(added["id"], added["label"])) == expected
        assert set(val_rows["id"]) == set(folds.loc[folds["fold"] == fold, "id"])
    (child,) = (parent["tmp"] / "runs" / "ensemble").iterdir()
    record = json.loads((child / "scores.json").read_text())["pseudo"]
    assert record["labeler"] == "ensemble" and record["images_per_fold"] == [len(expected)] * len(seen)
    assert not predicted_again  # the labels came from the fold probabilities the submission kept


@pytest.mark.slow
def test_a_parent_with_other_folds_is_one_clear_line_and_writes_nothing(parent, capsys):
    capsys.readouterr()
    code, _ = _train_child(parent, f"pseudo.from_run={parent['run'].name}", "cv.folds=3", "experiment=other")
    assert code == 2
    assert "split the training images into other folds" in capsys.readouterr().err
    assert not (parent["tmp"] / "runs" / "other").exists()


@pytest.mark.slow
def test_init_from_parent_starts_each_fold_from_the_parents_model_of_that_fold(parent, capsys):
    # a head stage at an lr too small to move anything: each fold predicts as the parent's fold did
    code, _ = _train_child(parent, f"pseudo.from_run={parent['run'].name}", "pseudo.threshold=0.9",
                           "pseudo.init=parent", "finetune.stages=[{epochs: 1, train: head, lr: 1e-12}]",
                           "experiment=continued")
    assert code == 0
    (child,) = (parent["tmp"] / "runs" / "continued").iterdir()
    for fold in (0, 1):
        before = pd.read_csv(parent["run"] / f"fold_{fold}" / "oof.csv", dtype={"id": str})
        after = pd.read_csv(child / f"fold_{fold}" / "oof.csv", dtype={"id": str})
        labels = list(before.columns[3:])
        np.testing.assert_allclose(after[labels].to_numpy(), before[labels].to_numpy(), atol=1e-4)
    code, _ = _train_child(parent, f"pseudo.from_run={parent['run'].name}", "pseudo.threshold=0.9",
                           "pseudo.init=parent", "model.name=resnet18", "model.pretrained=false",
                           "experiment=otherbackbone")
    assert code == 2 and "pseudo.init=parent: run" in capsys.readouterr().err
