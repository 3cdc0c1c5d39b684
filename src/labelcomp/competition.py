"""One competition: where its files are, id/label/group columns, label list, metric, submission format.

Reads the splits with pandas and validates them where they enter; writes submissions in the exact
shape of the sample submission (header or none, separator, order, line endings).
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from labelcomp.config import Choice
from labelcomp.errors import LabelcompError
from labelcomp.metrics import METRICS
from labelcomp.runs import write_text_atomic

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# columns of OOF and probability files; class names must not clash with them
RESERVED_COLUMNS = ("id", "fold", "label")
SEPARATORS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}


# choices among names fail when competition.yaml loads, with the valid names listed (config.Choice)
MetricName = Choice("MetricName", [(name, name) for name in METRICS])


class LabelFormat(Choice):
    name = "name"  # class names
    index = "index"  # class ids: label_ids, or positions in `labels`


@dataclass
class TrainSpec:
    csv: Optional[str] = "train.csv"  # null: folder layout, one sub-folder of `images` per class
    sep: str = ","
    id_column: str = "id"
    label_column: str = "label"
    label_format: LabelFormat = LabelFormat["name"]  # how the label column writes a class
    group_column: Optional[str] = None  # rows sharing a group stay in one fold
    images: str = "train_images"


@dataclass
class TestSpec:
    csv: Optional[str] = None  # null: the sample submission's ids, or every image of `images`
    sep: str = ","
    id_column: str = "id"
    images: str = "test_images"


@dataclass
class SubmissionSpec:
    sample: Optional[str] = "sample_submission.csv"  # null: write `id,label` with a header
    sep: str = ","
    header: bool = True
    # column names; without a header, 0-based column positions
    id_column: str = "id"
    label_column: str = "label"
    label_format: LabelFormat = LabelFormat["name"]


# tried in turn on a table without a configured encoding: UTF-8 (with or without BOM), then the
# Shift-JIS of Japanese competitions (cp932, its Windows superset), then Western Windows text
ENCODINGS = ("utf-8-sig", "cp932", "cp1252")


def text_encoding(path: Path) -> str:
    """The first of ENCODINGS that decodes the whole file."""
    data = path.read_bytes()
    for encoding in ENCODINGS:
        try:
            data.decode(encoding)
        except UnicodeDecodeError:
            continue
        return encoding
    raise LabelcompError(f"{path}: cannot be decoded as text ({', '.join(ENCODINGS)} tried); save it as UTF-8, or "
                         "set 'encoding' in competition.yaml")


def read_text_table(path: Path, sep: str, header: bool, encoding: str | None) -> pd.DataFrame:
    """A competition table as strings, exactly as written (no NA guessing). Blank lines are dropped, and
    the index is each row's line number in the file, for messages."""
    encoding = encoding or text_encoding(path)
    try:
        # index_col=False: rows ending in a separator the header lacks are not shifted into an index
        table = pd.read_csv(path, sep=sep, header=0 if header else None, dtype=str, keep_default_na=False,
                            skip_blank_lines=False, index_col=False, encoding=encoding)
    except pd.errors.EmptyDataError:
        raise LabelcompError(f"{path}: the file is empty; expected a table with a header line and rows") from None
    except UnicodeDecodeError:
        raise LabelcompError(f"{path}: cannot be decoded as {encoding}; save it as UTF-8, or set 'encoding' in "
                             "competition.yaml") from None
    except pd.errors.ParserError as error:
        raise LabelcompError(f"{path}: cannot be read as a table separated by {sep!r} ({error})") from None
    table.columns = [str(column) for column in table.columns]
    table.index = table.index + (2 if header else 1)
    return table[~(table == "").all(axis=1)]


@dataclass
class CompetitionSpec:
    name: str = "???"
    metric: MetricName = MetricName.accuracy
    labels: list[str] = field(default_factory=list)  # class names; a class's index is its position
    # how classes are written where label_format is index (e.g. SIGNATE label_id); default 0 .. n-1
    label_ids: Optional[list[str]] = None
    train: TrainSpec = field(default_factory=TrainSpec)
    test: TestSpec = field(default_factory=TestSpec)
    submission: SubmissionSpec = field(default_factory=SubmissionSpec)
    # of every table, e.g. cp932 (Shift-JIS); null: detected (ENCODINGS). The submission is written in it
    encoding: Optional[str] = None


