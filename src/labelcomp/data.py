"""Image decoding (cv2, to RGB), an optional decoded-image cache, the Dataset and the LightningDataModule.

Transforms are given to the data module; it does not choose augmentations.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import cv2
import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from labelcomp.errors import LabelcompError


def read_image(path: str) -> np.ndarray:
    """RGB uint8 array of shape (H, W, 3), the same for train and test whatever the file holds:
    grayscale, palette and 16-bit images are converted, alpha dropped, EXIF orientation applied."""
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
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise LabelcompError(f"{path}: cannot be decoded as an image; replace or remove it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ImageDataset(Dataset):
    """(transformed uint8 (H, W, C) image, class index) pairs; the index is -1 where labels are unknown (test)."""

    def __init__(self, frame: pd.DataFrame, transform: Callable, cache: Optional[dict[str, np.ndarray]] = None):
        self.paths = frame["path"].tolist()
        self.targets = frame["target"].to_numpy() if "target" in frame else np.full(len(frame), -1)
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, path: str) -> np.ndarray:
        if self.cache is None:
            return read_image(path)
        if path not in self.cache:
            self.cache[path] = read_image(path)
        return self.cache[path]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image = self.transform(image=self._image(self.paths[index]))["image"]
        return image, int(self.targets[index])


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
        cache: Optional[dict[str, np.ndarray]] = None,
        pin_memory: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.channels_last = channels_last
        self.pin_memory = pin_memory
        self.mean, self.std = list(mean), list(std)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.frames = {"train": train, "val": val, "predict": predict}
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.cache = cache

    def _loader(self, split: str, transform: Callable, shuffle: bool) -> DataLoader:
        dataset = ImageDataset(self.frames[split], transform, self.cache)
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
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train_transform, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_transform, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_transform, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets = batch
        return normalize(images, self.mean, self.std, self.channels_last), targets
