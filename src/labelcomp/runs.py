"""The run folder contract: `runs/<experiment>/<run_id>/` and its files, written atomically.

Everything after training reads a run folder, never the training process's memory.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Callable

import pandas as pd

from labelcomp.errors import LabelcompError


def write_text_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.
    Text is written as UTF-8 exactly as given (no newline translation)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _unwritable(path, error) from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode() if isinstance(data, str) else data)
        # mkstemp creates owner-only files; give the file the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _unwritable(path, error) from None
        raise


def _unwritable(path: Path, error: OSError) -> LabelcompError:
    """A write that failed (disk full, no permission, a file where a folder should be) as one line."""
    return LabelcompError(
        f"{path}: could not be written ({error.strerror}); what was there before is unchanged. Free space or fix "
        "the path, then run the command again: `labelcomp train --resume RUN` continues a run where it stopped"
    )


def write_figure_atomic(figure, path: Path, dpi: int = 100) -> None:
    """A matplotlib figure as PNG, written atomically; a pyplot figure is closed after."""
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=dpi, bbox_inches="tight")
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(figure)
    write_text_atomic(path, image.getvalue())


def read_table(path: Path) -> pd.DataFrame:
    """A CSV that labelcomp wrote (folds, OOF, test probabilities): ids and labels stay the strings they
    were, whatever they look like ("01", "1.0", "NA", "None"); the other columns are numbers."""
    return pd.read_csv(path, dtype={"id": str, "label": str}, keep_default_na=False)


def write_csv_atomic(frame: pd.DataFrame, path: Path, **to_csv_args) -> None:
    write_text_atomic(path, frame.to_csv(index=False, lineterminator="\n", **to_csv_args))


class RunDir:
    """Paths of one run; `fold_<k>/oof.csv` existing is what marks fold k as done."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.run_id = self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def survey(self) -> Path:
        """The fingerprint of the surveyed competition files and their duplicate sets: a resumed run
        or a fold job of unchanged files does not decode every image again."""
        return self.root / "survey.json"

    @property
    def oof(self) -> Path:
        return self.root / "oof.csv"

    @property
    def oof_tta(self) -> Path:
        return self.root / "oof_tta.csv"

    @property
    def scores(self) -> Path:
        return self.root / "scores.json"

    @property
    def pseudo_labels(self) -> Path:
        """The pseudo-labelled test images every fold trains on as well (pseudo.from_run)."""
        return self.root / "pseudo_labels.csv"

    @property
    def pseudo_record(self) -> Path:
        """How they were chosen: parent run, threshold, counts."""
        return self.root / "pseudo.json"

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"fold_{fold}"

    def fold_oof(self, fold: int) -> Path:
        return self.fold_dir(fold) / "oof.csv"

    def fold_oof_views(self, fold: int) -> Path:
        """Raw outputs of every TTA view for the fold's images, so every policy is scored from them."""
        return self.fold_dir(fold) / "oof_views.npz"

    def fold_usage(self, fold: int) -> Path:
        """Seconds and peak memory of the fold."""
        return self.fold_dir(fold) / "usage.json"

    def checkpoint(self, fold: int) -> Path:
        return self.fold_dir(fold) / "best.ckpt"

    def last_checkpoint(self, fold: int) -> Path:
        """Written every epoch while the fold trains, so an interrupted fold continues."""
        return self.fold_dir(fold) / "last.ckpt"


def claim_name(prefix: str, create: Callable[[str], None]) -> str:
    """`<prefix>-<local time>`, with a suffix when the name is taken. `create(name)` makes the thing
    named, failing with FileExistsError where it exists: whoever creates it owns the name, so parallel
    processes never share one."""
    stamp = f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1000):
        name = stamp + (f"-{attempt}" if attempt else "")
        try:
            create(name)
        except FileExistsError:
            continue
        return name
    raise LabelcompError(f"could not find a free name for a new '{prefix}'")


def check_run_id(run_id: str) -> str:
    """A run id is a folder name under `<paths.runs>/<experiment>/`, never a path."""
    if not run_id or run_id in (".", "..") or any(character in run_id for character in "/\\\0"):
        raise LabelcompError(f"run id {run_id!r}: expected a name (letters, digits, '-', '_', '.'), not a path; "
                             "runs live under paths.runs/<experiment>/")
    return run_id


def new_run(runs_root: str | Path, experiment: str) -> RunDir:
    """A fresh folder `<runs_root>/<experiment>/<experiment>-<local time>`."""
    parent = Path(runs_root) / experiment
    parent.mkdir(parents=True, exist_ok=True)
    return RunDir(parent / claim_name(experiment, lambda name: (parent / name).mkdir()))


def find_run(runs_root: str | Path, experiment: str, run_id: str | None = None, finished: bool = True) -> RunDir:
    """The named run, or the latest finished run (one with scores.json) of the experiment."""
    parent = Path(runs_root) / experiment
    if run_id:
        check_run_id(run_id)
        for candidate in (parent / run_id, *Path(runs_root).glob(f"*/{run_id}")):
            if (candidate / "config.yaml").is_file():
                if finished and not (candidate / "scores.json").is_file():
                    raise LabelcompError(f"run '{run_id}' has unfinished folds; `make train RUN={run_id}` continues it")
                return RunDir(candidate)
        raise LabelcompError(f"run '{run_id}' not found under {runs_root}/; list runs with `make compare`")
    finished = sorted(path.parent for path in parent.glob("*/scores.json"))
    if not finished:
        raise LabelcompError(
            f"{parent}: no finished run of experiment '{experiment}'; train one first with `make train`"
        )
    return RunDir(finished[-1])
