"""The k-fold loop: per fold build data, model and callbacks, fit, predict OOF; then scores and history.

`run` is made of `read_data`, `resolve_config` (resolve.py), `fit_fold`, `predict_oof` and
`finish_run`, each usable alone.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import pandas as pd
from filelock import FileLock
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from labelcomp import __version__, history, ranks
from labelcomp.augment import build_transforms, stage_train_transforms
from labelcomp.competition import Competition
from labelcomp.config import load_config, save_config
from labelcomp.data import ImageDataModule, ImageReader
from labelcomp.errors import LabelcompError
from labelcomp.finetune import (BestValidated, EarlyStoppingValidated, StagedFinetuning, ValidationEpochs,
                                resized_epochs, validated_epochs)
from labelcomp.folds import assign_folds, fold_groups
from labelcomp.hardware import device_of, peak_memory_gb, reset_peak_memory
from labelcomp.loggers import fold_loggers, log_run_scores
from labelcomp.metrics import METRICS, multiclass_log_loss
from labelcomp.model import ClassifierModule, class_weights
from labelcomp.predict import load_classifier, predict_views
from labelcomp.pseudo import pseudo_labels, read_pseudo, start_from_parent, training_rows
from labelcomp.resolve import resolve_config
from labelcomp.runs import RunDir, check_run_id, new_run, read_table, write_csv_atomic, write_text_atomic
from labelcomp.survey import check_images, fingerprint
from labelcomp.tta import choose_policy, merge_views, scored_views

_logger = logging.getLogger(__name__)


class RunData(NamedTuple):
    """A competition's splits, checked."""

    competition: Competition
    train: pd.DataFrame
    test: pd.DataFrame
    duplicates: list[list[int]]  # positions in `train` of images with identical pixels, a list per set
    fingerprint: str  # of the tables and image files (survey.fingerprint)
    images: ImageReader  # how the loaders read the images (size, disk cache, memory)


def read_data(config: DictConfig, known: RunDir | None = None) -> RunData:
    """Both splits of the config's competition, validated before a run folder exists, so bad input
    leaves nothing behind: every image is decoded once (and kept when caching), unless `known`, a run
    folder of this competition, recorded a survey of the very same files."""
    competition = Competition.load(config.competition)
    train = competition.read_train()
    test = competition.read_test()
    images = ImageReader.from_config(config)
    stamp = fingerprint(train, test)
    duplicates = _recorded_duplicates(known, stamp, train) if known is not None else None
    if duplicates is None:
        duplicates = check_images(train, test, images)
    else:
        _logger.info("images unchanged since run %s surveyed them: not decoded again", known.run_id)
    if duplicates:
        _logger.info("%d sets of identical training images: each set is kept within one fold", len(duplicates))
    if images.cache is not None:
        entries, size = images.cache.usage()
        _logger.info("image cache %s: %d images at %d px, %.0f MB", images.cache.folder, entries, images.short_side,
                     size / 2**20)
    return RunData(competition, train, test, duplicates, stamp, images)


def _recorded_duplicates(run_dir: RunDir, stamp: str, train: pd.DataFrame) -> list[list[int]] | None:
    """The run's recorded duplicate sets, if it surveyed files with this fingerprint."""
    if not run_dir.survey.is_file():
        return None
    record = json.loads(run_dir.survey.read_text())
    if record["fingerprint"] != stamp:
        return None
    position = pd.Series(np.arange(len(train)), index=train["id"].to_numpy())
    return [position.loc[ids].tolist() for ids in record["duplicate_ids"]]


def split_folds(config: DictConfig, data: RunData) -> pd.DataFrame:
    spec = data.competition.spec.train
    source = str(data.competition.root / (spec.csv or spec.images))
    return assign_folds(data.train, config.cv.folds, config.seed, fold_groups(data.train, data.duplicates), source,
                        data.competition.labels)


