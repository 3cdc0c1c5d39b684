"""The k-fold loop: per fold build data, model and callbacks, fit, predict OOF; then scores and history.

`run` is made of `fit_fold`, `predict_oof` and `write_scores`, each usable alone.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import subprocess
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from labelcomp import __version__, history
from labelcomp.augment import build_transforms, check_tta, merge_views, policy_views, scored_views
from labelcomp.competition import Competition
from labelcomp.config import save_config
from labelcomp.data import ImageDataModule
from labelcomp.errors import LabelcompError
from labelcomp.finetune import StagedFinetuning, resolve_stages
from labelcomp.folds import assign_folds, fold_groups
from labelcomp.metrics import METRICS, multiclass_log_loss
from labelcomp.model import ClassifierModule, apply_weights_card, build_model, resolve_normalization
from labelcomp.predict import check_ensemble, load_classifier, predict_views
from labelcomp.runs import RunDir, new_run, write_csv_atomic, write_text_atomic
from labelcomp.speed import device_of, loader_workers, peak_memory_gb, reset_peak_memory, resolve_speed, resolve_workers
from labelcomp.survey import survey

_logger = logging.getLogger(__name__)

# few or no workers is a measured choice on small machines (speed.resolve_workers), not an oversight
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# frozen BatchNorm layers are put in eval mode on purpose (see finetune.py)
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode at the start of training.*")
# a fold folder holds its checkpoint beside its logs folder
warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
# with deterministic algorithms on (trainer.deterministic), torch also fills every new tensor with NaN,
# a debugging aid against reading uninitialized memory that reproducibility does not need; it cost 14%
# of the training steps' time here (mobilenetv2_035 at 96 px on 2 CPU cores: 385 vs 434 images/s)
torch.utils.deterministic.fill_uninitialized_memory = False


class Prepared(NamedTuple):
    competition: Competition
    train: pd.DataFrame
    test: pd.DataFrame
    folds: pd.DataFrame
    cache: dict[str, np.ndarray] | None  # decoded training images, when data.cache_images is on


def prepare(config: DictConfig) -> Prepared:
    """Validate everything a run needs before its folder exists, so bad input leaves nothing behind:
    the config, both splits and every image (decoded once; kept when caching), then the folds."""
    competition = Competition.load(config.competition)
    train = competition.read_train()
    test = competition.read_test()
    cache: dict[str, np.ndarray] | None = {} if config.data.cache_images else None
    train_images = survey(train["path"].tolist(), cache)
    train_images.raise_problems("training")
    survey(test["path"].tolist()).raise_problems("test")
    duplicates = train_images.duplicate_sets()
    if duplicates:
        _logger.info("%d sets of identical training images: each set is kept within one fold", len(duplicates))
    source = str(competition.root / (competition.spec.train.csv or competition.spec.train.images))
    folds = assign_folds(train, config.cv.folds, config.seed, fold_groups(train, duplicates), source)
    resolve_stages(config.finetune)
    check_tta(config.tta)
    check_ensemble(config.ensemble)
    apply_weights_card(config.model)
    build_model(config.model, competition.num_classes)
    _logger.info("backbone %s, pretrained: %s", config.model.name, config.model.pretrained)
    resolve_speed(config, competition.num_classes)
    resolve_workers(config)
    if config.augment.mean is None or config.augment.std is None:
        mean, std = resolve_normalization(config.model)
        config.augment.mean = config.augment.mean or mean
        config.augment.std = config.augment.std or std
    build_transforms(config.augment, train=True)
    build_transforms(config.augment, train=False)
    return Prepared(competition, train, test, folds, cache)


def run(
    config: DictConfig, run_id: str | None = None, only_folds: list[int] | None = None
) -> tuple[RunDir, dict[str, Any] | None]:
    """Train the folds of a run (all, or `only_folds`), skipping finished ones and continuing an
    interrupted one from its last checkpoint. `run_id` names a run to create or join, so that fold
    jobs in separate processes share it. Scores and the history row come when every fold is done;
    until then the returned scores are None."""
    competition, train, _, folds, cache = prepare(config)
    run_dir, folds = open_run(config, folds, run_id)
    _logger.info("run %s in %s", run_dir.run_id, run_dir.root)
    for fold in only_folds if only_folds is not None else range(config.cv.folds):
        if not 0 <= fold < config.cv.folds:
            raise LabelcompError(f"--folds: fold {fold} does not exist; cv.folds is {config.cv.folds}")
        if run_dir.fold_oof(fold).exists():
            _logger.info("fold %d/%d: done before, skipped", fold + 1, config.cv.folds)
            continue
        started = time.perf_counter()
        reset_peak_memory()
        checkpoint = fit_fold(config, competition, train, folds, fold, run_dir, cache)
        predict_oof(config, competition, train, folds, fold, checkpoint, run_dir, cache)
        usage = {"seconds": round(time.perf_counter() - started, 1), "peak_memory_gb": peak_memory_gb()}
        write_text_atomic(run_dir.fold_usage(fold), json.dumps(usage) + "\n")
        _logger.info("fold %d/%d: %.0f s, peak memory %s GB", fold + 1, config.cv.folds, usage["seconds"],
                     usage["peak_memory_gb"])
        run_dir.last_checkpoint(fold).unlink(missing_ok=True)  # only needed to resume the fold
    if not all(run_dir.fold_oof(fold).exists() for fold in range(config.cv.folds)):
        return run_dir, None
    scores = write_scores(run_dir, competition, config)
    history.record_run(history.history_path(config.paths.submissions), run_row(run_dir, config, scores))
    return run_dir, scores


def open_run(config: DictConfig, folds: pd.DataFrame, run_id: str | None) -> tuple[RunDir, pd.DataFrame]:
    """A new run folder, or the named one (created by whichever fold job comes first). A joined run
    keeps its own folds, and must have been split the same way."""
    if run_id is None:
        run_dir = new_run(config.paths.runs, config.experiment)
    else:
        run_dir = RunDir(Path(config.paths.runs) / config.experiment / run_id)
        run_dir.root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_dir.root / ".setup.lock")):
        if run_dir.folds.exists():
            saved = pd.read_csv(run_dir.folds, dtype={"id": str})
            if not (saved["id"].equals(folds["id"]) and saved["fold"].equals(folds["fold"])):
                raise LabelcompError(
                    f"{run_dir.folds}: this run split the data differently; join it with the same config, "
                    "competition and seed"
                )
            return run_dir, saved
        save_config(config, run_dir.config)
        write_csv_atomic(folds, run_dir.folds)
    return run_dir, folds


def fold_data(config: DictConfig, train: pd.DataFrame, val: pd.DataFrame,
              cache: dict[str, np.ndarray] | None) -> ImageDataModule:
    return ImageDataModule(
        batch_size=config.data.batch_size, num_workers=loader_workers(config), mean=config.augment.mean,
        std=config.augment.std, train=train, val=val,
        train_transform=build_transforms(config.augment, train=True, seed=config.seed),
        eval_transform=build_transforms(config.augment, train=False), cache=cache,
        pin_memory=device_of(config.trainer.accelerator).type == "cuda",
        channels_last=bool(config.trainer.channels_last),
    )


def classifier_module(config: DictConfig, competition: Competition, stages: list | None = None) -> ClassifierModule:
    """The LightningModule of the config; `stages` replaces the config's fine-tuning stages."""
    finetune = OmegaConf.to_container(config.finetune, resolve=True)
    return ClassifierModule(
        model=OmegaConf.to_container(config.model, resolve=True),
        optim=OmegaConf.to_container(config.optim, resolve=True),
        finetune={**finetune, "stages": stages or finetune["stages"]}, num_classes=competition.num_classes,
        metric=competition.spec.metric, mixup=OmegaConf.to_container(config.mixup),
        ema=OmegaConf.to_container(config.ema), channels_last=bool(config.trainer.channels_last),
    )


