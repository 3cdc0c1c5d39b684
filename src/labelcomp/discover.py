"""`labelcomp init`: guess a competition.yaml from a downloaded competition folder.

Kaggle (train.csv + sample_submission.csv with a header), SIGNATE (train_master.tsv,
label_master.tsv, sample_submit without a header) and folder layouts (one sub-folder per class).
Every guess is printed so the user can review the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from labelcomp.competition import IMAGE_EXTENSIONS, SEPARATORS, ImageIndex, read_text_table, text_encoding
from labelcomp.errors import LabelcompError
from labelcomp.runs import write_text_atomic

TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
LABEL_WORDS = ("label", "class", "category", "target", "y")


def _guess_sep(path: Path) -> str:
    with open(path, encoding=text_encoding(path)) as stream:
        first = stream.readline()
    return max(SEPARATORS, key=first.count) if any(sep in first for sep in SEPARATORS) else ","


def _is_int(values: pd.Series) -> bool:
    return len(values) > 0 and values.str.fullmatch(r"-?\d+").all()


def _image_folders(root: Path) -> list[Path]:
    """Folders holding image files (directly or below), nearest first."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files):
            path = Path(folder)
            top = root / path.relative_to(root).parts[0] if path != root else root
            if top not in found:
                found.append(top)
    return found


class _Guess:
    def __init__(self, root: Path):
        self.root = root
        self.notes: list[str] = []
        self.encodings: set[str] = set()  # of the tables read, where not UTF-8
        self.tables = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
        self.indexes = {folder: ImageIndex(folder) for folder in _image_folders(root)}

    def note(self, text: str) -> None:
        self.notes.append(text)

    def table(self, *words: str, exclude: tuple[str, ...] = ()) -> Optional[Path]:
        for path in self.tables:
            name = path.stem.lower()
            if any(word in name for word in words) and not any(word in name for word in exclude):
                return path
        return None

    def read(self, path: Path, header: bool = True) -> tuple[pd.DataFrame, str]:
        encoding = text_encoding(path)
        if encoding != "utf-8-sig":
            self.encodings.add(encoding)
        sep = _guess_sep(path)
        return read_text_table(path, sep, header, encoding), sep

    def folder_of(self, ids: pd.Series, exclude: Optional[Path] = None) -> tuple[Optional[Path], float]:
        """The image folder where most of `ids` are found, and that share."""
        best, share = None, 0.0
        probe = ids.head(200)
        for folder, index in self.indexes.items():
            if folder == exclude:
                continue
            found = sum(index.find(str(image_id)) is not None for image_id in probe) / max(1, len(probe))
            if found > share:
                best, share = folder, found
        return best, share

    def id_column(self, table: pd.DataFrame, exclude: Optional[Path] = None) -> tuple[str, Optional[Path]]:
        scored = [(self.folder_of(table[column], exclude), column) for column in table.columns]
        (folder, share), column = max(scored, key=lambda item: item[0][1])
        if share == 0:
            return table.columns[0], None
        return column, folder

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def _label_master(guess: _Guess) -> dict[str, str]:
    """SIGNATE's label_master: class id -> class name, in the file's order."""
    path = guess.table("label_master", "labels", exclude=("train", "test", "sample"))
    if path is None:
        return {}
    master, _ = guess.read(path)
    id_col = next((c for c in master.columns if _is_int(master[c])), master.columns[0])
    name_col = next((c for c in master.columns if c != id_col), id_col)
    guess.note(f"label names from {path.name}: ids in '{id_col}', names in '{name_col}'")
    return dict(zip(master[id_col], master[name_col]))


def _train_from_table(guess: _Guess, path: Path, id_to_name: dict[str, str]) -> tuple[dict, list[str], dict]:
    """(train section, labels, extra top-level keys) from a train table."""
    train, sep = guess.read(path)
    id_column, folder = guess.id_column(train)
    if folder is None:
        raise LabelcompError(f"{path}: none of its columns names image files found under {guess.root}")
    candidates = [c for c in train.columns if c != id_column]
    if not candidates:
        raise LabelcompError(f"{path}: no label column besides the id column '{id_column}'")
    label_column = next((c for c in candidates if c.lower() in LABEL_WORDS or "label" in c.lower()),
                        min(candidates, key=lambda c: train[c].nunique()))
    written = pd.Series(sorted(train[label_column].str.strip().unique()))
    if _is_int(written):
        written = written.iloc[written.astype(int).argsort()]
    extra = {}
    if id_to_name and set(written) <= set(id_to_name):
        ids = list(id_to_name)
        labels, extra["label_ids"], label_format = [id_to_name[i] for i in ids], ids, "index"
    else:
        labels, label_format = written.tolist(), "name"
    guess.note(f"train: {path.name} separated by {SEPARATORS[sep]}, ids in '{id_column}', labels in "
               f"'{label_column}' written as {'names' if label_format == 'name' else 'class ids'}, "
               f"images in {guess.relative(folder)}/")
    section = {"csv": guess.relative(path), "sep": sep, "id_column": id_column, "label_column": label_column,
               "label_format": label_format, "images": guess.relative(folder)}
    return section, labels, extra


