"""Where Optuna meets training: trial -> TrialConfig -> engine -> value and attributes."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from gemma_search.space import trial_config
from gemma_search.spec import StudySpec
from gemma_search.train.data import TaskData
from gemma_search.train.engine import train_trial
from gemma_search.train.model import BaseModel

__all__ = ["Objective", "OptunaReporter"]


class OptunaReporter:
    """The engine's `Reporter`, backed by an Optuna trial."""

    def __init__(self, trial: Any) -> None:
        self._trial = trial

    def report(self, step: int, value: float) -> None:
        self._trial.report(value, step)

    def should_prune(self) -> bool:
        return bool(self._trial.should_prune())


class Objective:
    """Callable for `study.optimize`: trains one trial on the worker's resident model."""

    def __init__(self, spec: StudySpec, base: BaseModel, data: TaskData,
                 on_start: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.base = base
        self.data = data
        self.on_start = on_start
        """Called first in every trial: the worker releases its study lock there."""

    def __call__(self, trial: Any) -> float:
        import optuna

        if self.on_start is not None:
            self.on_start()
        cfg = trial_config(trial, self.spec)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("data_fingerprint", self.data.fingerprint)
        result = train_trial(self.base, self.data, cfg, OptunaReporter(trial))
        # Metrics of the best evaluation, and what the trial cost.
        for key, value in result.metrics.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("tokens_trained", result.tokens_trained)
        trial.set_user_attr("optimizer_steps", result.optimizer_steps)
        trial.set_user_attr("wall_seconds", round(result.wall_seconds, 3))
        trial.set_user_attr("peak_memory_bytes", result.peak_memory_bytes)
        trial.set_user_attr("stop_reason", result.stop_reason)
        if result.stop_reason in ("pruned", "diverged") or result.value is None:
            raise optuna.TrialPruned(result.stop_reason)
        return result.value
