import socket

import pytest
import torch
from omegaconf import OmegaConf

from labelcomp.config import load_config
from labelcomp.errors import LabelcompError
from labelcomp.model import apply_weights_card, build_model
from labelcomp.resolve import resolve_config
from conftest import REPO

WEIGHTS = REPO / "weights" / "mobilenetv2_035_keras_imagenet_backbone.pth"


def test_local_weights_are_loaded_with_the_card_arguments():
    model = load_config(REPO / "configs" / "default.yaml", [f"model.pretrained={WEIGHTS}"]).model
    apply_weights_card(model)
    assert model.kwargs == {"pad_type": "same", "bn_eps": 0.001}
    net = build_model(model, num_classes=5)
    state = torch.load(WEIGHTS, map_location="cpu")
    assert all(torch.equal(net.state_dict()[name], tensor) for name, tensor in state.items())
    # zero-initialised head: the head-only stage starts from uniform probabilities
    assert not net.get_classifier().weight.any() and not net.get_classifier().bias.any()


def _resolved(tmp_path, *overrides):
    config = load_config(REPO / "configs" / "smoke.yaml", [f"paths.runs={tmp_path}", "trainer.precision=32-true",
                                                           "trainer.channels_last=false", *overrides])
    return config, resolve_config(config, num_classes=5)


def test_resolved_config_is_a_new_object_with_the_weights_card_mean_and_std(tmp_path):
    config, resolved = _resolved(tmp_path)
    assert resolved is not config and config.augment.mean is None and config.model.kwargs == {}
    assert list(resolved.augment.mean) == [0.5] * 3 and list(resolved.augment.std) == [0.5] * 3
    assert resolved.model.kwargs == {"pad_type": "same", "bn_eps": 0.001}
    assert [stage.train for stage in resolved.finetune.stages] == ["head", "all"]
    assert isinstance(resolved.data.num_workers, int)


def test_random_init_keeps_timm_normalisation(tmp_path):
    _, resolved = _resolved(tmp_path, "model.name=resnet18", "model.pretrained=false")
    assert list(resolved.augment.mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(resolved.augment.std) == pytest.approx([0.229, 0.224, 0.225])


def test_unreachable_hub_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", offline)
    model = OmegaConf.structured(load_config(None, ["competition=x", "model.pretrained=true"]).model)
    with pytest.raises(LabelcompError, match="cannot reach the timm weights hub .* model.pretrained=path/to/weights.pth"):
        build_model(model, num_classes=3)
