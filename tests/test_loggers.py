"""Lightning loggers from the config (`trainer.loggers`)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from labelcomp.cli import main
from labelcomp.config import load_config
from labelcomp.errors import LabelcompError
from tests.conftest import REPO, tiny_overrides

SMOKE = str(REPO / "configs" / "smoke.yaml")


def test_the_default_is_the_csv_logger_and_names_are_checked():
    assert [str(name) for name in load_config(None).trainer.loggers] == ["csv"]
    with pytest.raises(LabelcompError, match="csv, tensorboard, mlflow, wandb"):
        load_config(None, ["trainer.loggers=[neptune]"])


@pytest.mark.parametrize("name", ["mlflow", "wandb", "tensorboard"])
def test_a_logger_without_its_package_is_one_line_before_anything_is_written(tmp_path, tiny_competition, monkeypatch,
                                                                             capsys, name):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *args: None if module == name
                        else find_spec(module, *args))
    code = main(["train", "--config", SMOKE, *tiny_overrides(tmp_path, tiny_competition), f"trainer.loggers=[csv,{name}]"])
    error = capsys.readouterr().err
    assert code == 2 and f"pip install 'labelcomp[{name}]'" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "smoke").exists()


@pytest.mark.slow
def test_tensorboard_gets_each_folds_curves_the_config_and_the_run_scores(tmp_path, tiny_competition):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [*tiny_overrides(tmp_path, tiny_competition), "trainer.loggers=[csv,tensorboard]"]
    assert main(["train", "--config", SMOKE, *overrides]) == 0
    (run,) = (tmp_path / "runs" / "smoke").iterdir()
    assert (run / "fold_0" / "logs" / "metrics.csv").is_file()  # csv as before
    for fold in (0, 1):
        events = EventAccumulator(str(run / "tensorboard" / f"fold_{fold}")).Reload()
        assert {"train/loss_epoch", "val/accuracy", "val/loss"} <= set(events.Tags()["scalars"])
        hyperparameters = yaml.safe_load((run / "tensorboard" / f"fold_{fold}" / "hparams.yaml").read_text())
        assert hyperparameters["augment"]["image_size"] == 32 and hyperparameters["experiment"] == "smoke"
    scores = EventAccumulator(str(run / "tensorboard" / "run")).Reload()
    expected = json.loads((run / "scores.json").read_text())
    assert scores.Scalars("run/oof")[0].value == pytest.approx(expected["oof_score"])
    assert scores.Scalars("run/cv_mean")[0].value == pytest.approx(expected["cv_mean"])
