"""Albumentations pipelines from the config (train / eval); test-time-augmentation views, policies and merging."""

from __future__ import annotations

from typing import Callable

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from scipy.special import log_softmax, softmax

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


def _scaled(scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def view(images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    return view


def _cropped(ratio: float, corner: tuple[float, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A crop of `ratio` times the image side, placed by `corner` (0: top/left, 0.5: centre, 1: bottom/right),
    resized back to the image's size so that it stacks with the other views."""
    def view(images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        crop_height, crop_width = max(1, round(height * ratio)), max(1, round(width * ratio))
        top, left = round((height - crop_height) * corner[0]), round((width - crop_width) * corner[1])
        crop = images[..., top:top + crop_height, left:left + crop_width]
        return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
    return view


# the dihedral group D4 on (..., H, W) image batches; flips first, so `flips` is the first four
_DIHEDRAL = {
    "identity": lambda images: images,
    "hflip": lambda images: images.flip(-1),
    "vflip": lambda images: images.flip(-2),
    "rot180": lambda images: images.flip(-2, -1),
    "rot90": lambda images: images.rot90(1, (-2, -1)),
    "rot270": lambda images: images.rot90(-1, (-2, -1)),
    "transpose": lambda images: images.transpose(-2, -1),
    "antitranspose": lambda images: images.flip(-2, -1).transpose(-2, -1),
}
_CORNERS = {"centre": (0.5, 0.5), "top_left": (0.0, 0.0), "top_right": (0.0, 1.0),
            "bottom_left": (1.0, 0.0), "bottom_right": (1.0, 1.0)}
TTA_POLICIES = ("none", "hflip", "flips", "d4", "multiscale", "fivecrop")
TTA_MERGES = ("mean", "geometric", "logits")


def _scale_view(scale: float) -> str:
    return "identity" if scale == 1 else f"scale_{scale:g}"


def policy_views(policy: str, tta: DictConfig) -> list[str]:
    """The view names a TTA policy averages over."""
    dihedral = list(_DIHEDRAL)
    views = {
        "none": ["identity"], "hflip": ["identity", "hflip"], "flips": dihedral[:4], "d4": dihedral,
        "multiscale": list(dict.fromkeys(_scale_view(float(scale)) for scale in tta.scales)),
        "fivecrop": [f"crop_{corner}" for corner in _CORNERS],
    }
    if policy not in views:
        raise LabelcompError(f"tta policy '{policy}' is unknown; use one of {', '.join(TTA_POLICIES)} or auto")
    return views[policy]


def check_tta(tta: DictConfig) -> None:
    for policy in [*tta.policies, *([] if tta.policy == "auto" else [tta.policy])]:
        policy_views(policy, tta)
    if tta.policy == "auto" and not tta.policies:
        raise LabelcompError("tta.policy is auto but tta.policies is empty; list the policies to choose from")
    if tta.merge not in TTA_MERGES:
        raise LabelcompError(f"tta.merge '{tta.merge}' is unknown; use one of {', '.join(TTA_MERGES)}")
    if not tta.scales or any(scale <= 0 for scale in tta.scales):
        raise LabelcompError(f"tta.scales {list(tta.scales)}: expected positive image-size factors, e.g. [0.875, 1.0, 1.125]")
    if not 0 < tta.crop <= 1:
        raise LabelcompError(f"tta.crop {tta.crop}: expected a fraction of the image side in (0, 1]")
    if tta.max_images < 1:
        raise LabelcompError(f"tta.max_images {tta.max_images}: expected at least 1 image per forward pass")


def scored_views(tta: DictConfig) -> list[str]:
    """Every view any listed policy (or the chosen one) needs, the identity first: predicted once
    per image, so that each policy can be scored on OOF without predicting again."""
    policies = [*tta.policies, *([] if tta.policy == "auto" else [tta.policy])]
    return list(dict.fromkeys(["identity", *(view for policy in policies for view in policy_views(policy, tta))]))


def view_transforms(names: list[str], tta: DictConfig) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Tensor transforms of a normalised (batch, channels, H, W) batch, one per view name."""
    transforms = dict(_DIHEDRAL)
    transforms.update({_scale_view(float(scale)): _scaled(float(scale)) for scale in tta.scales if scale != 1})
    transforms.update({f"crop_{corner}": _cropped(tta.crop, place) for corner, place in _CORNERS.items()})
    return [transforms[name] for name in names]


def merge_views(outputs: np.ndarray, merge: str) -> np.ndarray:
    """Merge per-view logits (views, images, classes) into probabilities (images, classes): the mean of
    the views' probabilities, their geometric mean renormalised, or the softmax of the mean logits.
    (For a softmax model the last two agree: log-probabilities differ from logits by a per-view constant.)"""
    if merge == "mean":
        return softmax(outputs, axis=-1).mean(axis=0)
    if merge == "geometric":
        return softmax(log_softmax(outputs, axis=-1).mean(axis=0), axis=-1)
    if merge == "logits":
        return softmax(outputs.mean(axis=0), axis=-1)
    raise LabelcompError(f"tta.merge '{merge}' is unknown; use one of {', '.join(TTA_MERGES)}")
