"""The config schema with every default once, YAML loading with `extends`, `key=value` overrides.

Configs are OmegaConf structured configs, so an unknown or mistyped key fails at load time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from labelcomp.errors import LabelcompError
from labelcomp.runs import write_text_atomic

_logger = logging.getLogger(__name__)


class Choice(str, Enum):
    """Choices among names are Enums, so that a typo fails when the config loads, with the valid names
    listed. Members are also their names as str: `config.tta.merge == "mean"` holds, and they print,
    format and serialise (JSON, YAML) as the plain name."""

    def __str__(self) -> str:
        return self.value


class Preset(Choice):
    head = "head"  # a linear probe on frozen features
    freeze_unfreeze = "freeze_unfreeze"  # fastai's fine_tune: the head, then all layers
    gradual = "gradual"  # the head, then the top two block groups, then all layers


class TTAPolicy(Choice):
    none = "none"
    hflip = "hflip"
    flips = "flips"  # horizontal and vertical
    d4 = "d4"  # flips and 90 degree rotations
    multiscale = "multiscale"  # tta.scales
    fivecrop = "fivecrop"  # tta.crop of the side, resized back


class TTAChoice(Choice):
    """`tta.policy`: a policy, or auto: the best of `tta.policies` on OOF."""

    auto = "auto"
    none = "none"
    hflip = "hflip"
    flips = "flips"
    d4 = "d4"
    multiscale = "multiscale"
    fivecrop = "fivecrop"


class Merge(Choice):
    mean = "mean"  # of the views' probabilities
    geometric = "geometric"  # of the views' probabilities, renormalised (= softmax of the mean logits)


class ClassWeights(Choice):
    none = "none"
    balanced = "balanced"  # n / (classes x n_c), scikit-learn's compute_class_weight: every class weighs alike
    sqrt = "sqrt"  # the square root of balanced: rare classes count more, not as much


class LoggerName(Choice):
    csv = "csv"
    tensorboard = "tensorboard"
    mlflow = "mlflow"
    wandb = "wandb"


class PseudoTargets(Choice):
    hard = "hard"  # the labelling model's class
    soft = "soft"  # the labelling model's probabilities


class PseudoLabeler(Choice):
    # fold k learns only the labels of the parent's fold-k model, which never saw fold k's validation
    # images: OOF stays exactly as honest as without pseudo-labels
    fold = "fold"
    # every fold learns the labels of the parent's whole fold ensemble (its submission): more accurate
    # labels, but those carry a little of fold k's validation labels into fold k, so OOF may read a
    # little high; held-out images (the leaderboard) are unaffected
    ensemble = "ensemble"


class PseudoInit(Choice):
    pretrained = "pretrained"  # each fold starts from model.pretrained, as any run
    parent = "parent"  # each fold goes on from the parent's model of the same fold (same backbone)


class FoldWeights(Choice):
    equal = "equal"
    score = "score"  # test probabilities weighted by each fold's OOF score


class BlendObjective(Choice):
    logloss = "logloss"
    metric = "metric"  # the competition's metric, refined from the log-loss weights


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any timm model name
    # true: timm hub weights; false: random init; a path: a local weights file
    pretrained: Any = True
    # overlay on timm's pretrained config, e.g. the mean/std a local weights file was trained with
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)  # more timm.create_model arguments
    drop_rate: float = 0.0
    # timm's default head init starts some backbones at cross-entropy ~9, which stalls a head-only stage
    zero_init_head: bool = True


@dataclass
class CVConfig:
    folds: int = 5


@dataclass
class DataConfig:
    batch_size: int = 64
    # auto: chosen for the cores and device (hardware.loader_workers); on a small CPU machine workers
    # compete with the model
    num_workers: Any = "auto"
    # Larger images are reduced once, when decoded, so that their shorter side is this many pixels (cv2
    # INTER_AREA, after libjpeg's 1/2-1/8 scaled decoding for JPEGs of at least twice the size): the
    # transforms crop and resize these, not the files at full size. auto: 1.25 x augment.image_size;
    # null: full size (the pixels of the files as they are)
    short_side: Any = "auto"
    # the reduced images as .npy files in <cache_dir>/<short_side>px, keyed by file content: decoded once
    # for every fold, run, resume and fold job (`labelcomp cache` shows the size and clears it)
    disk_cache: bool = True
    cache_dir: str = "${paths.runs}/.image_cache"
    cache_images: bool = False  # keep the images in memory as well (small datasets)


@dataclass
class AugmentConfig:
    image_size: int = 224
    mean: Optional[list[float]] = None  # None: from the backbone's pretrained config
    std: Optional[list[float]] = None
    # Albumentations transforms by class name and arguments, on uint8 (H, W, C) images; batches are
    # converted and normalized with mean/std on their device (data.normalize)
    train: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"name": "RandomResizedCrop", "size": ["${augment.image_size}", "${augment.image_size}"],
             "scale": [0.6, 1.0]},
            {"name": "HorizontalFlip", "p": 0.5},
            {"name": "ColorJitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.0, "p": 0.5},
        ]
    )
    eval: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"name": "Resize", "height": "${augment.image_size}", "width": "${augment.image_size}"},
        ]
    )


@dataclass
class StageConfig:
    epochs: int = 1
    train: str = "head"  # head | top:N (the last N block groups of timm's group_matcher) | all
    lr: float = 1e-3  # learning rate of the head
    backbone_lr_mult: float = 0.1  # block groups' lr = lr * backbone_lr_mult ...
    layer_decay: Optional[float] = None  # ... or lr * layer_decay ** (depth below the head)
    train_bn: bool = False  # BatchNorm layers of frozen block groups train (weights and running statistics)
    warmup_epochs: float = 0.0
    # pixels of the stage's training images (each augmented image resized to it); null: augment.image_size.
    # Validation, OOF and test images stay at augment.image_size: early stages at a smaller size train
    # faster, the last ones at the size the model is tested at (progressive resizing)
    image_size: Optional[int] = None


@dataclass
class FinetuneConfig:
    # a named recipe over `epochs` epochs; `stages` overrides it
    preset: Optional[Preset] = Preset.freeze_unfreeze
    epochs: int = 6
    stages: list[StageConfig] = field(default_factory=list)
    min_lr_ratio: float = 0.01  # the cosine decay of each stage ends at lr * min_lr_ratio


@dataclass
class OptimConfig:
    name: str = "adamw"  # any timm.optim.create_optimizer_v2 name
    weight_decay: float = 0.05
    # true: as timm's create_optimizer_v2, no weight decay for biases and norm weights (1-d parameters).
    # Off: in the quick recipe's 3-fold pilot (5,000 images) it scored OOF 0.5882 / 0.6012 with TTA
    # against 0.5886 / 0.6026 with decay on every parameter (configs/ablations/no_decay_norm_and_bias.yaml)
    filter_bias_and_bn: bool = False
    label_smoothing: float = 0.0


@dataclass
class LossConfig:
    # training cross-entropy weights per class, from the fold's training labels (validation stays unweighted)
    class_weights: ClassWeights = ClassWeights.none


@dataclass
class MixupConfig:
    """timm's Mixup/CutMix; off while both alphas are 0."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # chance a batch is mixed
    switch_prob: float = 0.5  # chance a mixed batch uses CutMix when both are on
    off_epoch: Optional[int] = None  # from this epoch on, batches are no longer mixed


