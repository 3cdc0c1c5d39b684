"""`labelcomp export RUN`: a finished run as a folder an offline notebook can use without labelcomp,
torch or timm (a Kaggle code competition, a server): every fold model as ONNX, the labels and the
preprocessing as JSON, and `predict.py`, which needs only onnxruntime, numpy, OpenCV and Pillow.

Each fold's graph takes the normalised batch (N, 3, H, W) and returns the logits of every TTA view of
the run's policy, (views, N, classes): the views are the same tensor operations labelcomp predicts with,
traced into the graph, so the script cannot drift from them. The JSON holds what happens outside the
graphs: decoding (data.short_side), the evaluation transforms as Albumentations serialises them, mean
and std, how the views merge, and each fold's weight."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import albumentations as A
import torch
from omegaconf import DictConfig

from labelcomp.augment import build_transforms
from labelcomp.competition import Competition
from labelcomp.config import load_config
from labelcomp.data import short_side
from labelcomp.ensemble import run_fold_weights
from labelcomp.errors import LabelcompError
from labelcomp.predict import ViewPredictor, fold_checkpoints, load_classifier
from labelcomp.runs import RunDir, find_run, write_text_atomic
from labelcomp.tta import policy_views, run_policy, view_transforms

_logger = logging.getLogger(__name__)

SPEC = "labelcomp_export.json"
SCRIPT = "predict.py"
# what the standalone script reproduces with OpenCV exactly as Albumentations does
EXPORTABLE_TRANSFORMS = ("Resize", "SmallestMaxSize", "CenterCrop")
OPSET = 18


def eval_transforms(config: DictConfig) -> list[dict]:
    """The run's evaluation transforms as Albumentations serialises them, each one the script can do."""
    steps = A.to_dict(build_transforms(config.augment, train=False))["transform"]["transforms"]
    for position, step in enumerate(steps):
        name = step["__class_fullname__"]
        unsupported = (name not in EXPORTABLE_TRANSFORMS or (name == "CenterCrop" and step["pad_if_needed"])
                       or (name == "SmallestMaxSize" and not isinstance(step["max_size"], int)))
        if unsupported:
            raise LabelcompError(f"augment.eval[{position}] ({name} {step}): the exported script does only "
                                 f"{', '.join(EXPORTABLE_TRANSFORMS)} (one max_size, no padding); "
                                 "export a run whose evaluation transforms use these")
    return steps


def export_fold(checkpoint: Path, views: list[str], config: DictConfig, path: Path) -> None:
    """One fold's network with the TTA views as an ONNX graph, its batch size free."""
    network = load_classifier(checkpoint).predicting_net().eval().to(memory_format=torch.contiguous_format)
    predictor = ViewPredictor(network, view_transforms(views, config.tta), max_images=None).eval()
    size = config.augment.image_size
    sample = torch.zeros(2, 3, size, size)
    temporary = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():  # the exporter's notes on its own progress are not the user's business
        warnings.simplefilter("ignore")
        try:
            predictor.to_onnx(temporary, (sample,), input_names=["images"], output_names=["view_logits"],
                              dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
                              opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
        except ImportError as error:
            raise LabelcompError(f"export needs the onnx and onnxscript packages ({error}); "
                                 "pip install 'labelcomp[export]'") from None
    temporary.replace(path)


def export_run(config: DictConfig, run_id: str | None, out: str | None, make_zip: bool) -> tuple[Path, int]:
    """Write the export folder (default `<run>/export`), or with `make_zip` only `<folder>.zip`. Returns
    what was written and its size in bytes."""
    run: RunDir = find_run(config.paths.runs, config.experiment, run_id)
    run_config = load_config(run.config)
    competition = Competition.load(run_config.competition)
    scores = json.loads(run.scores.read_text())
    policy = run_policy(scores, run_config.tta)
    views = policy_views(policy, run_config.tta)
    checkpoints = fold_checkpoints(run, run_config)
    steps = eval_transforms(run_config)
    folder = Path(out) if out else run.root / "export"
    # built beside the destination and renamed into place: a stopped export leaves the old one whole
    building = folder.with_name(f".{folder.name}.{os.getpid()}.building")  # one per process: exports may overlap
    building.mkdir(parents=True)
    try:
        _write_export(building, run, run_config, competition, scores, policy, views, checkpoints, steps)
        if make_zip:
            archive = Path(shutil.make_archive(str(building), "zip", building))
            final = folder.with_name(f"{folder.name}.zip")
            archive.replace(final)
            return final, final.stat().st_size
        replaced = folder.with_name(f".{folder.name}.{os.getpid()}.replaced")
        if folder.exists():
            folder.rename(replaced)
        building.rename(folder)
        shutil.rmtree(replaced, ignore_errors=True)
        return folder, sum(path.stat().st_size for path in folder.iterdir())
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _write_export(building: Path, run: RunDir, run_config: DictConfig, competition: Competition, scores: dict,
                  policy: str, views: list[str], checkpoints: list[Path], steps: list[dict]) -> None:
    weights = run_fold_weights(scores, run_config.ensemble)
    models = []
    for fold, (checkpoint, weight) in enumerate(zip(checkpoints, weights)):
        _logger.info("exporting fold %d (%s) with %d TTA view(s)", fold, checkpoint, len(views))
        export_fold(checkpoint, views, run_config, building / f"fold_{fold}.onnx")
        models.append({"file": f"fold_{fold}.onnx", "fold": fold, "weight": float(weight)})
    spec = {
        "run_id": run.run_id, "competition": competition.spec.name, "backbone": run_config.model.name,
        "labels": list(competition.labels), "image_size": int(run_config.augment.image_size),
        "short_side": short_side(run_config), "eval_transforms": steps,
        "mean": list(run_config.augment.mean), "std": list(run_config.augment.std),
        "input": "RGB uint8 images after the transforms, as float32 (pixel - 255 * mean) / (255 * std), (N, 3, H, W)",
        "tta_policy": policy, "views": views, "merge": str(run_config.tta.merge), "models": models,
    }
    write_text_atomic(building / SPEC, json.dumps(spec, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("standalone_predict.py"), building / SCRIPT)
