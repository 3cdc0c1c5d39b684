"""Image decoding (cv2, to RGB) at the size a run needs, the on-disk cache of decoded images, the
Dataset and the LightningDataModule.

Transforms are given to the data module; it does not choose augmentations.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import albumentations as A
import cv2
import lightning as L
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from labelcomp.errors import LabelcompError

_logger = logging.getLogger(__name__)

# libjpeg decodes at 1/2, 1/4 or 1/8 scale directly from the DCT coefficients
_REDUCED_JPEG = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:  # a dangling link, a folder, no permission
        raise LabelcompError(f"{path}: cannot be opened ({error.strerror}); replace or remove it") from None
    if not data:
        raise LabelcompError(f"{path}: empty image file; replace or remove it")
    # libjpeg decodes a cut-off JPEG with a grey bottom and only a warning; its end marker tells
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:]:
        raise LabelcompError(f"{path}: truncated JPEG (no end-of-image marker); replace or remove it")
    return data


def _decode_flag(data: bytes, short_side: int | None) -> int:
    """The largest libjpeg reduction that keeps the JPEG's shorter side at least `short_side`. Pillow reads
    the size from the header alone (0.06 ms for a 400x533 photo)."""
    if short_side is None or data[:2] != b"\xff\xd8":
        return cv2.IMREAD_COLOR
    try:
        side = min(Image.open(io.BytesIO(data)).size)
    except Exception:  # an unusual header: cv2 decodes it at full size or says it cannot
        return cv2.IMREAD_COLOR
    return next((flag for factor, flag in _REDUCED_JPEG if side / factor >= short_side), cv2.IMREAD_COLOR)


def read_image(path: str, short_side: int | None = None) -> np.ndarray:
    """RGB uint8 array of shape (H, W, 3), the same for train and test whatever the file holds:
    grayscale, palette and 16-bit images are converted, alpha dropped, EXIF orientation applied.

    With `short_side`, a larger image is reduced so that its shorter side is `short_side` (cv2 INTER_AREA),
    a JPEG of at least twice that size decoded at 1/2, 1/4 or 1/8 scale first; smaller images stay as they are."""
    data = _read_bytes(path)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _decode_flag(data, short_side))
    if image is None:
        raise LabelcompError(f"{path}: cannot be decoded as an image; replace or remove it")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if short_side is None or min(image.shape[:2]) <= short_side:  # reduced, never enlarged
        return image
    return _reduction(short_side)(image=image)["image"]


@functools.lru_cache(maxsize=8)
def _reduction(short_side: int) -> A.SmallestMaxSize:
    return A.SmallestMaxSize(max_size=short_side, interpolation=cv2.INTER_AREA, p=1.0)


def short_side(config: DictConfig) -> int | None:
    """`data.short_side` in pixels: auto is 1.25 x augment.image_size, so that RandomResizedCrop's crops of
    at least 64% of the area are reduced, never enlarged, to the training size; None keeps full size."""
    value = config.data.short_side
    if value == "auto":
        return round(1.25 * config.augment.image_size)
    return None if value is None else int(value)


class DiskCache:
    """Reduced images as .npy files under `folder` (one folder per short side), named by a digest of the
    source file's bytes: folds, runs, resumes and fold jobs over the same files share them, and an edited
    file gets a new entry. Entries are written to a temporary name and renamed, so parallel writers
    (loader workers, fold jobs) never leave a partial entry; one that does not load is rebuilt.

    .npy was chosen by measurement (300 clothing photos at 224 px, one core): read 0.17 ms, 197 KB;
    PNG 2.9 ms, 93 KB; lossless WebP 2.1 ms (110 ms to write), 58 KB; JPEG q95 0.66 ms, 25 KB but 1.4
    grey levels off on average. Decoding the 400x533 source and reducing it took 3.5 ms."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._digests: dict[tuple[str, int, int], str] = {}
        self._write_failed = False

    def digest(self, path: str) -> str:
        """The source's content digest, hashed once per process for each (path, size, mtime)."""
        stat = os.stat(path)
        known = (path, stat.st_size, stat.st_mtime_ns)
        if known not in self._digests:
            self._digests[known] = hashlib.blake2b(_read_bytes(path), digest_size=16).hexdigest()
        return self._digests[known]

    def entry(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.npy"

    def load(self, digest: str) -> np.ndarray | None:
        path = self.entry(digest)
        try:
            image = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):  # truncated or overwritten: rebuilt from the source
            _logger.info("image cache entry %s is damaged: rebuilt", path)
            return None
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            _logger.info("image cache entry %s is not an RGB image: rebuilt", path)
            return None
        return image

    def store(self, digest: str, image: np.ndarray) -> None:
        path = self.entry(digest)
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as stream:
                np.save(stream, image, allow_pickle=False)
            os.replace(temporary, path)
        except OSError as error:  # a full disk or a read-only cache: train on, uncached
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            if not self._write_failed:
                _logger.warning("image cache %s: cannot write (%s); images are decoded every time", self.folder,
                                error.strerror)
            self._write_failed = True

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) in the cache folder."""
        files = list(self.folder.glob("*/*.npy"))
        return len(files), sum(path.stat().st_size for path in files)


def cache_folders(cache_dir: str | Path) -> list[DiskCache]:
    """The disk caches under `data.cache_dir`, one per short side."""
    root = Path(cache_dir)
    return [DiskCache(folder) for folder in sorted(root.glob("*px")) if folder.is_dir()] if root.is_dir() else []


def clear_cache(cache_dir: str | Path) -> None:
    """Delete the cache. Renamed away first, so a run reading it meanwhile finds whole entries or none
    (and rebuilds what it misses)."""
    root = Path(cache_dir)
    if not root.is_dir():
        return
    doomed = root.with_name(f".{root.name}.{os.getpid()}.deleting")
    os.replace(root, doomed)
    shutil.rmtree(doomed)


class ImageReader:
    """Images as the transforms receive them: decoded and reduced to `short_side` (read_image), from the
    disk cache when given (only reduced images are stored: smaller ones decode as fast as they load),
    and kept in memory as well when `keep_in_memory` (small datasets)."""

    def __init__(self, short_side: int | None = None, cache: DiskCache | None = None, keep_in_memory: bool = False):
        self.short_side = short_side
        self.cache = cache
        self.memory: dict[str, np.ndarray] | None = {} if keep_in_memory else None

    @classmethod
    def from_config(cls, config: DictConfig) -> "ImageReader":
        side = short_side(config)
        cache = DiskCache(Path(config.data.cache_dir) / f"{side}px") if config.data.disk_cache and side else None
        return cls(side, cache, config.data.cache_images)

    def __call__(self, path: str) -> np.ndarray:
        if self.memory is not None and path in self.memory:
            return self.memory[path]
        image = self._read(path)
        if self.memory is not None:
            self.memory[path] = image
        return image

    def _read(self, path: str) -> np.ndarray:
        if self.cache is None:
            return read_image(path, self.short_side)
        try:
            digest = self.cache.digest(path)
        except OSError:  # missing or unreadable: read_image says so in its words
            return read_image(path, self.short_side)
        image = self.cache.load(digest)
        if image is None:
            image = read_image(path, self.short_side)
            if min(image.shape[:2]) == self.short_side:
                self.cache.store(digest, image)
        return image


class ImageDataset(Dataset):
    """(transformed uint8 (H, W, C) image, target) pairs. The target is the class index (-1 where labels
    are unknown: test), or where the frame has `soft_target` that row's class probabilities (soft
    pseudo-labels), which the cross-entropy takes as they are."""

    def __init__(self, frame: pd.DataFrame, transform: Callable, images: ImageReader):
        self.paths = frame["path"].tolist()
        if "soft_target" in frame:
            self.targets = np.stack(frame["soft_target"].to_numpy()).astype(np.float32)
        else:
            self.targets = frame["target"].to_numpy() if "target" in frame else np.full(len(frame), -1)
        self.transform = transform
        self.images = images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int | np.ndarray]:
        image = self.transform(image=self.images(self.paths[index]))["image"]
        target = self.targets[index]
        return image, target if target.ndim else int(target)


@functools.lru_cache(maxsize=32)
def _pixel_constants(mean: tuple[float, ...], std: tuple[float, ...], repeats: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std in pixel units (0-255), the channels' values repeated `repeats` times in turn. Made
    once: building them anew for every batch cost more than normalizing it."""
    return (torch.tensor(mean, device=device).repeat(repeats) * 255,
            torch.tensor(std, device=device).repeat(repeats) * 255)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              channels_last: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W, C), as the loaders collate them, as the float (N, C, H, W) input the
    backbone's weights expect, laid out channels-last or contiguous as the backbone runs.

    One operation per batch after the transfer to the device costs a fraction of a per-image float
    conversion in the loader, and the loader collates and transfers a quarter of the bytes."""
    count, height, width, channels = images.shape
    # in place after the one conversion: with a new batch-sized tensor per operation it ran several times slower
    if channels_last:
        # the collated (N, H, W, C) memory already is the channels-last layout; with the per-channel
        # constants repeated along (N * H, W * C) rows the arithmetic runs over long contiguous rows
        # (broadcasting over a last dimension of 3 is several times slower)
        mean_row, std_row = _pixel_constants(tuple(mean), tuple(std), width, images.device)
        rows = images.reshape(count * height, width * channels).float().sub_(mean_row).div_(std_row)
        return rows.view(count, height, width, channels).permute(0, 3, 1, 2)
    mean_pixel, std_pixel = (constant.view(1, -1, 1, 1)
                             for constant in _pixel_constants(tuple(mean), tuple(std), 1, images.device))
    return images.permute(0, 3, 1, 2).contiguous().float().sub_(mean_pixel).div_(std_pixel)


def _seed_worker_augmentations(worker_id: int) -> None:
    # every worker starts with a copy of the same Albumentations generator; torch gives each worker
    # its own seed (drawn from the seeded main process), so derive the augmentation stream from it
    dataset = torch.utils.data.get_worker_info().dataset
    dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


class ImageDataModule(L.LightningDataModule):
    """Train / validation / prediction loaders over frames with `path` (and `target`) columns; the
    loaders give uint8 (N, H, W, C) batches, normalized with `mean` and `std` once on their device into
    (N, C, H, W) floats, channels-last in memory where `channels_last` (the backbone's format)."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: Optional[pd.DataFrame] = None,
        val: Optional[pd.DataFrame] = None,
        predict: Optional[pd.DataFrame] = None,
        train_transform: Optional[Callable] = None,
        eval_transform: Optional[Callable] = None,
        images: Optional[ImageReader] = None,
        pin_memory: bool = False,
        channels_last: bool = False,
        stage_transforms: Optional[Sequence[tuple[int, Callable]]] = None,
    ):
        super().__init__()
        self.channels_last = channels_last
        self.pin_memory = pin_memory
        self.mean, self.std = list(mean), list(std)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.frames = {"train": train, "val": val, "predict": predict}
        self.train_transform = train_transform
        # (first epoch, transform) of stages training at sizes of their own: the Trainer then rebuilds the
        # train loader every epoch (reload_dataloaders_every_n_epochs), and it takes the epoch's stage's
        self.stage_transforms = list(stage_transforms or [])
        self.eval_transform = eval_transform
        self.images = images or ImageReader()

    def _loader(self, split: str, transform: Callable, shuffle: bool) -> DataLoader:
        dataset = ImageDataset(self.frames[split], transform, self.images)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # a last batch of one image breaks BatchNorm in training
            drop_last=shuffle and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            worker_init_fn=_seed_worker_augmentations if self.num_workers > 0 else None,
            # every iteration of a loader draws a seed; loaders that do not shuffle draw it from a generator
            # of their own, not torch's global one, so validating (or not) leaves the training's random
            # stream, and the model it trains, as they were
            generator=None if shuffle else torch.Generator(),
        )

    def train_dataloader(self) -> DataLoader:
        transform = self.train_transform
        if self.stage_transforms:
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
            transform = [staged for first, staged in self.stage_transforms if first <= epoch][-1]
        return self._loader("train", transform, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_transform, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_transform, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets = batch
        return normalize(images, self.mean, self.std, self.channels_last), targets
