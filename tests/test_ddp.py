"""Beyond one process: DDP replicas through an unfreeze, one run from N processes of the real CLI,
SLURM array fold jobs, and settings that cannot run here refused before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from labelcomp.cli import main
from labelcomp.config import load_config
from labelcomp.hardware import speed_key
from conftest import REPO, make_competition, tiny_overrides

SCRIPT = Path(__file__).with_name("ddp_stage_change.py")
SMOKE = str(REPO / "configs" / "smoke.yaml")


@pytest.mark.slow
def test_two_process_ddp_keeps_replicas_identical_through_an_unfreeze(tmp_path):
    """cf. Lightning issue 20340: parameters unfrozen after DDP wrapped the model must still be
    synchronised; here both processes must end with the same weights."""
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    weights = [name for name in ranks[0]["final"] if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(ranks[0]["final"][name], ranks[1]["final"][name]) for name in weights)
    backbone = [name for name in weights if not name.startswith("fc.")]
    assert all(not torch.equal(ranks[0]["initial"][name], ranks[0]["final"][name]) for name in backbone)


@pytest.mark.slow
def test_two_cpu_processes_from_the_command_line_make_one_run(tmp_path):
    competition = make_competition(tmp_path / "tiny")
    overrides = [*tiny_overrides(tmp_path, competition), "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.strategy=ddp", "trainer.precision=auto", "trainer.channels_last=auto"]
    # the machine's speed cache knows this config (measuring it is the speed tests' business): rank 0
    # takes the choice from it and every process trains with what rank 0 recorded
    key = speed_key(load_config(SMOKE, overrides), torch.device("cpu"))
    rows = [{"precision": "32-true", "channels_last": layout, "images_per_s": 100.0 + layout} for layout in (0, 1)]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / ".speed.json").write_text(json.dumps({key: rows}))
    result = subprocess.run([sys.executable, "-m", "labelcomp.cli", "train", "--config", SMOKE, *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs" / "smoke").iterdir())
    assert len(runs) == 1, runs  # one run folder for both processes
    run = runs[0]
    assert result.stdout.count("CV accuracy") == 1  # one process reports
    history = pd.read_csv(tmp_path / "submissions" / "score_history.csv")
    assert history["run_id"].tolist() == [run.name]
    # every training image predicted once, in the order a single process writes: the training table's
    train_ids = pd.read_csv(competition / "train.csv", dtype=str)["image_id"].tolist()
    assert pd.read_csv(run / "oof.csv", dtype={"id": str})["id"].tolist() == train_ids
    scores = json.loads((run / "scores.json").read_text())
    assert [fold["n"] for fold in scores["folds"]] == [20, 20]
    recorded = load_config(run / "config.yaml").trainer
    assert (recorded.precision, recorded.channels_last) == ("32-true", True)
    assert main(["submit", "--config", SMOKE, "--run", run.name, *overrides]) == 0  # auto: the run's choice
    submission = pd.read_csv(tmp_path / "submissions" / f"{run.name}.csv", dtype=str)
    assert submission["image_id"].tolist() == pd.read_csv(competition / "sample_submission.csv", dtype=str)["image_id"].tolist()


SLURM_ARRAY = {"SLURM_ARRAY_JOB_ID": "4242", "SLURM_JOB_NAME": "labelcomp", "SLURM_NTASKS": "1",
               "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


@pytest.mark.slow
def test_slurm_array_tasks_each_train_their_fold_into_the_arrays_run(tmp_path, monkeypatch, capsys):
    overrides = tiny_overrides(tmp_path, make_competition(tmp_path / "tiny"))
    for name, value in SLURM_ARRAY.items():
        monkeypatch.setenv(name, value)
    for task in (1, 0):  # the scheduler runs array tasks in any order
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_JOB_ID", str(4243 + task))
        assert main(["train", "--config", SMOKE, "--folds", "array", *overrides]) == 0
    run = tmp_path / "runs" / "smoke" / "smoke-array4242"
    assert list(run.parent.iterdir()) == [run]
    assert (run / "scores.json").exists() and capsys.readouterr().out.count("CV accuracy") == 1
    history = pd.read_csv(tmp_path / "submissions" / "score_history.csv")
    assert history["run_id"].tolist() == ["smoke-array4242"] and history.loc[0, "n_folds"] == 2


def test_folds_array_outside_an_array_job_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    overrides = tiny_overrides(tmp_path, make_competition(tmp_path / "tiny"))
    assert main(["train", "--config", SMOKE, "--folds", "array", *overrides]) == 2
    assert "SLURM_ARRAY_TASK_ID" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_a_process_started_with_others_must_be_told_the_run(tmp_path, monkeypatch, capsys):
    # rank 1 of a torchrun job whose rendezvous has no id: it cannot know rank 0's run folder
    for name, value in {"TORCHELASTIC_RUN_ID": "none", "RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0",
                        "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    overrides = tiny_overrides(tmp_path, make_competition(tmp_path / "tiny"))
    assert main(["train", "--config", SMOKE, *overrides]) == 2
    assert "--run NAME" in capsys.readouterr().err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("settings, expected", [
    (["trainer.accelerator=gpu"], "No supported gpu backend found"),
    (["trainer.accelerator=cpu", "trainer.strategy=fsdp"], "requires a GPU accelerator"),
    (["trainer.precision=fp8"], "Precision 'fp8' is invalid"),
])
def test_trainer_settings_that_cannot_run_here_stop_before_anything_is_written(tmp_path, capsys, settings, expected):
    overrides = [*tiny_overrides(tmp_path, make_competition(tmp_path / "tiny")), *settings]
    assert main(["train", "--config", SMOKE, *overrides]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "cannot run here" in error and expected in error
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


@pytest.mark.slow
def test_the_documented_sbatch_scripts_train_the_folds_and_submit(tmp_path):
    overrides = tiny_overrides(tmp_path, make_competition(tmp_path / "tiny"))
    environment = {**os.environ, **SLURM_ARRAY}
    for task in (0, 1):  # what SLURM runs for each array task, then the dependent submit job
        task_environment = {**environment, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": str(4243 + task)}
        result = subprocess.run(["bash", "tools/slurm/folds.sbatch", SMOKE, *overrides], cwd=REPO,
                                env=task_environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run(["bash", "tools/slurm/submit.sbatch", SMOKE, "smoke-array4242", *overrides], cwd=REPO,
                            env={**environment, "SLURM_JOB_ID": "4245"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "submissions" / "smoke-array4242.csv").exists()
