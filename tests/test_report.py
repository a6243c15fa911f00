"""`gemma-search report` and parameter importance, on studies filled without training.

Trials are added with Optuna directly, with the distributions the spec's search section gives,
so the synthetic loss (a bowl in log learning rate around LR_OPT) is known exactly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gemma_search.analysis import Evaluator, param_importances, recommendation
from gemma_search.cli import app
from gemma_search.errors import GemmaSearchError
from gemma_search.report import PLOTS, write_report
from gemma_search.spec import Choice, FloatRange, IntRange, StudySpec, spec_from_text
from gemma_search.study import create_study, load_study

from .conftest import demo_spec_text

LR_OPT = 2.0e-3
STEPS = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _distributions(spec: StudySpec) -> dict[str, Any]:
    """The spec's searched settings as Optuna distributions (what `space._suggest` asks)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for name in ("learning_rate", "optimizer", "lora_r"):
        value = getattr(spec.search, name)
        if isinstance(value, FloatRange):
            out[name] = FloatDistribution(value.low, value.high, log=value.log)
        elif isinstance(value, IntRange):
            out[name] = IntDistribution(value.low, value.high, log=value.log)
        elif isinstance(value, Choice):
            out[name] = CategoricalDistribution(list(value.choices))
    return out


def _loss(params: dict[str, Any]) -> float:
    """A bowl in log10(lr) around LR_OPT; optimizer and rank matter a little."""
    return (0.3 + 0.4 * (math.log10(params["learning_rate"]) - math.log10(LR_OPT)) ** 2
            + 0.03 * (params["optimizer"] == "sgd") + 0.01 * (params["lora_r"] == 4))


def make_study(url: str, name: str, *, n_complete: int = 20, n_pruned: int = 8,
               searched_momentum: bool = False) -> None:
    """A gemma-search study (stored spec) with finished trials and no training.

    `searched_momentum`: the spec searches momentum, a conditional param (sgd only) that no
    trial here has, as in a study where no sgd trial has finished yet.
    """
    import optuna
    from optuna.trial import TrialState

    # The model path need not exist: `create_study` stores the spec, `check_data` reads files.
    text = demo_spec_text(name, Path("/nonexistent/tiny-gemma2"),
                          Path("/nonexistent/train.jsonl"), Path("/nonexistent/val.jsonl"))
    if searched_momentum:
        text = text.replace("momentum: 0.9", "momentum: {low: 0.5, high: 0.95}")
    spec = spec_from_text(text)
    study = create_study(spec, url)
    dists = _distributions(spec)
    rng = random.Random(0)
    # Mid-points of a log grid over the spec's range (LR_OPT between two), shuffled.
    n = n_complete + n_pruned
    lrs = [1e-4 * (3e-2 / 1e-4) ** ((i + 0.5) / n) for i in range(n)]
    rng.shuffle(lrs)
    # The trials furthest from the optimum are the ones the pruner cut.
    by_badness = sorted(lrs, key=lambda lr: abs(math.log(lr / LR_OPT)), reverse=True)
    pruned = set(by_badness[:n_pruned])
    for lr in lrs:
        params = {"learning_rate": lr, "optimizer": rng.choice(["adamw", "sgd"]),
                  "lora_r": rng.choice([4, 8])}
        final = _loss(params) + rng.gauss(0, 0.003)
        steps = 2 if lr in pruned else STEPS
        curve = {s: final + 1.5 * math.exp(-0.6 * s) for s in range(1, steps + 1)}
        state = TrialState.PRUNED if lr in pruned else TrialState.COMPLETE
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, intermediate_values=curve, state=state,
            value=min(curve.values()) if state == TrialState.COMPLETE else None,
            user_attrs={"accuracy": 0.9 - final / 10, "tokens_trained": 1000 * steps}))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict[str, Path]]:
    base = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{base / 'study.db'}"
    make_study(url, "synthetic")
    return url, base / "out", write_report("synthetic", url, base / "out")


def test_report_writes_every_plot_as_a_real_png(
        report_dir: tuple[str, Path, dict[str, Path]]) -> None:
    _, out, paths = report_dir
    pngs = [out / filename for filename, _ in PLOTS.values()]
    assert set(paths) == {p.name for p in pngs} | {"report.html", "summary.json"}
    for png in pngs:
        width, height = png_size(png)
        assert width > 100 and height > 100, png
        assert png.stat().st_size > 5000, png
    assert len({png.read_bytes() for png in pngs}) == len(pngs)


