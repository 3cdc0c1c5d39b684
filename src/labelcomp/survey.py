"""Decode every image of a split once: unreadable files, exact duplicates (same pixels), sizes.

Runs before a run folder exists, so a bad image stops a run before anything is written; read
through the run's ImageReader, the decoding fills its caches (on disk, in memory) on the way.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from labelcomp.data import ImageReader
from labelcomp.errors import LabelcompError


@dataclass
class Survey:
    hashes: list[str]  # pixel digest per image; "" where unreadable
    sizes: list[tuple[int, int]]  # (height, width) after EXIF orientation; (0, 0) where unreadable
    problems: list[str]  # "path: reason", one per unreadable image

    def duplicate_sets(self) -> list[list[int]]:
        """Positions of images with identical pixels, one list per set of two or more."""
        positions: dict[str, list[int]] = {}
        for position, digest in enumerate(self.hashes):
            if digest:
                positions.setdefault(digest, []).append(position)
        return [group for group in positions.values() if len(group) > 1]

    def raise_problems(self, split: str) -> None:
        if self.problems:
            shown = "; ".join(self.problems[:10])
            raise LabelcompError(
                f"{len(self.problems)} unreadable {split} image(s): {shown}{' ...' if len(self.problems) > 10 else ''}"
            )


def _digest(image: np.ndarray) -> str:
    return hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).hexdigest()


def survey(paths: list[str], images: ImageReader | None = None) -> Survey:
    """Decode all `paths` with threads (cv2 releases the GIL) through `images` (full size without)."""
    images = images or ImageReader()

    def look(path: str) -> tuple[str, tuple[int, int], str]:
        try:
            image = images(path)
        except LabelcompError as error:
            return "", (0, 0), str(error)
        return _digest(image), image.shape[:2], ""

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(look, paths))
    return Survey(
        hashes=[digest for digest, _, _ in results],
        sizes=[size for _, size, _ in results],
        problems=[problem for _, _, problem in results if problem],
    )


def fingerprint(train: pd.DataFrame, test: pd.DataFrame) -> str:
    """A digest of both splits' tables and of every image file's size and modification time: equal
    fingerprints mean the survey of the competition would find what it found before."""
    digest = hashlib.blake2b(digest_size=16)
    for frame in (train, test):
        digest.update(frame.to_csv(index=False).encode())
        for path in frame["path"]:
            try:
                stat = os.stat(path)
            except OSError:  # missing now: the survey must run and say so
                stat = None
            digest.update(f"{path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def check_images(train: pd.DataFrame, test: pd.DataFrame, images: ImageReader | None = None) -> list[list[int]]:
    """Decode every image of both splits once; unreadable ones stop with one error naming them.
    Returns the sets of training images with identical pixels (positions in `train`)."""
    train_images = survey(train["path"].tolist(), images)
    train_images.raise_problems("training")
    # the test images are read at the run's size too (they fill the disk cache for submit), not kept in memory
    test_reader = ImageReader(images.short_side, images.cache) if images is not None else None
    survey(test["path"].tolist(), test_reader).raise_problems("test")
    return train_images.duplicate_sets()
