"""One ranking of a study's trials: every command that names a best trial uses it.

`export` (its best single trial and leaderboard.csv), `status`, `report`, `verify`, warm
start from an earlier study (`warm_start.from_study`) and `analysis` (where the good trials
lie) all call `ranked_trials`, so they name the same trial, and the same one as Optuna's own
`study.best_trial` (`optuna best-trial`, optuna-dashboard).

What is ranked: COMPLETE trials with a finite value that are search trials. Verification
re-runs live in a companion study of their own (see `gemma_search.verify`). Databases written
before that kept them inside the search study, tagged with the user attribute `verify_of`:
those are left out here, so such a study ranks as it always did.

Paused trials (`pruner.pause`, `gemma_search.promotion`) rank too, by their best value so
far: a copy of the trial whose value is that best, still WAITING and still carrying its
`paused` record, so every reader can mark it (`is_paused`). At an equal value a complete
trial ranks before a paused one.

Ties: equal values rank by trial number, the earlier trial first. Optuna leaves the order of
equal values to the database's sort; with a loss that never matters, but an accuracy on a
small validation set can tie, and then `optuna best-trial` may name another of the tied
trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gemma_search.promotion import PAUSED
from gemma_search.spec import StudySpec

__all__ = ["VERIFY_OF", "is_verification", "ranked_trials", "search_trials"]

#: User attribute of a verification re-run: the number of the search trial it re-runs.
VERIFY_OF = "verify_of"


def is_verification(trial: Any) -> bool:
    """Whether `trial` (frozen or live) re-runs another trial on a new seed."""
    return VERIFY_OF in trial.user_attrs


def search_trials(study_or_trials: Any) -> list[Any]:
    """The trials `ranked_trials` ranks, in trial-number order: COMPLETE, a finite value
    (inf and NaN would poison ranges and importances), not a verification re-run.

    `study_or_trials`: an Optuna study, or trials already read from one.
    """
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.WAITING)
    if isinstance(study_or_trials, Sequence):
        trials = [t for t in study_or_trials if t.state in states]
    else:
        trials = study_or_trials.get_trials(deepcopy=False, states=states)
    trials = [_as_ranked(t) if t.state == TrialState.WAITING else t for t in trials]
    return sorted((t for t in trials if t is not None and t.value is not None
                   and math.isfinite(t.value) and not is_verification(t)),
                  key=lambda t: t.number)


def _as_ranked(trial: Any) -> Any:
    """A paused trial as the ranking holds it: a copy valued at its best so far. None for a
    waiting trial that is not paused (queued, it has no result)."""
    import copy

    paused = trial.system_attrs.get(PAUSED)
    if not paused or paused.get("best_value") is None:
        return None
    ranked = copy.copy(trial)
    ranked._values = [float(paused["best_value"])]
    return ranked


def ranked_trials(study_or_trials: Any, spec: StudySpec) -> list[Any]:
    """`search_trials`, best first by the spec's objective; at an equal value a complete
    trial before a paused one, then the earlier trial."""
    from optuna.trial import TrialState

    sign = -1.0 if spec.direction == "maximize" else 1.0
    return sorted(search_trials(study_or_trials),
                  key=lambda t: (sign * t.value, t.state != TrialState.COMPLETE, t.number))
