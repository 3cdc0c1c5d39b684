"""Test-time augmentation: the views of each policy (tensor operations on a normalised batch), merging
the views' outputs into probabilities, and choosing a policy on OOF predictions."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from scipy.special import log_softmax, softmax

from labelcomp.config import Merge
from labelcomp.errors import LabelcompError
from labelcomp.metrics import Metric


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
    return views[str(policy)]


def scored_views(tta: DictConfig) -> list[str]:
    """Every view any listed policy (or the chosen one) needs, the identity first: predicted once
    per image, so that each policy can be scored on OOF without predicting again."""
    return list(dict.fromkeys(["identity", *(view for policy in listed_policies(tta)
                                             for view in policy_views(policy, tta))]))


def view_transforms(names: list[str], tta: DictConfig) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Tensor transforms of a normalised (batch, channels, H, W) batch, one per view name."""
    transforms = dict(_DIHEDRAL)
    transforms.update({_scale_view(float(scale)): _scaled(float(scale)) for scale in tta.scales if scale != 1})
    transforms.update({f"crop_{corner}": _cropped(tta.crop, place) for corner, place in _CORNERS.items()})
    return [transforms[name] for name in names]


def merge_views(outputs: np.ndarray, merge: str) -> np.ndarray:
    """Merge per-view logits (views, images, classes) into probabilities (images, classes): the mean of
    the views' probabilities, or their geometric mean renormalised (for a softmax model the softmax of
    the mean logits: log-probabilities differ from logits by a per-view constant)."""
    if merge == Merge.mean:
        return softmax(outputs, axis=-1).mean(axis=0)
    return softmax(log_softmax(outputs, axis=-1).mean(axis=0), axis=-1)


def listed_policies(tta: DictConfig) -> list[str]:
    """The policies scored on OOF: those listed, and the configured one."""
    chosen = [] if tta.policy == "auto" else [str(tta.policy)]
    return list(dict.fromkeys([*map(str, tta.policies), *chosen]))


def choose_policy(tta: DictConfig, metric: Metric, target: np.ndarray, views: list[str], outputs: np.ndarray,
                  ) -> tuple[str, dict[str, float], dict[str, np.ndarray]]:
    """Each listed policy merged and scored on the OOF outputs (views, images, classes); the chosen
    policy is the configured one, or with `auto` the best on OOF (the first listed among equals: the
    cheaper). Returns it, every policy's score and every policy's probabilities."""
    policies = listed_policies(tta)
    missing = sorted({view for policy in policies for view in policy_views(policy, tta)} - set(views))
    if missing:
        raise LabelcompError(f"OOF predictions lack the TTA views {missing}; list their policies in tta.policies "
                             "before training, or choose a policy whose views were predicted")
    proba = {policy: merge_views(outputs[[views.index(view) for view in policy_views(policy, tta)]], tta.merge)
             for policy in policies}
    scores = {policy: metric.score(target, proba[policy]) for policy in policies}
    if tta.policy != "auto":
        return str(tta.policy), scores, proba
    best = max if metric.mode == "max" else min
    return best(policies, key=lambda policy: scores[policy]), scores, proba


def run_policy(scores: dict, tta: DictConfig) -> str:
    """The policy a finished run predicts the test set with: the configured one, or with `auto` the one
    the run chose on its OOF predictions (scores.json)."""
    return scores["tta"]["policy"] if tta.policy == "auto" else str(tta.policy)