def fit_fold(
    config: DictConfig, competition: Competition, train: pd.DataFrame, folds: pd.DataFrame, fold: int,
    run_dir: RunDir, cache: dict[str, np.ndarray] | None = None,
) -> Path:
    """Train on every fold but `fold`, validate on `fold`; returns the best checkpoint's path."""
    L.seed_everything(config.seed, workers=True)
    held_out = folds["fold"].to_numpy() == fold
    _logger.info("fold %d/%d: %d train / %d validation images", fold + 1, config.cv.folds,
                 (~held_out).sum(), held_out.sum())
    data = fold_data(config, train[~held_out], train[held_out], cache)
    module = classifier_module(config, competition)
    finetune = module.hparams.finetune
    metric = METRICS[competition.spec.metric]
    fold_dir = run_dir.fold_dir(fold)
    best = ModelCheckpoint(
        dirpath=fold_dir, filename=run_dir.checkpoint(fold).stem, monitor=metric.monitor, mode=metric.mode,
        save_top_k=1, save_last=True, auto_insert_metric_name=False, enable_version_counter=False,
    )
    trainer = L.Trainer(
        max_epochs=sum(stage["epochs"] for stage in finetune["stages"]),
        accelerator=config.trainer.accelerator, devices=config.trainer.devices,
        num_nodes=config.trainer.num_nodes, strategy=config.trainer.strategy, precision=config.trainer.precision,
        callbacks=[
            StagedFinetuning(finetune["stages"], finetune["min_lr_ratio"]),
            best,
            EarlyStopping(monitor=metric.monitor, mode=metric.mode, patience=config.trainer.early_stopping_patience),
            LearningRateMonitor(logging_interval="step"),
        ],
        logger=CSVLogger(fold_dir, name="logs", version=""),
        deterministic=config.trainer.deterministic,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10,
        enable_progress_bar=config.trainer.progress_bar,
    )
    resume = run_dir.last_checkpoint(fold)
    if resume.exists():
        _logger.info("fold %d/%d: continuing from %s", fold + 1, config.cv.folds, resume)
    trainer.fit(module, datamodule=data, ckpt_path=resume if resume.exists() else None)
    return Path(best.best_model_path)


