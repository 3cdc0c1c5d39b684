"""One competition: its files, id/label columns, label list, metric and submission format.

Reads the splits with pandas and validates them where they enter; writes submissions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from labelcomp.errors import LabelcompError
from labelcomp.metrics import METRICS
from labelcomp.runs import write_csv_atomic

_logger = logging.getLogger(__name__)

# columns of OOF and probability files; class names must not clash with them
RESERVED_COLUMNS = ("id", "fold", "label")


@dataclass
class SubmissionFormat:
    id_column: str = "${..id_column}"
    label_column: str = "${..label_column}"
    label_format: str = "name"  # name | index


@dataclass
class CompetitionSpec:
    name: str = "???"
    train_csv: str = "train.csv"
    test_csv: str = "test.csv"
    sample_submission: str = "sample_submission.csv"
    train_images: str = "train_images"
    test_images: str = "test_images"
    id_column: str = "id"
    label_column: str = "label"
    sep: str = ","
    labels: list[str] = field(default_factory=list)
    metric: str = "accuracy"
    submission: SubmissionFormat = field(default_factory=SubmissionFormat)


class Competition:
    """A competition folder holding `competition.yaml`; paths in it are relative to the folder."""

    def __init__(self, root: Path, spec: CompetitionSpec):
        self.root = root
        self.spec = spec

    @classmethod
    def load(cls, folder: str | Path) -> "Competition":
        root = Path(folder)
        spec_path = root / "competition.yaml"
        if not spec_path.is_file():
            raise LabelcompError(
                f"{spec_path}: competition file not found; `competition` must be a folder holding competition.yaml"
            )
        try:
            spec = OmegaConf.merge(OmegaConf.structured(CompetitionSpec), OmegaConf.load(spec_path))
            spec = OmegaConf.to_object(spec)
        except OmegaConfBaseException as error:
            raise LabelcompError(f"{spec_path}: key '{error.full_key}': {error.msg.splitlines()[0]}") from None
        competition = cls(root, spec)
        competition._check_spec(spec_path)
        return competition

    def _check_spec(self, spec_path: Path) -> None:
        spec = self.spec
        if len(spec.labels) < 2:
            raise LabelcompError(f"{spec_path}: 'labels' must list at least two class names, found {len(spec.labels)}")
        repeated = sorted({label for label in spec.labels if spec.labels.count(label) > 1})
        if repeated:
            raise LabelcompError(f"{spec_path}: 'labels' repeats {repeated}; each class name must appear once")
        clashing = sorted(set(spec.labels) & set(RESERVED_COLUMNS))
        if clashing:
            raise LabelcompError(f"{spec_path}: class names {clashing} clash with the columns {RESERVED_COLUMNS}")
        if spec.metric not in METRICS:
            raise LabelcompError(f"{spec_path}: metric '{spec.metric}' is unknown; use one of {sorted(METRICS)}")
        if spec.submission.label_format not in ("name", "index"):
            raise LabelcompError(
                f"{spec_path}: submission.label_format '{spec.submission.label_format}' must be 'name' or 'index'"
            )

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    @property
    def num_classes(self) -> int:
        return len(self.spec.labels)

    def _read_table(self, name: str, required: list[str]) -> pd.DataFrame:
        path = self.root / name
        if not path.is_file():
            raise LabelcompError(f"{path}: file not found; check the paths in {self.root / 'competition.yaml'}")
        try:
            table = pd.read_csv(path, sep=self.spec.sep, dtype=str, keep_default_na=False)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
            raise LabelcompError(f"{path}: cannot be read as a table with sep {self.spec.sep!r} ({error})") from None
        for column in required:
            if column not in table.columns:
                raise LabelcompError(
                    f"{path}: column '{column}' not found; columns are {list(table.columns)} "
                    f"(set id_column / label_column / sep in competition.yaml)"
                )
        if table.empty:
            raise LabelcompError(f"{path}: has a header but no rows")
        duplicated = table[self.spec.id_column].duplicated()
        if duplicated.any():
            row = int(np.flatnonzero(duplicated)[0])
            raise LabelcompError(
                f"{path}: row {row + 2}: id '{table[self.spec.id_column].iloc[row]}' appears more than once; ids must be unique"
            )
        return table

    def _image_paths(self, ids: pd.Series, folder: str, table_path: Path) -> pd.Series:
        image_dir = self.root / folder
        paths = ids.map(lambda image_id: str(image_dir / image_id))
        missing = [image_id for image_id, path in zip(ids, paths) if not Path(path).is_file()]
        if missing:
            raise LabelcompError(
                f"{table_path}: {len(missing)} image(s) not found in {image_dir}/, e.g. {missing[:10]}; "
                "check train_images / test_images in competition.yaml"
            )
        return paths

    def read_train(self) -> pd.DataFrame:
        """Columns: id, path, label (class name), target (class index)."""
        spec = self.spec
        table = self._read_table(spec.train_csv, [spec.id_column, spec.label_column])
        path = self.root / spec.train_csv
        labels = table[spec.label_column].str.strip()
        index = {label: position for position, label in enumerate(spec.labels)}
        unknown = ~labels.isin(index)
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise LabelcompError(
                f"{path}: row {row + 2}, column '{spec.label_column}': label '{labels.iloc[row]}' is not in the "
                f"competition's label list ({unknown.sum()} such rows); add it to 'labels' in competition.yaml or fix the row"
            )
        ids = table[spec.id_column]
        return pd.DataFrame(
            {"id": ids, "path": self._image_paths(ids, spec.train_images, path), "label": labels,
             "target": labels.map(index).astype(int)}
        )

    def read_test(self) -> pd.DataFrame:
        """Columns: id, path, in the order of the sample submission (checked to hold the same ids)."""
        spec = self.spec
        test = self._read_table(spec.test_csv, [spec.id_column])
        sample = self.read_sample_submission()
        sample_ids = sample[spec.submission.id_column]
        if set(test[spec.id_column]) != set(sample_ids):
            only_test = sorted(set(test[spec.id_column]) - set(sample_ids))[:10]
            only_sample = sorted(set(sample_ids) - set(test[spec.id_column]))[:10]
            raise LabelcompError(
                f"{self.root / spec.test_csv} and {self.root / spec.sample_submission} hold different ids "
                f"(only in test: {only_test}, only in sample: {only_sample}); they must list the same images"
            )
        return pd.DataFrame(
            {"id": sample_ids, "path": self._image_paths(sample_ids, spec.test_images, self.root / spec.test_csv)}
        )

    def read_sample_submission(self) -> pd.DataFrame:
        spec = self.spec.submission
        return self._read_table(self.spec.sample_submission, [spec.id_column, spec.label_column])

    def write_submission(self, ids: pd.Series, proba: np.ndarray, path: Path) -> pd.DataFrame:
        """The sample submission with its label column filled from `proba`, checked, then written atomically."""
        spec = self.spec.submission
        sample = self.read_sample_submission()
        if list(sample[spec.id_column]) != list(ids):
            raise LabelcompError(
                f"{self.root / self.spec.sample_submission}: predicted ids differ from the sample's ids or order"
            )
        predicted = proba.argmax(axis=1)
        submission = sample.copy()
        if spec.label_format == "name":
            submission[spec.label_column] = [self.spec.labels[index] for index in predicted]
        else:
            submission[spec.label_column] = predicted.astype(str)
        self._check_submission(submission, sample)
        write_csv_atomic(submission, path, sep=self.spec.sep)
        return submission

    def _check_submission(self, submission: pd.DataFrame, sample: pd.DataFrame) -> None:
        spec = self.spec.submission
        valid = set(self.spec.labels) if spec.label_format == "name" else {str(i) for i in range(self.num_classes)}
        problems = []
        if list(submission.columns) != list(sample.columns):
            problems.append(f"columns {list(submission.columns)} instead of {list(sample.columns)}")
        if not submission[spec.id_column].equals(sample[spec.id_column]):
            problems.append("ids differ from the sample's ids or order")
        if not submission[spec.label_column].isin(valid).all():
            problems.append("labels outside the label list")
        if problems:
            raise LabelcompError(
                f"submission for {self.root / self.spec.sample_submission} not written: " + "; ".join(problems)
            )
