"""Per-trial sampler seeds: a fixed `sampler.seed` reproduces a search and never repeats a trial.

A sampler seeded once per process replays its random draws whenever the process starts
again: a worker restarted by `launch`, or relaunched after SIGTERM, proposed its first
start-up configurations a second time (issue 12: 6 completed trials, 3 distinct
configurations). Trial numbers are unique in a study and never reused, so a sampler seeded
from (spec seed, trial number) draws afresh for every trial, whichever worker or process
asks, and still draws the same for the same trial of the same study history.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from optuna.samplers import BaseSampler

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.study import Study
    from optuna.trial import FrozenTrial, TrialState

__all__ = ["TrialSeededSampler", "trial_seed"]


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial `number` under spec seed `seed`: 32 bits, as numpy's RandomState
    takes them; distinct trials get unrelated streams, not neighbouring ones."""
    digest = hashlib.sha256(f"gemma-search:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class TrialSeededSampler(BaseSampler):
    """Runs each trial on a fresh sampler from `make(trial_seed(seed, trial.number))`.

    Fresh rather than reseeded: Optuna's samplers keep their random state in private
    attributes (two generators each in TPE, GP and CMA-ES), and a sampler built from a seed
    holds exactly the state that seed gives. A fresh sampler loses its caches (TPE's search
    space, GP's last kernel fit) and recomputes them from the study, in under a second
    (figures in docs/reliability.md) beside a trial that trains for minutes. In exchange
    nothing of one trial leaks into the next: a restarted worker samples as an uninterrupted
    one would have.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        # Used only for calls that precede any `before_trial` (an `after_trial` of a trial
        # this process did not sample, e.g. a stale one failed by `fail_stale_trials`).
        self._sampler = make(seed)

    def __str__(self) -> str:
        return f"{self._sampler} (seeded per trial from {self._seed})"

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        # Optuna calls this first for every trial, before any sampling, with its number.
        self._sampler = self._make(trial_seed(self._seed, trial.number))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        pass  # every trial is seeded from its number already
