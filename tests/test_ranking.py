"""One ranking for every command: search trials only, finite values, ties to the earlier."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from gemma_search.ranking import ranked_trials, search_trials
from gemma_search.spec import spec_from_text

from .conftest import demo_spec_text


def _study(values: list[tuple[float, dict[str, int]]], direction: str) -> optuna.Study:
    study = optuna.create_study(direction=direction)
    for value, attrs in values:
        study.add_trial(create_trial(params={"x": 0.5}, value=value, user_attrs=attrs,
                                     distributions={"x": FloatDistribution(0, 1)}))
    study.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values={1: -9.0}))
    return study


def test_ranked_trials_leave_out_reruns_and_non_finite_values_and_ties_go_to_the_earlier(
        tmp_path: Path) -> None:
    text = demo_spec_text("r", tmp_path / "m", tmp_path / "t.jsonl", tmp_path / "v.jsonl")
    minimize = spec_from_text(text)  # val_loss
    maximize = spec_from_text(text + "objective: {metric: accuracy}\n")
    values = [(0.5, {}), (0.3, {}), (float("inf"), {}), (0.3, {}), (0.1, {"verify_of": 1}),
              (0.9, {})]
    study = _study(values, "minimize")
    assert [t.number for t in ranked_trials(study, minimize)] == [1, 3, 0, 5]
    assert [t.number for t in search_trials(study)] == [0, 1, 3, 5]
    # Trials read once rank the same as the study; maximize turns the order round, and
    # equal values still go to the earlier trial.
    assert [t.number for t in ranked_trials(study.trials, minimize)] == [1, 3, 0, 5]
    maximizing = _study(values, "maximize")
    assert [t.number for t in ranked_trials(maximizing, maximize)] == [5, 0, 1, 3]