def test_report_html_is_self_contained(report_dir: tuple[str, Path, dict[str, Path]]) -> None:
    url, out, paths = report_dir
    text = paths["report.html"].read_text()
    study, spec = load_study("synthetic", url)
    from gemma_search.export import leaderboard

    for row in leaderboard(study, spec, 10):
        assert f"<td>{row['trial']}</td>" in text
    assert text.count("src='data:image/png;base64,") == len(PLOTS)
    assert "http://" not in text and "https://" not in text
    assert "skipped" not in text
    summary = json.loads(paths["summary.json"].read_text())
    assert summary["trials"]["complete"] == 20 and summary["trials"]["pruned"] == 8
    assert summary["best"]["trial"] == summary["leaderboard"][0]["trial"]
    assert all(line in text for line in summary["recommendation"]["lines"])


def test_importance_and_recommendation_find_the_learning_rate(storage_url: str,
                                                              tmp_path: Path) -> None:
    name = f"imp-{tmp_path.name[-16:]}"
    make_study(storage_url, name)
    study, spec = load_study(name, storage_url)
    evaluators: list[Evaluator] = ["ped-anova"]
    if importlib.util.find_spec("sklearn") is not None:  # Optuna's fANOVA needs it
        evaluators.append("fanova")
    else:
        with pytest.raises(GemmaSearchError, match="fanova needs scikit-learn"):
            param_importances(study, evaluator="fanova")
    for evaluator in evaluators:
        importances = param_importances(study, evaluator=evaluator)
        assert list(importances)[0] == "learning_rate", (evaluator, importances)
        assert math.isclose(sum(importances.values()), 1.0)
    rec = recommendation(study, spec)
    json.dumps(rec)  # JSON-ready, as `status --json` prints it
    lr = next(p for p in rec["params"] if p["name"] == "learning_rate")
    assert rec["params"][0] is lr and lr["log"] and lr["kind"] == "float"
    assert lr["low"] < LR_OPT < lr["high"], lr
    assert lr["edge"] is None
    assert rec["lines"][0].startswith("learning_rate: good trials lie in ")
    assert "(log)" in rec["lines"][0] and "importance" in rec["lines"][0]
    assert rec["n_complete"] == 20 and rec["n_top"] == 4
    optimizer = next(p for p in rec["params"] if p["name"] == "optimizer")
    assert sum(optimizer["choices"].values()) == 4


