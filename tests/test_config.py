import re
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
        # choices among names fail at load, with the valid names
        (["tta.merge=logits"], "'tta.merge': Invalid value 'logits', expected one of [mean, geometric]"),
        (["tta.policies=[none,hflp]"], "'tta.policies[1]': Invalid value 'hflp'"),
        (["tta.policy=best"], "'tta.policy': Invalid value 'best'"),
        (["ensemble.fold_weights=scores"], "'ensemble.fold_weights': Invalid value 'scores'"),
        (["ensemble.blend_objective=auc"], "'ensemble.blend_objective': Invalid value 'auc'"),
        (["finetune.preset=slow"], "'finetune.preset': Invalid value 'slow'"),
        # values the types admit but no run can use
        (["tta.crop=1.5"], "'tta.crop': 1.5; expected a fraction of the image side in (0, 1]"),
        (["tta.scales=[1.0,0]"], "'tta.scales': [1.0, 0.0]; expected positive image-size factors"),
        (["tta.max_images=0"], "'tta.max_images': 0; expected at least 1"),
        (["tta.policies=[]"], "'tta.policies': []; expected at least one policy"),
        (["cv.folds=1"], "'cv.folds': 1; expected at least 2 folds"),
    ],
)
def test_bad_overrides_name_the_key(overrides, expected):
    with pytest.raises(LabelcompError, match=re.escape(expected)):
        load_config(REPO / "configs" / "default.yaml", overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(LabelcompError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


SHIPPED = sorted(str(path.relative_to(REPO / "configs")) for path in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_their_stages_and_transforms_resolve(name):
    from labelcomp.augment import build_transforms
    from labelcomp.schedule import resolve_stages

    config = load_config(REPO / "configs" / name)
    resolve_stages(config.finetune)
    config.augment.mean, config.augment.std = [0.5] * 3, [0.25] * 3
    build_transforms(config.augment, train=True)
    build_transforms(config.augment, train=False)
    stem = name.removesuffix(".yaml")
    expected = {"default": "demo_mnv2"}.get(stem, stem.replace("ablations/", "ablation-").replace("_", "-"))
    assert config.experiment == expected


def test_a_named_policy_needs_no_list_and_choices_read_as_their_names():
    config = load_config(REPO / "configs" / "default.yaml", ["tta=hflip", "tta.policies=[]", "tta.merge=geometric"])
    assert config.tta.policy == "hflip" and f"{config.tta.merge}" == "geometric"


def test_recipes_stand_on_the_schema_not_on_the_demo():
    quick = load_config(REPO / "configs" / "quick.yaml")
    assert quick.competition is None and quick.data.cache_images is False  # the demo's settings stay the demo's
    assert [step["name"] for step in quick.augment.train] == ["RandomResizedCrop", "HorizontalFlip", "ColorJitter"]
    assert quick.finetune.stages[-1].image_size is None  # the quick recipe ends at the size it is tested at
    quality = load_config(REPO / "configs" / "quality.yaml")
    # its own stages replace quick's, so none of them trains at quick's 64 px
    assert quality.augment.image_size == 160 and [stage.image_size for stage in quality.finetune.stages] == [None, None]
