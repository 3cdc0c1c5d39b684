"""End to end on a tiny real competition: train -> submit -> compare through the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from labelcomp import train as train_module
from labelcomp.cli import main
from labelcomp.data import ImageDataModule
from conftest import REPO, make_competition, tiny_overrides

SMOKE = str(REPO / "configs" / "smoke.yaml")


class RecordingDataModule(ImageDataModule):
    """Records which ids each fold trained and validated on."""

    seen: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if kwargs.get("train") is not None:
            RecordingDataModule.seen.append((set(kwargs["train"]["id"]), set(kwargs["val"]["id"])))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pipeline")
    competition = make_competition(tmp_path / "tiny")
    overrides = tiny_overrides(tmp_path, competition)
    RecordingDataModule.seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "ImageDataModule", RecordingDataModule)
        assert main(["train", "--config", SMOKE, *overrides]) == 0
    (run_dir,) = (tmp_path / "runs" / "smoke").iterdir()
    return {"tmp": tmp_path, "competition": competition, "overrides": overrides, "run": run_dir,
            "seen": list(RecordingDataModule.seen)}


def _read(path):
    return pd.read_csv(path, dtype={"id": str, "image_id": str})


def test_run_folder_follows_the_contract(trained):
    run = trained["run"]
    for name in ("config.yaml", "folds.csv", "oof.csv", "oof_tta.csv", "scores.json"):
        assert (run / name).is_file(), name
    for fold in (0, 1):
        for name in ("best.ckpt", "oof.csv", "oof_views.npz", "usage.json", "logs/metrics.csv"):
            assert (run / f"fold_{fold}" / name).is_file(), (fold, name)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    # normalisation and timm arguments from the weights card are resolved into the run's config
    assert resolved["augment"]["mean"] == [0.5, 0.5, 0.5]
    assert resolved["model"]["kwargs"] == {"pad_type": "same", "bn_eps": 0.001}
    assert not list(run.rglob("*.tmp"))


def test_oof_predictions_come_only_from_models_that_never_saw_the_image(trained):
    run = trained["run"]
    folds = _read(run / "folds.csv")
    oof = _read(run / "oof.csv")
    labels = yaml.safe_load((trained["competition"] / "competition.yaml").read_text())["labels"]
    assert list(oof.columns) == ["id", "fold", "label", *labels]
    assert oof["id"].tolist() == folds["id"].tolist() and oof["fold"].tolist() == folds["fold"].tolist()
    assert np.allclose(oof[labels].sum(axis=1), 1.0, atol=1e-4)
    assert len(trained["seen"]) == 2
    for fold, (train_ids, val_ids) in enumerate(trained["seen"]):
        assert not train_ids & val_ids
        assert val_ids == set(folds.loc[folds["fold"] == fold, "id"])
        assert set(_read(run / f"fold_{fold}" / "oof.csv")["id"]) == val_ids


def test_scores_are_computed_from_the_oof_files(trained):
    run = trained["run"]
    scores = json.loads((run / "scores.json").read_text())
    labels = yaml.safe_load((trained["competition"] / "competition.yaml").read_text())["labels"]
    for name, key in (("oof.csv", "oof_score"), ("oof_tta.csv", "oof_tta_score")):
        oof = _read(run / name)
        accuracy = (oof[labels].to_numpy().argmax(1) == oof["label"].map(labels.index)).mean()
        assert scores[key] == pytest.approx(accuracy)
    fold_scores = [row["score"] for row in scores["folds"]]
    assert scores["cv_mean"] == pytest.approx(np.mean(fold_scores))
    assert scores["cv_std"] == pytest.approx(np.std(fold_scores, ddof=1))
    assert {"torch", "timm", "lightning", "albumentations"} <= set(scores["versions"])
    # each fold's time and peak memory (this process's resident memory: a model's worth, not zero)
    for fold in scores["folds"]:
        assert fold["seconds"] > 0 and 0.1 < fold["peak_memory_gb"] < 16


def test_submit_writes_the_sample_format_and_records_it(trained, capsys):
    tmp, competition, overrides = trained["tmp"], trained["competition"], trained["overrides"]
    assert main(["submit", "--config", SMOKE, *overrides]) == 0
    run_id = trained["run"].name
    submission_path = tmp / "submissions" / f"{run_id}.csv"
    assert f"submission written: {submission_path}" in capsys.readouterr().out
    sample_text = (competition / "sample_submission.csv").read_text()
    written_text = submission_path.read_text()
    assert written_text.splitlines()[0] == sample_text.splitlines()[0]
    sample, written = _read(competition / "sample_submission.csv"), _read(submission_path)
    assert written["image_id"].tolist() == sample["image_id"].tolist()
    labels = yaml.safe_load((competition / "competition.yaml").read_text())["labels"]
    assert written["label"].isin(labels).all()
    proba = _read(tmp / "submissions" / f"{run_id}.test_proba.csv")
    assert proba["id"].tolist() == sample["image_id"].tolist()
    assert (np.array(labels)[proba[labels].to_numpy().argmax(1)] == written["label"]).all()
    history = pd.read_csv(tmp / "submissions" / "score_history.csv")
    assert len(history) == 1 and history.loc[0, "submission"] == f"{run_id}.csv"

    assert main(["compare", *overrides]) == 0
    table = capsys.readouterr().out
    assert run_id in table and f"{run_id}.csv" in table and "fold_1" in table


def test_history_row_has_the_contract_columns(trained):
    history = pd.read_csv(trained["tmp"] / "submissions" / "score_history.csv")
    assert list(history.columns) == [
        "run_id", "created_at", "competition", "competition_id", "experiment", "backbone", "metric", "n_folds",
        "fold_0", "fold_1",
        "cv_mean", "cv_std", "oof_score", "oof_tta_score", "submission", "lb_score", "parent_run", "pseudo_threshold",
        "pseudo_images", "notes",
    ]
    scores = json.loads((trained["run"] / "scores.json").read_text())
    row = history.iloc[0]
    assert row["run_id"] == trained["run"].name and row["backbone"] == "mobilenetv2_035"
    assert row["fold_1"] == pytest.approx(scores["folds"][1]["score"])
    assert row["competition"] == "tiny" and row["competition_id"] == scores["competition"]["competition_id"]


def test_predict_gives_the_submissions_probabilities_and_lists_unreadable_files(trained, tmp_path, capsys):
    tmp, competition, overrides = trained["tmp"], trained["competition"], trained["overrides"]
    assert main(["submit", "--config", SMOKE, *overrides]) == 0
    run_id = trained["run"].name
    expected = _read(tmp / "submissions" / f"{run_id}.test_proba.csv").set_index("id")
    folder = tmp_path / "new_images"
    shutil.copytree(competition / "test_images", folder)
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "predictions.csv"
    capsys.readouterr()
    assert main(["predict", run_id, str(folder), "--config", SMOKE, *overrides, "--out", str(out)]) == 0
    streams = capsys.readouterr()
    assert f"predictions written: {out}" in streams.out
    assert "left out" in streams.err and "broken.png" in streams.err
    predicted = pd.read_csv(out, dtype={"id": str})
    labels = list(expected.columns)
    assert list(predicted.columns) == ["id", "label", *labels] and len(predicted) == len(expected)
    names = predicted["id"].map(lambda path: Path(path).name)
    # the same fold ensemble and TTA policy as the submission: the same probabilities
    np.testing.assert_allclose(predicted[labels].to_numpy(), expected.loc[names, labels].to_numpy(), atol=1e-6)
    assert (predicted["label"] == predicted[labels].idxmax(axis=1)).all()
    assert main(["predict", run_id, str(tmp_path / "missing"), "--config", SMOKE, *overrides]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_folds_and_scores(trained):
    assert main(["train", "--config", SMOKE, *trained["overrides"]]) == 0
    first, second = sorted((trained["tmp"] / "runs" / "smoke").iterdir())
    assert (first / "folds.csv").read_text() == (second / "folds.csv").read_text()
    scores = [json.loads((run / "scores.json").read_text()) for run in (first, second)]
    assert [row["score"] for row in scores[0]["folds"]] == [row["score"] for row in scores[1]["folds"]]
    assert [row["loss"] for row in scores[0]["folds"]] == [row["loss"] for row in scores[1]["folds"]]


@pytest.mark.slow
def test_smoke_config_trains_the_full_demo_from_the_command_line(tmp_path):
    """`make train CONFIG=configs/smoke.yaml` as a reviewer runs it, with outputs redirected; the speed
    cache already knows the config (the speed tests measure; here it would cost a minute of bf16 steps)."""
    from labelcomp.config import load_config
    from labelcomp.hardware import device_of, speed_key

    overrides = [f"paths.runs={tmp_path / 'runs'}", f"paths.submissions={tmp_path / 'submissions'}"]
    key = speed_key(load_config(SMOKE, overrides), device_of("auto"))
    rows = [{"precision": "32-true", "channels_last": layout, "images_per_s": 100.0 + layout} for layout in (0, 1)]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / ".speed.json").write_text(json.dumps({key: rows}))
    result = subprocess.run(
        [sys.executable, "-m", "labelcomp.cli", "train", "--config", SMOKE, *overrides, "trainer.progress_bar=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CV accuracy:" in result.stdout and "OOF accuracy by TTA policy" in result.stdout
    scores = json.loads(next((tmp_path / "runs" / "smoke").glob("*/scores.json")).read_text())
    assert len(scores["folds"]) == 2 and sum(row["n"] for row in scores["folds"]) == 2000
    # 20 classes: chance is 0.05; even one short epoch per stage on 32 px images learns something
    assert scores["oof_score"] > 0.08


@pytest.mark.slow
def test_another_backbone_trains_through_overrides(tmp_path):
    """The README's example: another competition, another timm backbone, random init."""
    competition = make_competition(tmp_path / "other", classes=3, train_per_class=6, test_images=4)
    overrides = [*tiny_overrides(tmp_path, competition), "model.name=resnet18", "model.pretrained=false"]
    assert main(["train", "--config", SMOKE, *overrides]) == 0
    run = next((tmp_path / "runs" / "smoke").iterdir())
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == "resnet18"
    assert len(_read(run / "oof.csv")) == 18
    assert main(["submit", "--config", SMOKE, *overrides]) == 0
    assert (tmp_path / "submissions" / f"{run.name}.csv").is_file()