def test_report_with_one_complete_trial_skips_plots(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    make_study(url, "young", n_complete=1, n_pruned=2)
    paths = write_report("young", url, tmp_path / "out")
    assert "param_importances.png" not in paths and "parallel_coordinate.png" not in paths
    assert "intermediate_values.png" in paths and "optimization_history.png" in paths
    text = paths["report.html"].read_text()
    assert "skipped: 1 complete trial(s); parameter importances need at least 4" in text
    summary = json.loads(paths["summary.json"].read_text())
    assert summary["importances"] == {} and summary["plots"]["param_importances"] is None


def test_report_command(report_dir: tuple[str, Path, dict[str, Path]], tmp_path: Path) -> None:
    url, _, _ = report_dir
    runner = CliRunner()
    result = runner.invoke(app, ["report", "synthetic", "--out", str(tmp_path / "r"),
                                 "--storage", url])
    assert result.exit_code == 0, result.output
    printed = result.output.split()
    assert str(tmp_path / "r" / "report.html") in printed
    assert all(Path(p).is_file() for p in printed)
    result = runner.invoke(app, ["report", "nope", "--out", str(tmp_path / "x"),
                                 "--storage", url])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: study 'nope' does not exist")
    assert not (tmp_path / "x").exists()


def test_a_conditional_param_no_trial_has_does_not_break_the_report(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cond.db'}"
    make_study(url, "cond", searched_momentum=True)
    paths = write_report("cond", url, tmp_path / "out")
    # Drawn over the params every complete trial has (momentum left out), not skipped.
    assert png_size(paths["parallel_coordinate.png"])[0] > 100


def _frozen_trials(spec: StudySpec, n: int, seed: int = 0) -> list[Any]:
    """`n` finished trials of `spec` in memory, as `make_study` adds them: every 3rd pruned."""
    from optuna.trial import TrialState, create_trial

    rng = random.Random(seed)
    dists = _distributions(spec)
    trials = []
    for number in range(n):
        params = {"learning_rate": 10 ** rng.uniform(-4, math.log10(3e-2)),
                  "optimizer": rng.choice(["adamw", "sgd"]), "lora_r": rng.choice([4, 8])}
        final = _loss(params) + rng.gauss(0, 0.003)
        pruned = number % 3 == 2
        curve = {s: final + 1.5 * math.exp(-0.6 * s) for s in range(1, (2 if pruned else
                                                                         STEPS) + 1)}
        t = create_trial(params=params, distributions=dists, intermediate_values=curve,
                         state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
                         value=curve[max(curve)] if pruned else min(curve.values()))
        t.number = number
        trials.append(t)
    return trials


def test_plots_draw_a_bounded_number_of_artists_whatever_the_trials() -> None:
    """A few hundred trials draw what a few dozen past the threshold draw: no line, point
    collection or patch per trial (one line per trial took 39 s at 10,000 trials)."""
    from gemma_search import report

    spec = spec_from_text(demo_spec_text("many", Path("/nonexistent/m"),
                                         Path("/nonexistent/t.jsonl"),
                                         Path("/nonexistent/v.jsonl")))
    trials = _frozen_trials(spec, 600)

    def artists(n: int) -> dict[str, int]:
        subset = trials[:n]
        facts = report._Facts(subset, spec, {"importances": {"learning_rate": 0.9,
                                                             "optimizer": 0.1},
                                             "importance_note": None,
                                             "evaluator": "ped-anova"})
        counted = {}
        for key, fig in (("intermediate", report.intermediate_values_figure(subset, spec)),
                         ("history", report._history_figure(facts)),
                         ("parallel", report._parallel_figure(facts))):
            ax = fig.axes[0]
            counted[key] = len(ax.lines) + len(ax.collections) + len(ax.patches)
        return counted

    few = artists(30)  # 30 trials with evaluations: one line each, as before
    assert few["intermediate"] >= 30
    hundreds, more = artists(300), artists(600)
    assert hundreds == more, (hundreds, more)
    assert hundreds["intermediate"] <= 2 * report._TOP_LINES, hundreds
    assert hundreds["history"] <= 2 and hundreds["parallel"] <= 4, hundreds


def test_report_reads_the_trials_once_and_ranks_importance_once(
        storage_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from optuna.storages import RDBStorage

    from gemma_search import reads

    name = f"once-{tmp_path.name[-16:]}"
    make_study(storage_url, name)
    read: list[str] = []
    importances: list[str] = []
    real_read = reads.read_trials
    real_get_all = RDBStorage.get_all_trials
    real_importances = optuna.importance.get_param_importances

    def read_trials(study: Any) -> Any:
        read.append(study.study_name)
        return real_read(study)

    def get_all(self: Any, *args: Any, **kwargs: Any) -> Any:
        read.append("optuna's get_trials")
        return real_get_all(self, *args, **kwargs)

    def importance(*args: Any, **kwargs: Any) -> Any:
        importances.append("called")
        return real_importances(*args, **kwargs)

    monkeypatch.setattr(reads, "read_trials", read_trials)
    monkeypatch.setattr(RDBStorage, "get_all_trials", get_all)
    monkeypatch.setattr(optuna.importance, "get_param_importances", importance)
    paths = write_report(name, storage_url, tmp_path / "out")
    assert read == [name] and importances == ["called"]
    summary = json.loads(paths["summary.json"].read_text())
    assert list(summary["importances"])[0] == "learning_rate"
    assert summary["recommendation"]["importances"] == summary["importances"]


def test_read_trials_is_what_optuna_reads(storage_url: str, tmp_path: Path) -> None:
    """The report's read of Optuna's tables (`reads.read_trials`) gives Optuna's
    `get_trials`, field for field: infinite values, system attributes, running trials."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from gemma_search.reads import read_trials

    name = f"rows-{tmp_path.name[-16:]}"
    make_study(storage_url, name, n_complete=6, n_pruned=3)
    study, spec = load_study(name, storage_url)
    dists = _distributions(spec)
    study.add_trial(create_trial(
        params={"learning_rate": 1e-3, "optimizer": "sgd", "lora_r": 8}, distributions=dists,
        value=float("inf"), intermediate_values={1: float("-inf"), 2: 0.5},
        system_attrs={"retry_history": [3]}, user_attrs={"nested": {"a": [1, 2]}}))
    study.enqueue_trial({"learning_rate": 2e-3, "optimizer": "adamw", "lora_r": 4})
    running = study.ask()
    running.report(0.7, 1)
    fresh = optuna.load_study(study_name=name, storage=storage_url)
    expected = fresh.get_trials(deepcopy=False)
    got = read_trials(study)
    assert [t.state for t in got].count(TrialState.RUNNING) == 1
    assert len(got) == len(expected) == 11
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.__dict__ == theirs.__dict__, (ours, theirs)
        assert list(ours.params) == list(theirs.params)
