"""What `labelcomp export` accepts: evaluation transforms the standalone script reproduces exactly."""

import pytest

from labelcomp.config import load_config
from labelcomp.errors import LabelcompError
from labelcomp.export import eval_transforms

NORMALISED = ["augment.mean=[0.5,0.5,0.5]", "augment.std=[0.5,0.5,0.5]"]


def test_evaluation_transforms_are_recorded_as_albumentations_serialises_them():
    config = load_config(None, [*NORMALISED, "augment.image_size=48",
                                "augment.eval=[{name: SmallestMaxSize, max_size: 56}, {name: CenterCrop, height: 48, width: 48}]"])
    steps = eval_transforms(config)
    assert [step["__class_fullname__"] for step in steps] == ["SmallestMaxSize", "CenterCrop"]
    assert steps[0]["max_size"] == 56 and steps[0]["interpolation"] == 1 and steps[1]["height"] == 48


@pytest.mark.parametrize("step", ["{name: LongestMaxSize, max_size: 48}",
                                  "{name: CenterCrop, height: 48, width: 48, pad_if_needed: true}"])
def test_evaluation_transforms_the_script_cannot_reproduce_are_refused(step):
    config = load_config(None, [*NORMALISED, f"augment.eval=[{{name: Resize, height: 64, width: 64}}, {step}]"])
    with pytest.raises(LabelcompError, match=r"augment.eval\[1\] .*the exported script does only Resize, "
                                             "SmallestMaxSize, CenterCrop"):
        eval_transforms(config)