@dataclass
class EmaConfig:
    """timm's ModelEmaV3: when enabled, the averaged weights are validated, checkpointed and predict."""

    enabled: bool = False
    decay: float = 0.998
    use_warmup: bool = True  # a short average early on, so the first epochs are not dominated by the init


@dataclass
class ProbeConfig:
    """The frozen-feature baseline's scikit-learn LogisticRegression."""

    C: float = 0.5
    max_iter: int = 2000


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    # auto: the fastest of fp32 and bf16/fp16 autocast, measured for the model on this hardware
    precision: str = "auto"
    channels_last: Any = "auto"  # true | false | auto (measured together with the precision)
    # Lightning's deterministic mode; "warn" only warns about ops without a deterministic kernel (GPU)
    deterministic: Any = "warn"
    # validation (best checkpoint, early stopping) after every n-th epoch at the test size, counted back
    # from the last epoch, which is always validated; patience counts validations. quality.yaml's fold 0
    # on 10,000 images (2 CPU cores): 497 s validating every 3rd epoch, 570 s every epoch, same model
    validate_every_n_epochs: int = 1
    early_stopping_patience: int = 3
    progress_bar: bool = True
    # Lightning loggers of each fold's curves (labelcomp.loggers); all but csv need their package
    loggers: list[LoggerName] = field(default_factory=lambda: [LoggerName.csv])


