"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

import subprocess
import sys

import pandas as pd
import pytest

from labelcomp.cli import main
from conftest import REPO, tiny_overrides

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _break_label(competition):
    train = pd.read_csv(competition / "train.csv")
    train.loc[0, "label"] = "dragons"
    train.to_csv(competition / "train.csv", index=False)


def _remove_image(competition):
    (competition / "train_images" / pd.read_csv(competition / "train.csv")["image_id"][0]).unlink()


CASES = {
    "missing competition file": (lambda c: (c / "competition.yaml").unlink(), [], "competition.yaml: competition file not found"),
    "missing train csv": (lambda c: (c / "train.csv").unlink(), [], "train.csv: file not found"),
    "unknown label": (_break_label, [], "train.csv: line 2, column 'label': label 'dragons'"),
    "missing image": (_remove_image, [], "1 image(s) not found"),
    "unknown config key": (None, ["model.nme=resnet18"], "unknown config key 'model.nme'"),
    "missing weights file": (None, ["model.pretrained=nowhere.pth"], "weights file 'nowhere.pth' not found"),
    "weights of another architecture": (None, ["model.name=resnet18"], "holds mobilenetv2_035 weights"),
    "unknown model": (None, ["model.name=resnet9000", "model.pretrained=false"], "'resnet9000' is not a timm model"),
    "unknown augmentation": (None, ["augment.train=[{name: Sparkle}]"], "'Sparkle' is not an Albumentations transform"),
    "normalize in the transform list": (None, ["augment.train=[{name: Normalize}]"], "remove Normalize; labelcomp"),
    "unknown tta": (None, ["tta=spin"], "'tta.policy': Invalid value 'spin', expected one of [auto, none"),
    "unknown tta in the scored list": (None, ["tta.policies=[hflip,spin]"], "'tta.policies[1]': Invalid value 'spin'"),
    "unknown tta merge": (None, ["tta.merge=median"], "'tta.merge': Invalid value 'median', expected one of [mean, geometric]"),
    "bad tta scales": (None, ["tta.scales=[1.0,-2]"], "'tta.scales': [1.0, -2.0]; expected positive"),
    "bad tta crop": (None, ["tta.crop=1.5"], "'tta.crop': 1.5; expected a fraction"),
    "unknown fold weights": (None, ["ensemble.fold_weights=best"], "'ensemble.fold_weights': Invalid value 'best', expected one of [equal, score]"),
    "more folds than images in a class": (None, ["cv.folds=11"], "fewer images than cv.folds=11"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_rejects_bad_input_with_one_line_and_writes_nothing(case, tmp_path, tiny_competition, capsys):
    breaks, extra, expected = CASES[case]
    if breaks:
        breaks(tiny_competition)
    assert main(["train", "--config", SMOKE, *tiny_overrides(tmp_path, tiny_competition), *extra]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("labelcomp: error: ") and stderr.count("\n") == 1
    assert expected in stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "submissions").exists()


def test_missing_config_value_is_named(capsys):
    assert main(["train"]) == 2  # no --config: the defaults have no competition
    assert "config key 'competition' has no value" in capsys.readouterr().err


def test_submit_without_a_finished_run_says_what_to_do(tmp_path, tiny_competition, capsys):
    assert main(["submit", "--config", SMOKE, *tiny_overrides(tmp_path, tiny_competition)]) == 2
    assert "no finished run of experiment 'smoke'; train one first" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "labelcomp.cli", "train", "--config", SMOKE, "competition=" + str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"labelcomp: error: {tmp_path}/competition.yaml: competition file not found; "
        "`competition` must be a folder holding competition.yaml (`labelcomp init FOLDER` writes one)"
    ]


@pytest.mark.slow
def test_bad_image_is_one_stderr_line_from_the_real_process(tmp_path, tiny_competition):
    """In a real process the logging handlers and OpenCV's own messages would show."""
    image = tiny_competition / "train_images" / pd.read_csv(tiny_competition / "train.csv")["image_id"][3]
    image.write_bytes(b"<html>not an image</html>")
    result = subprocess.run(
        [sys.executable, "-m", "labelcomp.cli", "train", "--config", SMOKE, *tiny_overrides(tmp_path, tiny_competition)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"labelcomp: error: 1 unreadable training image(s): {image}: cannot be decoded as an image; replace or remove it"
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "submit", "probe", "bench", "report", "lr-find"])
def test_config_errors_answer_before_the_heavy_libraries_load(command):
    # torch and Lightning take seconds to import; a wrong path must not wait for them
    script = ("import sys; from labelcomp.cli import main; "
              f"code = main([{command!r}, '--config', 'nowhere.yaml']); "
              "sys.exit(code if not {'torch', 'lightning', 'timm'} & set(sys.modules) else 99)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "nowhere.yaml: config file not found" in result.stderr
