"""Photos at real sizes (issue 17): decoding at the size the run needs, the on-disk cache, class weights."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import labelcomp.data as data_module
from labelcomp.cli import main
from labelcomp.config import load_config
from labelcomp.data import DiskCache, ImageReader, cache_folders, read_image, short_side
from labelcomp.errors import LabelcompError
from labelcomp.model import class_weights
from tests.conftest import REPO, make_competition, tiny_overrides

PHOTOS = REPO.parent / "shared" / "data" / "clothing_photos"


def _photo(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB picture (as photos are: mostly low frequencies) saved as a JPEG; returns the
    pixels cv2 decodes from the file."""
    generator = np.random.default_rng(seed)
    small = generator.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _decode_flags(monkeypatch) -> list[int]:
    flags = []
    decode = cv2.imdecode
    monkeypatch.setattr(data_module.cv2, "imdecode", lambda data, flag: flags.append(flag) or decode(data, flag))
    return flags


def test_a_large_jpeg_is_decoded_reduced_to_the_short_side_the_run_needs(tmp_path, monkeypatch):
    full = _photo(tmp_path / "large.jpg", 1200, 900)
    flags = _decode_flags(monkeypatch)
    image = read_image(str(tmp_path / "large.jpg"), short_side=200)
    # 900 / 4 = 225 >= 200: libjpeg decodes at a quarter, then INTER_AREA brings the short side to 200
    assert flags == [cv2.IMREAD_REDUCED_COLOR_4]
    assert image.shape == (267, 200, 3) and image.dtype == np.uint8
    # what the config says differs: close to the full decode reduced in one step, not the same pixels
    direct = cv2.resize(full, (200, 267), interpolation=cv2.INTER_AREA)
    assert 0 < np.abs(image.astype(int) - direct).mean() < 2


def test_images_no_larger_than_the_short_side_keep_their_pixels(tmp_path, monkeypatch):
    full = _photo(tmp_path / "small.jpg", 300, 380)
    flags = _decode_flags(monkeypatch)
    np.testing.assert_array_equal(read_image(str(tmp_path / "small.jpg"), short_side=300), full)
    np.testing.assert_array_equal(read_image(str(tmp_path / "small.jpg"), short_side=None), full)
    # 300 / 2 < 200: no reduced decoding, only the resize
    assert read_image(str(tmp_path / "small.jpg"), short_side=200).shape == (200, 253, 3)
    assert flags == [cv2.IMREAD_COLOR] * 3


def test_short_side_auto_follows_the_image_size():
    assert short_side(load_config(None, ["augment.image_size=224"])) == 280
    assert short_side(load_config(None, ["data.short_side=300"])) == 300
    assert short_side(load_config(None, ["data.short_side=null"])) is None
    with pytest.raises(LabelcompError, match="data.short_side"):
        load_config(None, ["data.short_side=big"])


def test_the_cache_is_read_instead_of_decoding_and_keyed_by_content(tmp_path, monkeypatch):
    _photo(tmp_path / "a.jpg", 600, 450)
    cache = DiskCache(tmp_path / "cache" / "150px")
    first = ImageReader(150, cache)(str(tmp_path / "a.jpg"))
    assert cache.usage()[0] == 1
    # another process (a fold job, a resume, another run) reads the entry and decodes nothing
    monkeypatch.setattr(data_module, "read_image", lambda *args: pytest.fail("decoded although cached"))
    np.testing.assert_array_equal(ImageReader(150, DiskCache(cache.folder))(str(tmp_path / "a.jpg")), first)
    # the same bytes under another name: the same entry
    shutil.copy(tmp_path / "a.jpg", tmp_path / "copy.jpg")
    np.testing.assert_array_equal(ImageReader(150, DiskCache(cache.folder))(str(tmp_path / "copy.jpg")), first)
    monkeypatch.undo()
    # a file edited in place is a new entry, not the old pixels
    changed = _photo(tmp_path / "a.jpg", 600, 450, seed=1)
    again = ImageReader(150, DiskCache(cache.folder))(str(tmp_path / "a.jpg"))
    assert cache.usage()[0] == 2
    np.testing.assert_array_equal(again, read_image(str(tmp_path / "a.jpg"), 150))
    assert again.shape == (200, 150, 3) and changed.shape == (600, 450, 3)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_rgb"])
