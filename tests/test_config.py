from pathlib import Path

import pytest

from labelcomp.config import load_config
from labelcomp.errors import LabelcompError

REPO = Path(__file__).resolve().parents[1]


def test_experiment_file_extends_its_base_and_overrides_win():
    config = load_config(REPO / "configs" / "smoke.yaml", ["cv.folds=3", "model.name=resnet18"])
    assert config.experiment == "smoke"  # from smoke.yaml
    assert config.competition == "competition/demo"  # from default.yaml, which smoke.yaml extends
    assert config.cv.folds == 3 and config.model.name == "resnet18"  # overrides
    crop = next(step for step in config.augment.train if step["name"] == "RandomResizedCrop")
    assert crop["size"] == [32, 32]  # interpolated from augment.image_size
    assert [stage.train for stage in config.finetune.stages] == ["head", "all"]


def test_pretrained_takes_bool_or_path():
    assert load_config(REPO / "configs" / "default.yaml", ["model.pretrained=false"]).model.pretrained is False
    assert load_config(REPO / "configs" / "default.yaml", ["model.pretrained=true"]).model.pretrained is True


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.nme=resnet18"], "unknown config key 'model.nme'"),
        (["cv.folds=many"], "cv.folds"),
        (["cv.folds"], "not key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, expected):
    with pytest.raises(LabelcompError, match=expected.replace("(", r"\(")):
        load_config(REPO / "configs" / "default.yaml", overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(LabelcompError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


SHIPPED = sorted(str(path.relative_to(REPO / "configs")) for path in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_their_stages_transforms_and_tta_resolve(name):
    from labelcomp.augment import build_transforms, check_tta
    from labelcomp.finetune import resolve_stages

    config = load_config(REPO / "configs" / name)
    resolve_stages(config.finetune)
    check_tta(config.tta)
    config.augment.mean, config.augment.std = [0.5] * 3, [0.25] * 3
    build_transforms(config.augment, train=True)
    build_transforms(config.augment, train=False)
    stem = name.removesuffix(".yaml")
    expected = {"default": "demo_mnv2"}.get(stem, stem.replace("ablations/", "ablation-").replace("_", "-"))
    assert config.experiment == expected
