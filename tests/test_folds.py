import pandas as pd
import pytest

from labelcomp.competition import Competition
from labelcomp.errors import LabelcompError
from labelcomp.folds import assign_folds
from conftest import DEMO


def test_folds_are_stratified_and_repeatable():
    train = Competition.load(DEMO).read_train()
    folds = assign_folds(train, 5, seed=7)
    per_class_and_fold = pd.crosstab(folds["label"], folds["fold"])
    assert (per_class_and_fold == 20).all().all()  # 100 images per class, 5 folds
    assert folds["id"].tolist() == train["id"].tolist()
    assert folds.equals(assign_folds(train, 5, seed=7))
    assert not folds["fold"].equals(assign_folds(train, 5, seed=8)["fold"])


def test_classes_smaller_than_the_fold_count_are_refused(tiny_competition):
    train = Competition.load(tiny_competition).read_train()
    with pytest.raises(LabelcompError, match="fewer images than cv.folds=11"):
        assign_folds(train, 11, seed=0)


def test_identical_images_and_groups_stay_in_one_fold(tiny_competition):
    import shutil

    from labelcomp.folds import fold_groups
    from labelcomp.survey import survey

    train = Competition.load(tiny_competition).read_train()
    # three copies of one image under other ids, and a group column tying two more rows
    for row in (10, 20, 30):
        shutil.copy(train["path"][0], train["path"][row])
    train["group"] = [f"g{i}" for i in range(len(train))]
    train.loc[[5, 35], "group"] = "site-a"
    images = survey(train["path"].tolist())
    assert images.duplicate_sets() == [[0, 10, 20, 30]]
    groups = fold_groups(train, images.duplicate_sets())
    for seed in range(5):
        folds = assign_folds(train, 4, seed=seed, groups=groups)["fold"]
        assert folds[[0, 10, 20, 30]].nunique() == 1 and folds[[5, 35]].nunique() == 1
        assert (pd.crosstab(folds, train["label"]) > 0).all().all()  # every class still in every fold


def test_folds_without_ties_are_plain_stratified_k_fold(tiny_competition):
    from labelcomp.folds import fold_groups

    train = Competition.load(tiny_competition).read_train()
    assert fold_groups(train, []) is None


def test_group_column_of_the_competition_switches_to_group_folds(tiny_competition):
    import yaml

    from labelcomp.folds import fold_groups

    table = pd.read_csv(tiny_competition / "train.csv")
    table["site"] = [f"site{i % 8}" for i in range(len(table))]  # 8 sites, each spanning several classes
    table.to_csv(tiny_competition / "train.csv", index=False)
    spec = yaml.safe_load((tiny_competition / "competition.yaml").read_text())
    spec["train"]["group_column"] = "site"
    (tiny_competition / "competition.yaml").write_text(yaml.safe_dump(spec))
    train = Competition.load(tiny_competition).read_train()
    folds = assign_folds(train, 4, seed=0, groups=fold_groups(train, []))
    assert (pd.crosstab(train["group"], folds["fold"]) > 0).sum(axis=1).eq(1).all()  # each site in one fold


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentations_repeat_across_runs_and_differ_across_epochs(tiny_competition, workers):
    import lightning as L
    import torch

    from labelcomp.augment import build_transforms
    from labelcomp.config import load_config
    from labelcomp.data import ImageDataModule
    from conftest import REPO, tiny_overrides

    config = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(tiny_competition.parent, tiny_competition))
    config.augment.mean, config.augment.std = [0.5] * 3, [0.5] * 3
    # one image 16 times: the loader's shuffling cannot make epochs differ, only augmentation can
    train = Competition.load(tiny_competition).read_train().iloc[[0] * 16].reset_index(drop=True)

    def two_epochs():
        L.seed_everything(3, workers=True)
        data = ImageDataModule(batch_size=8, num_workers=workers, mean=config.augment.mean, std=config.augment.std,
                               train=train,
                               train_transform=build_transforms(config.augment, train=True, seed=3))
        loader = data.train_dataloader()
        return [torch.cat([images for images, _ in loader]) for _ in range(2)]

    def drawn(images):  # the epoch's augmented versions, whatever order they came in
        return torch.sort(images.flatten(1).sum(1)).values

    first, second = two_epochs(), two_epochs()
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # same seed: same augmented images
    assert not torch.allclose(drawn(first[0]), drawn(first[1]))  # a new epoch draws new augmentations
    assert len(set(drawn(first[0]).tolist())) > 1  # and the copies within an epoch differ too


def test_loader_gives_uint8_and_batches_are_normalized_as_albumentations_would(tiny_competition):
    import albumentations as A
    import torch

    from labelcomp.augment import build_transforms
    from labelcomp.config import load_config
    from labelcomp.data import ImageDataModule, read_image
    from conftest import REPO, tiny_overrides

    config = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(tiny_competition.parent, tiny_competition))
    config.augment.mean, config.augment.std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    frame = Competition.load(tiny_competition).read_train().head(4)
    data = ImageDataModule(batch_size=4, num_workers=0, mean=config.augment.mean, std=config.augment.std,
                           predict=frame, eval_transform=build_transforms(config.augment, train=False))
    images, _ = next(iter(data.predict_dataloader()))
    size = config.augment.image_size
    assert images.dtype == torch.uint8 and images.shape == (4, size, size, 3)  # a quarter of the bytes
    per_image = A.Compose([A.Resize(size, size), A.Normalize(mean=config.augment.mean, std=config.augment.std)])
    expected = torch.stack([torch.from_numpy(per_image(image=read_image(path))["image"]).permute(2, 0, 1)
                            for path in frame["path"]])
    for channels_last in (False, True):
        data.channels_last = channels_last
        normalized, _ = data.on_after_batch_transfer((images, torch.zeros(4)), 0)
        assert normalized.dtype == torch.float32
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        assert normalized.is_contiguous(memory_format=memory_format)  # as the backbone runs: no copy before it
        torch.testing.assert_close(normalized, expected, rtol=1e-5, atol=1e-5)


def test_validation_leaves_the_training_random_stream_as_it_was(tiny_competition):
    import torch

    from labelcomp.augment import build_transforms
    from labelcomp.config import load_config
    from labelcomp.data import ImageDataModule
    from conftest import REPO, tiny_overrides

    config = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(tiny_competition.parent, tiny_competition))
    config.augment.mean, config.augment.std = [0.5] * 3, [0.5] * 3
    frame = Competition.load(tiny_competition).read_train().head(8)
    data = ImageDataModule(batch_size=4, num_workers=0, mean=config.augment.mean, std=config.augment.std, train=frame,
                           val=frame, predict=frame, train_transform=build_transforms(config.augment, train=True, seed=0),
                           eval_transform=build_transforms(config.augment, train=False))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for loader in (data.val_dataloader(), data.predict_dataloader()):
        assert len(list(loader)) == 2
    # so skipping a validation (trainer.validate_every_n_epochs) trains the very same model
    assert torch.equal(torch.get_rng_state(), before)
    list(data.train_dataloader())  # shuffling draws from it, as seed_everything makes repeatable
    assert not torch.equal(torch.get_rng_state(), before)