def test_a_damaged_cache_entry_is_rebuilt_not_trusted(tmp_path, damage):
    _photo(tmp_path / "a.jpg", 600, 450)
    cache = DiskCache(tmp_path / "cache")
    expected = ImageReader(150, cache)(str(tmp_path / "a.jpg"))
    entry = cache.entry(cache.digest(str(tmp_path / "a.jpg")))
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:-1000])
    elif damage == "garbage":
        entry.write_bytes(b"\x00" * 500)
    else:
        np.save(entry, np.zeros((10, 10), np.float32))
    np.testing.assert_array_equal(ImageReader(150, DiskCache(cache.folder))(str(tmp_path / "a.jpg")), expected)
    np.testing.assert_array_equal(np.load(entry), expected)  # and written anew


def _fill(folder: str, paths: list[str]) -> None:
    reader = ImageReader(100, DiskCache(folder))
    for path in paths:
        reader(path)


def test_parallel_writers_leave_whole_entries_only(tmp_path):
    paths = [str(tmp_path / f"{index}.jpg") for index in range(12)]
    for index, path in enumerate(paths):
        _photo(Path(path), 400, 300, seed=index)
    folder = tmp_path / "cache"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_fill, args=(str(folder), paths[::step])) for step in (1, 1, 2, 3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert sorted(path.name for path in folder.rglob("*") if path.is_file() and not path.name.endswith(".npy")) == []
    cache = DiskCache(folder)
    assert cache.usage()[0] == 12
    for path in paths:
        np.testing.assert_array_equal(cache.load(cache.digest(path)), read_image(path, 100))


def test_an_unwritable_cache_costs_speed_not_the_run(tmp_path, caplog):
    _photo(tmp_path / "a.jpg", 600, 450)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    reader = ImageReader(150, DiskCache(tmp_path / "cache" / "150px"))
    assert reader(str(tmp_path / "a.jpg")).shape == (200, 150, 3)
    assert reader(str(tmp_path / "a.jpg")).shape == (200, 150, 3)
    warnings = [record for record in caplog.records if "cannot write" in record.getMessage()]
    assert len(warnings) == 1


def _photo_competition(root: Path) -> Path:
    """The tiny competition with its 32 px PNG images as 240x320 JPEG photos."""
    competition = make_competition(root, classes=3, train_per_class=8, test_images=4)
    for path in [*competition.glob("train_images/*"), *competition.glob("test_images/*")]:
        image = cv2.resize(cv2.imread(str(path)), (240, 320), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(path.with_suffix(".jpg")), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        path.unlink()
    for table in ("train.csv", "test.csv", "sample_submission.csv"):
        path = competition / table
        path.write_text(path.read_text().replace(".png", ".jpg"))
    return competition


@pytest.mark.slow
def test_a_photo_run_decodes_each_photo_once_and_later_runs_none(tmp_path, monkeypatch, capsys):
    competition = _photo_competition(tmp_path / "photos")
    overrides = [*tiny_overrides(tmp_path, competition), "cv.folds=2", "loss.class_weights=balanced"]
    decoded = []
    read = data_module.read_image
    monkeypatch.setattr(data_module, "read_image", lambda path, *size: decoded.append(path) or read(path, *size))
    assert main(["train", "--config", str(REPO / "configs" / "smoke.yaml"), *overrides]) == 0
    # the survey decoded every photo once at 40 px (1.25 x 32); folds, OOF and TTA read the cache
    assert sorted(decoded) == sorted(str(path) for path in competition.glob("*_images/*"))
    cache = cache_folders(tmp_path / "runs" / ".image_cache")
    assert [folder.folder.name for folder in cache] == ["40px"] and cache[0].usage()[0] == 28
    run = next((tmp_path / "runs" / "smoke").iterdir())
    scores = json.loads((run / "scores.json").read_text())
    assert 0 <= scores["oof_macro_f1"]["plain"] <= 1 and "OOF macro F1" in capsys.readouterr().out
    decoded.clear()
    assert main(["train", "--config", str(REPO / "configs" / "smoke.yaml"), *overrides]) == 0
    assert main(["submit", "--config", str(REPO / "configs" / "smoke.yaml"), *overrides]) == 0
    assert decoded == []

    capsys.readouterr()
    assert main(["cache", "--config", str(REPO / "configs" / "smoke.yaml"), *overrides]) == 0
    assert "40px: 28 images" in capsys.readouterr().out
    assert main(["cache", "--config", str(REPO / "configs" / "smoke.yaml"), *overrides, "--clear"]) == 0
    assert "cleared" in capsys.readouterr().out and not (tmp_path / "runs" / ".image_cache").exists()


def test_a_corrupt_photo_among_many_is_one_line_before_anything_is_written(tmp_path, capsys):
    competition = _photo_competition(tmp_path / "photos")
    victim = sorted(competition.glob("train_images/*"))[5]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    code = main(["train", "--config", str(REPO / "configs" / "smoke.yaml"), *tiny_overrides(tmp_path, competition)])
    error = capsys.readouterr().err
    assert code == 2 and victim.name in error and "truncated JPEG" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "smoke").exists()


def test_class_weights_follow_the_training_labels():
    targets = np.array([0] * 6 + [1] * 2 + [2] * 4)
    assert class_weights("none", targets, 4) is None
    balanced = class_weights("balanced", targets, 4)
    # n / (classes present x n_c); a class without training images keeps 1
    np.testing.assert_allclose(balanced, [12 / 18, 12 / 6, 12 / 12, 1.0])
    np.testing.assert_allclose(class_weights("sqrt", targets, 4), np.sqrt(balanced))


def test_class_weights_reach_the_training_loss_only(tmp_path, tiny_competition):
    from labelcomp.competition import Competition
    from labelcomp.resolve import resolve_config
    from labelcomp.train import build_module

    config = load_config(REPO / "configs" / "smoke.yaml", [*tiny_overrides(tmp_path, tiny_competition),
                                                           "loss.class_weights=balanced"])
    competition = Competition.load(config.competition)
    train = competition.read_train()
    resolved = resolve_config(config, competition.num_classes)
    skewed = train.drop(train.index[train["target"] == 0][:6])  # class 0 keeps 4 of its 10 images
    module = build_module(resolved, competition, train=skewed)
    weights = module.train_loss.weight
    assert weights.argmax() == 0 and torch.allclose(weights[1:], weights[1])
    assert module.val_loss.weight is None
    with pytest.raises(LabelcompError, match="mixup"):
        load_config(None, ["loss.class_weights=sqrt", "mixup.mixup_alpha=0.2"])


@pytest.mark.slow
@pytest.mark.skipif(not PHOTOS.is_dir(), reason="needs ../shared/data/clothing_photos")
def test_real_photos_are_reduced_and_cached_at_the_run_size(tmp_path):
    paths = [str(PHOTOS / path) for path in pd.read_csv(PHOTOS / "train.csv")["image"].head(40)]
    reader = ImageReader(200, DiskCache(tmp_path / "200px"))
    images = [reader(path) for path in paths]
    assert all(min(image.shape[:2]) == 200 and image.shape[2] == 3 for image in images)
    entries, size = reader.cache.usage()
    assert entries == len({DiskCache(tmp_path).digest(path) for path in paths})
    # a 400x533 photo's entry holds its 200x267 RGB pixels (and a .npy header)
    assert size / entries < 200 * 300 * 3 + 1024
    fresh = ImageReader(200, DiskCache(tmp_path / "200px"))
    assert all(np.array_equal(fresh(path), image) for path, image in zip(paths, images))
    assert os.listdir(tmp_path) == ["200px"]
