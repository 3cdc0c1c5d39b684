"""Kaggle, SIGNATE and folder layouts: init -> check -> train -> submit, and the submission's exact shape;
image decoding that is the same for every file format and colour mode."""

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from labelcomp.cli import main
from labelcomp.data import read_image
from conftest import REPO, tiny_overrides
from layouts import CLASSES, TEST_IMAGES, make_folders, make_kaggle, make_signate

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _train_and_submit(tmp_path, root):
    assert main(["init", str(root)]) == 0
    assert main(["check", str(root)]) == 0
    overrides = tiny_overrides(tmp_path, root)
    assert main(["train", "--config", SMOKE, *overrides]) == 0
    assert main(["submit", "--config", SMOKE, *overrides]) == 0
    (submission,) = (tmp_path / "submissions").glob("smoke-*[0-9].csv")
    return yaml.safe_load((root / "competition.yaml").read_text()), submission.read_bytes()


@pytest.mark.slow
def test_kaggle_layout_round_trip(tmp_path, capsys):
    root = make_kaggle(tmp_path / "download")
    spec, written = _train_and_submit(tmp_path, root)
    assert "ids in 'id', labels in 'category' written as names" in capsys.readouterr().out
    assert spec["train"]["images"] == "train" and spec["submission"]["label_format"] == "index"
    sample = (root / "sample_submission.csv").read_bytes()
    lines, sample_lines = written.decode().split("\n"), sample.decode().split("\n")
    assert lines[0] == sample_lines[0] == "id,category" and len(lines) == len(sample_lines)
    assert [line.split(",")[0] for line in lines] == [line.split(",")[0] for line in sample_lines]
    assert {line.split(",")[1] for line in lines[1:-1]} <= {str(i) for i in range(CLASSES)}
    assert written.endswith(b"\n") and b"\r" not in written


@pytest.mark.slow
def test_signate_layout_round_trip(tmp_path):
    root = make_signate(tmp_path / "download")
    spec, written = _train_and_submit(tmp_path, root)
    assert spec["train"]["label_format"] == "index" and spec["label_ids"] == ["0", "1", "2"]
    assert spec["submission"]["header"] is False and spec["submission"]["sep"] == "\t"
    sample_rows = (root / "sample_submit.tsv").read_bytes().split(b"\r\n")
    rows = written.split(b"\r\n")
    assert len(rows) == len(sample_rows) == TEST_IMAGES + 1 and rows[-1] == b""  # CRLF after every row
    assert b"\n" not in written.replace(b"\r\n", b"")
    assert [row.split(b"\t")[0] for row in rows] == [row.split(b"\t")[0] for row in sample_rows]
    assert all(row.split(b"\t")[1] in {b"0", b"1", b"2"} for row in rows[:-1])


@pytest.mark.slow
def test_folder_layout_round_trip(tmp_path):
    root = make_folders(tmp_path / "download")
    spec, written = _train_and_submit(tmp_path, root)
    assert spec["train"]["csv"] is None and spec["submission"]["sample"] is None
    submission = pd.read_csv(pd.io.common.BytesIO(written), dtype=str)
    assert list(submission.columns) == ["id", "label"]
    assert submission["id"].tolist() == sorted(p.name for p in (root / "test").iterdir())
    assert submission["label"].isin(spec["labels"]).all()
    folds = pd.read_csv(next((tmp_path / "runs" / "smoke").glob("*/folds.csv")))
    assert any("/batch2/" in image_id for image_id in folds["id"])  # nested class folder found


RGB = (np.random.RandomState(0).rand(12, 20, 3) * 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "exif-rotated", "bmp", "webp", "JPG"])
def test_every_mode_decodes_to_rgb_uint8(tmp_path, mode):
    path = tmp_path / "image.png"
    if mode == "L":
        Image.fromarray(RGB[..., 0]).save(path)
        expected = np.repeat(RGB[..., :1], 3, axis=2)
    elif mode == "RGBA":
        Image.fromarray(np.dstack([RGB, np.full(RGB.shape[:2], 100, np.uint8)])).save(path)
        expected = RGB
    elif mode == "P":
        palette_image = Image.fromarray(RGB).convert("P")
        palette_image.save(path)
        expected = np.asarray(palette_image.convert("RGB"))
    elif mode == "I;16":
        deep = RGB[..., 0].astype(np.uint16) * 257
        Image.fromarray(deep).save(path)
        expected = np.repeat(RGB[..., :1], 3, axis=2)
    elif mode == "exif-rotated":
        path = tmp_path / "image.jpg"
        image = Image.fromarray(RGB)
        exif = image.getexif()
        exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
        image.save(path, exif=exif, quality=100, subsampling=0)
        expected = np.rot90(RGB, k=-1)
    else:
        path = tmp_path / f"image.{mode}"
        Image.fromarray(RGB).save(path, format={"bmp": "BMP", "webp": "WEBP", "JPG": "JPEG"}[mode],
                                  **({"lossless": True} if mode == "webp" else {"quality": 100, "subsampling": 0} if mode == "JPG" else {}))
        expected = RGB
    decoded = read_image(str(path))
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    tolerance = 12 if path.suffix.lower() == ".jpg" else 1
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < tolerance


def test_init_recovers_the_demo_spec_and_keeps_an_existing_file(tmp_path, capsys):
    import shutil
    from dataclasses import replace

    from labelcomp.competition import Competition
    from conftest import DEMO

    copy = tmp_path / "demo"
    shutil.copytree(DEMO, copy, ignore=shutil.ignore_patterns("competition.yaml"))
    assert main(["init", str(copy)]) == 0
    guessed, shipped = Competition.load(copy).spec, Competition.load(DEMO).spec
    assert replace(guessed, name="demo") == shipped
    written = (copy / "competition.yaml").read_text()
    assert main(["init", str(copy)]) == 2
    assert "already exists; review it, or pass --force" in capsys.readouterr().err
    assert (copy / "competition.yaml").read_text() == written
    assert main(["init", str(copy), "--force"]) == 0