def test_probe_scores_frozen_features_and_submits_like_a_run(tmp_path, capsys):
    competition = make_competition(tmp_path / "tiny")
    overrides = tiny_overrides(tmp_path, competition)
    assert main(["probe", "--config", SMOKE, *overrides]) == 0
    assert "CV accuracy:" in capsys.readouterr().out
    (run,) = (tmp_path / "runs" / "smoke-probe").iterdir()
    scores = json.loads((run / "scores.json").read_text())
    oof = _read(run / "oof.csv")
    labels = yaml.safe_load((competition / "competition.yaml").read_text())["labels"]
    assert len(oof) == 40 and np.allclose(oof[labels].sum(axis=1), 1.0, atol=1e-4)
    accuracy = (oof[labels].to_numpy().argmax(1) == oof["label"].map(labels.index)).mean()
    assert scores["oof_score"] == pytest.approx(accuracy)
    history = pd.read_csv(tmp_path / "submissions" / "score_history.csv")
    assert history.loc[0, "experiment"] == "smoke-probe" and history.loc[0, "submission"] == f"{run.name}.csv"
    submission = _read(tmp_path / "submissions" / f"{run.name}.csv")
    assert submission["image_id"].tolist() == _read(competition / "sample_submission.csv")["image_id"].tolist()
    assert submission["label"].isin(labels).all()


