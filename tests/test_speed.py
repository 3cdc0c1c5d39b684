"""Speed choices: precision and memory format measured and cached, workers for the cores, the bench's output."""

import json
import re

import pytest
import torch
from omegaconf import OmegaConf

from labelcomp import bench, hardware, speed
from labelcomp.bench import PairedModelOnly, run_bench
from labelcomp.config import load_config
from labelcomp.hardware import fastest_variant, loader_workers
from labelcomp.model import ClassifierModule
from labelcomp.speed import Variant, training_rate
from conftest import REPO, tiny_config

# three measurements per variant, as measure_variants takes them; the choice follows the medians
RATES = {Variant("32-true", False): [100.0, 90.0, 300.0], Variant("32-true", True): [180.0, 170.0, 175.0],
         Variant("bf16-mixed", False): [150.0, 250.0, 140.0], Variant("bf16-mixed", True): [120.0, 125.0, 110.0]}


def _config(tmp_path, *overrides):
    return load_config(REPO / "configs" / "smoke.yaml", [f"paths.runs={tmp_path / 'runs'}", *overrides])


def test_auto_picks_the_fastest_measured_variant_once_per_machine_and_config(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "measure_variants", lambda config, classes, seconds: calls.append(1) or RATES)
    assert fastest_variant(_config(tmp_path), 20) == ("32-true", True)
    assert fastest_variant(_config(tmp_path), 20) == ("32-true", True) and len(calls) == 1
    cached = json.loads((tmp_path / "runs" / ".speed.json").read_text())
    assert len(cached) == 1 and len(next(iter(cached.values()))) == 4
    # the key names the device and the library versions: another machine or release measures anew
    key = next(iter(cached))
    assert hardware.device_name(torch.device("cpu")) in key and f"torch {torch.__version__}" in key
    # another image size is another measurement
    fastest_variant(_config(tmp_path, "augment.image_size=48"), 20)
    assert len(calls) == 2


def test_a_fixed_half_of_the_choice_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "measure_variants", lambda config, classes, seconds: RATES)
    assert fastest_variant(_config(tmp_path, "trainer.precision=bf16-mixed"), 20) == ("bf16-mixed", False)
    assert fastest_variant(_config(tmp_path, "trainer.channels_last=false"), 20) == ("bf16-mixed", False)
    fixed = _config(tmp_path, "trainer.precision=32-true", "trainer.channels_last=false")
    monkeypatch.setattr(speed, "measure_variants", lambda *args: pytest.fail("nothing to measure"))
    assert fastest_variant(fixed, 20) == ("32-true", False)


def test_training_rate_measures_real_steps():
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(4, 5))
    before = [parameter.clone() for parameter in network.parameters()]
    rate = training_rate(network, Variant("32-true", True), 16, 4, 5, torch.device("cpu"), seconds=0.05)
    assert rate > 0
    assert any(not torch.equal(old, new) for old, new in zip(before, network.parameters()))


def test_channels_last_module_predicts_what_the_contiguous_one_does():
    config = load_config(REPO / "configs" / "smoke.yaml", ["model.pretrained=false"])
    arguments = dict(model=OmegaConf.to_container(config.model), optim=OmegaConf.to_container(config.optim),
                     finetune={"stages": []}, num_classes=4, metric="accuracy")
    torch.manual_seed(0)
    contiguous = ClassifierModule(**arguments).eval()
    torch.manual_seed(0)
    channels_last = ClassifierModule(**arguments, channels_last=True).eval()
    convolution = next(module for module in channels_last.net.modules() if isinstance(module, torch.nn.Conv2d))
    assert convolution.weight.is_contiguous(memory_format=torch.channels_last)
    assert channels_last.hparams.channels_last
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(channels_last(images), contiguous(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cores, accelerator, devices, expected", [
    (2, "cpu", "auto", 0), (4, "cpu", "auto", 0), (16, "cpu", "auto", 4),
    # every GPU process gets its share of the cores, less one for itself
    (16, "gpu", "auto", 15), (4, "gpu", "1", 3), (16, "gpu", "4", 3), (16, "gpu", "[0,1]", 7), (2, "gpu", "4", 1),
])
def test_workers_follow_the_cores(monkeypatch, cores, accelerator, devices, expected):
    monkeypatch.setattr(hardware, "cores", lambda: cores)
    monkeypatch.setattr(hardware, "device_of", lambda name: torch.device("cuda" if name == "gpu" else "cpu"))
    monkeypatch.setattr(hardware.torch.cuda, "device_count", lambda: 1)
    config = load_config(None, [f"trainer.accelerator={accelerator}", f"trainer.devices={devices}"])
    assert loader_workers(config) == expected
    assert loader_workers(load_config(None, ["data.num_workers=1"])) == 1


@pytest.mark.slow
def test_bench_prints_every_measurement_and_the_ratio_line(tmp_path, tiny_competition):
    config = tiny_config(tmp_path, tiny_competition)
    config.trainer.precision = config.trainer.channels_last = config.data.num_workers = "auto"
    report = run_bench(config, seconds=0.05)
    lines = report.splitlines()
    assert sum("channels_last" in line or "contiguous" in line for line in lines[2:6]) == 4
    assert any(line.startswith("(b) pipeline training") for line in lines)
    assert any(line.startswith("(c) training loader alone") for line in lines)
    assert sum(line.startswith("(d) inference") for line in lines) == 3
    assert re.fullmatch(r"pipeline/model-only = \d+\.\d\d  loading/model-only = \d+\.\d\d", lines[-1])


def test_paired_bench_times_alternating_blocks_after_the_warmup(monkeypatch):
    # a clock that only the steps move: pipeline steps take 1 s (2 s after a slow one), model-only steps 3 s
    clock = {"now": 0.0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    model_steps = []

    def model_step():
        model_steps.append(clock["now"])
        clock["now"] += 3.0

    paired = PairedModelOnly(model_step, block=2, warmup=3, device=torch.device("cpu"))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for step in range(1, 10):
            clock["now"] += 2.0 if step == 6 else 1.0
            paired.on_train_batch_end(None, None, None, None, step - 1)
        assert torch.are_deterministic_algorithms_enabled()  # the pipeline's mode comes back after a block
    finally:
        torch.use_deterministic_algorithms(False)
    # blocks after steps 3, 5, 7, 9: no model-only step during the warmup, two per block
    assert len(model_steps) == 8
    assert paired.model_seconds == [6.0] * 4
    # the pipeline blocks between them: steps 4-5, 6-7 (one slow step), 8-9; not the warmup
    assert paired.pipeline_seconds == [2.0, 3.0, 2.0]
    assert paired.ratios() == [3.0, 2.0, 3.0]