def _probability_frame(ids: pd.Series, fold: int, labels: pd.Series, proba: np.ndarray, classes: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"id": ids.to_numpy(), "fold": fold, "label": labels.to_numpy()})
    return pd.concat([frame, pd.DataFrame(proba, columns=classes)], axis=1)


def predict_oof(
    config: DictConfig, competition: Competition, train: pd.DataFrame, folds: pd.DataFrame, fold: int,
    checkpoint: Path, run_dir: RunDir, cache: dict[str, np.ndarray] | None = None,
) -> None:
    """OOF outputs of `fold` from the model that never saw it, for every view the TTA policies need."""
    held_out = train[folds["fold"].to_numpy() == fold]
    views = scored_views(config.tta)
    outputs = predict_views(load_classifier(checkpoint), held_out, config, views, cache)
    write_oof(run_dir, competition, held_out, fold, outputs, views)


def write_oof(
    run_dir: RunDir, competition: Competition, held_out: pd.DataFrame, fold: int, outputs: np.ndarray,
    views: list[str],
) -> None:
    """The fold's raw outputs per view (views, images, classes), from which every TTA policy is scored,
    and its probabilities without TTA; `oof.csv` is written last: its presence marks the fold as done."""
    archive = io.BytesIO()
    np.savez(archive, outputs=outputs.astype(np.float32), views=np.array(views),
             ids=held_out["id"].to_numpy().astype(str))
    write_text_atomic(run_dir.fold_oof_views(fold), archive.getvalue())
    proba = merge_views(outputs[[views.index("identity")]], "mean")
    write_csv_atomic(_probability_frame(held_out["id"], fold, held_out["label"], proba, competition.labels),
                     run_dir.fold_oof(fold))


def _oof_views(run_dir: RunDir, folds: int, order: pd.Series) -> tuple[list[str], np.ndarray]:
    """Every fold's per-view outputs joined into (views, images, classes) in `order` of ids."""
    parts, ids, views = [], [], None
    for fold in range(folds):
        with np.load(run_dir.fold_oof_views(fold)) as archive:
            fold_views = archive["views"].tolist()
            if views is not None and fold_views != views:
                raise LabelcompError(f"{run_dir.fold_oof_views(fold)}: views {fold_views} differ from the other "
                                     f"folds' {views}; predict the folds with the same tta config")
            views = fold_views
            parts.append(archive["outputs"])
            ids.extend(archive["ids"].tolist())
    position = pd.Series(np.arange(len(ids)), index=ids)
    return views, np.concatenate(parts, axis=1)[:, position.loc[order.to_numpy()].to_numpy()]


