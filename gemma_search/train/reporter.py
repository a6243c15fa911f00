"""The seam between training and whatever decides to stop it (Optuna, in practice)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

__all__ = ["NullReporter", "Reporter"]


class Reporter(Protocol):
    """Receives the validation value at fixed points and answers whether to stop."""

    def report(self, step: int, value: float, metrics: Mapping[str, float]) -> None:
        """Record `value` of the objective metric at evaluation number `step` (1-based).

        `metrics` is the whole evaluation: optimizer step, tokens trained and every metric.
        """

    def should_prune(self) -> bool:
        """True when the run should stop now because it looks weak."""

    def should_pause(self) -> bool:
        """True when the run should stop here, checkpointed, to be resumed later (a rung of
        a scheduler that pauses trials, `gemma_search.promotion`). Asked after
        `should_prune`, at evaluations before the last."""

    def token_cap(self) -> int | None:
        """The tokens trained (cumulative) the run must not pass: its share of a study-wide
        token budget. Reaching it, the run pauses, checkpointed. None: no cap."""


class NullReporter:
    """A reporter that never prunes: for plain training runs and tests."""

    def __init__(self) -> None:
        self.values: dict[int, float] = {}

    def report(self, step: int, value: float, metrics: Mapping[str, float]) -> None:
        self.values[step] = value

    def should_prune(self) -> bool:
        return False

    def should_pause(self) -> bool:
        return False

    def token_cap(self) -> int | None:
        return None