class ImageIndex:
    """Every image file under a folder (nested, any case of extension), found by the ids a table uses:
    a relative path with or without extension, or a file name or stem that is unique in the folder."""

    def __init__(self, folder: Path):
        self.relative_paths: list[str] = []
        self.by_key: dict[str, str] = {}
        by_name: dict[str, list[str]] = {}
        for root, _, files in os.walk(folder):
            for name in files:
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(root, name)
                relative = Path(os.path.relpath(path, folder)).as_posix()
                self.relative_paths.append(relative)
                self.by_key[relative] = self.by_key[relative.rsplit(".", 1)[0]] = path
                for key in (name, name.rsplit(".", 1)[0]):
                    by_name.setdefault(key, []).append(path)
        self.relative_paths.sort()
        for key, paths in by_name.items():
            if len(paths) == 1:  # a bare file name is an id only where it is unambiguous
                self.by_key.setdefault(key, paths[0])

    def find(self, image_id: str) -> Optional[str]:
        return self.by_key.get(image_id.strip().replace("\\", "/"))


def line_ending(path: Path) -> str:
    with open(path, "rb") as stream:
        head = stream.read(65536)
    return "\r\n" if b"\r\n" in head else "\n"


class Competition:
    """A competition folder holding `competition.yaml`; paths in it are relative to the folder."""

    def __init__(self, root: Path, spec: CompetitionSpec):
        self.root = root
        self.spec = spec
        self.spec_path = root / "competition.yaml"

    @classmethod
    def load(cls, folder: str | Path | None) -> "Competition":
        if folder is None:
            raise LabelcompError(
                "config key 'competition' has no value; set it in the YAML file or pass competition=... "
                "(a folder holding competition.yaml)"
            )
        root = Path(folder)
        spec_path = root / "competition.yaml"
        if not spec_path.is_file():
            raise LabelcompError(
                f"{spec_path}: competition file not found; `competition` must be a folder holding competition.yaml "
                "(`labelcomp init FOLDER` writes one)"
            )
        try:
            spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CompetitionSpec), OmegaConf.load(spec_path)))
        except ConfigKeyError as error:
            parent = OmegaConf.select(OmegaConf.structured(CompetitionSpec), error.full_key.rpartition(".")[0] or "")
            known = ", ".join(parent.keys()) if parent is not None else ""
            raise LabelcompError(f"{spec_path}: unknown key '{error.full_key}'; known keys here: {known}") from None
        except OmegaConfBaseException as error:
            raise LabelcompError(f"{spec_path}: key '{error.full_key}': {error.msg.splitlines()[0]}") from None
        except Exception as error:  # yaml.YAMLError: not YAML at all
            raise LabelcompError(f"{spec_path}: not valid YAML ({error})") from None
        competition = cls(root, spec)
        competition._check_spec()
        return competition

    def _fail(self, message: str) -> LabelcompError:
        return LabelcompError(f"{self.spec_path}: {message}")

    def identity(self) -> dict[str, str]:
        """What the score history knows the competition by: its name and a digest of its training table
        (ids and labels), so runs are only compared on the same data."""
        train = self.read_train()
        digest = hashlib.blake2b(train[["id", "label"]].to_csv(index=False).encode(), digest_size=6).hexdigest()
        return {"competition": self.spec.name, "competition_id": digest}

    def _check_spec(self) -> None:
        spec = self.spec
        if len(spec.labels) < 2:
            raise self._fail(f"'labels' must list at least two class names, found {len(spec.labels)}")
        repeated = sorted({label for label in spec.labels if spec.labels.count(label) > 1})
        if repeated:
            raise self._fail(f"'labels' repeats {repeated}; each class name must appear once")
        clashing = sorted(set(spec.labels) & set(RESERVED_COLUMNS))
        if clashing:
            raise self._fail(f"class names {clashing} clash with the columns {RESERVED_COLUMNS}; rename them")
        if spec.label_ids is not None and len(spec.label_ids) != len(spec.labels):
            raise self._fail(f"'label_ids' has {len(spec.label_ids)} entries for {len(spec.labels)} labels")

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    @property
    def num_classes(self) -> int:
        return len(self.spec.labels)

    @property
    def label_ids(self) -> list[str]:
        return [str(i) for i in self.spec.label_ids] if self.spec.label_ids else [str(i) for i in range(self.num_classes)]

    def _class_index(self, label_format: str) -> dict[str, int]:
        """Text in a table -> class index, for labels written as names or as ids."""
        written = self.labels if label_format == "name" else self.label_ids
        return {text: position for position, text in enumerate(written)}

    # ---- tables

    def _read_table(self, name: str, sep: str, header: bool, required: list[str], key: str) -> pd.DataFrame:
        path = self.root / name
        if not path.is_file():
            raise LabelcompError(f"{path}: file not found; check '{key}' in {self.spec_path}")
        table = read_text_table(path, sep, header, self.spec.encoding)
        if len(table.columns) == 1:
            found = [name for other, name in SEPARATORS.items() if other != sep and other in str(table.columns[0])]
            if found:
                raise LabelcompError(
                    f"{path}: one column only with separator {sep!r}, but the header holds {found[0]}s; "
                    f"set the separator ('sep') of this table in {self.spec_path}"
                )
        for column in required:
            if column not in table.columns:
                what = "column position" if not header else "column"
                raise LabelcompError(
                    f"{path}: {what} '{column}' not found; columns are {list(table.columns)} "
                    f"(set the column names under '{key.split('.')[0]}' in {self.spec_path})"
                )
        if table.empty:
            raise LabelcompError(f"{path}: has a header but no rows")
        return table

    @staticmethod
    def _check_unique(table: pd.DataFrame, column: str, path: Path) -> None:
        duplicated = table[column].duplicated()
        if duplicated.any():
            row = int(np.flatnonzero(duplicated)[0])
            raise LabelcompError(
                f"{path}: line {table.index[row]}: id '{table[column].iloc[row]}' appears more than once "
                f"({int(duplicated.sum())} repeated ids); ids must be unique"
            )

    def _locate(self, ids: pd.Series, folder: str, table_path: Path, key: str) -> list[str]:
        image_dir = self.root / folder
        if not image_dir.is_dir():
            raise LabelcompError(f"{image_dir}: image folder not found; check '{key}' in {self.spec_path}")
        index = ImageIndex(image_dir)
        paths = [index.find(image_id) for image_id in ids]
        missing = [image_id for image_id, path in zip(ids, paths) if path is None]
        if missing:
            raise LabelcompError(
                f"{table_path}: {len(missing)} image(s) not found in {image_dir}/: {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}; add the files or fix '{key}' / the ids"
            )
        return paths

    # ---- train

    def read_train(self) -> pd.DataFrame:
        """Columns: id, path, label (class name), target (class index), and group when configured."""
        if self.spec.train.csv is None:
            return self._read_train_folders()
        spec = self.spec.train
        path = self.root / spec.csv
        required = [spec.id_column, spec.label_column] + ([spec.group_column] if spec.group_column else [])
        table = self._read_table(spec.csv, spec.sep, True, required, "train.csv")
        self._check_unique(table, spec.id_column, path)
        written = table[spec.label_column].str.strip()
        blank = written == ""
        if blank.any():
            row = int(np.flatnonzero(blank)[0])
            raise LabelcompError(
                f"{path}: line {table.index[row]}, column '{spec.label_column}': blank label ({int(blank.sum())} such rows); "
                "every training image needs a label: fill or remove the rows"
            )
        index = self._class_index(spec.label_format)
        unknown = ~written.isin(index)
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            known, key = ("label list", "labels") if spec.label_format == "name" else ("label ids", "label_ids")
            raise LabelcompError(
                f"{path}: line {table.index[row]}, column '{spec.label_column}': label '{written.iloc[row]}' is not in the "
                f"competition's {known} ({int(unknown.sum())} such rows); add it to '{key}' in {self.spec_path} "
                "or fix the rows"
            )
        ids = table[spec.id_column].str.strip()
        target = written.map(index).astype(int)
        frame = pd.DataFrame({
            "id": ids, "path": self._locate(ids, spec.images, path, "train.images"),
            "label": target.map(dict(enumerate(self.labels))), "target": target,
        })
        if spec.group_column:
            frame["group"] = table[spec.group_column].str.strip().to_numpy()
        return frame.reset_index(drop=True)

    def _read_train_folders(self) -> pd.DataFrame:
        folder = self.root / self.spec.train.images
        if not folder.is_dir():
            raise LabelcompError(f"{folder}: image folder not found; check 'train.images' in {self.spec_path}")
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        unknown = sorted(set(classes) - set(self.labels))
        if unknown:
            raise LabelcompError(
                f"{folder}: class folders {unknown[:10]} are not in the competition's label list; "
                f"add them to 'labels' in {self.spec_path} or remove the folders"
            )
        rows = []
        for position, label in enumerate(self.labels):
            index = ImageIndex(folder / label) if (folder / label).is_dir() else None
            for relative in index.relative_paths if index else []:
                rows.append({"id": f"{label}/{relative}", "path": str(folder / label / relative), "label": label,
                             "target": position})
        if not rows:
            raise LabelcompError(f"{folder}: no images found in its class folders")
        return pd.DataFrame(rows)

    # ---- test and submission

    def read_sample_submission(self) -> Optional[pd.DataFrame]:
        spec = self.spec.submission
        if spec.sample is None:
            return None
        sample = self._read_table(spec.sample, spec.sep, spec.header, [spec.id_column, spec.label_column],
                                  "submission.sample")
        self._check_unique(sample, spec.id_column, self.root / spec.sample)
        return sample

    def read_test(self) -> pd.DataFrame:
        """Columns: id, path; in the sample submission's order where there is one."""
        spec = self.spec.test
        sample = self.read_sample_submission()
        sample_ids = None if sample is None else sample[self.spec.submission.id_column].str.strip()
        table_path = self.root / (spec.csv or self.spec.submission.sample or spec.images)
        if spec.csv is not None:
            table = self._read_table(spec.csv, spec.sep, True, [spec.id_column], "test.csv")
            self._check_unique(table, spec.id_column, table_path)
            test_ids = table[spec.id_column].str.strip()
            if sample_ids is not None:
                only_test = sorted(set(test_ids) - set(sample_ids))
                only_sample = sorted(set(sample_ids) - set(test_ids))
                if only_test or only_sample:
                    raise LabelcompError(
                        f"{table_path} and {self.root / self.spec.submission.sample} list different ids: "
                        f"{len(only_test)} only in the test table {only_test[:10]}, "
                        f"{len(only_sample)} only in the sample submission {only_sample[:10]}; they must match"
                    )
        if sample_ids is not None:
            ids = sample_ids
        elif spec.csv is not None:
            ids = test_ids
        else:
            folder = self.root / spec.images
            if not folder.is_dir():
                raise LabelcompError(f"{folder}: image folder not found; check 'test.images' in {self.spec_path}")
            ids = pd.Series(ImageIndex(folder).relative_paths, dtype=str)
            if ids.empty:
                raise LabelcompError(f"{folder}: no test images found")
        return pd.DataFrame({"id": ids.to_numpy(), "path": self._locate(ids, spec.images, table_path, "test.images")})

    def write_submission(self, ids: pd.Series, proba: np.ndarray, path: Path) -> None:
        """Fill the sample submission's label column from `proba` and write it atomically in the sample's
        exact shape (header or none, separator, line endings, encoding), once the predicted ids are the sample's."""
        spec = self.spec.submission
        predicted = proba.argmax(axis=1)
        written = self.labels if spec.label_format == "name" else self.label_ids
        sample = self.read_sample_submission()
        if sample is None:
            submission = pd.DataFrame({"id": list(ids), "label": [written[i] for i in predicted]})
            text = submission.to_csv(index=False, sep=spec.sep, lineterminator="\n")
            encoding = self.spec.encoding or "utf-8"
        else:
            if list(sample[spec.id_column].str.strip()) != [str(i) for i in ids]:
                raise LabelcompError(
                    f"{self.root / spec.sample}: its ids or their order differ from the predicted test ids; "
                    "was the sample submission changed after the test table was read?"
                )
            submission = sample.copy()
            submission[spec.label_column] = [written[i] for i in predicted]
            sample_path = self.root / spec.sample
            ending = line_ending(sample_path)
            text = submission.to_csv(index=False, header=spec.header, sep=spec.sep, lineterminator=ending)
            data = sample_path.read_bytes()
            if not data.endswith(ending.encode()):
                text = text[: -len(ending)]
            encoding = self.spec.encoding or text_encoding(sample_path)
            if encoding == "utf-8-sig" and not data.startswith(codecs.BOM_UTF8):
                encoding = "utf-8"  # as the sample: no byte-order mark
        try:
            write_text_atomic(path, text.encode(encoding))
        except UnicodeEncodeError as error:
            raise LabelcompError(f"{path}: label '{error.object[error.start:error.end]}' cannot be written in the "
                                 f"sample submission's encoding {encoding}; set 'encoding' in {self.spec_path}") from None