@pytest.mark.slow
def test_lr_find_saves_its_plot_and_prints_a_suggestion(tmp_path, capsys):
    competition = make_competition(tmp_path / "tiny")
    overrides = tiny_overrides(tmp_path, competition)
    assert main(["lr-find", "--config", SMOKE, "--stage", "1", *overrides]) == 0
    printed = capsys.readouterr().out
    (run,) = (tmp_path / "runs" / "smoke-lr-find").iterdir()
    plot = run / "lr_find_stage1.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = json.loads((run / "lr_find.json").read_text())
    assert found["stage"] == 1 and len(found["results"]["lr"]) > 10
    assert f"plot: {plot}" in printed and (found["suggestion"] is None or f"{found['suggestion']:.2e}" in printed)
    assert main(["lr-find", "--config", SMOKE, "--stage", "5", *overrides]) == 2
    assert "--stage 5: the config has stages 0 to 1" in capsys.readouterr().err


# runs the exported script with torch, timm, Albumentations, Lightning and labelcomp unimportable
_WITHOUT_LABELCOMP = """
import runpy, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "albumentations", "lightning", "labelcomp"):
            raise ImportError(name + " is not available to an exported script")
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_export_predicts_offline_as_labelcomp_does(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import cv2
    import zipfile

    folder = tmp_path / "images"
    shutil.copytree(trained["competition"] / "test_images", folder)
    # photos larger than the run's short side: decoded reduced by libjpeg, then reduced and resized by OpenCV
    for number, image in enumerate(sorted((trained["competition"] / "train_images").iterdir())[:3]):
        photo = cv2.resize(cv2.imread(str(image)), (300 + 50 * number, 400), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"photo_{number}.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a photo")
    run_id, overrides = trained["run"].name, trained["overrides"]
    expected_csv = tmp_path / "expected.csv"
    assert main(["predict", run_id, str(folder), "--config", SMOKE, *overrides, "--out", str(expected_csv)]) == 0
    capsys.readouterr()
    assert main(["export", run_id, "--config", SMOKE, *overrides, "--out", str(tmp_path / "export"), "--zip"]) == 0
    archive = tmp_path / "export.zip"
    assert f"export written: {archive}" in capsys.readouterr().out
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))
    unpacked = tmp_path / "notebook"
    with zipfile.ZipFile(archive) as opened:
        assert sorted(opened.namelist()) == ["fold_0.onnx", "fold_1.onnx", "labelcomp_export.json", "predict.py"]
        opened.extractall(unpacked)
    spec = json.loads((unpacked / "labelcomp_export.json").read_text())
    scores = json.loads((trained["run"] / "scores.json").read_text())
    assert spec["views"] and spec["tta_policy"] == scores["tta"]["policy"] and spec["short_side"] == 40
    assert [model["weight"] for model in spec["models"]] == pytest.approx([0.5, 0.5])

    got_csv = tmp_path / "got.csv"
    done = subprocess.run([sys.executable, "-c", _WITHOUT_LABELCOMP, str(unpacked / "predict.py"), str(folder),
                           "--out", str(got_csv)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "broken.jpg" in done.stderr and f"predictions written: {got_csv}" in done.stdout
    expected, got = pd.read_csv(expected_csv, dtype=str), pd.read_csv(got_csv, dtype=str)
    labels = spec["labels"]
    assert list(got.columns) == ["id", "label", *labels] and got["id"].tolist() == expected["id"].tolist()
    assert len(got) == len(list(folder.iterdir())) - 1
    assert got["label"].tolist() == expected["label"].tolist()
    difference = np.abs(got[labels].astype(float).to_numpy() - expected[labels].astype(float).to_numpy())
    assert difference.max() <= 1e-4


@pytest.mark.slow
def test_report_explains_a_run_with_plots(trained, capsys):
    run = trained["run"]
    assert main(["report", "--config", SMOKE, "--run", run.name, *trained["overrides"]]) == 0
    report = (run / "report.md").read_text()
    assert f"report written: {run / 'report.html'} (one page, images inside) and {run / 'report.md'}" in capsys.readouterr().out
    for section in ("## Score progression", "## Config changes from the defaults", "## Folds", "## Confusion matrix",
                    "## Per-class scores", "## Most confident mistakes", "## Grad-CAM"):
        assert section in report
    assert "`cv.folds`: 5 → 2" in report and "CV accuracy:" in report and run.name in report
    for picture in ("score_history.png", "confusion_matrix.png", "mistakes.png", "best.png", "grad_cam.png"):
        assert f"]({picture})" in report
        assert (run / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (run / "report.html").read_text()
    # self-contained: every image is inside the page, nothing is fetched
    assert page.count('<img src="data:image/png;base64,') == 5 and "http" not in page
    assert "<code>cv.folds</code>: 5 → 2" in page and "recall (accuracy)" in page


def _headless_chromium():
    """Debian's chromium driven through chromedriver (apt-get install chromium chromium-driver), or a skip."""
    pytest.importorskip("selenium")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # no sandbox as root in containers; no background connections, which a closed network refuses
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.mark.slow
def test_report_page_renders_in_a_browser_with_every_image(trained, tmp_path):
    run = trained["run"]
    if not (run / "report.html").is_file():
        assert main(["report", "--config", SMOKE, "--run", run.name, *trained["overrides"]]) == 0
    browser = _headless_chromium()
    try:
        browser.get((run / "report.html").as_uri())
        images = browser.execute_script(
            "return [...document.images].map(image => [image.alt, image.complete, image.naturalWidth])")
        headings = browser.execute_script("return [...document.querySelectorAll('h2')].map(h => h.textContent)")
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        browser.set_window_size(1280, browser.execute_script("return document.body.scrollHeight") + 50)
        screenshot = tmp_path / "report.png"
        assert browser.save_screenshot(str(screenshot))
    finally:
        browser.quit()
    assert errors == []
    assert [alt for alt, complete, width in images if complete and width > 0] == [
        "score history", "confusion matrix", "most confident mistakes", "most confident correct predictions",
        "Grad-CAM"]
    assert headings[:3] == ["Score progression", "Folds", "Per-class scores (OOF with TTA)"]
    from PIL import Image
    assert Image.open(screenshot).size[1] > 2000  # the whole page, images laid out