@dataclass
class TTAConfig:
    """Test-time augmentation: every view of a batch goes through the model in one stacked forward
    pass; the views' outputs are merged into one probability per image."""

    policy: TTAChoice = TTAChoice.auto
    # scored on the OOF predictions after training (scores.json); their views are predicted once
    policies: list[TTAPolicy] = field(default_factory=lambda: list(TTAPolicy))
    merge: Merge = Merge.mean
    scales: list[float] = field(default_factory=lambda: [0.875, 1.0, 1.125])  # multiscale: image sizes
    crop: float = 0.875  # fivecrop: crop side relative to the image; each crop is resized back
    # images per forward pass, all views together: what bounds inference memory. On CPU small chunks
    # are also the fastest (mobilenetv2_035 @96 px: 609 images/s in chunks of 64, 370 in chunks of 512)
    max_images: int = 64


@dataclass
class EnsembleConfig:
    """How fold models and runs are averaged."""

    fold_weights: FoldWeights = FoldWeights.equal
    # what `submit --runs` fits blend weights for, on OOF predictions
    blend_objective: BlendObjective = BlendObjective.logloss


@dataclass
class PseudoConfig:
    """Pseudo-labels from a finished run of the same competition: its fold models (with its TTA policy)
    label the test images, and those they are confident of join the training images of the folds, never
    a validation fold."""

    from_run: Optional[str] = None  # the parent run's id (any experiment under paths.runs); null: off
    labeler: PseudoLabeler = PseudoLabeler.fold
    # the confidence threshold is the lowest at which the parent's OOF predictions (with TTA) at least as
    # confident are right this often
    precision: float = 0.95
    threshold: Optional[float] = None  # set: used as it is; null: chosen from `precision` (and recorded)
    targets: PseudoTargets = PseudoTargets.hard
    # parent: fold k starts from the parent's fold-k weights (which never saw fold k's validation images),
    # so a short finetune.stages suffices for the round
    init: PseudoInit = PseudoInit.pretrained


@dataclass
class PathsConfig:
    runs: str = "runs"
    submissions: str = "submissions"


