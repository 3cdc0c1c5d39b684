"""The `labelcomp` command: parse, call one function, print; known errors become one line and exit 2.

Heavy libraries are imported inside the commands so that `--help` and errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from labelcomp.errors import LabelcompError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labelcomp", description="k-fold fine-tuning for image-classification competitions")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "train every fold of an experiment, print fold scores, CV and OOF, record the run"),
        ("submit", "predict the test set with a run's fold models and TTA (or blend runs), write the submission"),
        ("compare", "print every run of the score history"),
        ("probe", "the frozen-feature baseline: LogisticRegression on pretrained features, per fold"),
        ("lr-find", "suggest a learning rate for a fine-tuning stage (Lightning's lr range test)"),
        ("report", "write report.html (self-contained) and report.md with plots into a finished run's folder"),
        ("bench", "measure model-only, pipeline, loading and inference speed side by side"),
        ("cache", "show the size of the decoded-image cache (data.cache_dir), or clear it with --clear"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--config", help="experiment YAML file (e.g. configs/default.yaml)")
        if name == "compare":
            command.add_argument("overrides", nargs="*", metavar="RUN | key=value",
                                 help="two run ids to compare fold by fold, and config overrides")
            command.add_argument("--plot", action="store_true",
                                 help="also write submissions/score_history.png: scores over time")
            command.add_argument("--competition", metavar="NAME",
                                 help="the competition (name or digest) whose runs to show; default: the config's")
            continue
        command.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. cv.folds=3")
        if name in ("submit", "report"):
            command.add_argument("--run", help="run id (default: the experiment's latest finished run)")
        if name == "submit":
            command.add_argument("--runs", metavar="A,B,...",
                                 help="blend these finished runs with weights fitted on their OOF predictions")
        if name == "train":
            command.add_argument("--resume", metavar="RUN", help="continue an interrupted run with its saved config")
            command.add_argument("--run", help="run id to create or join: fold jobs in parallel share it")
            command.add_argument("--folds", help="only these folds, e.g. 0,1 (the rest by other jobs), or array: "
                                                  "the fold of a SLURM array task (SLURM_ARRAY_TASK_ID)")
        if name == "bench":
            command.add_argument("--seconds", type=float, default=3.0,
                                 help="length of each variant's timed measurement; the (a)/(b) pairs run 12 times as long")
        if name == "cache":
            command.add_argument("--clear", action="store_true", help="delete the cache (rebuilt as runs need it)")
        if name == "lr-find":
            command.add_argument("--stage", type=int, default=0, help="index of the finetune stage (default 0)")
    label = commands.add_parser("label-history", help="name the config's competition in score-history rows "
                                "recorded before rows named it (all such rows, or the RUNs given)")
    label.add_argument("overrides", nargs="*", metavar="RUN | key=value", help="run ids and config overrides")
    label.add_argument("--config", help="experiment YAML file: its competition and paths.submissions")
    predict = commands.add_parser("predict", help="predict image files or folders with a run's fold models and TTA",
                                  description="predict image files or folders with a run's fold models and TTA: "
                                              "a CSV of id, predicted label and per-class probabilities")
    predict.add_argument("run", help="run id of a finished run")
    predict.add_argument("overrides", nargs="+", metavar="PATH | key=value", help="image files and folders, and config "
                                                                               "overrides")
    predict.add_argument("--config", help="experiment YAML file: its paths.runs and experiment find the run")
    predict.add_argument("--out", help="CSV to write (default: <paths.submissions>/<run>.predictions.csv)")
    export = commands.add_parser("export", help="a run's fold models as ONNX with a standalone predict.py (onnxruntime, "
                                 "numpy, OpenCV, Pillow) for offline notebooks",
                                 description="write a folder (or zip) with every fold model of a run as ONNX, the labels "
                                             "and preprocessing as JSON, and predict.py, which needs neither labelcomp, "
                                             "torch nor timm")
    export.add_argument("run", help="run id of a finished run")
    export.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    export.add_argument("--config", help="experiment YAML file: its paths.runs and experiment find the run")
    export.add_argument("--out", help="folder to write (default: <run>/export)")
    export.add_argument("--zip", action="store_true", help="write <folder>.zip instead of the folder")
    init = commands.add_parser("init", help="guess a competition.yaml for a downloaded competition folder")
    init.add_argument("folder")
    init.add_argument("--force", action="store_true", help="overwrite an existing competition.yaml")
    check = commands.add_parser("check", help="validate a competition folder and summarise its images")
    check.add_argument("folder")
    for name, value, text in (("lb", "score", "record a run's leaderboard score"),
                              ("note", "text", "record a note on a run")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("run")
        command.add_argument(value, type=float if name == "lb" else str)
        command.add_argument("--config", help="experiment YAML file; its paths.submissions holds the history")
        command.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _config(args: argparse.Namespace):
    """The command's config; once it has loaded (errors in it answer before torch and Lightning load),
    the process is configured for labelcomp's work."""
    from labelcomp.config import load_config
    from labelcomp.startup import configure

    config = load_config(args.config, args.overrides)
    configure()
    return config


