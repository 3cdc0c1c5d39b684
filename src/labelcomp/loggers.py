"""Lightning's experiment loggers by name (`trainer.loggers`): every fold's curves and the run's config as
hyperparameters, and the run's CV and OOF scores once it is scored.

`csv` (the default) writes `fold_<k>/logs/metrics.csv`; `tensorboard` writes `<run>/tensorboard/`;
`mlflow` logs to `MLFLOW_TRACKING_URI`, or else a local file store `<paths.runs>/mlruns`; `wandb`
logs offline into the run folder unless `WANDB_MODE=online` or a `WANDB_API_KEY` says otherwise. The
last three need their package: `pip install 'labelcomp[tensorboard]'` (or mlflow, wandb).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from labelcomp.errors import LabelcompError
from labelcomp.runs import RunDir

# the module each optional logger imports (tensorboardX would also do for TensorBoard)
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_loggers(config: DictConfig) -> None:
    """A logger whose package is missing stops the run before anything is written."""
    for name in map(str, config.trainer.loggers):
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise LabelcompError(f"trainer.loggers: {name} needs the '{package}' package, which is not installed: "
                                 f"pip install 'labelcomp[{name}]', or leave {name} out of trainer.loggers")


def _mlflow_uri(config: DictConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(config.paths.runs).resolve() / "mlruns").as_uri()


def _build(name: str, config: DictConfig, run_dir: RunDir, version: str) -> Logger:
    """One logger for `version`: a fold (`fold_<k>`) or the run as a whole (`run`)."""
    if name == "csv":  # fold_<k>/logs/metrics.csv
        return CSVLogger(run_dir.root / version, name="logs", version="")
    if name == "tensorboard":
        return TensorBoardLogger(run_dir.root / "tensorboard", name="", version=version, default_hp_metric=False)
    if name == "mlflow":
        return MLFlowLogger(experiment_name=config.experiment, run_name=f"{run_dir.run_id}/{version}",
                            tracking_uri=_mlflow_uri(config), tags={"labelcomp_run": run_dir.run_id})
    offline = os.environ.get("WANDB_MODE") != "online" and not os.environ.get("WANDB_API_KEY")
    return WandbLogger(project=config.experiment, name=f"{run_dir.run_id}/{version}", group=run_dir.run_id,
                       save_dir=str(run_dir.root), offline=offline)


def _hyperparameters(config: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(config, resolve=True, enum_to_str=True)


def fold_loggers(config: DictConfig, run_dir: RunDir, fold: int) -> list[Logger]:
    """The fold's loggers, in `trainer.loggers` order, with the run's config as hyperparameters."""
    loggers = [_build(str(name), config, run_dir, f"fold_{fold}") for name in config.trainer.loggers]
    for logger in loggers:
        logger.log_hyperparams(_hyperparameters(config))
    return loggers


def log_run_scores(config: DictConfig, run_dir: RunDir, scores: dict[str, Any]) -> None:
    """The run's CV and OOF scores, in every logger but csv (scores.json holds them)."""
    metrics = {"cv_mean": scores["cv_mean"], "cv_std": scores["cv_std"], "oof": scores["oof_score"],
               "oof_tta": scores["oof_tta_score"], "oof_loss": scores["oof_loss"]}
    if "oof_macro_f1" in scores:
        metrics.update({"oof_macro_f1": scores["oof_macro_f1"]["plain"], "oof_tta_macro_f1": scores["oof_macro_f1"]["tta"]})
    for name in map(str, config.trainer.loggers):
        if name == "csv":
            continue
        logger = _build(name, config, run_dir, "run")
        logger.log_hyperparams(_hyperparameters(config))
        logger.log_metrics({f"run/{key}": value for key, value in metrics.items()})
        logger.finalize("success")