@dataclass
class Config:
    experiment: str = "default"  # prefix of run ids and the folder under paths.runs
    competition: Optional[str] = None  # folder holding competition.yaml; needed by the commands that read data
    seed: int = 42
    cv: CVConfig = field(default_factory=CVConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def _read_yaml(path: Path) -> DictConfig:
    """One YAML file, merged over the file its `extends` key names (relative to it)."""
    if not path.is_file():
        raise LabelcompError(f"{path}: config file not found; pass an existing YAML file (see configs/)")
    try:
        node = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends: the file is not valid YAML
        raise LabelcompError(f"{path}: not a valid YAML config ({error})") from None
    parent = node.pop("extends", None)
    if parent is None:
        return node
    return OmegaConf.merge(_read_yaml(path.parent / parent), node)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults, then the YAML file, then `key=value` overrides; checked against the schema."""
    config = OmegaConf.structured(Config)
    source = "the defaults"
    try:
        if path is not None:
            source = str(path)
            config = OmegaConf.merge(config, _read_yaml(Path(path)))
        if overrides:
            source = "the overrides"
            bad = [item for item in overrides if "=" not in item]
            if bad:
                raise LabelcompError(f"override {bad[0]!r} is not key=value; write e.g. model.name=resnet18")
            # `tta=hflip` is short for `tta.policy=hflip`
            overrides = [f"tta.policy={item[4:]}" if item.startswith("tta=") else item for item in overrides]
            config = OmegaConf.merge(config, OmegaConf.from_dotlist(overrides))
        OmegaConf.to_container(config, resolve=True)
        _check_ranges(config, source)
        _check_combinations(config, source)
        _check_paths(config, source)
    except (ConfigKeyError, ValidationError) as error:
        raise LabelcompError(_describe(error, source)) from None
    except OmegaConfBaseException as error:
        raise LabelcompError(f"{source}: {error.msg}") from None
    OmegaConf.set_readonly(config, False)
    return config


# values the schema's types admit but no run can use: (key, test, what is expected)
_RANGES = [
    ("cv.folds", lambda value: value >= 2, "at least 2 folds"),
    ("augment.image_size", lambda value: value >= 1, "a positive number of pixels"),
    ("data.batch_size", lambda value: value >= 1, "at least 1 image per batch"),
    ("trainer.validate_every_n_epochs", lambda value: value >= 1, "at least 1 (1: every epoch)"),
    ("data.short_side", lambda value: value in ("auto", None) or (str(value).isdigit() and int(value) >= 1),
     "a number of pixels, auto (1.25 x augment.image_size) or null (full size)"),
    ("tta.scales", lambda value: len(value) > 0 and all(scale > 0 for scale in value),
     "positive image-size factors, e.g. [0.875, 1.0, 1.125]"),
    ("tta.crop", lambda value: 0 < value <= 1, "a fraction of the image side in (0, 1]"),
    ("tta.max_images", lambda value: value >= 1, "at least 1 image per forward pass"),
    ("tta.policies", lambda value: len(value) > 0, "at least one policy to score on OOF and choose from"),
    ("pseudo.precision", lambda value: 0 < value <= 1, "a precision in (0, 1], e.g. 0.95"),
    ("pseudo.threshold", lambda value: value is None or 0 <= value <= 1, "a probability in [0, 1], or null"),
]


def _check_combinations(config: DictConfig, source: str) -> None:
    mixes = config.mixup.mixup_alpha > 0 or config.mixup.cutmix_alpha > 0
    if mixes and config.loss.class_weights != "none":
        raise LabelcompError(f"{source}: loss.class_weights={config.loss.class_weights} weighs hard labels, and mixup "
                             "makes soft ones; set loss.class_weights=none or mixup.mixup_alpha=0 mixup.cutmix_alpha=0")
    if mixes and config.pseudo.from_run is not None and config.pseudo.targets == "soft":
        raise LabelcompError(f"{source}: pseudo.targets=soft and mixup both make soft targets, which timm's Mixup "
                             "does not mix; set pseudo.targets=hard or mixup.mixup_alpha=0 mixup.cutmix_alpha=0")


def _check_ranges(config: DictConfig, source: str) -> None:
    for key, test, expected in _RANGES:
        value = OmegaConf.select(config, key)
        if key == "tta.policies" and config.tta.policy != "auto":
            continue  # nothing to choose: the named policy is scored and used
        if not test(value):
            shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            raise LabelcompError(f"{source}: bad value for config key '{key}': {shown}; expected {expected}")


def _check_paths(config: DictConfig, source: str) -> None:
    for key in ("paths.runs", "paths.submissions"):
        path = Path(OmegaConf.select(config, key))
        if path.exists() and not path.is_dir():
            raise LabelcompError(f"{source}: config key '{key}' is {path}, a file; expected a folder (it is created "
                                 "when missing)")


def _describe(error: OmegaConfBaseException, source: str) -> str:
    key = error.full_key or "?"
    if isinstance(error, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        known = OmegaConf.select(OmegaConf.structured(Config), parent) if parent else OmegaConf.structured(Config)
        choices = ", ".join(known.keys()) if isinstance(known, DictConfig) else ""
        return f"{source}: unknown config key '{key}'" + (f"; known keys here: {choices}" if choices else "")
    return f"{source}: bad value for config key '{key}': {error.msg.splitlines()[0]}"


def save_config(config: DictConfig, path: Path) -> None:
    """The resolved config, so a run folder says exactly what produced it."""
    write_text_atomic(path, OmegaConf.to_yaml(config, resolve=True))