def _folds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    if text == "array":
        from labelcomp.ranks import array_fold

        return [array_fold()]
    try:
        return [int(fold) for fold in text.split(",")]
    except ValueError:
        raise LabelcompError(f"--folds {text!r}: expected fold numbers separated by commas, e.g. 0,1, "
                             "or array (the fold of a SLURM array task)") from None


def _train(args: argparse.Namespace) -> None:
    from labelcomp.config import load_config
    from labelcomp.runs import find_run

    folds = _folds(args.folds)
    config = _config(args)
    run_id = args.run
    if args.resume:
        resumed = find_run(config.paths.runs, config.experiment, args.resume, finished=False)
        config, run_id = load_config(resumed.config, args.overrides), resumed.run_id
    from labelcomp.history import fold_table
    from labelcomp.ranks import is_global_zero
    from labelcomp.train import run

    logger = logging.getLogger("labelcomp")
    level = logger.level
    if not is_global_zero():
        logger.setLevel(logging.WARNING)  # rank 0 tells how the run goes
    try:
        run_dir, scores = run(config, run_id, folds)
    finally:
        logger.setLevel(level)
    if not is_global_zero():
        return  # the job's rank 0 reports
    if scores is None:
        print(f"folds {args.folds} of run {run_dir.run_id} done; scores come when every fold is")
    else:
        print(fold_table(scores))


def _probe(args: argparse.Namespace) -> None:
    config = _config(args)
    from labelcomp.history import fold_table
    from labelcomp.probe import run_probe

    _, scores = run_probe(config)
    print(fold_table(scores))


def _lr_find(args: argparse.Namespace) -> None:
    config = _config(args)
    from labelcomp.lr_find import find_lr

    suggestion, plot = find_lr(config, args.stage)
    found = f"suggested lr for stage {args.stage}: {suggestion:.2e}" if suggestion else "no lr suggestion from the curve"
    print(f"{found}; plot: {plot}")


def _report(args: argparse.Namespace) -> None:
    config = _config(args)
    from labelcomp.report import write_report

    markdown, page = write_report(config, args.run)
    print(f"report written: {page} (one page, images inside) and {markdown} (PNGs beside it)")


def _bench(args: argparse.Namespace) -> None:
    config = _config(args)
    from labelcomp.bench import run_bench

    print(run_bench(config, args.seconds))


def _predict(args: argparse.Namespace) -> None:
    from labelcomp.config import load_config
    from labelcomp.startup import configure

    config = load_config(args.config, [item for item in args.overrides if "=" in item])
    configure()
    from labelcomp.submit import predict_images

    inputs = [item for item in args.overrides if "=" not in item]
    path, problems = predict_images(config, args.run, inputs, args.out)
    for problem in problems:
        print(f"left out: {problem}", file=sys.stderr)
    print(f"predictions written: {path}")


def _export(args: argparse.Namespace) -> None:
    config = _config(args)
    from labelcomp.export import SCRIPT, export_run

    path, size = export_run(config, args.run, args.out, args.zip)
    script = SCRIPT if args.zip else path / SCRIPT
    print(f"export written: {path} ({size / 1e6:.1f} MB); predict with: python {script} IMAGES... --out predictions.csv")


