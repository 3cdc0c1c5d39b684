"""TTA: views, policies, merge modes, batched and chunked inference that decodes each image once."""

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import nn

from labelcomp import data as data_module
from labelcomp.config import load_config
from labelcomp.ensemble import fold_weights
from labelcomp.predict import ViewPredictor, predict_views
from labelcomp.tta import merge_views, policy_views, scored_views, view_transforms
from conftest import REPO, tiny_config

TTA = load_config(REPO / "configs" / "smoke.yaml").tta


class FlipInvariant(nn.Module):
    """Per-pixel features and a global max: exactly invariant to any rearrangement of the pixels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pixel = nn.Conv2d(3, 16, kernel_size=1)
        self.head = nn.Linear(16, 4)

    def forward(self, images):
        return self.head(self.pixel(images).relu().amax(dim=(-2, -1)))


class PositionSensitive(nn.Module):
    """A linear layer over the flattened image: any flip changes its output."""

    def __init__(self, size: int):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3 * size * size, 4)

    def forward(self, images):
        return self.linear(images.flatten(1))


class CountingNetwork(nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network = network
        self.batch_sizes = []

    def forward(self, images):
        self.batch_sizes.append(len(images))
        return self.network(images)


def _images(tmp_path, tiny_competition):
    config = tiny_config(tmp_path, tiny_competition)
    config.augment.mean, config.augment.std = [0.5] * 3, [0.5] * 3
    frame = pd.read_csv(tiny_competition / "train.csv").head(12)
    frame["path"] = [str(tiny_competition / "train_images" / image_id) for image_id in frame["image_id"]]
    return config, frame


def test_a_flip_invariant_model_gives_identical_probabilities_under_flips(tmp_path, tiny_competition):
    config, frame = _images(tmp_path, tiny_competition)
    for policy in ("flips", "d4"):
        views = policy_views(policy, config.tta)
        outputs = predict_views(FlipInvariant().eval(), frame, config, views)
        assert outputs.shape == (len(views), len(frame), 4)
        for view in outputs[1:]:
            np.testing.assert_array_equal(view, outputs[0])
        merged = merge_views(outputs, "mean")
        np.testing.assert_allclose(merged, merge_views(outputs[:1], "mean"), rtol=0, atol=1e-7)
    # the views are not all the identity: a model that sees positions gives a different output for each
    views = policy_views("d4", config.tta)
    outputs = predict_views(PositionSensitive(32).eval(), frame, config, views)
    for first in range(len(views)):
        for second in range(first + 1, len(views)):
            assert not np.allclose(outputs[first], outputs[second]), (views[first], views[second])


def test_views_are_the_transforms_their_names_say():
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    names = policy_views("d4", TTA)
    transformed = dict(zip(names, (view(image) for view in view_transforms(names, TTA))))
    assert torch.equal(transformed["identity"], image)
    assert torch.equal(transformed["hflip"][..., 0], image[..., 3])
    assert torch.equal(transformed["vflip"][..., 0, :], image[..., 3, :])
    assert torch.equal(transformed["rot180"][..., 0, 0], image[..., 3, 3])
    assert torch.equal(transformed["transpose"][..., 1, 2], image[..., 2, 1])
    # rotating by 90 degrees four times, or combining it with its inverse, gives the image back
    assert torch.equal(transformed["rot90"].rot90(1, (-2, -1)).rot90(2, (-2, -1)), image)
    assert torch.equal(transformed["rot270"].rot90(1, (-2, -1)), image)
    config = OmegaConf.merge(TTA, {"scales": [0.5, 1.0, 2.0], "crop": 0.5})
    (small, identity, large) = view_transforms(policy_views("multiscale", config), config)
    assert small(image).shape[-2:] == (2, 2) and large(image).shape[-2:] == (8, 8) and identity(image) is image
    crops = dict(zip(policy_views("fivecrop", config), view_transforms(policy_views("fivecrop", config), config)))
    top_left = crops["crop_top_left"](image)
    assert top_left.shape == image.shape
    # a 2x2 corner upsampled to 4x4 keeps the corner's pixels at the corners
    assert torch.equal(top_left[..., 0, 0], image[..., 0, 0]) and torch.equal(top_left[..., 3, 3], image[..., 1, 1])
    assert torch.equal(crops["crop_bottom_right"](image)[..., 3, 3], image[..., 3, 3])


def test_merge_modes_match_hand_computed_values():
    # one image, two views: probabilities (0.25, 0.75) and (0.5, 0.5)
    outputs = np.array([[[0.0, np.log(3.0)]], [[0.0, 0.0]]])
    np.testing.assert_allclose(merge_views(outputs, "mean"), [[0.375, 0.625]])
    geometric = np.array([np.sqrt(0.25 * 0.5), np.sqrt(0.75 * 0.5)])
    np.testing.assert_allclose(merge_views(outputs, "geometric"), [geometric / geometric.sum()])
    # which for a softmax model is the softmax of the mean logits (0, ln 3 / 2): 1 : sqrt(3)
    np.testing.assert_allclose(merge_views(outputs, "geometric"), [[1 / (1 + np.sqrt(3)), np.sqrt(3) / (1 + np.sqrt(3))]])
    # one view: every mode is that view's softmax
    for mode in ("mean", "geometric"):
        np.testing.assert_allclose(merge_views(outputs[:1], mode), [[0.25, 0.75]])


def test_views_are_stacked_into_chunks_within_the_memory_bound():
    torch.manual_seed(1)
    images = torch.randn(5, 3, 8, 8)
    names = ["identity", "hflip", "rot90", "scale_0.5", "crop_centre"]
    config = OmegaConf.merge(TTA, {"scales": [0.5, 1.0]})
    any_size = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 4))
    with torch.no_grad():
        one_by_one = torch.stack([any_size(view(images)) for view in view_transforms(names, config)])
    for max_images in (1000, 3):
        network = CountingNetwork(any_size)
        predictor = ViewPredictor(network, view_transforms(names, config), max_images)
        with torch.no_grad():
            outputs = predictor.predict_step((images, torch.zeros(5)), 0)
        torch.testing.assert_close(outputs, one_by_one)
        assert sum(network.batch_sizes) == len(names) * len(images)
        if max_images == 1000:
            # the four 8x8 views go through in one forward pass, the 4x4 one in another
            assert network.batch_sizes == [20, 5]
        else:
            assert max(network.batch_sizes) <= 3


def test_each_image_is_decoded_once_whatever_the_number_of_views(tmp_path, tiny_competition, monkeypatch):
    config, frame = _images(tmp_path, tiny_competition)
    decoded = []
    read_image = data_module.read_image
    monkeypatch.setattr(data_module, "read_image", lambda path, *size: decoded.append(path) or read_image(path, *size))
    views = scored_views(config.tta)
    assert len(views) == 15  # d4's 8, two more scales, five crops
    predict_views(FlipInvariant().eval(), frame, config, views)
    assert sorted(decoded) == sorted(frame["path"])


def test_scored_views_cover_every_listed_policy_once_identity_first():
    config = OmegaConf.merge(TTA, {"policy": "fivecrop", "policies": ["none", "hflip"]})
    assert scored_views(config) == ["identity", "hflip", "crop_centre", "crop_top_left", "crop_top_right",
                                    "crop_bottom_left", "crop_bottom_right"]


def test_fold_weights_follow_fold_scores():
    np.testing.assert_allclose(fold_weights([0.5, 0.7], "equal", "max"), [0.5, 0.5])
    np.testing.assert_allclose(fold_weights([0.5, 0.7], "score", "max"), [0.5 / 1.2, 0.7 / 1.2])
    # lower is better: the fold with half the loss gets twice the weight
    np.testing.assert_allclose(fold_weights([1.0, 0.5], "score", "min"), [1 / 3, 2 / 3])


def test_tta_shorthand_names_the_policy():
    assert load_config(None, ["tta=d4"]).tta.policy == "d4"