def test_every_listed_tta_policy_is_scored_on_oof_and_auto_takes_the_best(trained):
    run = trained["run"]
    scores = json.loads((run / "scores.json").read_text())
    labels = yaml.safe_load((trained["competition"] / "competition.yaml").read_text())["labels"]
    folds = _read(run / "folds.csv")
    # the fold files' raw outputs, joined in the run's order, merged here by hand (mean of softmax)
    outputs, ids = [], []
    for fold in (0, 1):
        with np.load(run / f"fold_{fold}" / "oof_views.npz") as archive:
            views = archive["views"].tolist()
            outputs.append(archive["outputs"])
            ids += archive["ids"].tolist()
    order = [ids.index(image_id) for image_id in folds["id"]]
    outputs = np.concatenate(outputs, axis=1)[:, order]
    probabilities = np.exp(outputs) / np.exp(outputs).sum(-1, keepdims=True)
    target = _read(run / "oof.csv")["label"].map(labels.index).to_numpy()
    tta = yaml.safe_load((run / "config.yaml").read_text())["tta"]
    by_hand = {}
    for policy in tta["policies"]:
        names = {"none": ["identity"], "hflip": ["identity", "hflip"],
                 "flips": ["identity", "hflip", "vflip", "rot180"]}.get(policy)
        if names is None:
            continue
        by_hand[policy] = (probabilities[[views.index(name) for name in names]].mean(0).argmax(1) == target).mean()
    assert set(scores["tta"]["oof_scores"]) == set(tta["policies"])
    for policy, score in by_hand.items():
        assert scores["tta"]["oof_scores"][policy] == pytest.approx(score)
    best = max(scores["tta"]["oof_scores"].values())
    assert scores["tta"]["chosen_by"] == "oof" and scores["tta"]["oof_scores"][scores["tta"]["policy"]] == best
    assert scores["oof_tta_score"] == pytest.approx(best)
    # the identity view is the prediction without TTA
    np.testing.assert_allclose(_read(run / "oof.csv")[labels].to_numpy(), probabilities[0], atol=1e-6)


