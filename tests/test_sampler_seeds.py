"""Sampler seeds (issue 12, part 5): restarted workers never replay a configuration.

Each run below is `gemma_search.worker.run_worker` itself: the study from `load_study`, the
sampler from `build_sampler`, a trial claimed under the study lock and sampled by
`space.trial_config` on the trial the worker asked for. Only the training is replaced: the
objective scores the sampled configuration with a fixed formula, so TPE, GP and CMA-ES
see the same results on every run. A restart is `run_worker` called again: it loads the
study and builds its sampler anew, as a new process does.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from .conftest import demo_spec_text

STUDY = "seeds"
PARAMS = ("learning_rate", "optimizer", "lora_r")
SAMPLERS = ["tpe", "random", "gp", pytest.param("cmaes", marks=pytest.mark.skipif(
    importlib.util.find_spec("cmaes") is None, reason="CmaEsSampler needs the cmaes package"))]


class ScoreOnly:
    """Stands in for `gemma_search.objective.Objective`: samples the configuration through
    `trial_config`, as the real objective's first line does, and scores it without training."""

    def __init__(self, spec: Any, base: Any, data: Any, engine: Any, *, on_start: Any = None,
                 stop_requested: Any = None, status: Any = None, at_rung: Any = None) -> None:
        self.spec, self.on_start, self.last_error = spec, on_start, None

    def __call__(self, trial: Any) -> float:
        from gemma_search.space import trial_config

        if self.on_start is not None:
            self.on_start()  # the worker's study lock is released here
        cfg = trial_config(trial, self.spec)
        return ((math.log10(cfg.learning_rate) + 2.7) ** 2
                + (0.05 if cfg.optimizer == "sgd" else 0.0) + (0.01 if cfg.lora_r == 8 else 0.0))


class StopAfter:
    """The worker's stop flag, raised once `trials` more trials have finished: a SIGTERM
    between trials, after which the process exits and is started again."""

    def __init__(self, url: str, trials: int) -> None:
        self._url, self._until = url, len(configurations(url)) + trials

    @property
    def requested(self) -> bool:
        return len(configurations(self._url)) >= self._until

    def __call__(self) -> bool:
        return self.requested


@pytest.fixture(autouse=True)
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers without a model: everything else in `run_worker` is the real thing."""
    import gemma_search.objective
    import gemma_search.worker

    cpu = SimpleNamespace(device=SimpleNamespace(type="cpu", index=None))
    monkeypatch.setattr(gemma_search.worker, "load_resources", lambda spec: (cpu, None))
    monkeypatch.setattr(gemma_search.worker, "_baselines", lambda *args: None)
    monkeypatch.setattr(gemma_search.objective, "Objective", ScoreOnly)


def make_study(url: str, sampler: str, max_trials: int, extra: str = "") -> None:
    from gemma_search.spec import spec_from_text
    from gemma_search.study import create_study

    missing = Path("/nonexistent")  # nothing reads data or a model here
    text = demo_spec_text(STUDY, missing / "model", missing / "train.jsonl",
                          missing / "validation.jsonl", max_trials=max_trials, extra=extra)
    text = text.replace("sampler: {type: tpe, seed: 0, n_startup_trials: 3}",
                        f"sampler: {{type: {sampler}, seed: 7, n_startup_trials: 6}}")
    create_study(spec_from_text(text), url)


def configurations(url: str) -> list[tuple[Any, ...]]:
    """The configuration of every finished trial, in trial-number order."""
    import optuna
    from optuna.trial import TrialState

    trials = optuna.load_study(study_name=STUDY, storage=url).get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,))
    return [tuple(t.params[p] for p in PARAMS) for t in sorted(trials, key=lambda t: t.number)]


def run(url: str, index: int = 0, trials: int | None = None) -> None:
    """One worker process's life: until the budget is spent, or `trials` trials."""
    from gemma_search.worker import StopFlag, run_worker

    stop = StopFlag() if trials is None else StopAfter(url, trials)
    run_worker(STUDY, url, index=index, stop=stop)  # type: ignore[arg-type]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_restarted_worker_never_repeats_and_samples_as_if_uninterrupted(
        tmp_path: Path, sampler: str) -> None:
    once, restarted = f"sqlite:///{tmp_path / 'once.db'}", f"sqlite:///{tmp_path / 'again.db'}"
    for url in (once, restarted):
        make_study(url, sampler, max_trials=12)
    run(once)
    for _ in range(4):  # started, then restarted three times, 3 trials each
        run(restarted, trials=3)
    got = configurations(restarted)
    assert len(got) == 12 and len(set(got)) == 12, got
    # A restart changes nothing the study proposes: trial N draws from (seed, N).
    assert got == configurations(once)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_two_workers_never_propose_the_same_configuration(tmp_path: Path, sampler: str) -> None:
    url = f"sqlite:///{tmp_path / 'two.db'}"
    make_study(url, sampler, max_trials=12)
    for turn in range(6):  # workers 0 and 1 take turns, each restarted every 2 trials
        run(url, index=turn % 2, trials=2)
    got = configurations(url)
    assert len(got) == 12 and len(set(got)) == 12, got


def test_fixed_seed_reproduces_a_single_worker_run(tmp_path: Path) -> None:
    """A warm start that fixes only the learning rate: the sampler picks the rest, as it
    does for every later trial, and the same seed picks the same on a fresh database."""
    runs = []
    for name in ("first", "second"):
        url = f"sqlite:///{tmp_path / name}.db"
        make_study(url, "tpe", max_trials=8,
                   extra="warm_start: {configs: [{learning_rate: 1.0e-3}]}")
        run(url)
        runs.append(configurations(url))
    assert len(runs[0]) == 8 and runs[0][0][0] == 1.0e-3
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 8


def test_trial_seeds_differ_by_seed_and_trial() -> None:
    from gemma_search.sampler import trial_seed

    seeds = {trial_seed(seed, number) for seed in (0, 1, 7, -3) for number in range(500)}
    assert len(seeds) == 2000
    assert all(0 <= s < 2**32 for s in seeds)
    assert trial_seed(7, 3) == trial_seed(7, 3)
