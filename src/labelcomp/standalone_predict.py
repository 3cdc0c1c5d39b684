"""Predict images with an exported labelcomp run, offline, with only onnxruntime, numpy, OpenCV and Pillow
(no labelcomp, torch or timm): e.g. in a Kaggle code-competition notebook, with this folder uploaded.

    python predict.py IMAGE_OR_FOLDER... [--out predictions.csv]

Writes a CSV of id (the path as found), predicted label and one probability per class: every fold
model of the run with its TTA views, merged and averaged with the run's fold weights, exactly as
`labelcomp predict` does. Reads `labelcomp_export.json` beside this file. Files that cannot be read are
listed on stderr and left out.

This file is written by `labelcomp export`; it does not import labelcomp.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# libjpeg decodes at 1/2, 1/4 or 1/8 scale directly from the DCT coefficients, as labelcomp's reader does
REDUCED_JPEG = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def decode_flag(data: bytes, short_side: int | None) -> int:
    if short_side is None or data[:2] != b"\xff\xd8":
        return cv2.IMREAD_COLOR
    try:
        side = min(Image.open(io.BytesIO(data)).size)
    except Exception:
        return cv2.IMREAD_COLOR
    return next((flag for factor, flag in REDUCED_JPEG if side / factor >= short_side), cv2.IMREAD_COLOR)


def scaled(image: np.ndarray, scale: float, interpolation: int) -> np.ndarray:
    height, width = image.shape[:2]
    size = int(height * scale), int(width * scale)
    return image if size == (height, width) else cv2.resize(image, size[::-1], interpolation=interpolation)


def read_image(path: str, short_side: int | None) -> np.ndarray:
    """RGB uint8 (H, W, 3): decoded as labelcomp decodes, reduced to `short_side` when larger."""
    data = Path(path).read_bytes()
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:]:
        raise ValueError("truncated JPEG (no end-of-image marker)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), decode_flag(data, short_side))
    if image is None:
        raise ValueError("cannot be decoded as an image")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if short_side is None or min(image.shape[:2]) <= short_side:
        return image
    return scaled(image, short_side / min(image.shape[:2]), cv2.INTER_AREA)


def apply_step(image: np.ndarray, step: dict) -> np.ndarray:
    """One step of the run's evaluation transforms, as Albumentations serialised it."""
    name = step["__class_fullname__"]
    height, width = image.shape[:2]
    if name == "Resize":
        shrinks = step["height"] < height or step["width"] < width
        interpolation = cv2.INTER_AREA if step.get("area_for_downscale") and shrinks else step["interpolation"]
        if (step["height"], step["width"]) == (height, width):
            return image
        return cv2.resize(image, (step["width"], step["height"]), interpolation=interpolation)
    if name == "SmallestMaxSize":
        scale = step["max_size"] / min(height, width)
        interpolation = cv2.INTER_AREA if step.get("area_for_downscale") and scale < 1 else step["interpolation"]
        return scaled(image, scale, interpolation)
    if name == "CenterCrop":
        if step["height"] > height or step["width"] > width:
            raise ValueError(f"smaller than the centre crop {step['height']}x{step['width']}")
        top, left = (height - step["height"]) // 2, (width - step["width"]) // 2
        return image[top:top + step["height"], left:left + step["width"]]
    raise ValueError(f"transform {name} is not supported by this script")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def merge_views(logits: np.ndarray, merge: str) -> np.ndarray:
    """(views, images, classes) logits to probabilities: the mean of the views' probabilities, or their
    geometric mean renormalised."""
    if merge == "mean":
        return softmax(logits).mean(axis=0)
    return softmax(log_softmax(logits).mean(axis=0))


def image_files(inputs: list[str]) -> list[str]:
    # labelcomp.submit.image_files, copied: this script runs where labelcomp is not installed
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(str(found) for found in path.rglob("*")
                            if found.is_file() and found.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(item)
        else:
            sys.exit(f"{item}: no such file or folder")
    return files


def predict(paths: list[str], spec: dict, batch_size: int = 32) -> tuple[list[str], np.ndarray]:
    """The readable paths and their probabilities (images, classes)."""
    mean = np.asarray(spec["mean"], dtype=np.float32) * 255
    std = np.asarray(spec["std"], dtype=np.float32) * 255
    sessions = [onnxruntime.InferenceSession(str(HERE / model["file"]), providers=onnxruntime.get_available_providers())
                for model in spec["models"]]
    readable, pixels = [], []
    for path in paths:
        try:
            image = read_image(path, spec["short_side"])
            for step in spec["eval_transforms"]:
                image = apply_step(image, step)
        except (OSError, ValueError) as error:
            print(f"left out: {path}: {error}", file=sys.stderr)
            continue
        readable.append(path)
        pixels.append(image)
    proba = np.zeros((len(readable), len(spec["labels"])))
    for start in range(0, len(readable), batch_size):
        batch = np.stack(pixels[start:start + batch_size]).astype(np.float32)
        batch = ((batch - mean) / std).transpose(0, 3, 1, 2)
        for session, model in zip(sessions, spec["models"]):
            logits = session.run(None, {session.get_inputs()[0].name: batch})[0]
            proba[start:start + len(batch)] += model["weight"] * merge_views(logits.astype(np.float64), spec["merge"])
    return readable, proba


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files and folders")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    args = parser.parse_args()
    spec = json.loads((HERE / "labelcomp_export.json").read_text())
    paths, proba = predict(image_files(args.inputs), spec)
    labels = spec["labels"]
    with open(args.out, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "label", *labels])
        for path, row in zip(paths, proba):
            writer.writerow([path, labels[int(row.argmax())], *(f"{value:.8g}" for value in row)])
    print(f"predictions written: {args.out} ({len(paths)} images)")


if __name__ == "__main__":
    main()