def _forget_kept_test_proba(run: Path) -> None:
    """The fold folders' kept test probabilities would answer instead of the fold models."""
    for kept in run.glob("fold_*/test_proba.npz"):
        kept.unlink()


def test_submit_predicts_with_the_policy_the_run_chose_and_the_fold_weights(trained, monkeypatch):
    from labelcomp import predict as predict_module

    # fold k's views all say p_k, so the submission's first column gives the fold weights back
    fold_proba = [np.array([0.7, 0.1, 0.1, 0.1]), np.array([0.1, 0.7, 0.1, 0.1])]
    calls = []

    def recording(network, frame, config, views, images):
        calls.append(views)
        return np.broadcast_to(np.log(fold_proba[(len(calls) - 1) % 2]), (len(views), len(frame), 4)).copy()

    monkeypatch.setattr(predict_module, "predict_views", recording)
    _forget_kept_test_proba(trained["run"])
    scores = json.loads((trained["run"] / "scores.json").read_text())
    fold_scores = np.array([fold["score"] for fold in scores["folds"]])
    submitted = trained["tmp"] / "submissions" / f"{trained['run'].name}.test_proba.csv"
    try:
        weights = []
        for overrides in ([], ["tta=hflip", "ensemble.fold_weights=score"]):
            assert main(["submit", "--config", SMOKE, *trained["overrides"], "--run", trained["run"].name,
                         *overrides]) == 0
            first_class = _read(submitted).iloc[:, 1].to_numpy()
            weights.append((first_class - 0.1) / 0.6)  # 0.7 w0 + 0.1 (1 - w0)
    finally:
        _forget_kept_test_proba(trained["run"])  # they hold the fakes
    assert len(calls) == 4  # two folds, twice
    assert len(calls[0]) == {"none": 1, "hflip": 2, "flips": 4, "d4": 8, "multiscale": 3, "fivecrop": 5}[
        scores["tta"]["policy"]]
    np.testing.assert_allclose(weights[0], 0.5, atol=1e-6)
    assert calls[2] == ["identity", "hflip"]
    np.testing.assert_allclose(weights[1], fold_scores[0] / fold_scores.sum(), atol=1e-6)


