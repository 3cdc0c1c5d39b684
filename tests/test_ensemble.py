"""Blending runs: weights fitted on OOF predictions only, a blend of one run is that run."""

import json

import numpy as np
import pandas as pd
import pytest

from labelcomp.ensemble import fit_blend_weights
from labelcomp.cli import main
from labelcomp.metrics import METRICS
from conftest import REPO, make_competition, tiny_overrides

pytestmark = pytest.mark.slow  # the blends need two trained runs

SMOKE = str(REPO / "configs" / "smoke.yaml")
ACCURACY = METRICS["accuracy"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A fine-tuned run and a probe run on one tiny competition, both submitted."""
    tmp_path = tmp_path_factory.mktemp("blend")
    competition = make_competition(tmp_path / "tiny")
    overrides = tiny_overrides(tmp_path, competition)
    assert main(["train", "--config", SMOKE, *overrides]) == 0
    assert main(["submit", "--config", SMOKE, *overrides]) == 0
    assert main(["probe", "--config", SMOKE, *overrides]) == 0
    (trained,) = (tmp_path / "runs" / "smoke").iterdir()
    (probe,) = (tmp_path / "runs" / "smoke-probe").iterdir()
    return {"tmp": tmp_path, "competition": competition, "overrides": overrides,
            "trained": trained.name, "probe": probe.name}


def _blend(runs, capsys, extra=()) -> tuple[str, dict]:
    """Blend through the CLI; the printed summary and the blend's saved details."""
    assert main(["submit", "--config", SMOKE, "--runs", ",".join(runs["ids"]), *runs["overrides"], *extra]) == 0
    out = capsys.readouterr().out
    written = out.strip().splitlines()[-1].removeprefix("submission written: ")
    return out, json.loads(open(written.removesuffix(".csv") + ".json").read()) | {"submission": written}


def test_a_blend_of_one_run_is_that_run(two_runs, capsys):
    runs = dict(two_runs, ids=[two_runs["trained"]])
    out, details = _blend(runs, capsys)
    submissions = two_runs["tmp"] / "submissions"
    assert details["weights"] == {two_runs["trained"]: 1.0}
    assert open(details["submission"]).read() == (submissions / f"{two_runs['trained']}.csv").read_text()
    blended = pd.read_csv(details["submission"].removesuffix(".csv") + ".test_proba.csv")
    alone = pd.read_csv(submissions / f"{two_runs['trained']}.test_proba.csv")
    np.testing.assert_array_equal(blended.to_numpy(), alone.to_numpy())
    scores = json.loads((two_runs["tmp"] / "runs" / "smoke" / two_runs["trained"] / "scores.json").read_text())
    assert details["oof_scores"]["blend"] == pytest.approx(scores["oof_tta_score"])
    assert f"{scores['oof_tta_score']:.4f} with the fitted weights" in out


def test_blend_weights_come_from_oof_only_and_are_recorded(two_runs, capsys):
    runs = dict(two_runs, ids=[two_runs["trained"], two_runs["probe"]])
    out, first = _blend(runs, capsys)
    assert two_runs["trained"] in out and two_runs["probe"] in out and "OOF accuracy of the blend" in out
    weights = np.array(list(first["weights"].values()))
    assert (weights >= 0).all() and weights.sum() == pytest.approx(1.0)

    # the test side changes completely: other test predictions for the probe run, and test labels
    # in the test file; the fitted weights and OOF scores stay, only the submission changes
    submissions = two_runs["tmp"] / "submissions"
    probe_test = submissions / f"{two_runs['probe']}.test_proba.csv"
    proba = pd.read_csv(probe_test)
    classes = list(proba.columns[1:])
    proba[classes] = np.eye(len(classes))[np.arange(len(proba)) % len(classes)]
    proba.to_csv(probe_test, index=False)
    test_csv = two_runs["competition"] / "test.csv"
    test = pd.read_csv(test_csv)
    test["label"] = classes[0]
    test.to_csv(test_csv, index=False)
    _, second = _blend(runs, capsys)
    assert second["weights"] == first["weights"] and second["oof_scores"] == first["oof_scores"]
    trained_test = pd.read_csv(submissions / f"{two_runs['trained']}.test_proba.csv")[classes].to_numpy()
    blended = pd.read_csv(second["submission"].removesuffix(".csv") + ".test_proba.csv")[classes].to_numpy()
    np.testing.assert_allclose(blended, weights[0] * trained_test + weights[1] * proba[classes].to_numpy())

    history = pd.read_csv(submissions / "score_history.csv")
    row = history[history["run_id"] == first["blend_id"]].iloc[0]
    assert row["experiment"] == "blend" and row["oof_score"] == pytest.approx(first["oof_scores"]["blend"])
    assert row["submission"] == f"{first['blend_id']}.csv" and two_runs["probe"] in row["notes"]
    # both runs used the same folds, so the blend has fold scores like a run
    assert not np.isnan(row["fold_0"]) and not np.isnan(row["fold_1"])


def test_fitted_weights_favour_the_run_that_predicts_oof_better():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, 300)
    good = np.full((300, 3), 0.1)
    good[np.arange(300), target] = 0.8
    noise = rng.dirichlet(np.ones(3), 300)
    for objective in ("logloss", "metric"):
        weights = fit_blend_weights(np.stack([noise, good]), target, ACCURACY, objective)
        assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
        assert weights[1] > 0.9, (objective, weights)
    # two equally good, independent runs share the weight
    other = np.full((300, 3), 0.1)
    other[np.arange(300), target] = 0.8
    other[:150] = good[:150][:, [1, 2, 0]]
    swapped = good.copy()
    swapped[150:] = good[150:][:, [1, 2, 0]]
    weights = fit_blend_weights(np.stack([swapped, other]), target, ACCURACY, "logloss")
    assert weights == pytest.approx([0.5, 0.5], abs=0.05)


def test_blending_runs_of_another_competition_is_refused(two_runs, tmp_path, capsys):
    other = make_competition(tmp_path / "other", classes=3)
    overrides = [*tiny_overrides(two_runs["tmp"], other)]
    assert main(["probe", "--config", SMOKE, *overrides]) == 0
    probes = sorted(path.name for path in (two_runs["tmp"] / "runs" / "smoke-probe").iterdir())
    stranger = next(name for name in probes if name != two_runs["probe"])
    capsys.readouterr()
    assert main(["submit", "--config", SMOKE, "--runs", f"{two_runs['trained']},{stranger}",
                 *two_runs["overrides"]]) == 2
    error = capsys.readouterr().err
    # both are named "tiny"; their training tables differ
    assert "is of competition tiny (" in error and "blend runs of the same competition" in error
