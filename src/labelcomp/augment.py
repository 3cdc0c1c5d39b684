"""Albumentations pipelines from the config (train / eval) and the test-time-augmentation views."""

from __future__ import annotations

from typing import Callable

import albumentations as A
import torch
from albumentations.pytorch import ToTensorV2
from omegaconf import DictConfig, OmegaConf

from labelcomp.errors import LabelcompError


def build_transforms(augment: DictConfig, train: bool, seed: int | None = None) -> A.Compose:
    """The configured transforms, then Normalize with the resolved mean/std and ToTensorV2.

    Albumentations draws from its own generator, which global seeding does not reach: `seed` makes
    the sequence of augmentations repeatable (it still differs from image to image and epoch to epoch)."""
    steps = OmegaConf.to_container(augment.train if train else augment.eval, resolve=True)
    key = "augment.train" if train else "augment.eval"
    transforms = []
    for position, step in enumerate(steps):
        arguments = dict(step)
        name = arguments.pop("name", None)
        transform_class = getattr(A, str(name), None)
        if transform_class is None:
            raise LabelcompError(f"{key}[{position}]: '{name}' is not an Albumentations transform")
        try:
            transforms.append(transform_class(**arguments))
        except (TypeError, ValueError) as error:
            raise LabelcompError(f"{key}[{position}] ({name}): {error}") from None
    if augment.mean is None or augment.std is None:
        raise LabelcompError("augment.mean / augment.std are not resolved; set them or let train resolve them")
    transforms += [A.Normalize(mean=list(augment.mean), std=list(augment.std)), ToTensorV2()]
    return A.Compose(transforms, seed=seed)


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def _hflip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


# the identity comes first: view 0 is the prediction without TTA
TTA_POLICIES: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": [_identity],
    "hflip": [_identity, _hflip],
}


def tta_views(policy: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    if policy not in TTA_POLICIES:
        raise LabelcompError(f"tta '{policy}' is unknown; use one of {sorted(TTA_POLICIES)}")
    return TTA_POLICIES[policy]