def test_each_folds_test_probabilities_are_kept_for_the_next_submission_while_they_match(trained, monkeypatch):
    from labelcomp import predict as predict_module

    predicted = []
    real = predict_module.predict_views

    def counting(network, frame, config, views, images):
        predicted.append(views)
        return real(network, frame, config, views, images)

    monkeypatch.setattr(predict_module, "predict_views", counting)
    run = trained["run"]
    overrides = [*trained["overrides"], "--run", run.name]  # other tests train more runs of the experiment
    submission = trained["tmp"] / "submissions" / f"{run.name}.csv"
    _forget_kept_test_proba(run)
    assert main(["submit", "--config", SMOKE, *overrides]) == 0
    first = submission.read_bytes()
    kept = [run / f"fold_{fold}" / "test_proba.npz" for fold in range(2)]
    test_ids = _read(trained["competition"] / "test.csv")["image_id"].tolist()
    for path in kept:
        with np.load(path) as archive:
            assert archive["ids"].tolist() == test_ids and archive["views"].tolist() == predicted[0]
    assert len(predicted) == 2

    # the run's own config again: read back, the same submission to the byte
    assert main(["submit", "--config", SMOKE, *overrides]) == 0
    assert len(predicted) == 2 and submission.read_bytes() == first

    # an override may change the prediction: the fold models predict, and what is kept stays the run's own
    before = [path.read_bytes() for path in kept]
    assert main(["submit", "--config", SMOKE, *overrides, "augment.image_size=48"]) == 0
    assert len(predicted) == 4 and [path.read_bytes() for path in kept] == before

    # a damaged copy of fold 0's, then a changed checkpoint of fold 1: that fold predicts again, the
    # other is read back
    kept[0].write_bytes(before[0][: len(before[0]) // 2])
    assert main(["submit", "--config", SMOKE, *overrides]) == 0
    assert len(predicted) == 5 and submission.read_bytes() == first and kept[0].read_bytes() == before[0]
    checkpoint = run / "fold_1" / "best.ckpt"
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert main(["submit", "--config", SMOKE, *overrides]) == 0
    assert len(predicted) == 6 and submission.read_bytes() == first