def run(
    config: DictConfig, run_id: str | None = None, only_folds: list[int] | None = None
) -> tuple[RunDir, dict[str, Any] | None]:
    """Train the folds of a run (all, or `only_folds`), skipping finished ones and continuing an
    interrupted one from its last checkpoint. `run_id` names a run to create or join, so that fold
    jobs in separate processes share it. Scores and the history row come when every fold is done;
    until then, and in every process of a multi-process job but rank 0, the returned scores are None."""
    folds_to_train = only_folds if only_folds is not None else list(range(config.cv.folds))
    for fold in folds_to_train:
        if not 0 <= fold < config.cv.folds:
            raise LabelcompError(f"--folds: fold {fold} does not exist; cv.folds is {config.cv.folds}")
    run_id = ranks.shared_run_id(config.experiment, run_id)
    if run_id is not None:
        check_run_id(run_id)
    if not ranks.is_global_zero():
        return _follow_run(config, run_id, folds_to_train), None
    known = RunDir(Path(config.paths.runs) / config.experiment / run_id) if run_id else None
    if known is not None and not known.config.is_file():
        known = None
    data = read_data(config, known)
    resolved = resolve_config(config, data.competition.num_classes, load_config(known.config) if known else None)
    folds = split_folds(resolved, data)
    pseudo = _recorded_pseudo(known) or _chosen_pseudo(resolved, data, folds)
    run_dir, folds, pseudo = open_run(resolved, data, folds, run_id, pseudo)
    _logger.info("run %s in %s", run_dir.run_id, run_dir.root)
    with ranks.passed_down(run_dir.run_id):
        for fold in folds_to_train:
            if run_dir.fold_oof(fold).exists():
                _logger.info("fold %d/%d: done before, skipped", fold + 1, resolved.cv.folds)
                continue
            started = time.perf_counter()
            reset_peak_memory()
            checkpoint = fit_fold(resolved, data.competition, data.train, folds, fold, run_dir, data.images, pseudo,
                                  data.test)
            predict_oof(resolved, data.competition, data.train, folds, fold, checkpoint, run_dir, data.images)
            usage = {"seconds": round(time.perf_counter() - started, 1), "peak_memory_gb": peak_memory_gb()}
            write_text_atomic(run_dir.fold_usage(fold), json.dumps(usage) + "\n")
            _logger.info("fold %d/%d: %.0f s, peak memory %s GB", fold + 1, resolved.cv.folds, usage["seconds"],
                         usage["peak_memory_gb"])
            run_dir.last_checkpoint(fold).unlink(missing_ok=True)  # only needed to resume the fold
    if not all(run_dir.fold_oof(fold).exists() for fold in range(resolved.cv.folds)):
        return run_dir, None
    return run_dir, finish_run(run_dir, data.competition, resolved)


def _recorded_pseudo(known: RunDir | None) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The pseudo-labels a resumed or joined run chose when it started: never chosen again."""
    if known is None:
        return None
    frame, record = read_pseudo(known)
    return None if frame is None else (frame, record)


def _chosen_pseudo(config: DictConfig, data: RunData,
                   folds: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    if config.pseudo.from_run is None:
        return None
    return pseudo_labels(config, data.competition, data.test, folds)


def finish_run(run_dir: RunDir, competition: Competition, config: DictConfig) -> dict[str, Any]:
    """Score a run whose folds are all done, record it in the score history, and write scores.json
    last: it marks the run finished. Fold jobs that end together find every fold done: the first
    scores the run, the others take its scores (and make sure of the history row)."""
    with FileLock(str(run_dir.root / ".scores.lock")):
        if run_dir.scores.exists() and run_dir.scores.stat().st_mtime_ns >= max(
                run_dir.fold_oof(fold).stat().st_mtime_ns for fold in range(config.cv.folds)):
            scores = json.loads(run_dir.scores.read_text())
            record_run(run_dir, competition, config, scores)
            return scores
        scores = score_run(run_dir, competition, config)
        try:
            record_run(run_dir, competition, config, scores)
            unrecorded = None
        except LabelcompError as error:  # the finished run is kept all the same; the row can come later
            unrecorded = error
        write_text_atomic(run_dir.scores, json.dumps(scores, indent=2) + "\n")
        log_run_scores(config, run_dir, scores)
    if unrecorded is not None:
        raise LabelcompError(f"run {run_dir.run_id} is scored ({run_dir.scores}) but not in the score history: "
                             f"{unrecorded} Once it is fixed, `labelcomp train --resume {run_dir.run_id}` or "
                             f"`labelcomp submit --run {run_dir.run_id}` records it")
    return scores


def _follow_run(config: DictConfig, run_id: str, folds_to_train: list[int]) -> RunDir:
    """A process of a multi-process job other than rank 0: once rank 0 has written the run's files, it
    trains the same folds with rank 0's resolved config and writes nothing."""
    run_dir = RunDir(Path(config.paths.runs) / config.experiment / run_id)
    ranks.wait_for(run_dir.folds)
    resolved = load_config(run_dir.config)
    data = read_data(resolved, run_dir)
    folds = read_table(run_dir.folds)
    pseudo, _ = read_pseudo(run_dir)
    for fold in folds_to_train:
        if not run_dir.fold_oof(fold).exists():
            fit_fold(resolved, data.competition, data.train, folds, fold, run_dir, data.images, pseudo, data.test)
    return run_dir


