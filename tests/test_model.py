import socket
import time

import pytest
import torch
from omegaconf import OmegaConf

from labelcomp.config import load_config
from labelcomp.errors import LabelcompError
from labelcomp.model import apply_weights_card, build_model, resolve_normalization
from conftest import DEMO, REPO

WEIGHTS = DEMO / "weights" / "mobilenetv2_035_keras_imagenet_backbone.pth"


def test_local_weights_are_loaded_with_the_card_arguments():
    model = load_config(REPO / "configs" / "default.yaml", [f"model.pretrained={WEIGHTS}"]).model
    apply_weights_card(model)
    assert model.kwargs == {"pad_type": "same", "bn_eps": 0.001}
    net = build_model(model, num_classes=5)
    state = torch.load(WEIGHTS, map_location="cpu")
    assert all(torch.equal(net.state_dict()[name], tensor) for name, tensor in state.items())
    # zero-initialised head: the head-only stage starts from uniform probabilities
    assert not net.get_classifier().weight.any() and not net.get_classifier().bias.any()
    assert resolve_normalization(model) == ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


def test_random_init_keeps_timm_normalisation():
    model = load_config(None, ["competition=x", "model.name=resnet18", "model.pretrained=false"]).model
    net = build_model(model, num_classes=3)
    assert net.get_classifier().out_features == 3
    mean, std = resolve_normalization(model)
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])


def test_unreachable_hub_fails_fast_with_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", offline)
    model = OmegaConf.structured(load_config(None, ["competition=x", "model.pretrained=true"]).model)
    started = time.monotonic()
    with pytest.raises(LabelcompError, match="cannot reach the timm weights hub .* model.pretrained=path/to/weights.pth"):
        build_model(model, num_classes=3)
    assert time.monotonic() - started < 5
