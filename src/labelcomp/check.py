"""`labelcomp check`: validate a competition folder and summarise it: images per class, image sizes
and colour modes, exact duplicates within train and between train and test, every problem found."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from labelcomp.competition import Competition
from labelcomp.errors import LabelcompError
from labelcomp.survey import Survey, survey


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def text(self) -> str:
        verdict = [f"{len(self.problems)} problem(s):", *(f"  - {problem}" for problem in self.problems)] \
            if self.problems else ["no problems found"]
        return "\n".join(self.lines + verdict)


def _colour_modes(paths: list[str]) -> Counter:
    """PIL reads the mode from the header without decoding the pixels."""
    modes: Counter = Counter()
    for path in paths:
        try:
            with Image.open(path) as image:
                modes[image.mode] += 1
        except OSError:
            modes["unreadable"] += 1
    return modes


def _describe_images(name: str, paths: list[str], images: Survey) -> list[str]:
    sizes = Counter(f"{width}x{height}" for height, width in images.sizes if height)
    common = ", ".join(f"{size} ({count})" for size, count in sizes.most_common(3))
    modes = ", ".join(f"{mode} ({count})" for mode, count in _colour_modes(paths).most_common())
    return [f"{name}: {len(paths)} images; sizes {common}{' ...' if len(sizes) > 3 else ''}; colour modes {modes}"]


def check_competition(folder: str | Path) -> CheckReport:
    report = CheckReport()
    try:
        competition = Competition.load(folder)
    except LabelcompError as error:
        report.problems.append(str(error))
        return report
    report.lines.append(f"competition '{competition.spec.name}' in {competition.root}: "
                        f"{competition.num_classes} classes, metric {competition.spec.metric}")
    train = test = None
    try:
        train = competition.read_train()
    except LabelcompError as error:
        report.problems.append(str(error))
    try:
        test = competition.read_test()
    except LabelcompError as error:
        report.problems.append(str(error))
    train_images = test_images = None
    if train is not None:
        counts = train["label"].value_counts().reindex(competition.labels, fill_value=0)
        report.lines.append("images per class: " + ", ".join(f"{label} {count}" for label, count in counts.items()))
        empty = counts[counts == 0]
        if not empty.empty:
            report.problems.append(f"classes without training images: {list(empty.index)}")
        single = counts[counts == 1]
        if not single.empty:  # k-fold needs at least as many images per class as folds, 2 at the least
            report.problems.append(f"classes with a single training image: {list(single.index)}; k-fold "
                                   "cross-validation needs at least cv.folds images per class (2 at the least)")
        if counts.min() < 5:
            report.lines.append(f"smallest class: {counts.idxmin()} with {counts.min()} images (cv.folds must not exceed it)")
        train_images = survey(train["path"].tolist())
        report.lines += _describe_images("train", train["path"].tolist(), train_images)
        duplicates = train_images.duplicate_sets()
        conflicting = [group for group in duplicates if train["label"].iloc[group].nunique() > 1]
        report.lines.append(
            f"duplicates within train: {len(duplicates)} sets of identical images "
            f"({sum(len(group) for group in duplicates)} images; kept within one fold each)"
            + (f", {len(conflicting)} of them with different labels, e.g. {list(train['id'].iloc[conflicting[0]])}"
               if conflicting else "")
        )
        report.problems += train_images.problems
    if test is not None:
        test_images = survey(test["path"].tolist())
        report.lines += _describe_images("test", test["path"].tolist(), test_images)
        report.problems += test_images.problems
    if train_images is not None and test_images is not None:
        train_by_hash = pd.Series(train["id"].to_numpy(), index=train_images.hashes)
        shared = [(test_id, train_by_hash[digest]) for test_id, digest in zip(test["id"], test_images.hashes)
                  if digest and digest in train_by_hash.index]
        report.lines.append(
            f"duplicates between train and test: {len(shared)} test images also in train"
            + (f", e.g. test {shared[0][0]} = train {pd.Series(shared[0][1]).iloc[0]}" if shared else "")
        )
    return report