def record_run(run_dir: RunDir, competition: Competition, config: DictConfig, scores: dict[str, Any]) -> None:
    """The run's row in the score history."""
    # scores.json of runs scored before it named the competition: the competition as it is now
    identity = scores.get("competition") or competition.identity()
    history.record_scores(history.history_path(config.paths.submissions), run_dir.run_id, identity,
                          config.experiment, config.model.name, scores)


def open_run(config: DictConfig, data: RunData, folds: pd.DataFrame, run_id: str | None,
             pseudo: tuple[pd.DataFrame, dict[str, Any]] | None = None,
             ) -> tuple[RunDir, pd.DataFrame, pd.DataFrame | None]:
    """A new run folder, or the named one (created by whichever fold job comes first), holding the
    resolved config, the folds, the survey's record and the pseudo-labels (written before folds.csv,
    which other processes wait for). A joined run keeps its own folds and pseudo-labels, and must have
    been split the same way."""
    if run_id is None:
        run_dir = new_run(config.paths.runs, config.experiment)
    else:
        run_dir = RunDir(Path(config.paths.runs) / config.experiment / run_id)
        run_dir.root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_dir.root / ".setup.lock")):
        if run_dir.folds.exists():
            saved = read_table(run_dir.folds)
            if not (saved["id"].equals(folds["id"]) and saved["fold"].equals(folds["fold"])):
                raise LabelcompError(
                    f"{run_dir.folds}: this run split the data differently; join it with the same config, "
                    "competition and seed"
                )
            return run_dir, saved, read_pseudo(run_dir)[0]
        ids = data.train["id"].to_numpy()
        record = {"fingerprint": data.fingerprint, "duplicate_ids": [ids[group].tolist() for group in data.duplicates]}
        write_text_atomic(run_dir.survey, json.dumps(record) + "\n")
        if pseudo is not None:
            write_csv_atomic(pseudo[0], run_dir.pseudo_labels)
            write_text_atomic(run_dir.pseudo_record, json.dumps(pseudo[1], indent=2) + "\n")
        save_config(config, run_dir.config)
        write_csv_atomic(folds, run_dir.folds)
    return run_dir, folds, None if pseudo is None else pseudo[0]


def build_datamodule(config: DictConfig, train: pd.DataFrame, val: pd.DataFrame, images: ImageReader,
                     stages: list[dict[str, Any]] | None = None) -> ImageDataModule:
    """The data module of a fold: `train` augmented, at each stage's own image size where it has one
    (`stages`: the config's unless given), `val` as evaluated (a resolved config)."""
    stages = OmegaConf.to_container(config.finetune.stages, resolve=True) if stages is None else stages
    resized = resized_epochs(stages, config.augment.image_size)
    return ImageDataModule(
        batch_size=config.data.batch_size, num_workers=config.data.num_workers, mean=config.augment.mean,
        std=config.augment.std, train=train, val=val,
        train_transform=build_transforms(config.augment, train=True, seed=config.seed),
        stage_transforms=stage_train_transforms(config.augment, stages, config.seed) if resized else None,
        eval_transform=build_transforms(config.augment, train=False), images=images,
        pin_memory=device_of(config.trainer.accelerator).type == "cuda",
        channels_last=bool(config.trainer.channels_last),
    )


def build_module(config: DictConfig, competition: Competition, stages: list | None = None,
                 train: pd.DataFrame | None = None) -> ClassifierModule:
    """The LightningModule of a resolved config; `stages` replaces the config's fine-tuning stages, and
    `train`, the images it trains on, gives the loss its class weights (loss.class_weights)."""
    def container(node: DictConfig) -> dict[str, Any]:
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)

    finetune = container(config.finetune)
    return ClassifierModule(
        model=container(config.model), optim=container(config.optim),
        finetune={**finetune, "stages": stages or finetune["stages"]}, num_classes=competition.num_classes,
        metric=str(competition.spec.metric), mixup=container(config.mixup), ema=container(config.ema),
        channels_last=bool(config.trainer.channels_last),
        class_weights=class_weights(str(config.loss.class_weights), train["target"].to_numpy(), competition.num_classes)
        if train is not None else None,
    )


