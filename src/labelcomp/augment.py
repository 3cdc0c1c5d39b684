"""Albumentations pipelines from the config: `build_transforms(cfg.augment, train=...)`.

Test-time augmentation lives in tta.py."""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
from omegaconf import DictConfig, OmegaConf

from labelcomp.errors import LabelcompError


# labelcomp converts and normalizes whole batches with augment.mean / augment.std (data.normalize);
# these in a transform list would convert or scale the images twice
_NOT_IN_LISTS = ("Normalize", "ToFloat", "ToTensorV2")


def build_transforms(augment: DictConfig, train: bool, seed: int | None = None) -> A.Compose:
    """The configured transforms: uint8 (H, W, C) arrays, collated as they are and normalized per batch.

    Albumentations draws from its own generator, which global seeding does not reach: `seed` makes
    the sequence of augmentations repeatable (it still differs from image to image and epoch to epoch)."""
    steps = OmegaConf.to_container(augment.train if train else augment.eval, resolve=True)
    key = "augment.train" if train else "augment.eval"
    transforms = []
    for position, step in enumerate(steps):
        arguments = dict(step)
        name = arguments.pop("name", None)
        if name in _NOT_IN_LISTS:
            raise LabelcompError(f"{key}[{position}]: remove {name}; labelcomp converts and normalizes the images "
                                 "itself, with augment.mean and augment.std")
        transform_class = getattr(A, str(name), None)
        if transform_class is None:
            raise LabelcompError(f"{key}[{position}]: '{name}' is not an Albumentations transform")
        try:
            transforms.append(transform_class(**arguments))
        except (TypeError, ValueError) as error:
            raise LabelcompError(f"{key}[{position}] ({name}): {error}") from None
    if augment.mean is None or augment.std is None:
        raise LabelcompError("augment.mean / augment.std are not resolved; set them or let train resolve them")
    return A.Compose(transforms, seed=seed)


def stage_train_transforms(augment: DictConfig, stages: list[dict[str, Any]],
                           seed: int | None = None) -> list[tuple[int, A.Compose]]:
    """(first epoch, training transforms) of every stage: the configured transforms, and for a stage
    with an `image_size` of its own, the augmented image then resized to it. Resizing the result
    instead of building the list at another size holds for any transform list, and for a run's saved
    config too, where the sizes are numbers, no longer `${augment.image_size}`."""
    staged, first_epoch = [], 0
    for stage in stages:
        transforms = build_transforms(augment, train=True, seed=seed)
        size = stage.get("image_size")
        if size is not None and size != augment.image_size:
            # INTER_AREA: the least aliasing when shrinking, which is what a smaller early stage does
            transforms = A.Compose([*transforms.transforms, A.Resize(size, size, interpolation=cv2.INTER_AREA)],
                                   seed=seed)
        staged.append((first_epoch, transforms))
        first_epoch += stage["epochs"]
    return staged
