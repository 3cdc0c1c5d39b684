"""Runs that survive interruption and fan out: SIGKILL mid-fold then resume; fold jobs in parallel."""

import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from labelcomp.cli import main
from conftest import REPO, make_competition, tiny_overrides

SMOKE = str(REPO / "configs" / "smoke.yaml")
LONGER = "finetune.stages=[{epochs: 2, train: head, lr: 0.01}, {epochs: 3, train: all, lr: 0.001}]"


def _train_process(*arguments):
    return subprocess.Popen([sys.executable, "-m", "labelcomp.cli", "train", "--config", SMOKE, *arguments],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_run_killed_during_its_second_fold_resumes_to_completion(tmp_path):
    overrides = [*tiny_overrides(tmp_path, make_competition(tmp_path / "tiny")), "cv.folds=3", LONGER]
    run = tmp_path / "runs" / "smoke" / "killed"
    process = _train_process("--run", "killed", *overrides)
    deadline = time.monotonic() + 240
    while not (run / "fold_1" / "last.ckpt").exists():  # fold 1 has finished an epoch
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run / "fold_0" / "oof.csv").exists() and not (run / "fold_1" / "oof.csv").exists()

    assert main(["train", "--config", SMOKE, "--resume", "killed", *overrides]) == 0
    for fold in range(3):
        assert (run / f"fold_{fold}" / "oof.csv").exists() and (run / f"fold_{fold}" / "best.ckpt").exists()
        assert not (run / f"fold_{fold}" / "last.ckpt").exists()
    assert len(pd.read_csv(run / "oof.csv")) == 40 and (run / "scores.json").exists()
    history = pd.read_csv(tmp_path / "submissions" / "score_history.csv")
    assert history["run_id"].tolist() == ["killed"]
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


@pytest.mark.slow
def test_fold_jobs_in_parallel_processes_fill_one_run(tmp_path):
    overrides = tiny_overrides(tmp_path, make_competition(tmp_path / "tiny"))
    jobs = [_train_process("--run", "fanned", "--folds", str(fold), *overrides) for fold in (0, 1)]
    assert [job.wait(timeout=300) for job in jobs] == [0, 0]
    run = tmp_path / "runs" / "smoke" / "fanned"
    assert (run / "scores.json").exists() and len(pd.read_csv(run / "oof.csv")) == 40
    history = pd.read_csv(tmp_path / "submissions" / "score_history.csv")
    assert history["run_id"].tolist() == ["fanned"] and history.loc[0, "n_folds"] == 2
    assert list((tmp_path / "runs" / "smoke").iterdir()) == [run]


@pytest.mark.slow
def test_a_fold_job_with_other_folds_is_refused(tmp_path, capsys):
    competition = make_competition(tmp_path / "tiny")
    assert main(["train", "--config", SMOKE, "--run", "r", "--folds", "0", *tiny_overrides(tmp_path, competition)]) == 0
    assert "scores come when every fold is" in capsys.readouterr().out
    assert main(["train", "--config", SMOKE, "--run", "r", "--folds", "1", "seed=7",
                 *tiny_overrides(tmp_path, competition)]) == 2
    assert "split the data differently" in capsys.readouterr().err


@pytest.mark.slow
def test_a_fold_job_reuses_what_the_run_recorded_instead_of_surveying_and_measuring_again(tmp_path, monkeypatch):
    from labelcomp import speed, train
    from labelcomp.config import load_config
    from labelcomp.speed import Variant

    competition = make_competition(tmp_path / "tiny")
    overrides = [*tiny_overrides(tmp_path, competition), "trainer.precision=auto", "trainer.channels_last=auto"]
    rates = {Variant("32-true", False): [10.0] * 3, Variant("32-true", True): [20.0] * 3,
             Variant("bf16-mixed", False): [5.0] * 3, Variant("bf16-mixed", True): [5.0] * 3}
    monkeypatch.setattr(speed, "measure_variants", lambda *args: rates)
    assert main(["train", "--config", SMOKE, "--run", "r", "--folds", "0", *overrides]) == 0
    run = tmp_path / "runs" / "smoke" / "r"
    recorded = load_config(run / "config.yaml")
    assert (recorded.trainer.precision, recorded.trainer.channels_last) == ("32-true", True)

    # another machine's speed cache is empty: the job takes the run's choice, and the unchanged images
    # are not decoded again
    (tmp_path / "runs" / ".speed.json").unlink()
    monkeypatch.setattr(speed, "measure_variants", lambda *args: pytest.fail("the run recorded the choice"))
    surveyed = []
    check_images = train.check_images
    monkeypatch.setattr(train, "check_images", lambda *args: surveyed.append(1) or check_images(*args))
    assert main(["train", "--config", SMOKE, "--run", "r", "--folds", "1", *overrides]) == 0
    assert surveyed == [] and (run / "scores.json").exists()

    # a changed image file is surveyed again
    image = next((competition / "train_images").iterdir())
    image.write_bytes(image.read_bytes())
    assert main(["train", "--config", SMOKE, "--resume", "r", *tiny_overrides(tmp_path, competition)]) == 0
    assert surveyed == [1]