def fit_fold(
    config: DictConfig, competition: Competition, train: pd.DataFrame, folds: pd.DataFrame, fold: int,
    run_dir: RunDir, images: ImageReader, pseudo: pd.DataFrame | None = None, test: pd.DataFrame | None = None,
) -> Path:
    """Train on every fold but `fold` (and the pseudo-labelled test images), validate on `fold`;
    returns the best checkpoint's path."""
    L.seed_everything(config.seed, workers=True)
    held_out = folds["fold"].to_numpy() == fold
    rows = training_rows(train[~held_out], pseudo, fold, test, competition.labels,
                         soft=config.pseudo.targets == "soft")
    _logger.info("fold %d/%d: %d train%s / %d validation images", fold + 1, config.cv.folds, len(rows),
                 f" ({len(rows) - (~held_out).sum()} pseudo-labelled)" if len(rows) > (~held_out).sum() else "",
                 held_out.sum())
    data = build_datamodule(config, rows, train[held_out], images)
    module = build_module(config, competition, train=rows)
    start_from_parent(module, config, fold)
    metric = METRICS[competition.spec.metric]
    fold_dir = run_dir.fold_dir(fold)
    resized = resized_epochs(module.stages, config.augment.image_size)
    validated = validated_epochs(module.stages, config.augment.image_size, config.trainer.validate_every_n_epochs)
    best = BestValidated(
        dirpath=fold_dir, filename=run_dir.checkpoint(fold).stem, monitor=metric.monitor, mode=metric.mode,
        save_top_k=1, save_last=True, auto_insert_metric_name=False, enable_version_counter=False, validated=validated,
    )
    trainer = L.Trainer(
        max_epochs=sum(stage["epochs"] for stage in module.stages),
        accelerator=config.trainer.accelerator, devices=config.trainer.devices,
        num_nodes=config.trainer.num_nodes, strategy=config.trainer.strategy, precision=config.trainer.precision,
        callbacks=[
            StagedFinetuning(),
            ValidationEpochs(validated),
            best,
            EarlyStoppingValidated(monitor=metric.monitor, mode=metric.mode,
                                   patience=config.trainer.early_stopping_patience, validated=validated),
            LearningRateMonitor(logging_interval="step"),
        ],
        logger=fold_loggers(config, run_dir, fold),
        deterministic=config.trainer.deterministic,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10,
        enable_progress_bar=config.trainer.progress_bar,
        # stages at sizes of their own: a train loader per epoch, with the transforms of its stage
        reload_dataloaders_every_n_epochs=1 if resized else 0,
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
    checkpoint: Path, run_dir: RunDir, images: ImageReader,
) -> None:
    """OOF outputs of `fold` from the model that never saw it, for every view the TTA policies need."""
    held_out = train[folds["fold"].to_numpy() == fold]
    views = scored_views(config.tta)
    outputs = predict_views(load_classifier(checkpoint), held_out, config, views, images)
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


def score_run(run_dir: RunDir, competition: Competition, config: DictConfig) -> dict[str, Any]:
    """Per-fold and CV scores from the folds' OOF files and every TTA policy's OOF score (the content
    of scores.json), and the run's merged oof.csv / oof_tta.csv (the latter with the chosen policy)."""
    metric = METRICS[competition.spec.metric]
    index = {label: position for position, label in enumerate(competition.labels)}
    order = read_table(run_dir.folds)["id"]
    plain = pd.concat([read_table(run_dir.fold_oof(fold)) for fold in range(config.cv.folds)])
    plain = plain.set_index("id").loc[order].reset_index()
    target = plain["label"].map(index).to_numpy()
    policy, policy_scores, policy_proba = choose_policy(config.tta, metric, target,
                                                        *_oof_views(run_dir, config.cv.folds, order))
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
        "run_id": run_dir.run_id, "competition": competition.identity(), "metric": metric.name, "folds": fold_rows,
        "cv_mean": float(fold_scores.mean()), "cv_std": float(fold_scores.std(ddof=1)),
        "oof_score": evaluate(plain, metric.score), "oof_tta_score": evaluate(tta, metric.score),
        "tta": {"policy": policy, "chosen_by": "oof" if config.tta.policy == "auto" else "config",
                "merge": str(config.tta.merge), "oof_scores": policy_scores},
        "oof_loss": evaluate(plain, multiclass_log_loss),
        # where classes are out of balance accuracy hides the rare ones: macro F1 shows them, whatever the metric
        "oof_macro_f1": {"plain": evaluate(plain, METRICS["macro_f1"].score),
                         "tta": evaluate(tta, METRICS["macro_f1"].score)},
        "pseudo": read_pseudo(run_dir)[1],
        "finished_at": datetime.now().isoformat(timespec="seconds"),
        "versions": _versions(), "git_commit": _git_commit(),
    }
    return scores