def _train_from_folders(guess: _Guess) -> tuple[dict, list[str]]:
    folder = next((f for f in guess.indexes if "train" in f.name.lower()), None)
    if folder is None:
        raise LabelcompError(f"{guess.root}: found neither a train table (train*.csv/tsv) nor a train image folder")
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if len(classes) < 2:
        raise LabelcompError(f"{folder}: expected one sub-folder per class, found {len(classes)}")
    guess.note(f"train: folder layout, {len(classes)} class folders in {guess.relative(folder)}/")
    return {"csv": None, "images": guess.relative(folder)}, classes


def _submission(guess: _Guess, labels: list[str], by_id: bool, train_folder: Path) -> tuple[dict, Optional[Path]]:
    """The submission section guessed from the sample (header or not, columns, label format), and
    the folder its ids point into."""
    path = guess.table("sample")
    if path is None:
        guess.note("submission: no sample found; labelcomp writes `id,label` with a header")
        return {"sample": None}, None
    first, sep = guess.read(path, header=False)
    # a header's first field names no image and its second is no class id
    header = guess.folder_of(first.iloc[:1, 0], exclude=train_folder)[1] == 0 and not _is_int(first.iloc[:1, 1])
    sample = first.iloc[1:].reset_index(drop=True) if header else first
    if header:
        sample.columns = list(first.iloc[0])
    id_column, folder = guess.id_column(sample, exclude=train_folder)
    label_column = next(c for c in sample.columns if c != id_column)
    values = sample[label_column].str.strip()
    label_format = "name" if values.isin(labels).all() and not (by_id and _is_int(values)) else "index"
    guess.note(f"submission: like {path.name}, separated by {SEPARATORS[sep]}, "
               f"{'with' if header else 'without'} a header, ids in column '{id_column}', "
               f"labels in '{label_column}' as {'names' if label_format == 'name' else 'class ids'}")
    return {"sample": guess.relative(path), "sep": sep, "header": bool(header), "id_column": id_column,
            "label_column": label_column, "label_format": label_format}, folder


def _test(guess: _Guess, has_sample: bool, sample_folder: Optional[Path], train_folder: Path) -> dict:
    path = guess.table("test", exclude=("sample",))
    folder = sample_folder
    if path is not None:
        table, sep = guess.read(path)
        id_column, table_folder = guess.id_column(table, exclude=train_folder)
        folder = folder or table_folder
        section = {"csv": guess.relative(path), "sep": sep, "id_column": id_column}
        guess.note(f"test: ids in '{id_column}' of {path.name}")
    else:
        section = {"csv": None}
        guess.note("test: ids from the sample submission" if has_sample else "test: every image of the test folder")
    folder = folder or next((f for f in guess.indexes if "test" in f.name.lower()), None)
    if folder is None:
        raise LabelcompError(f"{guess.root}: found no test image folder")
    section["images"] = guess.relative(folder)
    guess.note(f"test images in {guess.relative(folder)}/")
    return section


def discover(root: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The competition.yaml content guessed for `root`, and one line per guess made."""
    root = Path(root)
    if not root.is_dir():
        raise LabelcompError(f"{root}: not a folder; give the folder of a downloaded competition")
    guess = _Guess(root)
    if not guess.indexes:
        raise LabelcompError(f"{root}: no image files found ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
    spec: dict[str, Any] = {"name": root.resolve().name, "metric": "accuracy"}
    guess.note("metric: accuracy (set macro_f1 or logloss if the competition scores that way)")
    id_to_name = _label_master(guess)
    train_table = guess.table("train")
    if train_table is not None:
        spec["train"], spec["labels"], extra = _train_from_table(guess, train_table, id_to_name)
        spec.update(extra)
    else:
        spec["train"], spec["labels"] = _train_from_folders(guess)
    guess.note(f"labels: {len(spec['labels'])} classes: {spec['labels'][:5]}{' ...' if len(spec['labels']) > 5 else ''}")
    train_folder = root / spec["train"]["images"]
    spec["submission"], sample_folder = _submission(guess, spec["labels"], bool(id_to_name), train_folder)
    spec["test"] = _test(guess, spec["submission"]["sample"] is not None, sample_folder, train_folder)
    if guess.encodings:
        spec["encoding"] = sorted(guess.encodings)[0]
        guess.note(f"encoding: {spec['encoding']} (the tables are not UTF-8; the submission is written in it too)")
    return spec, guess.notes


def write_spec(root: str | Path, spec: dict[str, Any], force: bool = False) -> Path:
    path = Path(root) / "competition.yaml"
    if path.exists() and not force:
        raise LabelcompError(f"{path}: already exists; review it, or pass --force to overwrite it")
    write_text_atomic(path, yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return path