def choose_tta(config: DictConfig, metric, target: np.ndarray, views: list[str], outputs: np.ndarray,
               ) -> tuple[str, dict[str, float], dict[str, np.ndarray]]:
    """Each listed policy (and the configured one) merged and scored on OOF; the chosen policy is the
    configured one, or with `auto` the best on OOF (the first listed among equals: the cheaper)."""
    tta = config.tta
    policies = list(dict.fromkeys([*tta.policies, *([] if tta.policy == "auto" else [tta.policy])]))
    missing = sorted({view for policy in policies for view in policy_views(policy, tta)} - set(views))
    if missing:
        raise LabelcompError(f"OOF predictions lack the TTA views {missing}; list their policies in tta.policies "
                             "before training, or choose a policy whose views were predicted")
    proba = {policy: merge_views(outputs[[views.index(view) for view in policy_views(policy, tta)]], tta.merge)
             for policy in policies}
    scores = {policy: metric.score(target, proba[policy]) for policy in policies}
    if tta.policy != "auto":
        return tta.policy, scores, proba
    best = max if metric.mode == "max" else min
    return best(policies, key=lambda policy: scores[policy]), scores, proba


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _versions() -> dict[str, str]:
    import albumentations
    import timm
    import torch

    return {"labelcomp": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "lightning": L.__version__, "albumentations": albumentations.__version__}


def _fold_usage(run_dir: RunDir, fold: int) -> dict[str, Any]:
    """Seconds and peak memory of the fold's training and OOF prediction, where recorded."""
    path = run_dir.fold_usage(fold)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_scores(run_dir: RunDir, competition: Competition, config: DictConfig) -> dict[str, Any]:
    """Per-fold and CV scores from the folds' OOF files, every TTA policy's OOF score, and the run's
    merged oof.csv / oof_tta.csv (the latter with the chosen policy)."""
    metric = METRICS[competition.spec.metric]
    index = {label: position for position, label in enumerate(competition.labels)}
    order = pd.read_csv(run_dir.folds, dtype={"id": str})["id"]
    plain = pd.concat([pd.read_csv(run_dir.fold_oof(fold), dtype={"id": str}) for fold in range(config.cv.folds)])
    plain = plain.set_index("id").loc[order].reset_index()
    target = plain["label"].map(index).to_numpy()
    policy, policy_scores, policy_proba = choose_tta(config, metric, target, *_oof_views(run_dir, config.cv.folds, order))
    tta = plain.copy()
    tta[competition.labels] = policy_proba[policy]
    write_csv_atomic(plain, run_dir.oof)
    write_csv_atomic(tta, run_dir.oof_tta)

    def evaluate(frame: pd.DataFrame, score) -> float:
        return score(frame["label"].map(index).to_numpy(), frame[competition.labels].to_numpy())

    fold_rows = [
        {"fold": fold, "n": int((plain["fold"] == fold).sum()), **_fold_usage(run_dir, fold),
         "score": evaluate(plain[plain["fold"] == fold], metric.score),
         "score_tta": evaluate(tta[tta["fold"] == fold], metric.score),
         "loss": evaluate(plain[plain["fold"] == fold], multiclass_log_loss)}
        for fold in range(config.cv.folds)
    ]
    fold_scores = np.array([row["score"] for row in fold_rows])
    scores = {
        "run_id": run_dir.run_id, "metric": metric.name, "folds": fold_rows,
        "cv_mean": float(fold_scores.mean()), "cv_std": float(fold_scores.std(ddof=1)),
        "oof_score": evaluate(plain, metric.score), "oof_tta_score": evaluate(tta, metric.score),
        "tta": {"policy": policy, "chosen_by": "oof" if config.tta.policy == "auto" else "config",
                "merge": config.tta.merge, "oof_scores": policy_scores},
        "oof_loss": evaluate(plain, multiclass_log_loss),
        "finished_at": datetime.now().isoformat(timespec="seconds"),
        "versions": _versions(), "git_commit": _git_commit(),
    }
    write_text_atomic(run_dir.scores, json.dumps(scores, indent=2) + "\n")
    return scores


def run_row(run_dir: RunDir, config: DictConfig, scores: dict[str, Any]) -> dict[str, Any]:
    row = {
        "run_id": run_dir.run_id, "created_at": scores["finished_at"], "experiment": config.experiment,
        "backbone": config.model.name, "metric": scores["metric"], "n_folds": len(scores["folds"]),
        "cv_mean": scores["cv_mean"], "cv_std": scores["cv_std"],
        "oof_score": scores["oof_score"], "oof_tta_score": scores["oof_tta_score"],
    }
    row.update({f"fold_{fold['fold']}": fold["score"] for fold in scores["folds"]})
    return row