def _cache(args: argparse.Namespace) -> None:
    config = _config(args)
    from labelcomp.data import cache_folders, clear_cache

    folders = cache_folders(config.data.cache_dir)
    for folder in folders:
        entries, size = folder.usage()
        print(f"{folder.folder}: {entries} images, {size / 2**20:.1f} MB")
    if not folders:
        print(f"{config.data.cache_dir}: no cached images")
    if args.clear:
        clear_cache(config.data.cache_dir)
        print(f"{config.data.cache_dir}: cleared")


def _submit(args: argparse.Namespace) -> None:
    if args.runs and args.run:
        raise LabelcompError("give either --run (one run) or --runs (a blend), not both")
    config = _config(args)
    if args.runs:
        from labelcomp.blend import blend

        path, summary = blend(config, args.runs.split(","))
        print(summary)
    else:
        from labelcomp.submit import submit

        path = submit(config, args.run, args.overrides)
    print(f"submission written: {path}")


def _compare(args: argparse.Namespace) -> None:
    from labelcomp.config import load_config
    from labelcomp.history import compare_runs, compare_table, history_path, of_competition, plot_history, read_history

    runs = [item for item in args.overrides if "=" not in item]
    config = load_config(args.config, [item for item in args.overrides if "=" in item])
    path = history_path(config.paths.submissions)
    history, left_out = of_competition(read_history(path), args.competition or _competition(config).identity())
    if len(runs) == 2:
        print(compare_runs(history, *runs))
    elif runs:
        raise LabelcompError(f"compare takes two run ids to put side by side, got {len(runs)}: {runs}")
    else:
        print(compare_table(history))
    if left_out:
        print(left_out)
    if args.plot:
        print(f"plot written: {plot_history(history, path.with_suffix('.png'))}")


def _competition(config):
    from labelcomp.competition import Competition

    if config.competition is None:
        raise LabelcompError("the score history is read per competition: give the config's competition "
                             "(competition=FOLDER) or --competition NAME")
    return Competition.load(config.competition)


def _label_history(args: argparse.Namespace) -> None:
    from labelcomp.config import load_config
    from labelcomp.history import history_path, label_rows

    config = load_config(args.config, [item for item in args.overrides if "=" in item])
    identity = _competition(config).identity()
    runs = [item for item in args.overrides if "=" not in item]
    labelled = label_rows(history_path(config.paths.submissions), identity, runs)
    print(f"{len(labelled)} row(s) now of competition {identity['competition']} ({identity['competition_id']})"
          + (f": {', '.join(labelled)}" if labelled else ""))


def _record(args: argparse.Namespace) -> None:
    from labelcomp.config import load_config
    from labelcomp.history import history_path, record_lb, record_note

    path = history_path(load_config(args.config, args.overrides).paths.submissions)
    if args.command == "lb":
        record_lb(path, args.run, args.score)
    else:
        record_note(path, args.run, args.text)
    print(f"recorded in {path}")


def _init(args: argparse.Namespace) -> None:
    from labelcomp.discover import discover, write_spec
    from labelcomp.startup import configure

    configure()

    spec, notes = discover(args.folder)
    path = write_spec(args.folder, spec, force=args.force)
    print("\n".join(["guessed:", *(f"  {note}" for note in notes), f"wrote {path}; review it, then run "
                     f"`labelcomp check {args.folder}`"]))


def _check(args: argparse.Namespace) -> int:
    from labelcomp.check import check_competition
    from labelcomp.startup import configure

    configure()

    report = check_competition(args.folder)
    print(report.text())
    return 2 if report.problems else 0


COMMANDS = {"train": _train, "submit": _submit, "compare": _compare, "probe": _probe, "lr-find": _lr_find,
            "init": _init, "check": _check, "lb": _record, "note": _record, "report": _report,
            "bench": _bench, "cache": _cache, "label-history": _label_history,
            "predict": _predict, "export": _export}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options: `labelcomp lb RUN 0.81 --config C key=value`
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Lightning answers Ctrl-C inside a fit with a graceful shutdown and exit(1); noting the signal
    # lets the interruption end as one, with its line and exit code 130
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        return COMMANDS[args.command](args) or 0
    except LabelcompError as error:
        print(f"labelcomp: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labelcomp: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        if not interrupted:
            raise
        print("labelcomp: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
