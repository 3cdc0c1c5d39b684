"""What a run will use: the config with everything left open or `auto` decided, as a new object.

`resolve_config` fills the fine-tuning stages from the preset, merges the weights card, checks that
the weights load, takes mean and std from timm's data config of the model, checks the trainer
settings with Lightning, chooses precision, memory format and loader workers for this machine, fixes
the size images are decoded at, and
checks that the transforms build. The result is the
run's saved config.yaml; a run that exists already gives its recorded choices to later fold jobs.
"""

from __future__ import annotations

import copy
import logging

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from timm.data import resolve_model_data_config

from labelcomp.augment import build_transforms
from labelcomp.data import short_side
from labelcomp.errors import LabelcompError
from labelcomp.hardware import fastest_variant, loader_workers
from labelcomp.loggers import check_loggers
from labelcomp.model import apply_weights_card, build_model
from labelcomp.schedule import resolve_stages

_logger = logging.getLogger(__name__)

# chosen for the machine: a run that recorded them keeps them, so every fold job trains alike
MEASURED = ("trainer.precision", "trainer.channels_last", "data.num_workers")


def resolve_config(config: DictConfig, num_classes: int, recorded: DictConfig | None = None) -> DictConfig:
    """A resolved copy of `config`; `config` itself is left as it was. Values `config` leaves `auto`
    among MEASURED come from `recorded` (the config of the run being joined) where given."""
    resolved = copy.deepcopy(config)
    resolved.finetune.merge_with({"stages": resolve_stages(resolved.finetune)})
    last_size = resolved.finetune.stages[-1].image_size
    if last_size not in (None, resolved.augment.image_size):
        # the best checkpoint is chosen among the epochs at the test size (finetune.BestValidated)
        raise LabelcompError(f"finetune.stages: the last stage trains at {last_size} px, but models are validated and "
                             f"tested at augment.image_size={resolved.augment.image_size}; end with a stage at that size "
                             "(image_size null), or set augment.image_size to the size to test at")
    apply_weights_card(resolved.model)
    # built once with its weights: a weights file that does not load stops here, before any run folder
    data_config = resolve_model_data_config(build_model(resolved.model, num_classes))
    _logger.info("backbone %s, pretrained: %s", resolved.model.name, resolved.model.pretrained)
    resolved.augment.mean = resolved.augment.mean or list(data_config["mean"])
    resolved.augment.std = resolved.augment.std or list(data_config["std"])
    if recorded is not None:
        keep_recorded_choices(resolved, recorded)
    check_trainer(resolved.trainer)
    check_loggers(resolved)
    resolved.trainer.precision, resolved.trainer.channels_last = fastest_variant(resolved, num_classes)
    resolved.data.num_workers = loader_workers(resolved)
    resolved.data.short_side = short_side(resolved)
    build_transforms(resolved.augment, train=True)
    build_transforms(resolved.augment, train=False)
    return resolved


def keep_recorded_choices(config: DictConfig, recorded: DictConfig) -> None:
    """The MEASURED values `config` leaves `auto`, from a run's recorded config."""
    for key in MEASURED:
        if OmegaConf.select(config, key) == "auto":
            OmegaConf.update(config, key, OmegaConf.select(recorded, key))


def check_trainer(trainer: DictConfig) -> None:
    """Lightning's own checks of accelerator, devices, nodes, strategy and precision on this machine,
    made by building a Trainer (which starts nothing), so that a setting that cannot work here stops
    before any run folder or measurement."""
    precision = "32-true" if trainer.precision == "auto" else trainer.precision
    try:
        L.Trainer(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
                  strategy=trainer.strategy, precision=precision, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as error:
        settings = (f"accelerator={trainer.accelerator} devices={trainer.devices} num_nodes={trainer.num_nodes} "
                    f"strategy={trainer.strategy} precision={trainer.precision}")
        raise LabelcompError(f"trainer settings {settings} cannot run here: {str(error).strip().splitlines()[0]}") from None
